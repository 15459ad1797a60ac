"""The Actor base class.

Subclass it and write ``async def`` methods: every public coroutine method can be called
with ``ask``/``tell``, and every public async-generator method with ``stream``. Methods run
one message at a time (``max_concurrency = 1``) in arrival order, so an actor's state needs
no locks; raise ``max_concurrency`` to let up to that many run at once (they then interleave
at ``await`` points). An open stream holds one slot until it ends.

A method's exception goes back to its caller as a RemoteError and the actor keeps serving.
The actor *fails* (and its supervisor decides what happens) when ``on_start`` raises, when a
task started with :meth:`create_task` raises, when it calls :meth:`fail`, or, if
``crash_on_error`` is set, when any method raises.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any, Callable

from .supervision import SupervisorStrategy


class Actor:
    max_concurrency: int = 1
    mailbox_size: int = 1024
    crash_on_error: bool = False
    supervisor_strategy: SupervisorStrategy = SupervisorStrategy()
    # Seconds on_stop may take at least, whatever a stop's own timeout (0: that timeout
    # bounds it). A process actor's process gets as long after SIGTERM before SIGKILL. Set
    # it for an actor whose cleanup is slow (a vLLM engine takes about 10 s to shut down).
    stop_timeout: float = 0.0

    # Set by the runtime before on_start.
    ref: Any = None
    system: Any = None
    _cell: Any = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        check_stop_timeout(cls.stop_timeout, cls.__qualname__)
        for name, value in vars(cls).items():
            if name in _RESERVED and name not in _HOOKS and callable(value):
                raise TypeError(f"{cls.__name__}.{name}: the name {name!r} belongs to the "
                                "Actor base class; give the method another name")

    async def on_start(self) -> None:
        """Runs before the first message. Raising fails the actor."""

    async def on_stop(self) -> None:
        """Runs after the last message, when the actor stops or is restarted."""

    async def on_terminated(self, ref, reason: str) -> None:
        """A watched actor stopped, failed for good, or its process or node died."""

    # -- helpers for subclasses -----------------------------------------------------

    @property
    def parent(self):
        return self._cell.parent_ref if self._cell else None

    @property
    def children(self) -> dict:
        """This actor's live children by name (or id)."""
        return self._cell.children_refs()

    async def spawn(self, cls, *args, name: str | None = None, where: str = "local",
                    timeout: float | None = None, env: dict[str, str] | None = None, **kwargs):
        """Start a supervised child; see :meth:`ActorSystem.spawn` for ``where`` and ``env``."""
        return await self.system.spawn(cls, *args, name=name, where=where, timeout=timeout,
                                       parent=self._cell, env=env, **kwargs)

    def watch(self, ref) -> None:
        """Have :meth:`on_terminated` called when ``ref`` stops or dies."""
        self.system.watch(self.ref, ref)

    def unwatch(self, ref) -> None:
        self.system.unwatch(self.ref, ref)

    def create_task(self, coro) -> asyncio.Task:
        """A background task owned by this actor: cancelled when it stops; an exception
        in it fails the actor."""
        return self._cell.create_task(coro)

    def fail(self, reason: str | BaseException) -> None:
        """Fail this actor now; its supervisor decides what follows."""
        self._cell.fail(reason if isinstance(reason, BaseException) else RuntimeError(reason))

    async def stop(self) -> None:
        """Stop this actor after the current message (children first)."""
        self._cell.request_stop()


_BASE_NAMES = frozenset(dir(Actor))
_HOOKS = frozenset({"on_start", "on_stop", "on_terminated", "__init__"})
_RESERVED = frozenset(name for name in vars(Actor) if not name.startswith("__"))

# The longest cleanup an actor may ask for (Actor.stop_timeout): every wait has a deadline,
# a stop's included.
MAX_STOP_TIMEOUT_S = 600.0


def check_stop_timeout(value: Any, owner: str) -> float:
    """``value`` as a stop_timeout in seconds, or ValueError naming ``owner``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not 0 <= value <= MAX_STOP_TIMEOUT_S:
        raise ValueError(f"{owner}.stop_timeout must be a number of seconds in "
                         f"[0, {MAX_STOP_TIMEOUT_S:g}], got {value!r}")
    return float(value)


def public_methods(cls) -> dict[str, Callable]:
    """The remotely callable methods of an actor class: name -> function."""
    cached = cls.__dict__.get("_asystem_methods")
    if cached is not None:
        return cached
    methods = {}
    for name in dir(cls):
        if name.startswith("_") or name in _BASE_NAMES:
            continue
        fn = getattr(cls, name)
        if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
            methods[name] = fn
    cls._asystem_methods = methods
    return methods
