"""A bounded FIFO mailbox with waiting senders.

Semantics:
- ``put`` appends when there is room and no sender is already waiting; otherwise the
  sender waits, in arrival order, until room frees up or its deadline passes, and then
  gets :class:`MailboxFullError`. Senders are admitted strictly in the order they called
  ``put``, so one sender's messages never overtake each other.
- At most ``capacity`` messages are queued and at most ``capacity`` senders wait in line
  (``put`` first waits for a place in line), so memory is bounded. ``crowded`` tells a
  network receive loop to stop reading (which pushes back on remote senders through
  ZeroMQ's high-water marks) until ``room`` completes.
- ``close`` refuses further puts, fails the waiting senders and returns what was queued,
  so that the owner can fail each message with a clear error instead of dropping it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable

from .errors import ActorDeadError, MailboxFullError


class Mailbox:
    def __init__(self, capacity: int, owner: str = "actor"):
        if capacity < 1:
            raise ValueError("mailbox capacity must be >= 1")
        self.capacity = capacity
        self.owner = owner
        self._items: deque = deque()
        self._waiting: deque = deque()  # [item, future] in arrival order
        self._getters: deque = deque()
        self._room: asyncio.Future | None = None
        self._closed: str | None = None

    def __len__(self) -> int:
        return len(self._items)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def crowded(self) -> bool:
        return len(self._waiting) >= self.capacity

    async def room(self) -> None:
        """Completes once fewer than ``capacity`` senders wait."""
        while self.crowded and not self._closed:
            if self._room is None or self._room.done():
                self._room = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._room)  # shared: a waiter's cancellation is its own

    def put_nowait(self, item) -> None:
        """Queue ``item`` if that needs no waiting, else raise MailboxFullError."""
        if self._closed:
            raise ActorDeadError(f"{self.owner} is not accepting messages: {self._closed}")
        if self._waiting or len(self._items) >= self.capacity:
            raise MailboxFullError(f"mailbox of {self.owner} is full")
        self._append(item)

    async def put(self, item, deadline: float | None) -> None:
        """Queue ``item``, waiting until ``deadline`` (loop time) while the mailbox is full,
        and first, while ``capacity`` senders already wait, for a place in line."""
        while self.crowded and not self._closed:
            try:
                async with asyncio.timeout_at(deadline):
                    await self.room()
            except TimeoutError:
                raise MailboxFullError(
                    f"mailbox of {self.owner} stayed full ({self.capacity} queued, "
                    f"{len(self._waiting)} senders waiting) until the sender's deadline") from None
        waiting = self.line_up(item, deadline)
        if waiting is not None:
            await waiting

    def line_up(self, item, deadline: float | None) -> Awaitable[None] | None:
        """``put``, with the sender's place in line taken at the call rather than when
        awaited: None if ``item`` is queued already, else an awaitable that completes once
        it is (or raises MailboxFullError at ``deadline``). A receive loop that hands the
        wait to a task thus keeps the arrival order, and ``crowded`` counts the sender
        at once. Raises at once when the mailbox is closed or crowded."""
        if self._closed:
            raise ActorDeadError(f"{self.owner} is not accepting messages: {self._closed}")
        if not self._waiting and len(self._items) < self.capacity:
            self._append(item)
            return None
        if self.crowded:
            raise MailboxFullError(f"mailbox of {self.owner} is full ({self.capacity} queued, "
                                   f"{len(self._waiting)} senders waiting)")
        entry = [item, asyncio.get_running_loop().create_future()]
        self._waiting.append(entry)
        return self._admission(entry, deadline)

    async def _admission(self, entry: list, deadline: float | None) -> None:
        loop = asyncio.get_running_loop()
        timeout = None if deadline is None else max(0.0, deadline - loop.time())
        try:
            await asyncio.wait_for(asyncio.shield(entry[1]), timeout)
        except asyncio.TimeoutError:
            if entry[1].done() and entry[1].exception() is None:
                return  # admitted in the same tick the deadline passed
            self._forget(entry)
            raise MailboxFullError(
                f"mailbox of {self.owner} stayed full ({self.capacity} queued) until the "
                f"sender's deadline") from None
        except asyncio.CancelledError:
            self._forget(entry)
            raise

    def _forget(self, entry) -> None:
        try:
            self._waiting.remove(entry)
        except ValueError:
            pass
        self._wake_room()

    async def get(self):
        """The oldest queued item; waits while the mailbox is empty."""
        while not self._items:
            if self._closed:
                raise ActorDeadError(f"{self.owner} stopped: {self._closed}")
            fut = asyncio.get_running_loop().create_future()
            self._getters.append(fut)
            try:
                await fut
            finally:
                if fut in self._getters:
                    self._getters.remove(fut)
        item = self._items.popleft()
        if self._waiting:
            self._admit_waiting()
        return item

    def _append(self, item) -> None:
        self._items.append(item)
        while self._getters:
            fut = self._getters.popleft()
            if not fut.done():
                fut.set_result(None)
                break

    def _admit_waiting(self) -> None:
        while self._waiting and len(self._items) < self.capacity:
            item, fut = self._waiting.popleft()
            if fut.done():
                continue
            self._append(item)
            fut.set_result(None)
        self._wake_room()

    def _wake_room(self) -> None:
        if self._room is not None and not self._room.done() and not self.crowded:
            self._room.set_result(None)

    def seal(self, reason: str) -> None:
        """Refuse further puts (waiting senders get ActorDeadError); ``get`` still returns
        what is queued, then raises ActorDeadError."""
        self._closed = reason
        for item, fut in self._waiting:
            if not fut.done():
                fut.set_exception(ActorDeadError(f"{self.owner} stopped: {reason}"))
                fut.exception()  # mark retrieved: the waiter re-raises it itself
        self._waiting.clear()
        for fut in self._getters:
            if not fut.done():
                fut.set_result(None)
        if self._room is not None and not self._room.done():
            self._room.set_result(None)

    def close(self, reason: str) -> list:
        """Seal, and return the queued items (oldest first) instead of delivering them."""
        self.seal(reason)
        dropped = list(self._items)
        self._items.clear()
        return dropped

    def reopen(self) -> None:
        self._closed = None
