"""Weight sync: the trainer sends versioned weights to the rollout engines, all or nothing.

One update is one `BucketPlan` (asystem/weight_plan.py): the tensors of version v, packed in
order into flat byte buckets. The plan is plain data; the trainer sends `plan.to_dict()` to every engine in an
actor message, then the bytes travel by one of two paths:

- **The group** (`WeightGroup`, `WeightSender`, `WeightReceiver`): trainer rank 0 and every
  engine join a dedicated torch.distributed process group, built from its own TCPStore (hosted
  by rank 0) and never registered as, or depending on, the default group; NCCL on CUDA, gloo on
  CPU. Rank 0 broadcasts the buckets.
- **ZeroMQ** (`push_over_actors`, `WeightStaging`), for an engine that cannot join a group:
  the same buckets go as tensors through actor asks (the codec sends them zero-copy), and the
  engine stages them until `commit_weights`.

One update on the group, run by every rank with the same plan:

1. *agree*: an all-reduce of (ok, version, plan digest) from every rank. If any rank holds
   another plan or rejected its input, every rank raises `WeightSyncError` naming the ranks,
   and the group stays usable.
2. *buckets*: rank 0 broadcasts bucket after bucket, at most `depth` in flight: it packs
   bucket i+1 while bucket i travels, and an engine sees bucket i while bucket i+1 arrives.
3. *ack*: an all-reduce of one flag per rank. So `send` returns only once every engine holds
   every bucket, and `receive` only once every rank got that far: trainer and engines agree on
   whether version v happened.

Deadlines: one per update, covering all three steps. Every collective is posted with the time
left as its own timeout and awaited with `Work.wait(time left)`, so a dead peer (connection
reset: milliseconds) or a hung one (at the deadline) surfaces as `WeightSyncError`, never as a
hang. After such a failure the ranks are out of step: the rank that saw it closes its end at
once (so that its peers fail at once too rather than at their deadline), the group is *broken*,
every later update on it raises at once, and each rank must `close()` it (idempotent) and
`WeightGroup.join` a new group with a fresh spec (a new port from `free_port()`). An engine
keeps serving its last complete version throughout: `receive` hands out tensors only after
step 3.

Blocking calls: run them in a thread (`asyncio.to_thread`) from async code. One update at a
time per group.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Self

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import ProcessGroupGloo

from .weight_plan import (
    ALIGN,
    DEFAULT_BUCKET_BYTES,
    DTYPES,
    BucketPlan,
    TensorMeta,
    _check,
    _from_fields,
    _is_int,
)

__all__ = [  # the plan's names too: callers import everything of weight sync from here
    "ALIGN", "DEFAULT_BUCKET_BYTES", "DEPTH", "DTYPES", "BucketPlan", "SendStats", "TensorMeta",
    "WeightGroup", "WeightReceiver", "WeightSender", "WeightStaging", "WeightSyncError",
    "WeightSyncSpec", "free_port", "push_over_actors",
]

log = logging.getLogger(__name__)

# Buckets in flight per rank. More keep the backend's threads busy instead of waking them
# per bucket (on CPU with 1 MiB buckets, depth 4 instead of 2 cut an update's CPU time by
# 10-20%, 8 a little more); each packed bucket in flight holds a staging buffer on the sender.
DEPTH = 4
# Added to the time left when a collective is posted. Gloo gives up at the deadline itself,
# so a failed group closes promptly. NCCL's watchdog tears the whole process down when an
# operation times out: it must never fire before our own wait does and aborts the group.
_BACKEND_GRACE_S = {"gloo": 0.0, "nccl": 60.0}


class WeightSyncError(RuntimeError):
    """An update failed or missed its deadline; the message names the group (host:port), the
    rank, the version, the step or bucket and the deadline. The receiving engine keeps its last
    complete version."""


# --- how to join ------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightSyncSpec:
    """How to join a weight group. Plain data: `to_dict()` travels in actor messages."""

    host: str
    port: int
    world_size: int
    """Rank 0 is the trainer (it hosts the TCPStore); ranks 1..world_size-1 are engines."""
    backend: str = "gloo"
    """"nccl" when the tensors live on CUDA (`asystem.device.collective_backend()`)."""
    timeout_s: float = 60.0
    """Deadline of `WeightGroup.join`, and the default one of each update."""
    group_name: str = "asystem-weights"
    """Prefix of this group's keys in the store."""

    def __post_init__(self) -> None:
        _check(isinstance(self.host, str) and self.host, "WeightSyncSpec.host", self.host, "a host name")
        _check(_is_int(self.port) and 0 < self.port < 65536, "WeightSyncSpec.port", self.port, "a port")
        _check(_is_int(self.world_size) and self.world_size >= 1, "WeightSyncSpec.world_size",
               self.world_size, "an int >= 1")
        _check(self.backend in ("gloo", "nccl"), "WeightSyncSpec.backend", self.backend, '"gloo" or "nccl"')
        _check(isinstance(self.timeout_s, (int, float)) and self.timeout_s > 0, "WeightSyncSpec.timeout_s",
               self.timeout_s, "a number > 0")
        _check(isinstance(self.group_name, str) and self.group_name, "WeightSyncSpec.group_name",
               self.group_name, "a name")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "world_size": self.world_size,
                "backend": self.backend, "timeout_s": self.timeout_s, "group_name": self.group_name}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WeightSyncSpec:
        return _from_fields(cls, data)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now, for a new group's store. Another process may take
    it before rank 0 binds it; `join` then fails with a clear error and a new port is needed."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class SendStats:
    """What one update cost the sender."""

    version: int
    buckets: int
    bytes: int
    packed_bytes: int  # copied into staging buffers; the rest went from the tensors' own memory
    seconds: float


