"""Trajectories and prompts: the plain data that flows from rollout to training.

A `Trajectory` is one sampled response to one prompt. Besides the tokens it keeps,
for every response token, the log-probability the inference engine sampled it with
and the policy version that produced it: C3PO++ lets a rollout continue across weight
updates, and IcePop needs each token's own sampling probability (RING1T.md 1-2).

Both classes convert to and from plain data (`dict`, `list`, `str`, `int`, `float`,
`None`) with `to_dict()` / `from_dict()`, so any msgpack or JSON codec can carry them.
`from_dict` validates every field and raises `ValueError` naming the field.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Sequence


class FinishReason(str, enum.Enum):
    """Why a response stopped. A trajectory that is still decoding has none (`None`)."""

    EOS = "eos"  # the model emitted its end-of-sequence token
    LENGTH = "length"  # the response hit the maximum length
    ABORTED = "aborted"  # the engine gave up on it (failure, cancellation); not trainable


@dataclass(frozen=True)
class Prompt:
    """A prompt to sample a group of responses for.

    `prompt_id` names the dataset item; it is not unique across attempts (a requeued
    prompt keeps its id and gets a new group).
    """

    prompt_id: str
    tokens: tuple[int, ...]

    def __post_init__(self) -> None:
        # Accept any sequence but store a tuple: a frozen prompt must not change under us.
        object.__setattr__(self, "tokens", tuple(self.tokens))

    def to_dict(self) -> dict[str, Any]:
        return {"prompt_id": self.prompt_id, "tokens": list(self.tokens)}

    @classmethod
    def from_dict(cls, data: Any) -> Prompt:
        _check_keys("Prompt", data, {"prompt_id", "tokens"})
        return cls(
            prompt_id=_str("Prompt.prompt_id", data["prompt_id"]),
            tokens=tuple(_int_list("Prompt.tokens", data["tokens"])),
        )


@dataclass
class Trajectory:
    """One response to one prompt, possibly sampled across several policy versions.

    Invariants kept by `append` and checked by `from_dict`:
    `response_tokens`, `infer_logprobs` and `versions` have the same length, and
    `versions` never decreases.
    """

    traj_id: int
    """Unique across the whole run (never reused, not even for a requeued prompt)."""
    group_id: int
    """The GRPO group: the G responses sampled for one attempt at one prompt."""
    prompt_id: str
    """The dataset item this responds to."""
    sample_index: int
    """Position within the group, 0 <= sample_index < G."""
    prompt_tokens: list[int]
    response_tokens: list[int] = field(default_factory=list)
    infer_logprobs: list[float] = field(default_factory=list)
    """log p_infer(y_t | prefix) as reported by the engine when it sampled token t."""
    versions: list[int] = field(default_factory=list)
    """Policy version of the weights that sampled token t."""
    reward: float | None = None
    finish_reason: FinishReason | None = None
    """None while the response is still being decoded."""
    retention: int = 0
    """How many training steps ended while this response was unfinished (C3PO++)."""

    @property
    def num_response_tokens(self) -> int:
        return len(self.response_tokens)

    @property
    def finished(self) -> bool:
        """True once the response has ended, whatever the reason (aborted included)."""
        return self.finish_reason is not None

    def versions_spanned(self) -> list[int]:
        """The distinct policy versions that produced this response, ascending."""
        return sorted(set(self.versions))

    def append(self, tokens: Sequence[int], logprobs: Sequence[float], version: int) -> None:
        """Append newly decoded tokens, all sampled by policy `version`.

        Raises ValueError if the trajectory has finished, if the lengths differ, or if
        `version` is older than the version of the last token (versions never go back).
        """
        if self.finished:
            raise ValueError(f"trajectory {self.traj_id}: append after finish ({self.finish_reason.value})")
        if len(tokens) != len(logprobs):
            raise ValueError(
                f"trajectory {self.traj_id}: {len(tokens)} tokens but {len(logprobs)} logprobs"
            )
        if self.versions and version < self.versions[-1]:
            raise ValueError(
                f"trajectory {self.traj_id}: version {version} is older than its last token's "
                f"version {self.versions[-1]}"
            )
        self.response_tokens.extend(tokens)
        self.infer_logprobs.extend(logprobs)
        # One list multiplication instead of a Python loop: rollouts append thousands of tokens.
        self.versions.extend([version] * len(tokens))

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists are copies): safe to hand to a codec or to mutate."""
        return {
            "traj_id": self.traj_id,
            "group_id": self.group_id,
            "prompt_id": self.prompt_id,
            "sample_index": self.sample_index,
            "prompt_tokens": list(self.prompt_tokens),
            "response_tokens": list(self.response_tokens),
            "infer_logprobs": list(self.infer_logprobs),
            "versions": list(self.versions),
            "reward": self.reward,
            "finish_reason": None if self.finish_reason is None else self.finish_reason.value,
            "retention": self.retention,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Trajectory:
        """Inverse of `to_dict`. Raises ValueError naming the first field that is wrong."""
        _check_keys("Trajectory", data, _TRAJECTORY_KEYS)
        traj = cls(
            traj_id=_int("Trajectory.traj_id", data["traj_id"]),
            group_id=_int("Trajectory.group_id", data["group_id"]),
            prompt_id=_str("Trajectory.prompt_id", data["prompt_id"]),
            sample_index=_int("Trajectory.sample_index", data["sample_index"], minimum=0),
            prompt_tokens=_int_list("Trajectory.prompt_tokens", data["prompt_tokens"]),
            response_tokens=_int_list("Trajectory.response_tokens", data["response_tokens"]),
            infer_logprobs=_float_list("Trajectory.infer_logprobs", data["infer_logprobs"]),
            versions=_int_list("Trajectory.versions", data["versions"]),
            reward=None if data["reward"] is None else _float("Trajectory.reward", data["reward"]),
            finish_reason=_finish_reason(data["finish_reason"]),
            retention=_int("Trajectory.retention", data["retention"], minimum=0),
        )
        n = len(traj.response_tokens)
        if len(traj.infer_logprobs) != n or len(traj.versions) != n:
            raise ValueError(
                f"Trajectory {traj.traj_id}: response_tokens, infer_logprobs and versions have "
                f"lengths {n}, {len(traj.infer_logprobs)}, {len(traj.versions)}; they must be equal"
            )
        if any(a > b for a, b in zip(traj.versions, traj.versions[1:])):
            raise ValueError(f"Trajectory {traj.traj_id}: versions must never decrease")
        return traj


_TRAJECTORY_KEYS = {
    "traj_id", "group_id", "prompt_id", "sample_index", "prompt_tokens", "response_tokens",
    "infer_logprobs", "versions", "reward", "finish_reason", "retention",
}


# Validation helpers. bool is a subclass of int in Python; a bool where a count or a
# token id belongs is almost certainly a bug upstream, so it is rejected.


def _check_keys(what: str, data: Any, keys: set[str]) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"{what}: expected a dict, got {type(data).__name__}")
    missing, unknown = keys - data.keys(), data.keys() - keys
    if missing or unknown:
        raise ValueError(f"{what}: missing keys {sorted(missing)}, unknown keys {sorted(map(str, unknown))}")


