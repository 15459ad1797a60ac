"""Group advantages: GRPO, Dr.GRPO, RLOO, and dropping groups that carry no signal."""

import math

import pytest
import torch

from ring.advantages import dr_grpo, group_advantages, grpo, informative_groups, rloo, trajectory_advantages
from ring.trajectory import Trajectory


def test_grpo_normalises_by_group_mean_and_sample_std():
    adv = grpo(torch.tensor([[1.0, 0.0, 0.0, 1.0]]), eps=0.0)
    std = math.sqrt(1 / 3)  # sample std of (1, 0, 0, 1)
    torch.testing.assert_close(adv, torch.tensor([[0.5, -0.5, -0.5, 0.5]]) / std)


def test_grpo_population_std_option_and_eps():
    rewards = torch.tensor([[2.0, 0.0]])
    torch.testing.assert_close(grpo(rewards, eps=0.0, unbiased=False), torch.tensor([[1.0, -1.0]]))
    torch.testing.assert_close(grpo(rewards, eps=1.0, unbiased=False), torch.tensor([[0.5, -0.5]]))


def test_dr_grpo_only_centres():
    torch.testing.assert_close(dr_grpo(torch.tensor([[3.0, 1.0, 2.0]])), torch.tensor([[1.0, -1.0, 0.0]]))


def test_rloo_subtracts_the_mean_of_the_others():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.3, 0.9, 0.1, 0.5]])
    expected = torch.tensor(
        [[r - (sum(row) - r) / (len(row) - 1) for r in row] for row in rewards.tolist()]
    )
    torch.testing.assert_close(rloo(rewards), expected)
    # The known identity: RLOO = G/(G-1) * Dr.GRPO.
    torch.testing.assert_close(rloo(rewards), dr_grpo(rewards) * 4 / 3)


def test_uniform_groups_are_dropped_and_counted():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.5, 0.2]])
    result = group_advantages(rewards, "dr_grpo")
    assert result.kept.tolist() == [1, 3]
    assert result.groups_dropped == 2 and result.samples_dropped == 6
    torch.testing.assert_close(result.advantages, dr_grpo(rewards[[1, 3]]))


def test_keeping_uniform_groups_gives_them_zero_advantage():
    rewards = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    for method in ("grpo", "dr_grpo", "rloo"):
        result = group_advantages(rewards, method, drop_uniform=False)
        assert result.groups_dropped == 0 and result.kept.tolist() == [0, 1]
        assert result.advantages[0].abs().max().item() == 0.0


def test_informative_groups_tolerance():
    rewards = torch.tensor([[1.0, 1.0 + 1e-9], [0.0, 1.0]], dtype=torch.float64)
    assert informative_groups(rewards).tolist() == [True, True]
    assert informative_groups(rewards, atol=1e-6).tolist() == [False, True]


def test_rejects_single_response_groups_and_unknown_methods():
    with pytest.raises(ValueError, match="G >= 2"):
        grpo(torch.tensor([[1.0], [0.0]]))
    with pytest.raises(ValueError, match="method"):
        group_advantages(torch.zeros(1, 2), "ppo")


def _traj(traj_id, group_id, index, reward):
    return Trajectory(traj_id, group_id, f"p{group_id}", index, [1], reward=reward)


def test_trajectory_advantages_key_by_id_and_skip_uniform_groups():
    groups = [
        [_traj(0, 0, 0, 1.0), _traj(1, 0, 1, 0.0)],
        [_traj(2, 1, 0, 1.0), _traj(3, 1, 1, 1.0)],
    ]
    by_id, result = trajectory_advantages(groups, "dr_grpo")
    assert by_id == {0: 0.5, 1: -0.5}
    assert result.groups_dropped == 1 and result.samples_dropped == 2


def test_trajectory_advantages_needs_every_reward():
    with pytest.raises(ValueError, match="trajectory 1 has no reward"):
        trajectory_advantages([[_traj(0, 0, 0, 1.0), _traj(1, 0, 1, None)]])


def test_all_groups_uniform_leaves_an_empty_result():
    result = group_advantages(torch.ones(3, 4))
    assert result.advantages.shape == (0, 4) and result.kept.numel() == 0
    assert result.groups_dropped == 3 and result.samples_dropped == 12
