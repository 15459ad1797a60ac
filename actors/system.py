"""ActorSystem: hosts actors in this process and talks to the other systems of the cluster.

One system per process is the normal case (several work, e.g. in tests). It runs inside
whatever asyncio loop is current (embedding in a web service needs nothing special) and
owns one :class:`transport.endpoint.Endpoint`: a bound ROUTER and DEALERs to the peers it
calls.

Delivery guarantees:
- At most once. A message is never retried by the runtime; a call that times out is
  cancelled on the callee's side (dropped if still queued, cancelled if running).
- FIFO per sender: messages from one system to one actor are handled in the order sent
  (with ``max_concurrency > 1`` they *start* in that order).
- Every wait has a deadline (``default_timeout`` unless given) and ends with a typed error
  that names the actor, the method, the address and the deadline.
- Calls to an actor fail with ActorDeadError as soon as it is known dead: it failed or
  stopped (told by its system), or its process or node is gone (the connection closed or
  its heartbeats stopped).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Awaitable

from transport import codec
from transport.endpoint import Endpoint, Heartbeat, Incoming
from transport.envelope import Envelope, Kind

from . import errors
from .cell import TERMINATED, ActorCell
from .errors import (ActorDeadError, AskTimeout, BadRequestError, SpawnError,
                     UnknownActorError)
from .messages import Call, LocalSink, PendingCall, PendingStream, Request, Sink
from .ref import ActorRef, binding_system
from .supervision import EscalationError

log = logging.getLogger(__name__)

SYSTEM_ID = "__system__"
# The system handling the current message; refs decoded from it bind to that system too.
_current = binding_system
_last_started: list = []


class _Expired(Exception):
    """Internal: a call's deadline passed (turned into AskTimeout with the details)."""


_EXPIRED = _Expired()


_CALLS = {Kind.CALL: Call.ASK, Kind.TELL: Call.TELL, Kind.STREAM: Call.STREAM}


