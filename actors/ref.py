"""ActorRef: the address of an actor, valid in any process of the cluster.

A ref is plain data (address, actor id, optional name) and travels inside messages as a
codec extension. Its methods send through the :class:`~actors.system.ActorSystem` running
in the current process (the one that created or received the ref).
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Coroutine

import msgpack

from transport import codec

REF_EXT_CODE = 32
# The system decoding a message sets this, so that refs inside it send through that system.
binding_system: contextvars.ContextVar = contextvars.ContextVar("binding_system", default=None)


@dataclass(frozen=True)
class ActorRef:
    address: str  # the transport address of the hosting actor system
    actor_id: str  # unique within that system
    name: str | None = None
    _system: Any = field(default=None, compare=False, repr=False, hash=False)

    def __str__(self) -> str:
        label = self.name or self.actor_id
        return f"{label}@{self.address}"

    @property
    def system(self):
        if self._system is not None:  # the common case: no import statement per call
            return self._system
        from .system import current_system
        return current_system()

    def ask(self, method: str, *args, timeout: float | None = None,
            **kwargs) -> Coroutine[Any, Any, Any]:
        """Call ``method`` and return its result.

        Raises :class:`~actors.errors.RemoteError` if the method raised (with the remote
        type, message and traceback), :class:`~actors.errors.ActorDeadError` as soon as the
        actor or its process is known dead, and :class:`~actors.errors.AskTimeout` (naming
        the actor, method, address and deadline) when ``timeout`` seconds pass first; the
        call is then cancelled on the actor's side. ``timeout`` defaults to the system's
        ``default_timeout``.
        """
        # The system's coroutine itself, not one that awaits it: one frame less to pass
        # through each time the call suspends and resumes.
        return self.system.ask(self, method, args, kwargs, timeout)

    async def tell(self, method: str, *args, timeout: float | None = None, **kwargs) -> None:
        """Send without waiting for the result (at most once; errors are logged by the
        actor's system). Returns once the message is handed to the actor's mailbox (local)
        or to the socket (remote); waits while the local mailbox or the socket is full, up
        to ``timeout``."""
        await self.system.tell(self, method, args, kwargs, timeout)

    def stream(self, method: str, *args, timeout: float | None = None, window: int = 16,
               **kwargs) -> AsyncIterator[Any]:
        """Iterate over what an async-generator method yields.

        At most ``window`` items are in flight: the producer pauses until the consumer
        takes them (flow control). ``timeout`` bounds the wait for each item. Leaving the
        loop early (``break``, an exception, ``aclose()``) cancels the producer, whose
        ``finally`` blocks run.
        """
        return self.system.stream(self, method, args, kwargs, timeout, window)

    def bind(self, system) -> "ActorRef":
        return ActorRef(self.address, self.actor_id, self.name, system)


def _ref_to_bytes(ref: ActorRef) -> bytes:
    return msgpack.packb([ref.address, ref.actor_id, ref.name])


def _ref_from_bytes(data: bytes) -> ActorRef:
    address, actor_id, name = msgpack.unpackb(data)
    if not (isinstance(address, str) and isinstance(actor_id, str)
            and (name is None or isinstance(name, str))):
        raise ValueError("malformed ActorRef")
    return ActorRef(address, actor_id, name, binding_system.get())


codec.register_ext(REF_EXT_CODE, ActorRef, _ref_to_bytes, _ref_from_bytes)