# --- the group path ---------------------------------------------------------------------


class WeightGroup:
    """A dedicated process group: trainer rank 0 and the engines; not the default group.

    `join` is blocking and returns once every rank joined (or raises `WeightSyncError` after
    `spec.timeout_s`). A group whose update failed is `broken` and closed: join a new one.
    `close()` is idempotent; usable as a context manager.
    """

    def __init__(self, spec: WeightSyncSpec, rank: int, device: torch.device, store: dist.Store, backend: Any):
        self.spec, self.rank, self.device = spec, rank, device
        self.broken: str | None = None  # why, once an update failed mid-way
        self._store, self._backend = store, backend
        self._pending: dict[str, Any] = {}  # step -> the backend's Work, while in flight
        # An engine's last update's buckets, kept here (not in a WeightReceiver, which callers
        # may make per update) so that the next update can reuse them once released.
        self._bucket_buffers: list[torch.Tensor] = []

    @classmethod
    def join(cls, spec: WeightSyncSpec, rank: int, device: torch.device | None = None) -> WeightGroup:
        _check(_is_int(rank) and 0 <= rank < spec.world_size, "rank", rank, f"in [0, {spec.world_size})")
        device = torch.device(device) if device is not None else _default_device(spec.backend)
        wanted = "cuda" if spec.backend == "nccl" else "cpu"
        _check(device.type == wanted, f"device for backend {spec.backend}", device, f"a {wanted} device")
        update = _Update(None, spec.timeout_s)
        timeout = timedelta(seconds=spec.timeout_s)
        try:
            # Rank 0 serves the store; wait_for_workers=False because the backend's own
            # rendezvous below waits for every rank (bounded by the same timeout).
            store = dist.TCPStore(spec.host, spec.port, spec.world_size, rank == 0, timeout,
                                  wait_for_workers=False)
            backend = _new_backend(spec.backend, dist.PrefixStore(spec.group_name + "/", store),
                                   rank, spec.world_size, timeout)
        except (RuntimeError, ValueError, OSError) as e:
            raise WeightSyncError(f"weight group {spec.group_name!r} at {spec.address}: rank {rank} of "
                                  f"{spec.world_size} could not join within {spec.timeout_s:.1f}s: {e}") from e
        group = cls(spec, rank, device, store, backend)
        # NCCL connects lazily: one collective makes join mean "every rank is there" everywhere.
        group._allreduce("join", torch.ones(1, dtype=torch.int64, device=device), update)
        group._wait("join", update)
        return group

    def close(self) -> None:
        """Leave the group; a failed update has already closed it. After a failure the backend
        is aborted (NCCL needs that not to hang); gloo's pending operations end at the failed
        update's deadline at the latest, and closing waits for them."""
        if self._backend is None:
            return
        if self.broken:
            self._backend.abort()
        else:
            self._backend.shutdown()
        self._backend = self._store = None
        self._bucket_buffers = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"WeightGroup({self.spec.group_name!r} at {self.spec.address}, rank {self.rank}/"
                f"{self.spec.world_size}, {self.spec.backend} on {self.device})")

    # One update's collectives, posted and awaited by step name ("agreement", "bucket 3/16",
    # "ack"). Each is posted with the time left as the operation's own timeout, so that the
    # backend gives up at the deadline too. The Work objects live only in `_pending`, never in
    # a local variable: a traceback that outlives a failure would otherwise keep the gloo
    # context, and so the connections, open, and the peers would wait for their deadline.

    def _broadcast(self, step: str, tensor: torch.Tensor, update: _Update) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self._pending[step] = self._live(update).broadcast([tensor], opts)

    def _allreduce(self, step: str, tensor: torch.Tensor, update: _Update) -> None:
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.SUM
        self._pending[step] = self._live(update).allreduce([tensor], opts)

    def _live(self, update: _Update) -> Any:
        """The backend, its timeout set to the time left; raises if broken or closed."""
        if self.broken:
            raise WeightSyncError(f"{self!r} is broken ({self.broken}); close it and join a new group")
        if self._backend is None:
            raise WeightSyncError(f"{self!r} is closed")
        grace = _BACKEND_GRACE_S[self.spec.backend]
        self._backend.set_timeout(timedelta(seconds=max(update.left(), 0.001) + grace))
        return self._backend

    def _wait(self, step: str, update: _Update) -> None:
        try:
            if update.left() <= 0:
                raise TimeoutError("no time left")
            self._pending[step].wait(timedelta(seconds=update.left()))
        except (RuntimeError, TimeoutError) as e:
            raise self._fail(update, step, e) from e
        del self._pending[step]

    def _fail(self, update: _Update, step: str, cause: object) -> WeightSyncError:
        """Mark the group broken, close it (its peers then fail at once instead of at their
        deadline) and describe what failed."""
        where = step if update.version is None else f"version {update.version}, {step}"
        log.warning("weight sync failed: %r, %s: %s", self, where, cause)
        self.broken = f"{where} failed"
        self._pending.clear()
        self.close()
        return WeightSyncError(
            f"weight group {self.spec.group_name!r} at {self.spec.address}, rank {self.rank}/"
            f"{self.spec.world_size}, {where}: {cause} (deadline {update.timeout:.1f}s; "
            f"{time.monotonic() - update.start:.2f}s in). The group is broken: close it and join a new one")

    def _agree(self, plan: BucketPlan, ok: bool, update: _Update) -> None:
        """Step 1: compare every rank's (ok, version, digest); raises if any disagrees."""
        table = torch.zeros(self.spec.world_size, 3, dtype=torch.int64, device=self.device)
        table[self.rank] = torch.tensor([int(ok), plan.version, plan.digest])
        self._allreduce("agreement", table, update)
        self._wait("agreement", update)
        problems = []
        for rank, (rank_ok, version, digest) in enumerate(table.tolist()):
            if not rank_ok:
                problems.append(f"rank {rank} rejected its input")
            elif (version, digest) != (plan.version, plan.digest):
                problems.append(f"rank {rank} holds plan version {version} (digest {digest:x})")
        if problems:
            raise WeightSyncError(
                f"weight group {self.spec.group_name!r} at {self.spec.address}, rank {self.rank}: update to "
                f"version {plan.version} (digest {plan.digest:x}) refused: {'; '.join(problems)}. Nothing "
                f"was sent; the group is still usable")

    def _ack(self, update: _Update) -> None:
        """Step 3: returns once every rank has every bucket."""
        flags = torch.zeros(self.spec.world_size, dtype=torch.int64, device=self.device)
        flags[self.rank] = 1
        self._allreduce("ack", flags, update)
        self._wait("ack", update)


