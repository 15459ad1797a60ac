"""ActorCell: the runtime around one actor instance in this process.

It owns the mailbox, the worker tasks that take messages from it, the requests in
progress, the actor's background tasks and its children. Lifecycle::

    starting --on_start ok--> running --stop--> stopping --> stopped
        \\                       |
         `--on_start raises------+--failure--> failed --supervisor--> restarted | stopped

When the actor fails, every request it holds (queued or running) fails at once with
ActorDeadError; the instance is discarded; a restart builds a new instance from the same
class and arguments under the same ref.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import traceback
from typing import TYPE_CHECKING, Any

from .actor import Actor, public_methods
from .errors import (ActorDeadError, ActorError, BadRequestError, RemoteError,
                     UnknownMethodError)
from .mailbox import Mailbox
from .messages import Call, Request
from .supervision import RestartBudget

if TYPE_CHECKING:
    from .ref import ActorRef
    from .system import ActorSystem

log = logging.getLogger(__name__)

# The internal method that delivers death-watch notices to Actor.on_terminated.
TERMINATED = "__terminated__"


class ActorCell:
    def __init__(self, system: "ActorSystem", ref: "ActorRef", cls: type, args, kwargs,
                 parent: "ActorCell | None" = None):
        if not (isinstance(cls, type) and issubclass(cls, Actor)):
            raise TypeError(f"{cls!r} is not an Actor subclass")
        self.system = system
        self.ref = ref
        self.cls, self.args, self.kwargs = cls, args, kwargs
        self.parent = parent
        self.methods = public_methods(cls)
        # Looked up per call; inspect's check costs more than the rest of the lookup.
        self.streaming = frozenset(name for name, fn in self.methods.items() if _is_generator(fn))
        self.mailbox = Mailbox(cls.mailbox_size, owner=f"actor {ref}")
        self.instance: Actor | None = None
        self.state = "new"
        self.children: dict[str, Any] = {}  # actor_id -> ChildRecord (see system)
        self.budget = RestartBudget(cls.supervisor_strategy)
        self.watchers: set = set()
        self._workers: list[asyncio.Task] = []
        self._tasks: set[asyncio.Task] = set()
        self._running: set[Request] = set()
        self.stopped = asyncio.get_running_loop().create_future()

    def __str__(self) -> str:
        return f"{self.cls.__name__} {self.ref}"

    @property
    def parent_ref(self):
        return self.parent.ref if self.parent else None

    def children_refs(self) -> dict:
        return {rec.ref.name or rec.ref.actor_id: rec.ref for rec in self.children.values()}

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Build the instance and run on_start; raises what on_start raised."""
        self.state = "starting"
        self.mailbox.reopen()
        instance = self.cls(*self.args, **self.kwargs)
        instance.ref, instance.system, instance._cell = self.ref, self.system, self
        self.instance = instance
        await instance.on_start()
        self.state = "running"
        self._workers = [asyncio.ensure_future(self._work())
                         for _ in range(max(1, self.cls.max_concurrency))]

    async def _work(self) -> None:
        task = asyncio.current_task()
        while True:
            try:
                request = await self.mailbox.get()
            except ActorDeadError:
                return  # sealed and drained
            await self._handle(request, task)

    def create_task(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.fail(task.exception())

    def fail(self, exc: BaseException) -> None:
        """Mark the actor failed and hand it to the system's supervision (once)."""
        if self.state not in ("starting", "running", "stopping"):
            return
        self.state = "failed"
        log.error("%s failed: %s", self, "".join(traceback.format_exception(exc)).rstrip())
        asyncio.ensure_future(self.system._on_failure(self, exc))

    def request_stop(self) -> None:
        asyncio.ensure_future(self.system.stop(self.ref))

    async def drain(self, timeout: float) -> None:
        """Refuse new messages, finish queued and running ones for up to ``timeout``."""
        if self.state == "running":
            self.state = "stopping"
        self.mailbox.seal("stopping")
        if self._workers:
            await asyncio.wait(self._workers, timeout=timeout)

    async def terminate(self, reason: str, timeout: float = 5.0) -> None:
        """Stop the instance now: everything it holds fails with ActorDeadError, its
        background tasks are cancelled and on_stop runs (bounded by ``timeout``, or by the
        class's ``stop_timeout`` if that is longer)."""
        dead = ActorDeadError(f"actor {self.ref} {reason}")
        for request in self.mailbox.close(reason):
            await self._fail_request(request, dead)
        current = asyncio.current_task()
        for task in [*self._workers, *self._tasks]:
            if task is not current:
                task.cancel()
        for request in list(self._running):
            await self._fail_request(request, dead)
        await asyncio.gather(*(t for t in [*self._workers, *self._tasks] if t is not current),
                             return_exceptions=True)
        self._workers, self._tasks = [], set()
        instance, self.instance = self.instance, None
        if instance is not None:
            try:
                await asyncio.wait_for(instance.on_stop(), max(timeout, self.cls.stop_timeout))
            except Exception as exc:  # on_stop failing must not stop the shutdown
                log.warning("%s: on_stop raised %r", self, exc)

    async def _fail_request(self, request: Request, exc: BaseException) -> None:
        if request.sink is not None and not request.cancelled:
            await request.sink.error(exc)
            request.sink.cancel()
        self.system._forget(request)

    # -- one message -----------------------------------------------------------------

    async def _handle(self, request: Request, task: asyncio.Task) -> None:
        """Run one request in the worker ``task``."""
        if self.state == "failed":  # taken in the moment before the teardown: not for it
            return await self._fail_request(request, ActorDeadError(f"actor {self.ref} failed"))
        if request.cancelled:
            self.system.counters["cancelled_before_start"] += 1
            return self.system._forget(request)
        deadline = request.deadline
        if deadline is not None and asyncio.get_running_loop().time() > deadline:
            # Nobody waits for this answer any more: skip the work (at-most-once).
            self.system.counters["expired_in_mailbox"] += 1
            log.info("%s: dropped %s.%s whose caller's deadline passed in the mailbox",
                     self, self.cls.__name__, request.method)
            return self.system._forget(request)
        request.task = task
        self._running.add(request)
        try:
            await self._run(request)
        except asyncio.CancelledError:
            if self.state not in ("running", "stopping") or not request.cancelled:
                raise  # the actor is being torn down
            self.system.counters["cancelled_while_running"] += 1
        finally:
            self._running.discard(request)
            request.task = None
            self.system._forget(request)

    async def _run(self, request: Request) -> None:
        sink = request.sink
        try:
            fn = self._method(request)
        except ActorError as exc:  # unknown method or wrong arguments: the caller's fault
            return await self._report(request, exc)
        try:
            try:
                # Calling an async function only binds its arguments, so a TypeError here
                # is always the caller's wrong arguments, never the method's own bug.
                started = fn(self.instance, *request.args, **request.kwargs)
            except TypeError as exc:
                return await self._report(request, BadRequestError(
                    f"wrong arguments for {self.cls.__name__}.{request.method}: {exc}"))
            if request.call is Call.STREAM:
                return await self._stream(started, request)
            value = await started
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._report(request, RemoteError(
                type(exc).__name__, str(exc), "".join(traceback.format_exception(exc))))
            if self.cls.crash_on_error:
                self.fail(exc)
            return
        if sink is not None and request.call is Call.ASK:
            await sink.result(value)

    async def _report(self, request: Request, error: ActorError) -> None:
        if request.sink is not None:
            await request.sink.error(error)
        else:
            self.system.counters["tell_errors"] += 1
            log.error("%s: tell %s failed: %s", self, request.method, error)

    def _method(self, request: Request):
        if request.method == TERMINATED and request.call is Call.TELL:
            return self.cls.on_terminated
        fn = self.methods.get(request.method)
        is_stream = request.call is Call.STREAM
        if fn is None or is_stream != (request.method in self.streaming):
            kind = "async-generator" if is_stream else "coroutine"
            raise UnknownMethodError(
                f"actor {self.ref} ({self.cls.__name__}) has no public {kind} method "
                f"{request.method!r}; it has: {sorted(self.methods)}")
        return fn

    async def _stream(self, agen, request: Request) -> None:
        sink = request.sink
        try:
            async for value in agen:
                if not await sink.item(value):
                    self.system.counters["streams_cancelled"] += 1
                    return
            await sink.end()
        finally:
            await agen.aclose()  # runs the producer's finally blocks on cancel too


def _is_generator(fn) -> bool:
    return inspect.isasyncgenfunction(fn)