def _int(name: str, value: Any, minimum: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name}: expected int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected >= {minimum}, got {value}")
    return value


def _float(name: str, value: Any) -> float:
    # Ints are accepted: some codecs write 0.0 as 0.
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{name}: expected float, got {type(value).__name__}")
    return float(value)


def _str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name}: expected str, got {type(value).__name__}")
    return value


def _int_list(name: str, value: Any) -> list[int]:
    if not isinstance(value, list):
        raise ValueError(f"{name}: expected a list of int, got {type(value).__name__}")
    for i, v in enumerate(value):
        if not isinstance(v, int) or isinstance(v, bool):
            raise ValueError(f"{name}[{i}]: expected int, got {type(v).__name__}")
    return list(value)


def _float_list(name: str, value: Any) -> list[float]:
    if not isinstance(value, list):
        raise ValueError(f"{name}: expected a list of float, got {type(value).__name__}")
    return [_float(f"{name}[{i}]", v) for i, v in enumerate(value)]


def _finish_reason(value: Any) -> FinishReason | None:
    if value is None:
        return None
    try:
        return FinishReason(value)
    except ValueError:
        allowed = [r.value for r in FinishReason]
        raise ValueError(f"Trajectory.finish_reason: expected one of {allowed} or None, got {value!r}") from None
