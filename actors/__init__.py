"""The asystem actor runtime: actors over ZeroMQ, embeddable in any asyncio loop.

    from actors import Actor, ActorSystem

    class Counter(Actor):
        async def add(self, n: int) -> int: ...

    async with ActorSystem() as system:
        counter = await system.spawn(Counter, where="process")
        await counter.ask("add", 1, timeout=5)

See docs/actors.md for the semantics.
"""

from .actor import Actor
from .errors import (ActorDeadError, ActorError, AskTimeout, BadRequestError,
                     MailboxFullError, RemoteError, SpawnError, UnknownActorError,
                     UnknownMethodError)
from .ref import ActorRef
from .runtime import run
from .supervision import EscalationError, SupervisorStrategy
from .system import ActorSystem, current_system

__all__ = [
    "Actor", "ActorDeadError", "ActorError", "ActorRef", "ActorSystem", "AskTimeout",
    "BadRequestError", "EscalationError", "MailboxFullError", "RemoteError", "SpawnError",
    "SupervisorStrategy", "UnknownActorError", "UnknownMethodError", "current_system", "run",
]
