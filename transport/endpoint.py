"""One process's presence on the wire: a bound ROUTER and one DEALER per remote endpoint.

Traffic has a direction. Whatever a caller sends (calls, tells, stream opens, credits,
cancels) goes out of the caller's DEALER for that address into the callee's ROUTER;
whatever a callee sends back (replies, errors, stream items and ends) goes out of the
callee's ROUTER to the route (the DEALER identity) the request came from. So each socket
has exactly one receive loop, and a reply can only reach the connection that asked.

Liveness. Every socket runs ZMTP heartbeats (``Heartbeat``), which libzmq's I/O thread
answers even while the application's event loop is busy. A DEALER whose peer dies (process
killed: the kernel closes the TCP connection; host gone: the heartbeat times out) sees the
connection close; the endpoint then drops that DEALER and reports ``on_peer_lost`` once, so
that everything waiting on that peer fails at once instead of at its deadline. A later send
to the same address opens a fresh connection.

Routes. A callee learns that a caller is gone only by trying to reach it: ROUTER_MANDATORY
makes a send to a vanished route fail with EHOSTUNREACH instead of being dropped silently.
``reply`` returns False in that case and ``probe`` sends a HEARTBEAT for exactly this check.

Bad input never reaches the handler: headers are validated (:mod:`transport.envelope`),
sizes are checked against :class:`transport.codec.Limits`, and a message that breaks a rule
gets an ERROR reply when its correlation id could be read (the connection stays usable) or
is dropped with a log line and a counter. An answer that breaks a rule is replaced, for the
handler, by an ERROR for the call it answers, so that the call fails at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections import Counter
from dataclasses import dataclass
from functools import partial
from typing import Awaitable, Protocol, Sequence

import msgpack
import zmq
from zmq.utils.monitor import parse_monitor_message

from . import auth
from .codec import Limits
from .envelope import Envelope, EnvelopeError, Kind, pack_header, unpack_header
from .reactor import SocketReader, send_when_room, try_send

log = logging.getLogger(__name__)

# Kinds a caller sends (arrive on the ROUTER) and kinds a callee sends (arrive on a DEALER).
TO_CALLEE = frozenset({Kind.CALL, Kind.TELL, Kind.STREAM, Kind.CANCEL, Kind.CREDIT, Kind.HEARTBEAT})
TO_CALLER = frozenset({Kind.REPLY, Kind.ERROR, Kind.STREAM_ITEM, Kind.STREAM_END, Kind.HEARTBEAT})
_ANSWERS = TO_CALLER - {Kind.HEARTBEAT}
_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


@dataclass(frozen=True)
class Heartbeat:
    """ZMTP heartbeats: a peer that answers nothing for ``timeout`` seconds is dead."""

    interval: float = 1.0
    timeout: float = 5.0


@dataclass(slots=True)
class Incoming:
    """One validated message. ``route`` is set when it arrived on our ROUTER (a request:
    answer with :meth:`Endpoint.reply`); ``peer`` when it arrived on the DEALER to that
    address (an answer to one of our requests)."""

    envelope: Envelope
    frames: list  # the codec's frames (body, *buffers), as buffers over the received memory
    route: bytes | None = None
    peer: str | None = None


class Handler(Protocol):
    def on_message(self, msg: Incoming) -> Awaitable | None:
        """Called from the event loop for each valid message; must not block. Returning
        an awaitable pauses reading from that socket until it completes (backpressure)."""

    def on_peer_lost(self, address: str, reason: str) -> None:
        """The endpoint at ``address`` is gone: nothing sent to it will be answered."""


class TransportError(RuntimeError):
    pass


class _Connection:
    """Our DEALER to one remote endpoint, with its reader and its monitor."""

    def __init__(self, endpoint: "Endpoint", address: str, sock: zmq.Socket):
        self.address = address
        self.sock = sock
        self.lost = False
        self.connected = False
        # copied: the header and the body; out-of-band buffers stay zero-copy.
        self.reader = SocketReader(sock, partial(endpoint._on_dealer, self), copied=2)
        self.monitor = sock.get_monitor_socket(
            zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | _HANDSHAKE_FAILED)
        # A peer that never answers the handshake (nothing listens there any more) is as
        # dead as one whose connection closed: give up after the heartbeat timeout.
        self.check = asyncio.get_running_loop().call_later(
            endpoint.heartbeat.timeout, endpoint._check_connected, self)
        self.monitor_reader = SocketReader(
            self.monitor, lambda parts: endpoint._on_dealer_event(self, parts))

    def close(self, linger: float) -> None:
        self.lost = True
        self.check.cancel()
        self.reader.close()
        self.monitor_reader.close()
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=int(linger * 1000))


class Endpoint:
    """Binds one ROUTER at ``bind`` and connects DEALERs on demand.

    ``secret`` enables CURVE authentication and encryption (see :mod:`transport.auth`);
    all endpoints of a cluster must share it. ``counters`` counts what was dropped or
    rejected and why.
    """

    def __init__(self, handler: Handler, bind: str = "tcp://127.0.0.1:0", *,
                 secret: bytes | None = None, limits: Limits = Limits(),
                 heartbeat: Heartbeat = Heartbeat(), hwm: int = 1000):
        self.handler = handler
        self.bind_address = bind
        self.limits = limits
        self.heartbeat = heartbeat
        self.hwm = hwm
        self.keys = auth.derive_keys(secret) if secret is not None else None
        self.counters: Counter[str] = Counter()
        self.address: str = ""
        self._identity = uuid.uuid4().bytes
        self._ctx: zmq.Context | None = None
        self._router: zmq.Socket | None = None
        self._readers: list[SocketReader] = []
        self._zap: auth.ZapHandler | None = None
        self._conns: dict[str, _Connection] = {}
        self._expected_losses: set[str] = set()
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> str:
        """Bind and start receiving. Returns the bound address (port resolved)."""
        self._ctx = zmq.Context()
        if self.keys is not None:
            self._zap = auth.ZapHandler(self._ctx, self.keys)
        router = self._ctx.socket(zmq.ROUTER)
        self._configure(router)
        router.router_mandatory = 1  # a reply to a vanished route raises, never vanishes
        # Backpressure stops reading this socket; libzmq then stops reading the connections
        # whose queue is full, heartbeats included, and a heartbeat timeout here would cut a
        # caller that is alive and merely held back (losing what it had queued). Callers
        # still notice if this side dies (its pings stop); a caller whose host vanished is
        # found by TCP keepalive, which the kernel answers whatever the queues hold.
        router.heartbeat_timeout = 24 * 3600 * 1000
        router.tcp_keepalive = 1
        router.tcp_keepalive_idle = max(1, round(self.heartbeat.timeout))
        router.tcp_keepalive_intvl = max(1, round(self.heartbeat.interval))
        router.tcp_keepalive_cnt = 3
        if self.keys is not None:
            auth.configure_server(router, self.keys)
        if self.bind_address.startswith("ipc://"):
            _remove_stale_ipc(self.bind_address)
        try:
            router.bind(self.bind_address)
        except zmq.ZMQError as exc:
            router.close(linger=0)
            self._ctx.term()
            raise TransportError(f"cannot bind {self.bind_address}: {exc}") from None
        self.address = router.last_endpoint.decode()
        self._router = router
        monitor = router.get_monitor_socket(_HANDSHAKE_FAILED)
        self._readers = [SocketReader(router, self._on_router, copied=3),
                         SocketReader(monitor, self._on_router_event)]
        self._monitor = monitor
        return self.address

    async def close(self, linger: float = 0.0) -> None:
        """Stop receiving and close every socket, waiting at most ``linger`` seconds for
        messages not yet sent (0: drop them)."""
        if self._closed or self._ctx is None:
            return
        self._closed = True
        for conn in list(self._conns.values()):
            self._drop(conn, linger)
        for reader in self._readers:
            reader.close()
        self._router.disable_monitor()
        self._monitor.close(linger=0)
        self._router.close(linger=int(linger * 1000))
        if self._zap is not None:
            self._zap.close()
        self._ctx.term()
        if self.address.startswith("ipc://"):
            _remove_stale_ipc(self.address)

    def _configure(self, sock: zmq.Socket) -> None:
        # linger 0 by default: closing must never hang on a peer that stopped reading.
        sock.linger = 0
        sock.sndhwm = sock.rcvhwm = self.hwm
        ivl = int(self.heartbeat.interval * 1000)
        timeout = int(self.heartbeat.timeout * 1000)
        sock.heartbeat_ivl, sock.heartbeat_timeout, sock.heartbeat_ttl = ivl, timeout, timeout
        # No ZMQ_MAXMSGSIZE: libzmq answers a frame over it by cutting the connection, which
        # the peer sees as this process dying. The limits are checked per message instead,
        # so that an over-limit message of any size gets an error reply (see _admit).

    # -- sending -----------------------------------------------------------------------

    def send_nowait(self, address: str, env: Envelope, frames: Sequence = ()) -> bool:
        """Send a request-side message to the endpoint at ``address`` (connecting if needed)
        if the peer's queue has room now; False, with nothing sent, at its high-water mark
        (then :meth:`send`). The usual case, without a coroutine."""
        conn = self._conns.get(address) or self._connect(address)
        return try_send(conn.sock, [pack_header(env), *frames], conn.reader)

    async def send(self, address: str, env: Envelope, frames: Sequence = (),
                   deadline: float | None = None) -> None:
        """Send a request-side message to the endpoint at ``address`` (connecting if needed).
        Messages to one address leave in the order of the calls. Waits only while the
        peer's queue is at its high-water mark, until ``deadline`` (loop time), then
        raises TimeoutError."""
        if not self.send_nowait(address, env, frames):
            conn = self._conns.get(address) or self._connect(address)
            await send_when_room(conn.sock, [pack_header(env), *frames], conn.reader, deadline)

    def reply_nowait(self, route: bytes, env: Envelope, frames: Sequence = ()) -> bool | None:
        """:meth:`reply` without waiting: True when sent, False when the route is gone
        (counted and logged), None when the caller's queue is full now (then :meth:`reply`)."""
        if self._closed:
            return False
        try:
            return True if try_send(self._router, [route, pack_header(env), *frames],
                                    self._readers[0]) else None
        except zmq.ZMQError as exc:
            return self._unroutable(exc, env)

    async def reply(self, route: bytes, env: Envelope, frames: Sequence = (),
                    deadline: float | None = None) -> bool:
        """Send an answer back to ``route``. Returns False, counted and logged, when the
        route is gone (its process died or closed the connection), or when its queue stays
        at the high-water mark (the caller reads nothing) until ``deadline`` (loop time)."""
        sent = self.reply_nowait(route, env, frames)
        if sent is not None:
            return sent
        try:
            await send_when_room(self._router, [route, pack_header(env), *frames],
                                 self._readers[0], deadline)
            return True
        except TimeoutError:
            self.counters["reply_queue_full"] += 1
            log.warning("%s: %s for call %d dropped: the caller has not read its answers "
                        "until the deadline", self.address, env.kind.name, env.corr)
            return False
        except zmq.ZMQError as exc:
            return self._unroutable(exc, env)

    def _unroutable(self, exc: zmq.ZMQError, env: Envelope) -> bool:
        if exc.errno != zmq.EHOSTUNREACH:
            raise exc
        self.counters["reply_unroutable"] += 1
        log.info("%s: %s for call %d dropped: the caller is gone", self.address,
                 env.kind.name, env.corr)
        return False

    async def probe(self, route: bytes) -> bool:
        """True while the connection behind ``route`` is still open and its caller reads
        (its queue is not full for a heartbeat timeout)."""
        deadline = asyncio.get_running_loop().time() + self.heartbeat.timeout
        return await self.reply(route, Envelope(Kind.HEARTBEAT), (), deadline)

    def _connect(self, address: str) -> _Connection:
        if self._closed:
            raise TransportError(f"endpoint {self.address} is closed")
        sock = self._ctx.socket(zmq.DEALER)
        self._configure(sock)
        sock.routing_id = self._identity + os.urandom(4)
        if self.keys is not None:
            auth.configure_client(sock, self.keys)
        conn = self._conns[address] = _Connection(self, address, sock)
        # Connect only once the monitor listens: libzmq does not report a handshake that
        # finished before, and the peer would then be declared lost at the timeout.
        try:
            sock.connect(address)
        except zmq.ZMQError:
            self._drop(conn)
            raise
        return conn

    def expect_loss(self, address: str) -> None:
        """The peer at ``address`` is being stopped on purpose: log its loss quietly."""
        self._expected_losses.add(address)

    def forget(self, address: str) -> None:
        """Close the connection to ``address`` without reporting a loss (its peer is known
        to be gone); the next send opens a fresh one."""
        conn = self._conns.get(address)
        if conn is not None:
            self._drop(conn)

    def _drop(self, conn: _Connection, linger: float = 0.0) -> None:
        if self._conns.get(conn.address) is conn:
            del self._conns[conn.address]
        conn.close(linger)

    def _lose(self, conn: _Connection, reason: str) -> None:
        if conn.lost:
            return
        self.counters["peers_lost"] += 1
        expected = conn.address in self._expected_losses
        self._expected_losses.discard(conn.address)
        log.log(logging.INFO if expected else logging.WARNING,
                "%s: peer %s lost: %s", self.address, conn.address, reason)
        self._drop(conn)
        self.handler.on_peer_lost(conn.address, reason)

    # -- receiving ---------------------------------------------------------------------

    def _on_router(self, parts: list) -> Awaitable | None:
        route = parts[0]
        msg = self._admit(parts[1:], TO_CALLEE, route=route)
        if msg is None or msg.envelope.kind is Kind.HEARTBEAT:
            return None
        return self._dispatch(msg)

    def _on_dealer(self, conn: _Connection, parts: list) -> Awaitable | None:
        msg = self._admit(parts, TO_CALLER, peer=conn.address)
        if msg is None or msg.envelope.kind is Kind.HEARTBEAT:
            return None
        return self._dispatch(msg)

    def _dispatch(self, msg: Incoming) -> Awaitable | None:
        try:
            return self.handler.on_message(msg)
        except Exception:  # a handler bug must not kill the receive loop
            self.counters["handler_errors"] += 1
            log.exception("%s: handler failed on %s", self.address, msg.envelope)
            return None

    def _admit(self, parts: list, allowed: frozenset, *, route: bytes | None = None,
               peer: str | None = None) -> Incoming | None:
        """Validate one raw message; answer or drop what breaks a rule."""
        if not parts:
            return self._reject("empty message", None, route, peer)
        try:
            env = unpack_header(parts[0])
        except EnvelopeError as exc:
            return self._reject(str(exc), exc.corr, route, peer, exc.kind)
        if env.kind not in allowed:
            return self._reject(f"{env.kind.name} is not valid in this direction",
                                env.corr, route, peer, env.kind)
        frames = parts[1:]
        problem = self._check_limits(frames)
        if problem:
            return self._reject(problem, env.corr, route, peer, env.kind)
        return Incoming(env, frames, route, peer)

    def _check_limits(self, frames: list) -> str | None:
        """What breaks the limits in ``frames``, if anything; zmq.Frames in it become
        their buffers on the way."""
        lim = self.limits
        if len(frames) > lim.max_frames + 1:
            return f"message has {len(frames)} frames, limit is {lim.max_frames + 1}"
        total = 0
        for i, frame in enumerate(frames):
            if type(frame) is bytes:
                size = len(frame)
            else:
                frame = frames[i] = frame.buffer
                size = frame.nbytes
            if size > lim.max_frame_bytes:
                return f"frame of {size} bytes exceeds the limit of {lim.max_frame_bytes}"
            total += size
        if total > lim.max_message_bytes:
            return f"message of {total} bytes exceeds the limit of {lim.max_message_bytes}"
        return None

    def _reject(self, problem: str, corr: int | None, route: bytes | None,
                peer: str | None, kind: int | None = None) -> None:
        self.counters["rejected"] += 1
        origin = f"route {route.hex()[:12]}" if route is not None else f"peer {peer}"
        log.warning("%s: rejected message from %s: %s", self.address, origin, problem)
        # Only requests get an error reply; answering an answer could ping-pong forever.
        if route is not None and corr is not None and kind in (Kind.CALL, Kind.STREAM, None):
            body = msgpack.packb({"code": "bad_request", "type": "BadRequest",
                                  "message": problem, "traceback": ""})
            try:
                sent = try_send(self._router, [route, pack_header(Envelope(Kind.ERROR, corr)),
                                               body], self._readers[0])
            except zmq.ZMQError as exc:
                sent = exc
            if sent is not True:
                log.info("%s: could not send the rejection: %s", self.address,
                         sent or "the caller's queue is full")
        # An answer we cannot accept still says which call it answers: fail that call now,
        # not at its deadline.
        if route is None and corr is not None and kind in _ANSWERS:
            body = msgpack.packb({"code": "bad_request", "type": "BadRequest", "traceback": "",
                                  "message": f"the answer from {peer} was refused: {problem}"})
            wait = self._dispatch(Incoming(Envelope(Kind.ERROR, corr), [body], peer=peer))
            if wait is not None:
                asyncio.ensure_future(wait)
        return None

    # -- monitors ----------------------------------------------------------------------

    def _on_router_event(self, parts: list) -> None:
        event = parse_monitor_message(parts)
        self.counters["handshake_failures"] += 1
        log.warning("%s: rejected a connection from %s: authentication failed",
                    self.address, event.get("endpoint", b"?").decode(errors="replace"))

    def _check_connected(self, conn: _Connection) -> None:
        if not conn.connected:
            self._lose(conn, f"no connection within {self.heartbeat.timeout:g}s "
                             "(nothing listens there, or the network is down)")

    def _on_dealer_event(self, conn: _Connection, parts: list) -> None:
        event = parse_monitor_message(parts)
        if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            conn.connected = True
            return
        if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            reason = "authentication failed (is the cluster secret the same on both sides?)"
        elif event["event"] & _HANDSHAKE_FAILED:
            reason = ("handshake failed (a different cluster secret, or the peer closed "
                      "during the handshake)")
        else:
            reason = "connection closed (process exited or heartbeat timed out)"
        self._lose(conn, reason)


def _remove_stale_ipc(address: str) -> None:
    try:
        os.unlink(address[len("ipc://"):])
    except FileNotFoundError:
        pass
