"""Plugging synchronous ZeroMQ sockets into an asyncio loop, without a task per message.

pyzmq's asyncio sockets create a future (and reschedule poll events) for every receive;
on a small-message round trip that costs about 3x the time of the message itself. Here a
socket's notification FD is registered with ``loop.add_reader`` once, and a callback drains
every message that is ready with non-blocking receives.

The FD is edge-triggered (libzmq's rule): it signals a *change*, and any operation on the
socket, a send included, can consume that signal while input is still pending. So the drain
loops until ``EVENTS`` says nothing is left, and whoever sends on a socket calls
:meth:`SocketReader.kick` afterwards, which re-checks ``EVENTS``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

import zmq

log = logging.getLogger(__name__)

# Messages handled per loop turn before yielding, so that one busy socket cannot starve
# the other tasks of the loop.
BATCH = 64
# Frames smaller than this are copied: for small frames a copy is cheaper than the
# bookkeeping of a zero-copy zmq.Frame (measured: 21 vs 29 us per small round trip).
COPY_BELOW = 64 * 1024

# The Cython methods under pyzmq's Python wrappers, and plain ints instead of its enums: on
# this path the wrappers' argument handling and enum arithmetic cost more than the I/O.
_get = zmq.backend.Socket.get
_recv = zmq.backend.Socket.recv
_send = zmq.backend.Socket.send
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
_NOBLOCK, _MORE = int(zmq.NOBLOCK), int(zmq.NOBLOCK | zmq.SNDMORE)


class SocketReader:
    """Calls ``on_message(parts)`` for each multipart message ``sock`` receives.

    ``on_message`` runs inside the event loop and must not block. If it returns an
    awaitable, reading pauses until that completes: that is how a receiver pushes back on
    its senders (they then block on ZeroMQ's high-water mark).

    The first ``copied`` frames of each message arrive as bytes (envelope frames are
    small); the rest as zmq.Frame objects whose ``.buffer`` views libzmq's memory
    without a copy (out-of-band tensor data).
    """

    def __init__(self, sock: zmq.Socket,
                 on_message: Callable[[list], Awaitable | None], *, copied: int = 1 << 30):
        self.sock = sock
        self.on_message = on_message
        self.copied = copied
        self.loop = asyncio.get_running_loop()
        self._fd = sock.getsockopt(zmq.FD)
        self._paused = False
        self._scheduled = False
        self._kicked = False
        self._closed = False
        self.loop.add_reader(self._fd, self._drain, True)
        self.kick()  # messages that arrived before the reader was registered

    def kick(self) -> None:
        """Drain soon if input is pending (call after sending on this socket)."""
        if self._scheduled or self._paused or self._closed or self._kicked:
            return
        # Checked once per loop turn, after all of the turn's sends: one EVENTS read (3 us)
        # instead of one per send when many go out together (pipelined calls, a batch of
        # replies).
        self._kicked = True
        self.loop.call_soon(self._check)

    def _check(self) -> None:
        self._kicked = False
        if self._scheduled or self._paused or self._closed:
            return
        if _get(self.sock, _EVENTS) & _POLLIN:
            self._drain()

    def _drain(self, woken: bool = False) -> None:
        """Receive what is pending, up to BATCH messages. ``woken``: called because the FD
        fired, the usual way a lone message arrives (see below)."""
        self._scheduled = False
        if self._paused or self._closed:
            return
        sock = self.sock
        for i in range(BATCH):
            try:
                # As a zmq.Frame, whose `more` comes with it: reading RCVMORE instead costs a
                # getsockopt and an enum conversion in pyzmq per frame.
                frame = _recv(sock, _NOBLOCK, False)
            except zmq.Again:
                # Reading EVENTS re-arms the edge-triggered FD (libzmq's rule), so that the
                # next message wakes the loop; None pending now.
                if _get(sock, _EVENTS) & _POLLIN:
                    continue
                return
            parts = [frame.bytes]
            while frame.more:
                frame = _recv(sock, 0, False)
                parts.append(frame.bytes if len(parts) < self.copied else frame)
            wait = self.on_message(parts)
            if wait is not None:
                self._pause(wait)
                return
            if self._closed:
                return
            if woken:
                # Likely a lone message, the usual case with one call in flight. Reading
                # EVENTS re-arms the FD as above, without first raising zmq.Again (about
                # 8 us); kick's check does it after what this message woke (the task
                # awaiting the answer, the actor's worker) has run, so that the read is not
                # on the way of the reply, and merged with the check after its send. The
                # check then drains whatever else is there, in batches.
                self.kick()
                return
        self._scheduled = True
        self.loop.call_soon(self._drain)

    def _pause(self, wait: Awaitable) -> None:
        self._paused = True
        asyncio.ensure_future(wait).add_done_callback(self._resume)

    def _resume(self, _fut) -> None:
        self._paused = False
        if not self._closed:
            self._drain()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.loop.remove_reader(self._fd)


def try_send(sock: zmq.Socket, parts: list, reader: SocketReader | None = None) -> bool:
    """Queue one multipart message if it fits now (then kick ``reader``); False at the
    high-water mark, with nothing queued (then :func:`send_when_room`). The usual case
    needs no coroutine. Large buffers go without a copy: keep them unmodified until sent."""
    last = len(parts) - 1
    try:
        for i, part in enumerate(parts):
            copy = type(part) is not memoryview or part.nbytes < COPY_BELOW
            _send(sock, part, _MORE if i < last else _NOBLOCK, copy)
    except zmq.Again:
        # Only the first part can meet the high-water mark: libzmq queues the parts of a
        # message atomically, so nothing was queued.
        return False
    if reader is not None:
        reader.kick()
    return True


async def send_when_room(sock: zmq.Socket, parts: list, reader: SocketReader | None = None,
                         deadline: float | None = None) -> None:
    """Send a message that :func:`try_send` refused (the peer's queue is at its high-water
    mark, the peer is not reading), without blocking the loop: retry with a short back-off
    until it fits, or raise TimeoutError once ``deadline`` (loop time) has passed. libzmq
    queues the parts of a message atomically, so a refusal means none of them was queued."""
    delay = 0.0005
    while True:
        if deadline is not None and asyncio.get_running_loop().time() >= deadline:
            raise TimeoutError("the peer's queue stayed full (high-water mark) until "
                               "the deadline")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.02)
        if try_send(sock, parts, reader):
            return
