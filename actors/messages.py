"""What travels inside one actor system: requests to an actor and where their answers go.

A :class:`Request` is one message in a mailbox. Its :class:`Sink` is where the answer goes:
straight to a waiting future or stream queue when the caller lives in the same process
(:class:`LocalSink`), or back over the wire to the caller's route (``RemoteSink`` in
:mod:`actors.system`). Streams use credit-based flow control: the producer may send one
item per credit and waits when it has none; the consumer grants credit as it takes items.
"""

from __future__ import annotations

import asyncio
import enum
from typing import Any


class Call(enum.Enum):
    ASK = "ask"
    TELL = "tell"
    STREAM = "stream"


class Sink:
    """Where a request's outcome goes. ``item`` waits for stream credit and returns False
    when the consumer is gone or cancelled."""

    cancelled = False
    _credit_changed: asyncio.Event | None = None  # made by the first wait: asks never wait

    def __init__(self, credit: int = 0):
        self.credit = credit

    async def result(self, value: Any) -> None:
        raise NotImplementedError

    async def error(self, exc: BaseException) -> None:
        raise NotImplementedError

    async def item(self, value: Any) -> bool:
        raise NotImplementedError

    async def end(self) -> None:
        raise NotImplementedError

    def grant(self, n: int) -> None:
        self.credit += n
        if self._credit_changed is not None:
            self._credit_changed.set()

    def cancel(self) -> None:
        self.cancelled = True
        if self._credit_changed is not None:
            self._credit_changed.set()

    async def wait_credit(self, poll: float | None = None) -> bool:
        """Wait until there is credit (True) or the stream is cancelled (False). With
        ``poll``, returns None every ``poll`` seconds so the caller can check liveness."""
        if self._credit_changed is None:
            self._credit_changed = asyncio.Event()
        while self.credit <= 0 and not self.cancelled:
            self._credit_changed.clear()
            try:
                await asyncio.wait_for(self._credit_changed.wait(), poll)
            except asyncio.TimeoutError:
                return None
        return not self.cancelled


class Request:
    """One message for an actor."""

    __slots__ = ("call", "method", "args", "kwargs", "deadline", "sink", "task", "key")

    def __init__(self, call: Call, method: str, args, kwargs, deadline: float | None,
                 sink: Sink | None, key=None):
        self.call = call
        self.method = method
        self.args = args
        self.kwargs = kwargs
        self.deadline = deadline  # loop time after which nobody waits for the answer
        self.sink = sink
        self.task: asyncio.Task | None = None
        self.key = key  # (route, corr) of a remote request, so CANCEL and CREDIT find it

    @property
    def cancelled(self) -> bool:
        return self.sink is not None and self.sink.cancelled


class PendingCall:
    """The caller's side of an ask."""

    __slots__ = ("future", "address", "ref", "method")

    def __init__(self, future: asyncio.Future, address: str, ref, method: str):
        self.future = future
        self.address = address
        self.ref = ref
        self.method = method

    @property
    def what(self) -> str:
        return f"{self.ref}.{self.method}()"


class PendingStream:
    """The caller's side of a stream: items queue here (at most ``window`` of them, since
    the producer respects credit)."""

    def __init__(self, address: str, what: str):
        self.address = address
        self.what = what
        self.queue: asyncio.Queue = asyncio.Queue()

    def push(self, kind: str, value: Any = None) -> None:
        self.queue.put_nowait((kind, value))


class LocalSink(Sink):
    """Answers a caller in the same process without encoding anything."""

    def __init__(self, pending: PendingCall | PendingStream, credit: int = 0):
        super().__init__(credit)
        self.pending = pending

    async def result(self, value: Any) -> None:
        if not self.pending.future.done():
            self.pending.future.set_result(value)

    async def error(self, exc: BaseException) -> None:
        if isinstance(self.pending, PendingStream):
            self.pending.push("error", exc)
        elif not self.pending.future.done():
            self.pending.future.set_exception(exc)

    async def item(self, value: Any) -> bool:
        if not await self.wait_credit():
            return False
        self.credit -= 1
        self.pending.push("item", value)
        return True

    async def end(self) -> None:
        self.pending.push("end")