@dataclass(frozen=True)
class _Update:
    """The version and the deadline one update (or a join) runs under."""

    version: int | None
    timeout: float
    start: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        return self.start + self.timeout - time.monotonic()


class WeightSender:
    """Rank 0's end of a group: broadcasts one update at a time."""

    def __init__(self, group: WeightGroup, depth: int = DEPTH):
        _check(group.rank == 0, "WeightSender rank", group.rank, "0 (the trainer)")
        _check(_is_int(depth) and depth >= 1, "depth", depth, "an int >= 1")
        self.group, self.depth = group, depth
        self._staging: list[torch.Tensor] = []  # `depth` pack buffers, reused across updates

    def send(self, plan: BucketPlan, named_tensors: Iterable[tuple[str, torch.Tensor]],
             timeout: float | None = None) -> SendStats:
        """Broadcast `named_tensors` (matching `plan`) as version `plan.version`; return once
        every engine holds all of it. The tensors must not change until this returns.

        Raises ValueError (and every engine a WeightSyncError, the group staying usable) when
        the tensors do not match the plan; WeightSyncError when an engine disagrees on the
        plan, fails, dies or the `timeout` (seconds for the whole update, `spec.timeout_s` when
        None) passes.
        """
        update = _Update(plan.version, self.group.spec.timeout_s if timeout is None else timeout)
        try:
            tensors, problem = plan.match(named_tensors), None
        except ValueError as e:
            tensors, problem = {}, e
        if problem is not None:
            with contextlib.suppress(WeightSyncError):  # expected: the engines learn it from this
                self.group._agree(plan, False, update)
            raise problem
        self.group._agree(plan, True, update)
        packed = 0
        in_flight: deque[str] = deque()  # steps
        for index in range(len(plan.buckets)):
            if len(in_flight) == self.depth:  # frees the slot bucket `index` packs into
                self.group._wait(in_flight.popleft(), update)
            buffer = plan.solo_bytes(index, tensors, self.group.device)
            if buffer is None:
                buffer = plan.pack(index, tensors, self._slot(index % self.depth, plan.bucket_nbytes(index)))
                packed += buffer.numel()
            in_flight.append(_step(index, plan))
            self.group._broadcast(in_flight[-1], buffer, update)
        while in_flight:
            self.group._wait(in_flight.popleft(), update)
        self.group._ack(update)
        return SendStats(plan.version, len(plan.buckets), plan.total_bytes, packed, time.monotonic() - update.start)

    def _slot(self, slot: int, nbytes: int) -> torch.Tensor:
        while len(self._staging) <= slot:
            self._staging.append(torch.empty(0, dtype=torch.uint8, device=self.group.device))
        if self._staging[slot].numel() < nbytes:
            self._staging[slot] = torch.empty(nbytes, dtype=torch.uint8, device=self.group.device)
        return self._staging[slot]


