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

Shared prompts. The G responses of a group share one prompt; computed separately, the
prompt's positions are computed G times (on short answers to long prompts, most of the
pass). `shared_prompt_rows` puts sequences with the same prompt into one row, laid out
as the prompt once followed by each response; `collate_rows` builds that row with
position ids that restart each response after the prompt and an attention mask that lets
each response see the prompt and itself only (`Packed`), so every token gets the same
logits as in a row of its own. The planning functions then plan rows instead of
sequences: `step_plan` takes row lengths.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch

from ring.trajectory import Trajectory


@dataclass(frozen=True)
class Packed:
    """The forward pass of a micro-batch whose rows hold several sequences sharing a prompt.

    A row is `prompt, response_1, response_2, ...`, right-padded. The logits at position
    `source[n]` predict the n-th response token of the micro-batch (in the row-major order
    of `MicroBatch.response_mask`).
    """

    input_ids: torch.Tensor
    """[R, W] int64."""
    position_ids: torch.Tensor
    """[R, W] int64: 0.. over the prompt, then each response continues from the prompt's end."""
    attention_mask: torch.Tensor
    """[R, 1, W, W] bool, True where query position i may attend to key position j: causal,
    and a response sees the prompt and its own earlier tokens only. Padding sees itself."""
    source: torch.Tensor
    """[N, 2] int64: (row, position) of the logits that predict each response token."""


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
    packed: Packed | None = None
    """How to run the forward pass when rows share prompts (`collate_rows`); None: one row
    per sequence, the tensors above."""

    @property
    def num_tokens(self) -> int:
        """Response tokens in this micro-batch."""
        return int(self.response_mask.sum())

    @property
    def positions(self) -> int:
        """Positions the forward pass computes, padding included (0 for a placeholder)."""
        if not self.indices:
            return 0
        return (self.packed.input_ids if self.packed is not None else self.input_ids).numel()

    def to(self, device: torch.device) -> MicroBatch:
        """The same micro-batch with every tensor on `device`."""
        packed = self.packed
        if packed is not None:
            packed = Packed(*(getattr(packed, f.name).to(device) for f in fields(Packed)))
        return MicroBatch(self.input_ids.to(device), self.response_mask.to(device),
                          self.infer_logprobs.to(device), self.advantages.to(device), self.indices, packed)


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


def shared_prompt_rows(prompts: Sequence[Sequence[int]], response_lengths: Sequence[int],
                       max_tokens: int) -> list[list[int]]:
    """Rows of sequence indices whose prompts are identical, each row at most `max_tokens`
    positions (its prompt once plus its responses) unless one sequence alone is longer.

    Rows come in the order of their first sequence; within a row, longest response first
    (index order on ties). Deterministic.
    """
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_prompt.setdefault(tuple(prompt), []).append(i)
    rows: list[list[int]] = []
    for prompt, members in by_prompt.items():
        row: list[int] = []
        size = len(prompt)
        for i in sorted(members, key=lambda i: (-response_lengths[i], i)):
            if row and size + response_lengths[i] > max_tokens:
                rows.append(row)
                row, size = [], len(prompt)
            row.append(i)
            size += response_lengths[i]
        rows.append(row)
    return rows


def row_length(trajectories: Sequence[Trajectory], row: Sequence[int]) -> int:
    """Positions of a row: the (shared) prompt once, plus every response."""
    return len(trajectories[row[0]].prompt_tokens) + sum(len(trajectories[i].response_tokens) for i in row)


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

    `lengths` are those of sequences, or of rows (`shared_prompt_rows`, `row_length`):
    the plan then holds row indices.

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


def collate_rows(
    trajectories: Sequence[Trajectory],
    advantages: Sequence[float],
    rows: Sequence[Sequence[int]],
    pad_id: int = 0,
) -> MicroBatch:
    """`collate` of the rows' sequences (in row order), with `packed` set when a row holds
    more than one sequence. The sequences of a row must have the same prompt."""
    indices = [i for row in rows for i in row]
    mb = collate(trajectories, advantages, indices, pad_id)
    if all(len(row) == 1 for row in rows):
        return mb
    width = max(row_length(trajectories, row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    position_ids = torch.zeros((len(rows), width), dtype=torch.int64)
    segment = torch.full((len(rows), width), -1, dtype=torch.int64)  # 0: prompt, k: response k
    source: list[tuple[int, int]] = []
    for r, row in enumerate(rows):
        prompt = trajectories[row[0]].prompt_tokens
        start = len(prompt)
        input_ids[r, :start] = torch.tensor(prompt, dtype=torch.int64)
        position_ids[r, :start] = torch.arange(start)
        segment[r, :start] = 0
        for k, i in enumerate(row, start=1):
            traj = trajectories[i]
            if traj.prompt_tokens != prompt:
                raise ValueError(f"collate_rows: trajectory {traj.traj_id} does not share the prompt of its row")
            n = len(traj.response_tokens)
            input_ids[r, start:start + n] = torch.tensor(traj.response_tokens, dtype=torch.int64)
            position_ids[r, start:start + n] = torch.arange(len(prompt), len(prompt) + n)
            segment[r, start:start + n] = k
            # The first response token is predicted by the prompt's last position.
            source += [(r, len(prompt) - 1)] + [(r, start + j) for j in range(n - 1)]
            start += n
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    sees = (segment[:, None, :] == 0) | (segment[:, None, :] == segment[:, :, None])  # [R, q, k]
    mask = (causal & sees) | torch.eye(width, dtype=torch.bool)
    packed = Packed(input_ids, position_ids, mask[:, None], torch.tensor(source, dtype=torch.int64).reshape(-1, 2))
    return replace(mb, packed=packed)


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
