"""From finished trajectories to padded tensors: data-parallel shards and micro-batches.

A training step splits its batch twice: across the data-parallel ranks, then, on each
rank, into micro-batches small enough for one forward/backward pass. Both splits are pure
functions of the sequence lengths, so every rank computes the same plan from the same
batch without talking to the others.

    plan = step_plan(lengths, world_size=2, max_tokens=4096)   # [rank][micro-batch] -> indices
    for indices in plan[rank]:
        mb = collate(trajectories, advantages, indices)          # padded tensors
        share = loss_share(icepop.aggregation, mb.response_mask, totals)

- A sequence is prompt + response; its length counts every position of the forward pass.
- `shard` balances ranks by tokens (longest first, each to the least loaded rank).
- `micro_batches` packs sequences of similar length together (longest first) while the
  padded size, sequences x longest length, stays within `max_tokens`. A sequence is never
  split: one longer than `max_tokens` gets a micro-batch of its own.
- `step_plan` pads every rank to the same number of micro-batches with empty ones: under
  FSDP every forward and backward is a collective, so all ranks must run as many.
- `loss_share` makes micro-batch losses add up to the loss of the whole batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ring.trajectory import Trajectory


@dataclass(frozen=True)
class MicroBatch:
    """Right-padded tensors for a few sequences; position j of a row holds token j.

    `response_mask[b, j]` is true where token j is a response token. `infer_logprobs[b, j]`
    is the engine's log-probability of that token (0 elsewhere). A micro-batch with no
    sequence (`indices` empty) is a placeholder that keeps ranks in step (see `step_plan`).
    """

    input_ids: torch.Tensor
    """[B, L] int64: prompt + response tokens, then `pad_id`."""
    response_mask: torch.Tensor
    """[B, L] bool."""
    infer_logprobs: torch.Tensor
    """[B, L] float32."""
    advantages: torch.Tensor
    """[B] float32: one advantage per sequence, for all its tokens."""
    indices: tuple[int, ...]
    """Positions of these sequences in the list given to `collate`."""

    @property
    def num_tokens(self) -> int:
        """Response tokens in this micro-batch."""
        return int(self.response_mask.sum())


@dataclass(frozen=True)
class BatchTotals:
    """What the loss of a whole batch is normalised by (every rank knows it)."""

    sequences: int
    """Sequences with at least one response token."""
    tokens: int
    """Response tokens."""

    @classmethod
    def of(cls, trajectories: Sequence[Trajectory]) -> BatchTotals:
        lengths = [t.num_response_tokens for t in trajectories]
        return cls(sequences=sum(1 for n in lengths if n > 0), tokens=sum(lengths))


def sequence_length(traj: Trajectory) -> int:
    """Positions in the forward pass: prompt plus response tokens."""
    return len(traj.prompt_tokens) + len(traj.response_tokens)


def shard(lengths: Sequence[int], world_size: int) -> list[list[int]]:
    """Split sequence indices across `world_size` ranks, balancing total tokens.

    Longest first, each to the rank with the fewest tokens so far (the lowest rank on a
    tie). Deterministic. A rank may get nothing when there are fewer sequences than ranks.
    Each rank's indices come back in ascending order.
    """
    if world_size < 1:
        raise ValueError(f"shard: world_size must be >= 1, got {world_size}")
    load = [0] * world_size
    shards: list[list[int]] = [[] for _ in range(world_size)]
    for i in _longest_first(lengths):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        shards[rank].append(i)
        load[rank] += lengths[i]
    return [sorted(s) for s in shards]


def micro_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group sequence indices so that each group's padded size stays within `max_tokens`.

    The padded size of a group is its number of sequences times its longest length.
    Sequences are taken longest first (index order on ties) and added to the current
    group while it fits, so lengths within a group are close and padding is small. A
    sequence longer than `max_tokens` forms a group alone.
    """
    if max_tokens < 1:
        raise ValueError(f"micro_batches: max_tokens must be >= 1, got {max_tokens}")
    groups: list[list[int]] = []
    for i in _longest_first(lengths):
        # The first member of a group is its longest: later ones never raise the padding.
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def step_plan(lengths: Sequence[int], world_size: int, max_tokens: int) -> list[list[list[int]]]:
    """`plan[rank]` = that rank's micro-batches (lists of indices into `lengths`).

    Every rank gets the same number of micro-batches; ranks with fewer real ones get empty
    lists at the end, which the trainer runs as placeholder passes so that the collectives
    of FSDP match on all ranks.
    """
    plan = []
    for indices in shard(lengths, world_size):
        groups = micro_batches([lengths[i] for i in indices], max_tokens)
        plan.append([[indices[j] for j in group] for group in groups])
    most = max(len(p) for p in plan)
    return [p + [[] for _ in range(most - len(p))] for p in plan]


def collate(
    trajectories: Sequence[Trajectory],
    advantages: Sequence[float],
    indices: Sequence[int],
    pad_id: int = 0,
) -> MicroBatch:
    """Padded tensors for `trajectories[i] for i in indices` (one row each, in that order).

    Empty `indices` gives a placeholder with one padding position and no response token.
    """
    rows = [trajectories[i] for i in indices]
    width = max((sequence_length(t) for t in rows), default=1)
    input_ids = torch.full((max(len(rows), 1), width), pad_id, dtype=torch.int64)
    response_mask = torch.zeros(input_ids.shape, dtype=torch.bool)
    infer_logprobs = torch.zeros(input_ids.shape, dtype=torch.float32)
    for b, traj in enumerate(rows):
        start, end = len(traj.prompt_tokens), sequence_length(traj)
        input_ids[b, :start] = torch.tensor(traj.prompt_tokens, dtype=torch.int64)
        input_ids[b, start:end] = torch.tensor(traj.response_tokens, dtype=torch.int64)
        response_mask[b, start:end] = True
        infer_logprobs[b, start:end] = torch.tensor(traj.infer_logprobs, dtype=torch.float32)
    adv = torch.tensor([float(advantages[i]) for i in indices] or [0.0], dtype=torch.float32)
    return MicroBatch(input_ids, response_mask, infer_logprobs, adv, tuple(indices))


def loss_share(aggregation: str, response_mask: torch.Tensor, totals: BatchTotals) -> float:
    """The factor that turns a micro-batch's loss into its share of the batch's loss.

    `icepop_loss` on a micro-batch averages over that micro-batch only; multiplied by this
    factor, the micro-batch losses of all ranks sum to `icepop_loss` on the whole batch:
    - "seq_mean_group_mean": sequences here / sequences in the batch;
    - "token_mean": response tokens here / response tokens in the batch;
    - "budget": 1 (the divisor is the constant Phi already).
    """
    if aggregation == "budget":
        return 1.0
    lengths = response_mask.sum(dim=-1)
    if aggregation == "token_mean":
        return float(lengths.sum()) / max(totals.tokens, 1)
    if aggregation == "seq_mean_group_mean":
        return float((lengths > 0).sum()) / max(totals.sequences, 1)
    raise ValueError(f"loss_share: unknown aggregation {aggregation!r}")


def _longest_first(lengths: Sequence[int]) -> list[int]:
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