class WeightReceiver:
    """One engine's end of a group."""

    def __init__(self, group: WeightGroup, device: torch.device | None = None, depth: int = DEPTH):
        _check(group.rank != 0, "WeightReceiver rank", group.rank, "an engine rank (>= 1)")
        _check(_is_int(depth) and depth >= 1, "depth", depth, "an int >= 1")
        self.group, self.depth = group, depth
        self.device = torch.device(device) if device is not None else group.device

    def receive(self, plan: BucketPlan, timeout: float | None = None,
                on_bucket: Callable[[int, list[tuple[str, torch.Tensor]]], None] | None = None,
                ) -> list[tuple[str, torch.Tensor]]:
        """Receive version `plan.version`; return its (name, tensor) pairs in plan order, on
        `self.device`, only once every bucket arrived on every rank. Otherwise raise
        WeightSyncError and return nothing: the caller keeps its old weights.

        The tensors are views into bucket buffers and stay valid as long as the caller holds
        any of them. The next update reuses a bucket buffer only if nothing references it any
        more (the caller loaded the tensors and dropped them), else it allocates a new one: no
        update ever writes into tensors a caller still holds, and one that loads and drops pays
        no fresh allocation (first-touch page faults can cost more than the transfer).

        `on_bucket(index, named)`, if given, sees each bucket as soon as it arrived, in order,
        while the next ones are in flight: it may stage or check them, not apply them, since
        the update as a whole may still fail. If it raises, the update fails on this rank (and
        on the others at the ack). `timeout`: seconds for the whole update, `spec.timeout_s`
        when None.
        """
        update = _Update(plan.version, self.group.spec.timeout_s if timeout is None else timeout)
        self.group._agree(plan, True, update)
        buffers = self.group._bucket_buffers = self._reuse_or_allocate(plan)
        named: list[tuple[str, torch.Tensor]] = []
        in_flight: deque[int] = deque()

        def land(index: int) -> None:
            self.group._wait(_step(index, plan), update)
            bucket = plan.unpack(index, buffers[index])
            if on_bucket is not None:
                try:
                    on_bucket(index, bucket)
                except Exception as e:
                    raise self.group._fail(update, f"on_bucket({index})", repr(e)) from e
            named.extend(bucket)

        for index in range(len(plan.buckets)):
            if len(in_flight) == self.depth:
                land(in_flight.popleft())
            self.group._broadcast(_step(index, plan), buffers[index], update)
            in_flight.append(index)
        while in_flight:
            land(in_flight.popleft())
        self.group._ack(update)
        if self.device != self.group.device:
            named = [(name, t.to(self.device)) for name, t in named]
        return named

    def _reuse_or_allocate(self, plan: BucketPlan) -> list[torch.Tensor]:
        old = self.group._bucket_buffers
        return [old[i] if i < len(old) and old[i].numel() == plan.bucket_nbytes(i) and _released(old[i])
                else torch.empty(plan.bucket_nbytes(i), dtype=torch.uint8, device=self.group.device)
                for i in range(len(plan.buckets))]


