"""The rollout engine contract: one small protocol, two backends (vLLM, torch).

An engine turns prompts into sampled tokens. Every token it reports carries the
log-probability it was sampled with and the version of the weights that sampled it,
because C3PO++ continues a response across weight updates and IcePop needs each token's
own sampling probability (RING1T.md 1-2).

    request = GenerationRequest("7", prompt_tokens=[...], sampling=SamplingParams(max_tokens=64))
    async for chunk in engine.generate(request):       # chunks of new tokens
        traj.append(chunk.tokens, chunk.logprobs, chunk.version)
    partials = await engine.interrupt()                # stop everything, get partials back
    await engine.update_weights(version=3, named_tensors=...)
    async for chunk in engine.generate(partials[0]):   # continue under the new weights
        ...

Semantics every backend keeps (tests/asystem/test_engine_contract.py checks them):

- `generate(request)` streams `TokenChunk`s for one request. A request whose
  `response_tokens` is not empty is a *continuation* (the issue's `continue`): the engine
  conditions on prompt + response tokens so far (with prefix caching where it has it) and
  samples only the remaining `max_tokens - len(response_tokens)` tokens. The last chunk
  of a request that ended has `finish_reason` set ("eos" for the end-of-sequence token or
  a stop string, "length" at max_tokens). A request that was interrupted ends its stream
  with a chunk (possibly empty) whose `finish_reason` is None and `interrupted` True.
- `interrupt(request_ids=None)` stops the given requests (all when None) at a token
  boundary and returns them as partial `GenerationRequest`s (prompt + every token
  generated so far, with their logprobs and versions), ready to pass to `generate` again.
  Requests that already finished or are unknown are skipped.
- `pause()` stops decoding at the next token boundary and returns once it has stopped;
  running requests stay where they are ("keep": their streams just wait) and new ones
  queue. `resume()` goes on. Both are idempotent.
- `update_weights(version, named_tensors)` replaces the weights with checkpoint-named
  tensors (transformers names; any subset of the model's; any floating dtype, converted to
  the engine's) and sets the version; the tokens
  sampled afterwards carry it. It may land while requests are running (between two decode
  steps): they continue under the new weights. It is all or nothing: on failure
  (`EngineError`: unknown name, wrong shape, or a version older than the current one) the
  engine keeps serving its previous version.
- `join_weight_group(spec, rank)` / `receive_weights(plan, timeout)`: the same update,
  received from the trainer's broadcast group (asystem/weights.py) inside the process
  that holds the weights.
- A request the engine cannot serve (a duplicate running id, token ids outside the
  vocabulary, longer than the model's context) or that fails while decoding ends its stream
  with `EngineError`; the engine goes on serving the others.
- `stats()` reports tokens/s, running and queued requests and the current version;
  `health()` raises if the engine cannot serve.
- Sampling with the same `seed` and the same weights gives the same tokens; greedy is
  `temperature=0`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


class EngineError(RuntimeError):
    """The engine cannot do what was asked (not started, closed, bad request)."""


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. `max_tokens` bounds the whole response, continuations included."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be >= 1, got {self.max_tokens}")

    def to_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens,
                "stop": list(self.stop), "seed": self.seed}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingParams:
        return cls(**data)


@dataclass
class GenerationRequest:
    """One response to produce, or to continue when `response_tokens` is not empty."""

    request_id: str
    prompt_tokens: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    response_tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)

    @property
    def remaining(self) -> int:
        return self.sampling.max_tokens - len(self.response_tokens)

    def to_dict(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "prompt_tokens": list(self.prompt_tokens),
                "sampling": self.sampling.to_dict(), "response_tokens": list(self.response_tokens),
                "logprobs": list(self.logprobs), "versions": list(self.versions)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationRequest:
        return cls(request_id=str(data["request_id"]), prompt_tokens=list(data["prompt_tokens"]),
                   sampling=SamplingParams.from_dict(data["sampling"]),
                   response_tokens=list(data.get("response_tokens", [])),
                   logprobs=list(data.get("logprobs", [])), versions=list(data.get("versions", [])))


@dataclass
class TokenChunk:
    """New tokens of one request, all sampled by weights `version`."""

    request_id: str
    tokens: list[int]
    logprobs: list[float]
    version: int
    finish_reason: str | None = None  # "eos" | "length" | None (still running or interrupted);
    # the RolloutWorker adds "aborted" for a request its engine failed
    interrupted: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "tokens": self.tokens, "logprobs": self.logprobs,
                "version": self.version, "finish_reason": self.finish_reason,
                "interrupted": self.interrupted}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenChunk:
        return cls(**data)


@dataclass
class EngineStats:
    tokens_per_s: float
    running: int
    queued: int
    version: int
    tokens_total: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class RolloutEngine(Protocol):
    """What the RolloutWorker needs from an engine. See the module docstring for semantics."""

    version: int

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]: ...
    async def interrupt(self, request_ids: Iterable[str] | None = None) -> list[GenerationRequest]: ...
    async def pause(self) -> None: ...
    async def resume(self) -> None: ...
    async def update_weights(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None: ...
    async def join_weight_group(self, spec: Any, rank: int) -> None: ...
    async def receive_weights(self, plan: Any, timeout: float) -> None: ...
    def stats(self) -> EngineStats: ...
    async def health(self) -> None: ...