def _expire(future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(_EXPIRED)


class _Deadlines:
    """Fails futures with _EXPIRED at their deadlines, at most GRAIN seconds late.

    Futures due in the same GRAIN-wide slot share one loop timer, cancelled when the slot
    empties. A timer per call, created and cancelled for every ask, cost about 7% of the
    pipelined call rate (heap pushes, and the loop's sweeps of cancelled timers). The
    newest slot keeps its timer when it empties: one call at a time (a round trip is far
    shorter than GRAIN) then reuses it instead of making and cancelling a timer per call.
    So at most one empty slot waits, and its timer fires harmlessly."""

    GRAIN = 0.005

    def __init__(self) -> None:
        self._slots: dict[int, tuple[asyncio.TimerHandle, dict[int, asyncio.Future]]] = {}
        self._newest: int | None = None

    def add(self, loop: asyncio.AbstractEventLoop, key: int, deadline: float,
            future: asyncio.Future) -> int:
        """Expire `future` (known by the unique `key`) at `deadline` (loop time); returns
        the slot to pass to `remove`."""
        slot = -int(-deadline // self.GRAIN)  # rounded up: never early
        entry = self._slots.get(slot)
        if entry is None:
            entry = self._slots[slot] = (loop.call_at(slot * self.GRAIN, self._fire, slot), {})
            newest, self._newest = self._newest, slot
            if newest is not None:
                self._drop_if_empty(newest)
        entry[1][key] = future
        return slot

    def remove(self, key: int, slot: int) -> None:
        entry = self._slots.get(slot)
        if entry is not None:
            entry[1].pop(key, None)
            if slot != self._newest:
                self._drop_if_empty(slot)

    def _drop_if_empty(self, slot: int) -> None:
        entry = self._slots.get(slot)
        if entry is not None and not entry[1]:
            entry[0].cancel()
            del self._slots[slot]

    def _fire(self, slot: int) -> None:
        for future in self._slots.pop(slot)[1].values():
            _expire(future)


def check_env(env: Any) -> dict[str, str]:
    """``env`` for a new process, checked: names and values are strings, names non-empty
    and without "=" or NUL. Raises TypeError or ValueError naming the bad entry."""
    if not isinstance(env, dict):
        raise TypeError(f"env must be a dict of str to str, not {type(env).__name__}")
    for key, value in env.items():
        if not (isinstance(key, str) and key and "=" not in key and "\0" not in key):
            raise ValueError(f"env: invalid variable name {key!r}")
        if not (isinstance(value, str) and "\0" not in value):
            raise ValueError(f"env: the value of {key} must be a string without NUL, "
                             f"not {value!r}")
    return dict(env)


def current_system() -> "ActorSystem":
    """The system of the running context: the one that delivered the current message, else
    the most recently started one in this process."""
    system = _current.get() or (_last_started[-1] if _last_started else None)
    if system is None:
        raise RuntimeError("no ActorSystem is running in this process")
    return system


@dataclass
class ChildRecord:
    """What a supervisor knows about one child: enough to restart it."""

    ref: ActorRef
    cls: type
    args: tuple
    kwargs: dict
    where: Any  # "local", "process" or a node agent's ActorRef
    cell: ActorCell | None = None
    env: dict | None = None  # environment variables of its process, kept for restarts
    process: Any = None  # actors.process.ChildProcess for where="process"


class RemoteSink(Sink):
    """Answers a caller in another process, over the ROUTER route the request came from."""

    def __init__(self, system: "ActorSystem", route: bytes, env: Envelope,
                 deadline: float | None):
        super().__init__(env.credit)
        self.system, self.route, self.corr, self.target = system, route, env.corr, env.target
        # How long an answer may wait for room in the caller's queue: until the caller's
        # deadline (loop time; nobody waits after it), else a heartbeat timeout. Never
        # longer, so that a caller that reads nothing cannot stall the actor for everyone.
        self.deadline = deadline

    async def _send(self, kind: Kind, value: Any) -> bool:
        try:
            frames = codec.encode(value)
        except (TypeError, codec.CodecError) as exc:
            frames = codec.encode(BadRequestError(
                f"the answer of {self.target} cannot be encoded: {exc}").to_wire())
            kind = Kind.ERROR
        env = Envelope(kind, self.corr)
        endpoint = self.system.endpoint
        ok = endpoint.reply_nowait(self.route, env, frames)
        if ok is None:  # the caller's queue is full: wait for room, up to the deadline
            deadline = self.deadline or (asyncio.get_running_loop().time()
                                         + self.system.heartbeat.timeout)
            ok = await endpoint.reply(self.route, env, frames, deadline)
        if not ok:
            self.cancel()  # the caller is gone or not reading: stop producing for it
        return ok

    def result(self, value: Any) -> Awaitable[bool]:
        return self._send(Kind.REPLY, value)

    async def error(self, exc: BaseException) -> None:
        await self._send(Kind.ERROR, exc.to_wire())

    async def item(self, value: Any) -> bool:
        poll = self.system.heartbeat.interval
        while True:
            ok = await self.wait_credit(poll)
            if ok is None:  # no credit for a while: is the consumer still there?
                if not await self.system.endpoint.probe(self.route):
                    self.cancel()
                    return False
                continue
            if not ok:
                return False
            self.credit -= 1
            return await self._send(Kind.STREAM_ITEM, value)

    async def end(self) -> None:
        await self._send(Kind.STREAM_END, None)


class ActorSystem:
    """Hosts actors; see the module docstring for the guarantees.

    ``bind``: the transport address (``tcp://host:port``, port 0 picks one, or
    ``ipc:///path``). ``advertise``: the host other machines reach this one by, when
    binding a wildcard address. ``secret``: the cluster secret (bytes, >= 16); when None
    a random one is made, which child processes inherit. ``head``: the address of the
    system that keeps the cluster's name registry (None: this one).
    """

    def __init__(self, bind: str = "tcp://127.0.0.1:0", *, secret: bytes | None = None,
                 head: str | None = None, advertise: str | None = None,
                 default_timeout: float = 30.0, heartbeat: Heartbeat = Heartbeat(),
                 limits: codec.Limits = codec.Limits()):
        self.secret = secret if secret is not None else os.urandom(32)
        self.default_timeout = default_timeout
        self.heartbeat = heartbeat
        self.limits = limits
        self.endpoint = Endpoint(self, bind, secret=self.secret, limits=limits,
                                 heartbeat=heartbeat)
        self.advertise = advertise
        self.head = head
        self.address = ""
        self.counters: Counter[str] = Counter()
        self._cells: dict[str, ActorCell] = {}
        self._names: dict[str, ActorRef] = {}  # the registry (head) or local cache
        self._pending: dict[int, PendingCall | PendingStream] = {}
        self._active: dict[tuple, Request] = {}
        self._watches: dict[str, dict[str, set]] = defaultdict(dict)  # address->id->watchers
        self._lost: dict[str, asyncio.Future] = {}
        self._launches: dict[str, tuple] = {}  # token -> (spec, started future)
        self._child_processes: set = set()  # actors.process.ChildProcess
        self.shutdown_requested = asyncio.Event()
        self._corr = itertools.count(1)
        self._deadlines = _Deadlines()
        self._closing = False
        self.closed: asyncio.Future | None = None

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> "ActorSystem":
        bound = await self.endpoint.start()
        if self.advertise and bound.startswith("tcp://"):
            bound = f"tcp://{self.advertise}:{bound.rsplit(':', 1)[1]}"
        self.address = bound
        self._loop = asyncio.get_running_loop()
        self.closed = self._loop.create_future()
        from .process import SystemActor  # the built-in actor that serves other systems
        await self._start_cell(SystemActor, (), {}, SYSTEM_ID, None, None)
        _last_started.append(self)
        return self

    async def __aenter__(self) -> "ActorSystem":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.shutdown()

    async def shutdown(self, timeout: float = 10.0, linger: float = 0.0) -> None:
        """Stop every actor (children first, each drained for up to ``timeout``), stop
        child processes, fail what is still pending, close the sockets. Idempotent."""
        if self._closing:
            await asyncio.shield(self.closed)
            return
        self._closing = True
        try:
            tops = [c for c in self._cells.values() if c.parent is None and c.ref.actor_id != SYSTEM_ID]
            await asyncio.gather(*(self.stop(c.ref, timeout) for c in tops),
                                 return_exceptions=True)
            from .process import stop_processes
            await stop_processes(self, timeout)
            system_cell = self._cells.get(SYSTEM_ID)
            if system_cell is not None:
                await system_cell.terminate("system shut down")
                self._cells.pop(SYSTEM_ID, None)
            for corr in list(self._pending):
                self._fail_pending(corr, ActorDeadError(f"system {self.address} shut down"))
            await self.endpoint.close(linger)
        finally:
            if self in _last_started:
                _last_started.remove(self)
            if not self.closed.done():
                self.closed.set_result(None)

    def stats(self) -> dict:
        return {**self.counters, **{f"transport.{k}": v for k, v in self.endpoint.counters.items()}}

    # -- spawning ----------------------------------------------------------------------

    async def spawn(self, cls, *args, name: str | None = None, where: Any = "local",
                    timeout: float | None = None, parent: ActorCell | None = None,
                    actor_id: str | None = None, env: dict[str, str] | None = None,
                    **kwargs) -> ActorRef:
        """Start an actor and return its ref.

        ``where``: ``"local"`` (this process), ``"process"`` (a new OS process on this
        host; the class must be importable by its module path and the arguments encodable),
        or the ActorRef of a :class:`~actors.agent.NodeAgent` (a new process on that node).
        ``env``: environment variables set in the new process on top of its parent's (e.g.
        ``CUDA_VISIBLE_DEVICES``); a restart keeps them. Not allowed with ``"local"``.
        ``name`` registers the actor cluster-wide (see :meth:`lookup`); a taken name raises
        SpawnError. ``timeout`` bounds start-up, ``on_start`` included. When called by an
        actor (``Actor.spawn``) the new actor is its supervised child.
        """
        if self._closing:
            raise SpawnError(f"system {self.address} is shutting down")
        timeout = self.default_timeout if timeout is None else timeout
        if env is not None:
            if where == "local":
                raise ValueError("spawn: env needs a new process (where='process' or an agent)")
            env = check_env(env)
        actor_id = actor_id or f"{cls.__name__.lower()}-{uuid.uuid4().hex[:8]}"
        if name is not None:
            await self._check_name_free(name, actor_id, timeout)
        if where == "local":
            cell = await self._start_cell(cls, args, kwargs, actor_id, name, parent, timeout)
            ref, record = cell.ref, ChildRecord(cell.ref, cls, args, kwargs, where, cell=cell)
        else:
            from .process import spawn_elsewhere
            ref, proc = await spawn_elsewhere(self, cls, args, kwargs, actor_id, name, where,
                                              timeout, env=env)
            record = ChildRecord(ref, cls, args, kwargs, where, process=proc, env=env)
            if parent is not None:
                self.watch(parent.ref, ref)
        if parent is not None:
            parent.children[actor_id] = record
        if name is not None:
            await self._register(name, ref, timeout)
        return ref

    async def _start_cell(self, cls, args, kwargs, actor_id, name, parent,
                          timeout: float | None = None) -> ActorCell:
        ref = ActorRef(self.address, actor_id, name, self)
        cell = ActorCell(self, ref, cls, args, kwargs, parent)
        self._cells[actor_id] = cell
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                await cell.start()
        except BaseException as exc:
            self._cells.pop(actor_id, None)
            await cell.terminate(f"failed to start: {exc!r}")
            # Only our own deadline is "did not finish"; a TimeoutError raised by on_start
            # itself is the actor's error and is reported as such.
            if isinstance(exc, TimeoutError) and deadline.expired():
                raise SpawnError(f"{cls.__name__} {actor_id}: on_start did not finish within "
                                 f"{timeout}s") from None
            if isinstance(exc, Exception):
                raise SpawnError(f"{cls.__name__} {actor_id}: on_start raised {exc!r}") from exc
            raise
        return cell

    async def stop(self, ref: ActorRef, timeout: float = 10.0) -> None:
        """Stop an actor for good: its children first, then it finishes (drains) its
        queued messages for up to ``timeout`` seconds; then on_stop runs (for up to
        ``timeout``, or the class's ``stop_timeout`` if longer) and its watchers are told.
        Stopping a stopped actor does nothing."""
        if ref.address != self.address:
            grace = timeout
            for child in self._child_processes:
                if child.ref.address == ref.address:
                    # A process actor's process exits with it: the lost connection is not news.
                    self.endpoint.expect_loss(ref.address)
                    grace = max(timeout, child.stop_timeout)
            await self._system_ref(ref.address).ask("stop_actor", ref.actor_id, timeout,
                                                    timeout=timeout + grace + 5)
            return
        cell = self._cells.get(ref.actor_id)
        if cell is None or cell.state in ("stopped",):
            return
        await self._stop_children(cell, timeout)
        await cell.drain(timeout)
        if cell.state == "failed":
            return  # failed while draining: supervision owns it now
        await cell.terminate("stopped", timeout)
        await self._finalize(cell, "stopped", failed=False)

    async def _stop_children(self, cell: ActorCell, timeout: float) -> None:
        records = list(cell.children.values())
        cell.children.clear()
        await asyncio.gather(*(self._stop_record(r, timeout) for r in records),
                             return_exceptions=True)

    async def _stop_record(self, record: ChildRecord, timeout: float) -> None:
        if record.process is not None:
            await record.process.stop(timeout)
        elif record.where == "local":
            await self.stop(record.ref, timeout)
        else:
            try:
                await self.stop(record.ref, timeout)
            except errors.ActorError as exc:
                log.warning("could not stop %s: %s", record.ref, exc)

    async def _finalize(self, cell: ActorCell, reason: str, failed: bool) -> None:
        """The actor is gone for good: forget it and tell its watchers."""
        cell.state = "stopped"
        self._cells.pop(cell.ref.actor_id, None)
        if cell.parent is not None:
            cell.parent.children.pop(cell.ref.actor_id, None)
        if cell.ref.name is not None and self._names.get(cell.ref.name) == cell.ref:
            del self._names[cell.ref.name]
        for watcher in list(cell.watchers):
            await self._tell_terminated(watcher, cell.ref, reason, failed)
        if not cell.stopped.done():
            cell.stopped.set_result(failed)

    # -- failure and supervision ----------------------------------------------------------

    async def _on_failure(self, cell: ActorCell, exc: BaseException) -> None:
        await cell.terminate(f"failed: {exc!r}")
        await self._stop_children(cell, 5.0)
        parent = cell.parent
        if parent is not None and parent.state == "running":
            await self._supervise(parent, cell.ref.actor_id, repr(exc))
        else:
            await self._finalize(cell, f"failed: {exc!r}", failed=True)

    async def _supervise(self, parent: ActorCell, child_id: str, why: str) -> None:
        """A child of ``parent`` failed: restart by strategy, or escalate."""
        record = parent.children.get(child_id)
        if record is None:
            return
        strategy = parent.cls.supervisor_strategy
        if not parent.budget.allow():
            parent.children.pop(child_id, None)
            if record.cell is not None:
                await self._finalize(record.cell, f"failed: {why}", failed=True)
            self.counters["escalations"] += 1
            parent.fail(EscalationError(
                f"child {record.ref} failed more than {strategy.max_restarts} times within "
                f"{strategy.within}s; last failure: {why}"))
            return
        victims = [child_id]
        if strategy.kind == "one_for_all":
            victims = list(parent.children)
            for other in victims:
                if other != child_id:
                    # Its process exiting is part of this restart, not news to supervise.
                    self.unwatch(parent.ref, parent.children[other].ref)
                    await self._halt(parent.children[other])
        for victim in victims:
            if victim in parent.children:  # (unless it stopped for good meanwhile)
                await self._restart(parent, parent.children[victim], why)

    async def _halt(self, record: ChildRecord) -> None:
        """Stop a child so that it can be restarted (one_for_all)."""
        if record.cell is not None:
            await record.cell.terminate("stopped for a restart of its siblings")
            await self._stop_children(record.cell, 5.0)
        elif record.process is not None:
            await record.process.stop(5.0)

    async def _restart(self, parent: ActorCell, record: ChildRecord, why: str) -> None:
        self.counters["restarts"] += 1
        log.warning("restarting %s (%s): %s", record.ref, parent.cls.supervisor_strategy.kind, why)
        if record.cell is not None:
            self._cells[record.ref.actor_id] = record.cell
            try:
                await record.cell.start()
            except Exception as exc:
                record.cell.state = "running"  # so that fail() accepts it
                record.cell.fail(exc)
            return
        from .process import spawn_elsewhere
        if record.process is not None:
            await record.process.stop(5.0)  # free its port, so the ref can stay the same
        # Forget the old incarnation's connection and watches: the successor may bind the
        # same address, and must not inherit the news of its predecessor's death.
        self.endpoint.forget(record.ref.address)
        self._watches.pop(record.ref.address, None)
        try:
            ref, proc = await spawn_elsewhere(
                self, record.cls, record.args, record.kwargs, record.ref.actor_id,
                record.ref.name, record.where, self.default_timeout, rebind=record.ref.address,
                env=record.env)
        except errors.ActorError as exc:  # SpawnError, or e.g. its node agent is gone too
            await self._supervise(parent, record.ref.actor_id, str(exc))
            return
        record.ref, record.process = ref, proc
        self.watch(parent.ref, ref)
        if ref.name is not None:
            await self._register(ref.name, ref, self.default_timeout)

    # -- death watch -------------------------------------------------------------------

    def watch(self, watcher: ActorRef, target: ActorRef) -> None:
        """Tell ``watcher`` (its ``on_terminated``) once ``target`` stops, fails for good,
        or its process or node dies. Watching a dead or unknown actor tells at once."""
        if target.address == self.address:
            cell = self._cells.get(target.actor_id)
            if cell is None:
                asyncio.ensure_future(self._tell_terminated(watcher, target, "not running", True))
            else:
                cell.watchers.add(watcher)
            return
        self._watches[target.address].setdefault(target.actor_id, set()).add(watcher)
        asyncio.ensure_future(self._register_watch(watcher, target))

    async def _register_watch(self, watcher: ActorRef, target: ActorRef) -> None:
        try:
            await self._system_ref(target.address).ask(
                "watch_actor", target.actor_id, watcher, timeout=self.default_timeout)
        except errors.ActorError as exc:
            self._target_gone(target.address, target.actor_id, f"unreachable: {exc}")

    def unwatch(self, watcher: ActorRef, target: ActorRef) -> None:
        if target.address == self.address:
            cell = self._cells.get(target.actor_id)
            if cell is not None:
                cell.watchers.discard(watcher)
            return
        watch = self._watches.get(target.address, {}).get(target.actor_id)
        if watch is not None:
            watch.discard(watcher)

    def _target_gone(self, address: str, actor_id: str | None, reason: str,
                     failed: bool = True) -> None:
        """Fire (once) the remote watches on one actor, or on every actor of an address."""
        watches = self._watches.get(address, {})
        for target_id in list(watches) if actor_id is None else [actor_id]:
            self._fire_watch(ActorRef(address, target_id, None, self), reason, failed)

    def _fire_watch(self, target: ActorRef, reason: str, failed: bool) -> None:
        """Tell each remote-watch watcher of ``target`` once; a fired watch is forgotten."""
        watchers = self._watches.get(target.address, {}).pop(target.actor_id, ())
        for watcher in watchers:
            asyncio.ensure_future(self._tell_terminated(watcher, target, reason, failed))

    async def _tell_terminated(self, watcher: ActorRef, target: ActorRef, reason: str,
                               failed: bool) -> None:
        if watcher.address != self.address:
            try:
                await self.tell(watcher, TERMINATED, (target, reason, failed), {}, None)
            except errors.ActorError as exc:
                log.info("could not tell %s that %s terminated: %s", watcher, target, exc)
            return
        cell = self._cells.get(watcher.actor_id)
        if cell is None or cell.state not in ("running", "stopping"):
            return
        record = cell.children.get(target.actor_id)
        if record is not None and record.ref.address == target.address and record.cell is None:
            if failed:  # a child in another process died: supervise it
                await self._supervise(cell, target.actor_id, reason)
                return
            cell.children.pop(target.actor_id, None)
        request = Request(Call.TELL, TERMINATED, (target, reason), {}, None, None)
        try:
            await cell.mailbox.put(request, None)
        except ActorDeadError:  # the watcher stopped taking messages meanwhile: no one to tell
            log.debug("%s stopped before it heard that %s terminated", watcher, target)

    # -- naming ------------------------------------------------------------------------

    def _system_ref(self, address: str) -> ActorRef:
        return ActorRef(address, SYSTEM_ID, None, self)

    @property
    def _registry(self) -> ActorRef | None:
        return None if self.head in (None, self.address) else self._system_ref(self.head)

    async def _check_name_free(self, name: str, actor_id: str, timeout: float) -> None:
        holder = await self.lookup(name, timeout)
        if holder is not None and holder.actor_id != actor_id:
            raise SpawnError(f"the name {name!r} is taken by {holder}")

    async def _register(self, name: str, ref: ActorRef, timeout: float) -> None:
        if self._registry is None:
            self.register_local(name, ref)
        else:
            await self._registry.ask("register", name, ref, timeout=timeout)

    def register_local(self, name: str, ref: ActorRef) -> None:
        """Registry side of naming: record ``name`` and forget it when the actor dies."""
        holder = self._names.get(name)
        if holder is not None and holder.actor_id != ref.actor_id:
            raise SpawnError(f"the name {name!r} is taken by {holder}")
        self._names[name] = ref
        system_cell = self._cells.get(SYSTEM_ID)
        if system_cell is not None:
            self.watch(system_cell.ref, ref)

    async def lookup(self, name: str, timeout: float | None = None) -> ActorRef | None:
        """The live actor registered under ``name`` anywhere in the cluster, or None."""
        ref = self._names.get(name)
        if ref is not None or self._registry is None:
            return ref.bind(self) if ref is not None else None
        found = await self._registry.ask("lookup", name, timeout=timeout)
        return found.bind(self) if found is not None else None

    # -- calling -----------------------------------------------------------------------

    def _deadline(self, timeout: float | None) -> tuple[float, float]:
        timeout = self.default_timeout if timeout is None else timeout
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        return timeout, asyncio.get_running_loop().time() + timeout

    def _timeout_error(self, ref: ActorRef, method: str, timeout: float,
                       doing: str = "answer") -> AskTimeout:
        return AskTimeout(f"no {doing} from actor {ref.name or ref.actor_id} to {method}() "
                          f"at {ref.address} within the {timeout:g}s deadline")

    def _full_error(self, ref: ActorRef, method: str, timeout: float) -> errors.MailboxFullError:
        return errors.MailboxFullError(
            f"mailbox of actor {ref.name or ref.actor_id} at {ref.address} stayed full until "
            f"the {timeout:g}s deadline of {method}()")

    async def ask(self, ref: ActorRef, method: str, args, kwargs, timeout) -> Any:
        loop = asyncio.get_running_loop()
        if timeout is None:
            timeout = self.default_timeout
        elif timeout <= 0:
            raise ValueError("timeout must be > 0")
        deadline = loop.time() + timeout
        corr = next(self._corr)
        future = loop.create_future()
        pending = PendingCall(future, ref.address, ref, method)
        # Fails the future at the deadline, whatever the call is waiting on then (cheaper
        # than asyncio.timeout).
        slot = self._deadlines.add(loop, corr, deadline, future)
        try:
            if ref.address == self.address:
                request = Request(Call.ASK, method, args, kwargs, deadline, LocalSink(pending),
                                  (None, corr))
                if not self._deliver_now(ref, request):  # full mailbox: wait for room
                    delivery = asyncio.ensure_future(self._deliver_local(ref, request))
                    future.add_done_callback(lambda _: delivery.cancel())
                    try:
                        await delivery
                    except asyncio.CancelledError:
                        if future.done() and future.exception() is _EXPIRED:
                            raise self._full_error(ref, method, timeout) from None
                        raise
            else:
                self._pending[corr] = pending
                frames = codec.encode([list(args), kwargs])  # TypeError if unencodable
                env = Envelope(Kind.CALL, corr, self.address, ref.actor_id, method,
                               int(timeout * 1000))
                if not self.endpoint.send_nowait(ref.address, env, frames):
                    await self.endpoint.send(ref.address, env, frames, deadline)
            return await future
        except TimeoutError:  # the peer's socket queue stayed full until the deadline
            self._cancel(ref, corr)
            raise self._timeout_error(ref, method, timeout, "room in the socket") from None
        except (_Expired, asyncio.CancelledError) as exc:
            self._cancel(ref, corr)
            if isinstance(exc, _Expired) or future.exception() is _EXPIRED:
                raise self._timeout_error(ref, method, timeout) from None
            raise
        finally:
            self._deadlines.remove(corr, slot)
            self._pending.pop(corr, None)

    async def tell(self, ref: ActorRef, method: str, args, kwargs, timeout) -> None:
        timeout, deadline = self._deadline(timeout)
        try:
            async with asyncio.timeout_at(deadline):
                if ref.address == self.address:
                    await self._deliver_local(ref, Request(Call.TELL, method, args, kwargs,
                                                           None, None))
                else:
                    await self._send_call(ref, Kind.TELL, 0, method, args, kwargs, 0)
        except TimeoutError:
            if ref.address == self.address:
                raise self._full_error(ref, method, timeout) from None
            raise self._timeout_error(ref, method, timeout, "room for a message") from None

    async def stream(self, ref: ActorRef, method: str, args, kwargs, timeout, window: int):
        if window < 1:
            raise ValueError("window must be >= 1")
        timeout, deadline = self._deadline(timeout)
        corr = next(self._corr)
        pending = PendingStream(ref.address, f"{ref}.{method}")
        local = ref.address == self.address
        sink = LocalSink(pending, credit=window) if local else None
        finished = False
        try:
            async with asyncio.timeout_at(deadline):
                if local:
                    await self._deliver_local(ref, Request(Call.STREAM, method, args, kwargs,
                                                           None, sink, (None, corr)))
                else:
                    self._pending[corr] = pending
                    await self._send_call(ref, Kind.STREAM, corr, method, args, kwargs,
                                          0, credit=window)
            taken = 0
            while True:
                try:
                    # Not wait_for: on Python 3.11 it swallows a cancellation that arrives
                    # together with an item, and the cancelled consumer would go on taking.
                    async with asyncio.timeout(timeout):
                        kind, value = await pending.queue.get()
                except TimeoutError:
                    raise self._timeout_error(ref, method, timeout, "stream item") from None
                if kind == "end":
                    finished = True
                    return
                if kind == "error":
                    finished = True
                    raise value
                yield value
                taken += 1
                if taken >= max(1, window // 2):
                    await self._grant(ref, corr, sink, taken)
                    taken = 0
        except AskTimeout:
            raise  # already says what was missed (an AskTimeout is a TimeoutError too)
        except TimeoutError:
            raise self._timeout_error(ref, method, timeout) from None
        finally:
            self._pending.pop(corr, None)
            if not finished:
                self._cancel(ref, corr)

    async def _grant(self, ref: ActorRef, corr: int, sink: Sink | None, n: int) -> None:
        if sink is not None:
            sink.grant(n)
        else:
            await self.endpoint.send(ref.address, Envelope(Kind.CREDIT, corr, credit=n))

    def _cancel(self, ref: ActorRef, corr: int) -> None:
        """The caller gave up: drop or cancel the request on the callee's side."""
        if ref.address == self.address:
            request = self._active.get((None, corr))
            if request is not None:
                self._cancel_request(request)
        elif not self.endpoint._closed:
            asyncio.ensure_future(self._send_quietly(
                ref.address, Envelope(Kind.CANCEL, corr, self.address, ref.actor_id)))

    async def _send_quietly(self, address: str, env: Envelope) -> None:
        try:
            await self.endpoint.send(address, env)
        except Exception as exc:  # best effort: the callee may be gone already
            log.debug("could not send %s to %s: %s", env.kind.name, address, exc)

    def _cancel_request(self, request: Request) -> None:
        if request.sink is not None:
            request.sink.cancel()
        if request.task is not None and request.task is not asyncio.current_task():
            request.task.cancel()

    def _local_cell(self, ref: ActorRef) -> ActorCell:
        cell = self._cells.get(ref.actor_id)
        if cell is None or cell.state == "stopped":
            raise ActorDeadError(f"actor {ref} is not running (stopped, failed or never "
                                 "existed)")
        return cell

    def _deliver_now(self, ref: ActorRef, request: Request) -> bool:
        """Queue a local request if that needs no waiting; False if the mailbox is full."""
        cell = self._local_cell(ref)
        try:
            cell.mailbox.put_nowait(request)
        except errors.MailboxFullError:
            return False
        if request.key is not None:
            self._active[request.key] = request
        return True

    async def _deliver_local(self, ref: ActorRef, request: Request) -> None:
        cell = self._local_cell(ref)
        if request.key is not None:
            self._active[request.key] = request
        try:
            await cell.mailbox.put(request, request.deadline)
        except BaseException:
            self._forget(request)
            raise

    async def _send_call(self, ref: ActorRef, kind: Kind, corr: int, method: str, args,
                         kwargs, timeout: float, credit: int = 0) -> None:
        frames = codec.encode([list(args), kwargs])  # TypeError for unencodable arguments
        env = Envelope(kind, corr, self.address, ref.actor_id, method,
                       int(timeout * 1000), credit)
        await self.endpoint.send(ref.address, env, frames)

    def _forget(self, request: Request) -> None:
        if request.key is not None:
            self._active.pop(request.key, None)

    def _fail_pending(self, corr: int, exc: BaseException) -> None:
        pending = self._pending.pop(corr, None)
        if isinstance(pending, PendingStream):
            pending.push("error", exc)
        elif pending is not None and not pending.future.done():
            pending.future.set_exception(exc)

    # -- the transport's handler -------------------------------------------------------

    def on_message(self, msg: Incoming):
        # Also binds the refs decoded from the message to this system.
        token = _current.set(self)
        try:
            if msg.route is not None:
                return self._on_request(msg)
            self._on_answer(msg)
        finally:
            _current.reset(token)

    def _on_request(self, msg: Incoming):
        env, key = msg.envelope, (msg.route, msg.envelope.corr)
        if env.kind is Kind.CANCEL:
            request = self._active.get(key)
            if request is not None:
                self._cancel_request(request)
            return None
        if env.kind is Kind.CREDIT:
            request = self._active.get(key)
            if request is not None and request.sink is not None:
                request.sink.grant(env.credit)
            return None
        if env.kind is Kind.TELL and env.method == TERMINATED:
            return self._on_terminated_notice(msg)
        call = _CALLS[env.kind]
        deadline = self._loop.time() + env.deadline_ms / 1000 if env.deadline_ms else None
        sink = None if call is Call.TELL else RemoteSink(self, msg.route, env, deadline)
        try:
            args, kwargs = self._decode_call(msg)
        except errors.ActorError as exc:
            return self._refuse(sink, env, exc)
        cell = self._cells.get(env.target)
        if cell is None or cell.state == "stopped":
            return self._refuse(sink, env, UnknownActorError(
                f"no actor {env.target!r} at {self.address}"))
        request = Request(call, env.method, args, kwargs, deadline, sink,
                          key if sink is not None else None)
        if request.key is not None:
            self._active[key] = request
        try:
            # The place in line is taken now, not when a task first runs: later messages
            # must queue behind this one, and `crowded` must count it before the next read.
            waiting = cell.mailbox.line_up(request, request.deadline)
        except errors.MailboxFullError:  # local senders crowd the line: wait behind them
            waiting = cell.mailbox.put(request, request.deadline)
        except errors.ActorError as exc:  # the actor is stopping
            self._forget(request)
            return self._refuse(sink, env, exc)
        if waiting is None:
            return None
        asyncio.ensure_future(self._deliver_later(cell, request, waiting))
        # Too many senders already wait for this actor: stop reading the socket, so that
        # remote senders block on ZeroMQ's high-water mark instead of growing memory here.
        return cell.mailbox.room() if cell.mailbox.crowded else None

    def _on_terminated_notice(self, msg: Incoming) -> None:
        """A remote system says an actor we watch is gone: (target ref, reason, failed)."""
        try:
            (target, reason, failed), _ = self._decode_call(msg)
            if not (isinstance(target, ActorRef) and isinstance(reason, str)):
                raise BadRequestError("malformed termination notice")
        except (ValueError, errors.ActorError) as exc:
            self.counters["refused.bad_request"] += 1
            log.warning("%s: malformed termination notice dropped: %s", self.address, exc)
            return
        # Fire the local watch once; if it has fired already (its process was seen to
        # die first), this notice is old news.
        self._fire_watch(target, reason, bool(failed))

    def _decode_call(self, msg: Incoming) -> tuple[list, dict]:
        try:
            payload = codec.decode(msg.frames, limits=self.limits)
        except codec.CodecError as exc:
            raise BadRequestError(f"undecodable arguments for {msg.envelope.method}: {exc}")
        if (type(payload) is not list or len(payload) != 2
                or type(payload[0]) is not list or type(payload[1]) is not dict
                or payload[1] and not all(type(k) is str for k in payload[1])):
            raise BadRequestError(f"arguments for {msg.envelope.method} must be "
                                  "[args list, kwargs map with string keys]")
        return payload[0], payload[1]

    def _refuse(self, sink: Sink | None, env: Envelope, exc: errors.ActorError) -> None:
        self.counters[f"refused.{exc.code}"] += 1
        log.warning("%s: refused %s %s.%s from %s: %s", self.address, env.kind.name,
                    env.target, env.method, env.sender, exc)
        if sink is not None:
            asyncio.ensure_future(sink.error(exc))

    async def _deliver_later(self, cell: ActorCell, request: Request, waiting) -> None:
        try:
            await waiting
        except errors.ActorError as exc:
            self._forget(request)
            if request.sink is not None:
                await request.sink.error(exc)
            else:
                self.counters["tells_dropped_mailbox_full"] += 1
                log.warning("tell %s to %s dropped: %s", request.method, cell.ref, exc)

    def _on_answer(self, msg: Incoming) -> None:
        env = msg.envelope
        pending = self._pending.get(env.corr)
        if pending is None:
            self.counters["late_answers"] += 1
            log.debug("%s: %s for call %d arrived after its caller gave up", self.address,
                      env.kind.name, env.corr)
            return
        try:
            value = codec.decode(msg.frames, limits=self.limits)
        except codec.CodecError as exc:
            value, env = BadRequestError(f"undecodable answer from {msg.peer}: {exc}"), None
        if env is None or env.kind is Kind.ERROR:
            exc = value if env is None else errors.from_wire(value)
            self._fail_pending(env.corr if env else msg.envelope.corr, exc)
        elif isinstance(pending, PendingStream):
            pending.push("item" if env.kind is Kind.STREAM_ITEM else "end", value)
        elif env.kind is Kind.REPLY and not pending.future.done():
            pending.future.set_result(value)

    def on_peer_lost(self, address: str, reason: str) -> None:
        dead = f"the process at {address} is gone: {reason}"
        for corr, pending in list(self._pending.items()):
            if pending.address == address:
                self._fail_pending(corr, ActorDeadError(f"{pending.what}: {dead}"))
        self._target_gone(address, None, dead)
        lost = self._lost.pop(address, None)
        if lost is not None and not lost.done():
            lost.set_result(reason)

    def when_lost(self, address: str) -> asyncio.Future:
        """A future that completes (with the reason) when the peer at ``address`` is lost."""
        fut = self._lost.get(address)
        if fut is None:
            fut = self._lost[address] = asyncio.get_running_loop().create_future()
        return fut
