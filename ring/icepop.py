"""IcePop: a GRPO/PPO policy loss that drops tokens where trainer and engine disagree.

RING1T.md section 1. For every response token t of response i:

    k[i,t] = p_train(y | prefix; theta_old) / p_infer(y | prefix)     (detached)
    r[i,t] = p_train(y | prefix; theta)     / p_train(y | prefix; theta_old)
    M(k)   = k if alpha <= k <= beta else 0
    J      = 1/G sum_i 1/|y_i| sum_t M(k) * min(r*A, clip(r, 1-eps, 1+eps_high)*A)

J is maximised, so the loss returned is -J. The weight M(k) is a constant: no gradient
flows through k, out-of-band tokens contribute exactly zero gradient, and they still
count in |y_i|. In band, the gradient is k times the ordinary clipped-PPO gradient.

For comparison the same function computes two baselines, selected by `method`:
- "grpo": weight 1 on every token (no mismatch correction at all);
- "tis":  truncated importance sampling, weight min(k, C): one-sided, caps instead of drops.

Three ways to turn per-token terms into a scalar (`aggregation`):
- "seq_mean_group_mean": the report's form. Mean over each response's tokens, then mean
  over responses. With equal-size groups (what the scheduler produces) the mean over all
  responses of a batch equals the mean over groups of 1/G * sum_i, so no group ids are needed.
- "token_mean": sum over every response token of the batch / number of response tokens.
- "budget": C3PO. Sum over every token / the step's token budget Phi, a constant, so that a
  step with long responses does not get a larger gradient. Sums over micro-batches add up.

All probabilities enter as log-probabilities of shape [B, T]; `mask` marks response tokens
(prompt and padding positions are ignored entirely, whatever values they hold).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

METHODS = ("icepop", "grpo", "tis")
AGGREGATIONS = ("seq_mean_group_mean", "token_mean", "budget")


@dataclass(frozen=True)
class IcePopConfig:
    """Settings of the policy loss. Defaults are Ring-1T's (RING1T.md 1 and 4)."""

    method: str = "icepop"
    """"icepop" (mask outside [alpha, beta]), "grpo" (no correction) or "tis" (min(k, C))."""
    alpha: float = 0.5
    """Lower edge of the IcePop band: tokens with k < alpha are masked."""
    beta: float = 5.0
    """Upper edge of the IcePop band: tokens with k > beta are masked. [0.5, 2] destabilised Ring-1T."""
    eps: float = 0.2
    """PPO clip: r is clipped to [1 - eps, 1 + eps_high]."""
    eps_high: float | None = None
    """Upper clip for an asymmetric ("clip-higher") range; None means eps_high = eps."""
    tis_cap: float = 2.0
    """C for method "tis": the weight is min(k, C)."""
    aggregation: str = "seq_mean_group_mean"
    """How per-token terms become the scalar loss; see the module docstring."""
    token_budget: int | None = None
    """Phi, the divisor of aggregation "budget" (required there, unused elsewhere)."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"IcePopConfig.method: expected one of {METHODS}, got {self.method!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"IcePopConfig.aggregation: expected one of {AGGREGATIONS}, got {self.aggregation!r}")
        if not 0 <= self.alpha <= self.beta:
            raise ValueError(f"IcePopConfig: need 0 <= alpha <= beta, got alpha={self.alpha}, beta={self.beta}")
        if not 0 < self.eps < 1 or (self.eps_high is not None and self.eps_high <= 0):
            raise ValueError(f"IcePopConfig: need 0 < eps < 1 and eps_high > 0, got {self.eps}, {self.eps_high}")
        if self.tis_cap <= 0:
            raise ValueError(f"IcePopConfig.tis_cap: must be > 0, got {self.tis_cap}")
        if self.aggregation == "budget" and (self.token_budget is None or self.token_budget <= 0):
            raise ValueError("IcePopConfig.token_budget: aggregation 'budget' needs a positive token budget Phi")

    @property
    def clip_high(self) -> float:
        return self.eps if self.eps_high is None else self.eps_high


def mismatch_weight(k: torch.Tensor, config: IcePopConfig) -> torch.Tensor:
    """The per-token weight that corrects for the train-inference mismatch k (detached).

    icepop: M(k) = k inside [alpha, beta], 0 outside (both edges included);
    tis: min(k, C); grpo: 1.
    """
    k = k.detach()
    if config.method == "icepop":
        in_band = (k >= config.alpha) & (k <= config.beta)
        return torch.where(in_band, k, torch.zeros_like(k))
    if config.method == "tis":
        return k.clamp(max=config.tis_cap)
    return torch.ones_like(k)


def clipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's pessimistic term min(r*A, clip(r, 1-eps_low, 1+eps_high)*A), per token.

    Also returns where the clip is active, i.e. where the min picks the clipped branch and
    the token's gradient is cut (r above 1+eps_high with A > 0, or below 1-eps_low with A < 0).
    """
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * advantages
    return torch.minimum(unclipped, clipped), clipped < unclipped


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, config: IcePopConfig) -> torch.Tensor:
    """Reduce per-token terms [B, T] (zero outside `mask`) to a scalar; see the module docstring.

    Responses with no response token (all-padding rows) do not count in the sequence mean.
    """
    if config.aggregation == "budget":
        return per_token.sum() / config.token_budget
    lengths = mask.sum(dim=-1)
    if config.aggregation == "token_mean":
        return per_token.sum() / lengths.sum().clamp(min=1)
    has_tokens = lengths > 0
    per_sequence = per_token.sum(dim=-1)[has_tokens] / lengths[has_tokens]
    return per_sequence.sum() / has_tokens.sum().clamp(min=1)