def _storage_refs(t: torch.Tensor) -> int:
    # How many tensors (and in-flight operations) share t's memory. A private counter, the
    # one torch's own cudagraph trees use to see whether outputs are still alive.
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


_ONE_OWNER = _storage_refs(torch.empty(1))


def _released(buffer: torch.Tensor) -> bool:
    """Nothing but `buffer` itself holds its memory: no tensor handed out, no pending work."""
    return _storage_refs(buffer) == _ONE_OWNER


def _default_device(backend: str) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def _new_backend(name: str, store: dist.Store, rank: int, size: int, timeout: timedelta) -> Any:
    """The bare backend (not a ProcessGroup wrapper): nothing global is registered, so the
    default group and vLLM's groups are untouched. Gloo connects to every rank here."""
    if name == "gloo":
        return ProcessGroupGloo(store, rank, size, timeout)
    from torch.distributed.distributed_c10d import ProcessGroupNCCL  # CUDA builds only

    options = ProcessGroupNCCL.Options()
    options._timeout = timeout
    return ProcessGroupNCCL(store, rank, size, options)


# --- the ZeroMQ path --------------------------------------------------------------------


async def push_over_actors(ref: Any, plan: BucketPlan, named_tensors: Iterable[tuple[str, torch.Tensor]],
                           timeout: float, depth: int = 2) -> SendStats:
    """Send one update to an engine actor through asks: `load_weight_bucket(version, index,
    plan, buffer)` per bucket, in order (the plan dict with bucket 0, None after it), at most
    `depth` in flight, then `commit_weights(version)`.

    The actor applies nothing before the commit (see `WeightStaging`). The tensors must not
    change until this returns; an actor in this same process gets them by reference (asks
    pass arguments without a copy there) and must copy what it keeps. Raises ValueError if
    the tensors do not match the plan, WeightSyncError (naming the actor, version, bucket and
    deadline) if an ask fails or `timeout` (seconds, the whole update) passes; the commit is
    then not sent and the engine keeps its weights.
    """
    start = time.monotonic()
    deadline = start + timeout
    tensors = plan.match(named_tensors)
    count = len(plan.buckets)
    in_flight: deque[tuple[str, asyncio.Future]] = deque()  # (step, ask)
    packed = 0
    step = "start"
    try:
        for index in range(count):
            if len(in_flight) == depth:
                step, ask = in_flight.popleft()
                await ask
            step = f"packing bucket {index}/{count}"
            # A fresh buffer per bucket: a local actor keeps a reference to what it was sent.
            buffer = plan.solo_bytes(index, tensors, torch.device("cpu"))
            if buffer is None:
                out = torch.empty(plan.bucket_nbytes(index), dtype=torch.uint8)
                buffer = await asyncio.to_thread(plan.pack, index, tensors, out)
                packed += buffer.numel()
            ask = ref.ask("load_weight_bucket", plan.version, index, plan.to_dict() if index == 0 else None,
                          buffer, timeout=max(deadline - time.monotonic(), 0.001))
            in_flight.append((f"bucket {index}/{count}", asyncio.ensure_future(ask)))
        while in_flight:
            step, ask = in_flight.popleft()
            await ask
        step = "commit"
        await ref.ask("commit_weights", plan.version, timeout=max(deadline - time.monotonic(), 0.001))
    except Exception as e:  # the actor's error, its death, or the deadline
        raise WeightSyncError(f"pushing weights version {plan.version} to {ref}, {step}: {type(e).__name__}: {e} "
                              f"(deadline {timeout:.1f}s); the engine keeps its previous version") from e
    finally:
        for _, ask in in_flight:
            ask.cancel()
    return SendStats(plan.version, len(plan.buckets), plan.total_bytes, packed, time.monotonic() - start)


