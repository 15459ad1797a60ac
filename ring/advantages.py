"""Group advantages: every response is scored against the other responses to its prompt.

`rewards` is a [N, G] tensor: N groups (prompts) of G responses each. Each estimator gives
one advantage per response; the loss broadcasts it over the response's tokens.

- GRPO:    A_i = (R_i - mean(R)) / (std(R) + eps)       (RING1T.md 2)
- Dr.GRPO: A_i =  R_i - mean(R)                         (no std: no difficulty re-weighting)
- RLOO:    A_i =  R_i - mean_{j != i} R_j = G/(G-1) * (R_i - mean(R))

std is the sample standard deviation (divides by G-1), as in verl and TRL; pass
`unbiased=False` for the population one. The report does not say which.

A group whose rewards are all equal has zero advantage everywhere under all three
estimators: it carries no signal and only dilutes the loss normaliser. `group_advantages`
drops such groups and says how many it dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ring.trajectory import Trajectory

ESTIMATORS = ("grpo", "dr_grpo", "rloo")


def grpo(rewards: torch.Tensor, eps: float = 1e-6, unbiased: bool = True) -> torch.Tensor:
    """(R - mean) / (std + eps) within each group (row)."""
    rewards = _check(rewards)
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True, unbiased=unbiased)
    return (rewards - mean) / (std + eps)


def dr_grpo(rewards: torch.Tensor) -> torch.Tensor:
    """R - mean within each group (Dr.GRPO drops GRPO's division by std)."""
    rewards = _check(rewards)
    return rewards - rewards.mean(dim=1, keepdim=True)


def rloo(rewards: torch.Tensor) -> torch.Tensor:
    """R_i minus the mean reward of the other G-1 responses of its group."""
    rewards = _check(rewards)
    g = rewards.shape[1]
    leave_one_out_mean = (rewards.sum(dim=1, keepdim=True) - rewards) / (g - 1)
    return rewards - leave_one_out_mean


def informative_groups(rewards: torch.Tensor, atol: float = 0.0) -> torch.Tensor:
    """[N] bool: True where a group's rewards are not all equal (max - min > atol)."""
    rewards = _check(rewards)
    spread = rewards.max(dim=1).values - rewards.min(dim=1).values
    return spread > atol


@dataclass(frozen=True)
class GroupAdvantages:
    """Advantages of the kept groups, which rows of the input they are, and what was dropped."""

    advantages: torch.Tensor
    """[K, G] for the K kept groups, in input order."""
    kept: torch.Tensor
    """[K] long: the input row of each kept group."""
    groups_dropped: int
    samples_dropped: int


def group_advantages(
    rewards: torch.Tensor,
    method: str = "grpo",
    eps: float = 1e-6,
    unbiased: bool = True,
    drop_uniform: bool = True,
    atol: float = 0.0,
) -> GroupAdvantages:
    """Advantages by `method` ("grpo", "dr_grpo", "rloo") after dropping uniform groups.

    With `drop_uniform=False` every group is kept (uniform groups get advantage 0).
    """
    rewards = _check(rewards)
    if method not in ESTIMATORS:
        raise ValueError(f"group_advantages: method must be one of {ESTIMATORS}, got {method!r}")
    keep = informative_groups(rewards, atol) if drop_uniform else torch.ones(len(rewards), dtype=torch.bool)
    kept_rewards = rewards[keep]
    if len(kept_rewards) == 0:
        adv = kept_rewards.clone()  # every group dropped: nothing to normalise
    elif method == "grpo":
        adv = grpo(kept_rewards, eps, unbiased)
    elif method == "dr_grpo":
        adv = dr_grpo(kept_rewards)
    else:
        adv = rloo(kept_rewards)
    dropped = int((~keep).sum())
    return GroupAdvantages(
        advantages=adv,
        kept=keep.nonzero().flatten(),
        groups_dropped=dropped,
        samples_dropped=dropped * rewards.shape[1],
    )


def trajectory_advantages(
    groups: Sequence[Sequence[Trajectory]], method: str = "grpo", **kwargs
) -> tuple[dict[int, float], GroupAdvantages]:
    """Advantages keyed by trajectory id, for groups of scored trajectories (as in a Batch).

    Trajectories of dropped groups are absent from the dict. Keyword arguments go to
    `group_advantages`. Raises ValueError if a reward is missing or groups differ in size.
    """
    sizes = {len(g) for g in groups}
    if len(sizes) > 1:
        raise ValueError(f"trajectory_advantages: groups must have equal sizes, got {sorted(sizes)}")
    for group in groups:
        for traj in group:
            if traj.reward is None:
                raise ValueError(f"trajectory_advantages: trajectory {traj.traj_id} has no reward")
    rewards = torch.tensor([[t.reward for t in g] for g in groups], dtype=torch.float64)
    if not groups:
        rewards = rewards.reshape(0, 2)  # no groups at all: an empty batch of pairs
    result = group_advantages(rewards, method, **kwargs)
    by_id: dict[int, float] = {}
    for row, adv in zip(result.kept.tolist(), result.advantages.tolist()):
        for traj, a in zip(groups[row], adv):
            by_id[traj.traj_id] = a
    return by_id, result


def _check(rewards: torch.Tensor) -> torch.Tensor:
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [N groups, G >= 2 responses], got shape {tuple(rewards.shape)}")
    return rewards if rewards.is_floating_point() else rewards.float()