def icepop_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    infer_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    config: IcePopConfig = IcePopConfig(),
) -> tuple[torch.Tensor, dict[str, float]]:
    """The policy loss -J and its diagnostics.

    Args:
        logp: [B, T] log p_train(y_t; theta), with grad.
        old_logp: [B, T] log p_train(y_t; theta_old), the trainer's recompute (no grad used).
        infer_logp: [B, T] log p_infer(y_t), as the engine sampled each token, whatever
            policy version produced it.
        advantages: [B] (one per response, broadcast over its tokens) or [B, T].
        mask: [B, T], true (or nonzero) on response tokens.
        config: method, band, clip and aggregation.

    Returns:
        (loss, metrics). loss is a scalar tensor to minimise. metrics are Python floats over
        the response tokens: masked_frac (outside [alpha, beta], which IcePop masks; reported
        for every method so runs can be compared), below_alpha_frac, above_beta_frac,
        tis_capped_frac (k > C), mismatch_abs_mean / mismatch_abs_max
        (|log p_train(theta_old) - log p_infer|), kl_k3 (k3 estimate of KL(p_infer || p_train),
        mean of k - 1 - log k, exact in expectation because tokens are sampled from p_infer),
        clip_frac (share of tokens whose gradient the PPO clip cuts), num_tokens.
    """
    mask = _check_inputs(logp, old_logp, infer_logp, advantages, mask)
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logp)
    advantages = advantages.detach().float()

    # Positions outside the mask may hold anything (padding, -inf); zero their log-ratios
    # before exp so that neither the loss nor its gradient can pick up a NaN from them.
    zero = torch.zeros((), dtype=torch.float32, device=logp.device)
    log_ratio = torch.where(mask, logp.float() - old_logp.detach().float(), zero)
    log_k = torch.where(mask, old_logp.detach().float() - infer_logp.detach().float(), zero)
    ratio, k = log_ratio.exp(), log_k.exp()

    weight = mismatch_weight(k, config)
    surrogate, clip_active = clipped_surrogate(ratio, advantages, config.eps, config.clip_high)
    per_token = torch.where(mask, weight * surrogate, zero)
    loss = -aggregate(per_token, mask, config)

    metrics = _metrics(k, log_k, mask, clip_active, config)
    return loss, metrics


def _check_inputs(logp, old_logp, infer_logp, advantages, mask) -> torch.Tensor:
    if logp.dim() != 2:
        raise ValueError(f"icepop_loss: logp must be [B, T], got shape {tuple(logp.shape)}")
    for name, t in (("old_logp", old_logp), ("infer_logp", infer_logp), ("mask", mask)):
        if t.shape != logp.shape:
            raise ValueError(f"icepop_loss: {name} has shape {tuple(t.shape)}, logp has {tuple(logp.shape)}")
    if advantages.shape not in (logp.shape, logp.shape[:1]):
        raise ValueError(
            f"icepop_loss: advantages must be [B] or [B, T] = {tuple(logp.shape)}, got {tuple(advantages.shape)}"
        )
    return mask if mask.dtype == torch.bool else mask != 0


@torch.no_grad()
def _metrics(k, log_k, mask, clip_active, config: IcePopConfig) -> dict[str, float]:
    n = int(mask.sum())
    denom = max(n, 1)

    def frac(flags: torch.Tensor) -> float:
        return float((flags & mask).sum()) / denom

    below, above = k < config.alpha, k > config.beta
    abs_gap = log_k.abs()[mask]
    # k3 = k - 1 - log k >= 0 per token; its mean estimates KL(p_infer || p_train) without bias.
    k3 = (k - 1.0 - log_k)[mask]
    return {
        "masked_frac": frac(below | above),
        "below_alpha_frac": frac(below),
        "above_beta_frac": frac(above),
        "tis_capped_frac": frac(k > config.tis_cap),
        "mismatch_abs_mean": float(abs_gap.mean()) if n else 0.0,
        "mismatch_abs_max": float(abs_gap.max()) if n else 0.0,
        "kl_k3": float(k3.mean()) if n else 0.0,
        "clip_frac": frac(clip_active),
        "num_tokens": float(n),
    }