class WeightStaging:
    """An engine's side of the ZeroMQ path: buckets wait here until `commit`.

    - `add(version, index, buffer, plan)` stages bucket `index` of `version`. The plan (a
      BucketPlan or its dict) must come with the first bucket of a version; later buckets may
      omit it or repeat it. A newer version discards a partial older one (logged, counted in
      `discarded`); a bucket of an older version, or of one already committed, raises ValueError.
      A bucket that arrives twice replaces the first copy (a retry).
    - `commit(version)` returns the version's (name, tensor) pairs, views into the staged
      buffers, once every bucket is there, and clears the staging; otherwise it raises
      WeightSyncError naming the missing buckets and keeps what is staged.
    """

    def __init__(self) -> None:
        self.plan: BucketPlan | None = None  # of the version being staged
        self.committed: int | None = None  # the last version commit returned
        self.discarded = 0
        self._buffers: dict[int, torch.Tensor] = {}

    def add(self, version: int, index: int, buffer: torch.Tensor,
            plan: BucketPlan | Mapping[str, Any] | None = None) -> None:
        _check(_is_int(version) and version >= 0, "weights version", version, "an int >= 0")
        if plan is not None and not isinstance(plan, BucketPlan):
            plan = BucketPlan.from_dict(plan)
        if plan is not None and plan.version != version:
            raise ValueError(f"bucket {index} says version {version}, its plan says {plan.version}")
        if self.committed is not None and version <= self.committed:
            raise ValueError(f"weights version {version} is stale: version {self.committed} is committed")
        if self.plan is not None and version < self.plan.version:
            raise ValueError(f"weights version {version} is stale: version {self.plan.version} is staging")
        newer = self.plan is None or version > self.plan.version
        if newer and plan is None:
            raise ValueError(f"the first bucket of weights version {version} must carry its plan")
        if not newer and plan is not None and plan.digest != self.plan.digest:
            raise ValueError(f"bucket {index} of version {version} comes with a different plan")
        target = plan if newer else self.plan
        if not _is_int(index) or not 0 <= index < len(target.buckets):
            raise ValueError(f"bucket index {index} out of range: version {version} has {len(target.buckets)}")
        target.unpack(index, buffer)  # checks dtype and size
        if newer:
            self._start(target)
        self._buffers[index] = buffer

    def missing(self) -> list[int]:
        """The bucket indices of the staged version that have not arrived."""
        if self.plan is None:
            return []
        return [i for i in range(len(self.plan.buckets)) if i not in self._buffers]

    def commit(self, version: int) -> list[tuple[str, torch.Tensor]]:
        if self.plan is None or self.plan.version != version:
            staged = None if self.plan is None else self.plan.version
            raise WeightSyncError(f"cannot commit weights version {version}: staging holds version {staged}")
        if missing := self.missing():
            raise WeightSyncError(f"cannot commit weights version {version}: buckets {missing} of "
                                  f"{len(self.plan.buckets)} have not arrived")
        named = [pair for i in range(len(self.plan.buckets)) for pair in self.plan.unpack(i, self._buffers[i])]
        self.plan, self._buffers, self.committed = None, {}, version
        return named

    def _start(self, plan: BucketPlan) -> None:
        if self.plan is not None:
            self.discarded += 1
            log.warning("weights version %d discarded with buckets %s missing: version %d arrives",
                        self.plan.version, self.missing(), plan.version)
        self.plan, self._buffers = plan, {}


# --- helpers ----------------------------------------------------------------------------


def _step(index: int, plan: BucketPlan) -> str:
    return f"bucket {index}/{len(plan.buckets)}"
