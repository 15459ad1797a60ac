"""ring/batching: every sequence trained exactly once, in bounded micro-batches, with ranks
balanced and in step, and micro-batch losses adding up to the batch's loss."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ring.batching import (
    BatchTotals,
    collate,
    collate_rows,
    loss_share,
    micro_batches,
    sequence_length,
    shard,
    shared_prompt_rows,
    step_plan,
)
from ring.icepop import IcePopConfig, icepop_loss
from ring.trajectory import FinishReason, Trajectory

lengths_st = st.lists(st.integers(min_value=1, max_value=300), min_size=0, max_size=60)


def make_traj(i: int, prompt_len: int, response_len: int) -> Trajectory:
    g = torch.Generator().manual_seed(i)
    return Trajectory(
        traj_id=i, group_id=i // 2, prompt_id=str(i // 2), sample_index=i % 2,
        prompt_tokens=torch.randint(1, 100, (prompt_len,), generator=g).tolist(),
        response_tokens=torch.randint(1, 100, (response_len,), generator=g).tolist(),
        infer_logprobs=(-torch.rand(response_len, generator=g) * 3).tolist(),
        versions=[0] * response_len, reward=float(i % 2), finish_reason=FinishReason.EOS,
    )


@settings(max_examples=200, deadline=None)
@given(lengths=lengths_st, world_size=st.integers(1, 5), max_tokens=st.integers(1, 1000))
def test_the_plan_trains_every_sequence_once_in_bounded_micro_batches(lengths, world_size, max_tokens):
    plan = step_plan(lengths, world_size, max_tokens)
    assert len(plan) == world_size
    assert len({len(p) for p in plan}) == 1, "every rank runs as many micro-batches"
    seen = sorted(i for rank in plan for mb in rank for i in mb)
    assert seen == list(range(len(lengths)))
    for rank in plan:
        for mb in rank:
            if len(mb) > 1:
                assert len(mb) * max(lengths[i] for i in mb) <= max_tokens
        # Placeholders only at the end, after the real micro-batches.
        real = [bool(mb) for mb in rank]
        assert real == sorted(real, reverse=True)


@settings(max_examples=200, deadline=None)
@given(lengths=lengths_st, world_size=st.integers(1, 5))
def test_shards_are_balanced_by_tokens(lengths, world_size):
    loads = [sum(lengths[i] for i in s) for s in shard(lengths, world_size)]
    # Longest-first greedy: no rank exceeds another by more than one sequence's length.
    if lengths:
        assert max(loads) - min(loads) <= max(lengths)
    assert sum(loads) == sum(lengths)


def test_the_plan_is_deterministic_and_ignores_input_identity():
    lengths = [5, 9, 9, 2, 7, 7, 1]
    assert step_plan(lengths, 3, 20) == step_plan(list(lengths), 3, 20)
    assert shard(lengths, 2) == [[0, 1, 4], [2, 3, 5, 6]]  # 21 and 19 tokens


def test_similar_lengths_share_a_micro_batch():
    assert micro_batches([10, 100, 11, 98, 12], max_tokens=200) == [[1, 3], [4, 2, 0]]


def test_a_sequence_longer_than_the_bound_runs_alone():
    assert micro_batches([50, 500, 40], max_tokens=80) == [[1], [0], [2]]


def test_fewer_sequences_than_ranks_gives_placeholders():
    plan = step_plan([4], world_size=3, max_tokens=100)
    assert plan == [[[0]], [[]], [[]]]


def test_collate_places_prompt_response_and_logprobs_by_position():
    trajs = [make_traj(0, 3, 2), make_traj(1, 2, 4)]
    mb = collate(trajs, [0.5, -1.0], [1, 0], pad_id=0)
    assert mb.indices == (1, 0)
    assert mb.input_ids.shape == (2, 6)
    assert mb.input_ids[0].tolist() == trajs[1].prompt_tokens + trajs[1].response_tokens
    assert mb.input_ids[1].tolist() == trajs[0].prompt_tokens + trajs[0].response_tokens + [0]
    assert mb.response_mask[1].tolist() == [False, False, False, True, True, False]
    assert mb.infer_logprobs[0, 2:].tolist() == pytest.approx(trajs[1].infer_logprobs)
    assert mb.infer_logprobs[1, 5] == 0
    assert mb.advantages.tolist() == [-1.0, 0.5]
    assert mb.num_tokens == 6


def test_an_empty_micro_batch_is_a_placeholder_without_response_tokens():
    mb = collate([make_traj(0, 3, 2)], [1.0], [])
    assert mb.input_ids.shape == (1, 1) and mb.num_tokens == 0 and mb.indices == ()


@pytest.mark.parametrize("aggregation", ["seq_mean_group_mean", "token_mean", "budget"])
@pytest.mark.parametrize("world_size", [1, 3])
def test_micro_batch_losses_sum_to_the_batch_loss(aggregation, world_size):
    trajs = [make_traj(i, 2 + i % 3, n) for i, n in enumerate([5, 1, 8, 3, 3, 7, 2])]
    advantages = torch.linspace(-1, 1, len(trajs)).tolist()
    config = IcePopConfig(aggregation=aggregation, token_budget=64, alpha=0.8, beta=1.25)
    totals = BatchTotals.of(trajs)

    def loss_of(mb):
        # A fixed "current policy" that differs from theta_old and from the engine.
        logp = mb.infer_logprobs * 0.9 + 0.05 * torch.sin(mb.input_ids.float())
        old = mb.infer_logprobs + 0.3 * torch.cos(mb.input_ids.float())
        return icepop_loss(logp, old, mb.infer_logprobs, mb.advantages, mb.response_mask, config)[0]

    whole = loss_of(collate(trajs, advantages, range(len(trajs))))
    lengths = [sequence_length(t) for t in trajs]
    parts = 0.0
    for rank in step_plan(lengths, world_size, max_tokens=16):
        for indices in rank:
            mb = collate(trajs, advantages, indices)
            parts += float(loss_of(mb)) * loss_share(aggregation, mb.response_mask, totals)
    assert parts == pytest.approx(float(whole), rel=1e-5, abs=1e-7)


def test_totals_ignore_empty_responses():
    totals = BatchTotals.of([make_traj(0, 2, 3), make_traj(1, 2, 0), make_traj(2, 1, 4)])
    assert totals == BatchTotals(sequences=2, tokens=7)


def test_sequences_share_a_row_only_with_their_own_prompt_and_within_the_budget():
    prompts = [[1, 2, 3], [4, 5], [1, 2, 3], [1, 2, 3], [4, 5]]
    responses = [4, 2, 6, 5, 9]
    # The prompt [1, 2, 3] with responses 6, 5, 4 needs 18 positions: the budget of 15 cuts it.
    assert shared_prompt_rows(prompts, responses, max_tokens=15) == [[2, 3], [0], [4, 1]]
    assert shared_prompt_rows(prompts, responses, max_tokens=100) == [[2, 3, 0], [4, 1]]
    # A sequence longer than the budget still gets a row.
    assert shared_prompt_rows([[1] * 10], [20], max_tokens=15) == [[0]]


def test_a_shared_row_lays_out_the_prompt_once_and_masks_responses_from_each_other():
    prompt = [7, 8, 9]
    trajs = [make_traj(i, 3, n) for i, n in enumerate([2, 3])]
    for traj in trajs:
        traj.prompt_tokens = list(prompt)
    mb = collate_rows(trajs, [1.0, -1.0], [[1, 0]])
    assert mb.indices == (1, 0)
    assert mb.input_ids.shape == (2, 6)  # the per-sequence layout is unchanged (targets)
    packed = mb.packed
    assert packed.input_ids[0].tolist() == prompt + trajs[1].response_tokens + trajs[0].response_tokens
    assert packed.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 3, 4]
    mask = packed.attention_mask[0, 0]
    assert mask[5].tolist() == [True] * 6 + [False] * 2  # response 1 sees the prompt and itself
    assert mask[6].tolist() == [True] * 3 + [False] * 3 + [True, False]  # response 2: not response 1
    # Token n of the micro-batch (row-major over the per-sequence layout) is predicted by
    # the prompt's last position for each first response token.
    assert packed.source.tolist() == [[0, 2], [0, 3], [0, 4], [0, 2], [0, 6]]
    assert mb.positions == 8
    with pytest.raises(ValueError, match="does not share the prompt"):
        collate_rows([make_traj(0, 3, 2), make_traj(1, 3, 2)], [1.0, 1.0], [[0, 1]])


def test_rows_of_one_sequence_need_no_packing():
    mb = collate_rows([make_traj(0, 3, 2), make_traj(1, 2, 4)], [1.0, 1.0], [[1], [0]])
    assert mb.packed is None and mb.indices == (1, 0) and mb.positions == 12
