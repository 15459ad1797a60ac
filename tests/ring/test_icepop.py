"""IcePop loss: values and gradients against a hand-written reference, baselines, metrics."""

import math

import pytest
import torch

from ring.icepop import IcePopConfig, icepop_loss

EPS = 0.2


def reference_objective(logp, old, infer, adv, mask, weight_fn, eps_low=EPS, eps_high=EPS):
    """J of RING1T.md 1 written token by token in float64: mean_i 1/|y_i| sum_t w(k) * min(...)."""
    total, n_seq = 0.0, 0
    for i in range(logp.shape[0]):
        length = int(mask[i].sum())
        if length == 0:
            continue
        seq = 0.0
        for t in range(logp.shape[1]):
            if not mask[i, t]:
                continue
            k = math.exp(float(old[i, t]) - float(infer[i, t]))
            r = torch.exp(logp[i, t].double() - float(old[i, t]))
            a = float(adv[i])
            surrogate = torch.minimum(r * a, r.clamp(1 - eps_low, 1 + eps_high) * a)
            seq = seq + weight_fn(k) * surrogate
        total = total + seq / length
        n_seq += 1
    return total / n_seq


def icepop_weight(k, alpha=0.5, beta=5.0):
    return k if alpha <= k <= beta else 0.0


def make_inputs(seed=0, b=3, t=6):
    """Random small batch with a few tokens pushed outside the IcePop band."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g) * 2 - 0.1
    infer = old + torch.randn(b, t, generator=g) * 0.3
    infer[0, 1] = old[0, 1] - math.log(8.0)  # k = 8  > beta
    infer[1, 2] = old[1, 2] + math.log(4.0)  # k = 1/4 < alpha
    logp = (old + torch.randn(b, t, generator=g) * 0.15).requires_grad_()
    adv = torch.tensor([1.0, -0.5, 2.0])
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[2, 4:] = False  # a shorter response
    return logp, old, infer, adv, mask


def grad_of(config, logp, old, infer, adv, mask):
    logp = logp.detach().clone().requires_grad_()
    loss, metrics = icepop_loss(logp, old, infer, adv, mask, config)
    loss.backward()
    return loss.detach(), logp.grad, metrics


def test_loss_and_gradient_match_the_reference_formula():
    logp, old, infer, adv, mask = make_inputs()
    loss, grad, _ = grad_of(IcePopConfig(), logp, old, infer, adv, mask)

    ref_logp = logp.detach().double().requires_grad_()
    j = reference_objective(ref_logp, old, infer, adv, mask, icepop_weight)
    (-j).backward()
    assert loss.item() == pytest.approx(-j.item(), rel=1e-5)
    torch.testing.assert_close(grad.double(), ref_logp.grad, rtol=1e-5, atol=1e-7)


def test_out_of_band_tokens_get_exactly_zero_gradient():
    logp, old, infer, adv, mask = make_inputs()
    _, grad, _ = grad_of(IcePopConfig(), logp, old, infer, adv, mask)
    assert grad[0, 1].item() == 0.0 and grad[1, 2].item() == 0.0
    # ... while their neighbours in band do get a gradient.
    assert grad[0, 0].item() != 0.0 and grad[1, 3].item() != 0.0


def test_masked_tokens_still_count_in_the_sequence_normaliser():
    # One response of 4 tokens, all r = 1, A = 1, k = 1 except one token masked (k = 8).
    old = torch.zeros(1, 4)
    infer = torch.tensor([[0.0, -math.log(8.0), 0.0, 0.0]])
    logp = old.clone().requires_grad_()
    loss, _ = icepop_loss(logp, old, infer, torch.tensor([1.0]), torch.ones(1, 4), IcePopConfig())
    assert loss.item() == pytest.approx(-3 / 4)  # not -3/3


def test_in_band_gradient_is_k_times_the_clipped_ppo_gradient():
    logp, old, infer, adv, mask = make_inputs(seed=1)
    _, g_icepop, _ = grad_of(IcePopConfig(), logp, old, infer, adv, mask)
    _, g_ppo, _ = grad_of(IcePopConfig(method="grpo"), logp, old, infer, adv, mask)
    k = torch.exp(old - infer)
    in_band = (k >= 0.5) & (k <= 5.0) & mask
    torch.testing.assert_close(g_icepop[in_band], (k * g_ppo)[in_band])
    assert torch.all(g_icepop[~in_band] == 0)


def test_mask_weight_carries_no_gradient_even_if_old_logp_requires_grad():
    logp, old, infer, adv, mask = make_inputs()
    old = old.clone().requires_grad_()
    infer = infer.clone().requires_grad_()
    loss, _ = icepop_loss(logp, old, infer, adv, mask)
    loss.backward()
    assert old.grad is None and infer.grad is None


def test_grpo_baseline_gradient_is_the_plain_clipped_policy_gradient():
    # Unclipped token: d(-J)/d logp = -r*A / (|y_i| * B). Clip-active token: exactly 0.
    old = torch.zeros(2, 3)
    infer = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, -3.0]])  # far out of band: grpo ignores k
    logp = torch.tensor([[0.1, 0.5, -0.1], [0.0, -0.5, 0.05]], requires_grad=True)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    loss, metrics = icepop_loss(logp, old, infer, adv, mask, IcePopConfig(method="grpo"))
    loss.backward()
    r = logp.detach().exp()
    expected = torch.tensor(
        [
            [-r[0, 0] / 6, 0.0, -r[0, 2] / 6],  # r = e^0.5 > 1.2 with A > 0: clipped
            [r[1, 0] / 4, 0.0, 0.0],  # r = e^-0.5 < 0.8 with A < 0: clipped; [1,2] is padding
        ]
    )
    torch.testing.assert_close(logp.grad, expected)
    assert metrics["clip_frac"] == pytest.approx(2 / 5)


def test_tis_baseline_weights_by_k_capped_at_c_and_drops_nothing():
    logp, old, infer, adv, mask = make_inputs(seed=2)
    cap = 1.5
    _, g_tis, _ = grad_of(IcePopConfig(method="tis", tis_cap=cap), logp, old, infer, adv, mask)
    _, g_ppo, _ = grad_of(IcePopConfig(method="grpo"), logp, old, infer, adv, mask)
    k = torch.exp(old - infer)
    torch.testing.assert_close(g_tis, k.clamp(max=cap) * g_ppo)
    # The k = 1/4 token IcePop drops still pulls under TIS, with a quarter of the weight.
    assert g_tis[1, 2].item() == pytest.approx(0.25 * g_ppo[1, 2].item(), rel=1e-5)
    assert g_tis[1, 2].item() != 0.0


def test_tis_value_matches_reference():
    logp, old, infer, adv, mask = make_inputs(seed=3)
    loss, _ = icepop_loss(logp, old, infer, adv, mask, IcePopConfig(method="tis", tis_cap=2.0))
    j = reference_objective(logp.detach().double(), old, infer, adv, mask, lambda k: min(k, 2.0))
    assert loss.item() == pytest.approx(-j.item(), rel=1e-5)


def test_asymmetric_upper_clip_lets_larger_ratios_through():
    old, infer = torch.zeros(1, 1), torch.zeros(1, 1)
    adv, mask = torch.tensor([1.0]), torch.ones(1, 1)
    logp = torch.full((1, 1), math.log(1.25))
    _, g_sym, m_sym = grad_of(IcePopConfig(), logp, old, infer, adv, mask)
    _, g_high, m_high = grad_of(IcePopConfig(eps_high=0.28), logp, old, infer, adv, mask)
    assert g_sym.item() == 0.0 and m_sym["clip_frac"] == 1.0
    assert g_high.item() == pytest.approx(-1.25) and m_high["clip_frac"] == 0.0


def test_aggregation_modes():
    # Two responses of lengths 1 and 3; per-token objective = A (r = k = 1).
    old = infer = torch.zeros(2, 3)
    logp = torch.zeros(2, 3)
    adv = torch.tensor([[4.0, 0, 0], [1.0, 2.0, 3.0]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]], dtype=torch.bool)

    def loss(**kw):
        return icepop_loss(logp, old, infer, adv, mask, IcePopConfig(**kw))[0].item()

    assert loss() == pytest.approx(-(4 / 1 + 6 / 3) / 2)  # per-sequence mean, then mean
    assert loss(aggregation="token_mean") == pytest.approx(-10 / 4)
    assert loss(aggregation="budget", token_budget=20) == pytest.approx(-10 / 20)


def test_budget_aggregation_adds_up_over_micro_batches():
    logp, old, infer, adv, mask = make_inputs(seed=4)
    config = IcePopConfig(aggregation="budget", token_budget=64)
    full, _ = icepop_loss(logp, old, infer, adv, mask, config)
    rows = [slice(i, i + 1) for i in range(3)]
    parts = sum(icepop_loss(logp[r], old[r], infer[r], adv[r], mask[r], config)[0] for r in rows)
    assert full.item() == pytest.approx(parts.item(), rel=1e-6)


def test_padding_values_do_not_leak_into_loss_or_gradient():
    logp, old, infer, adv, mask = make_inputs()
    clean_loss, clean_grad, clean_metrics = grad_of(IcePopConfig(), logp, old, infer, adv, mask)
    dirty = [x.detach().clone() for x in (logp, old, infer)]
    for x, v in zip(dirty, (float("nan"), float("-inf"), 50.0)):
        x[~mask] = v
    loss, grad, metrics = grad_of(IcePopConfig(), *dirty, adv, mask)
    assert loss.item() == clean_loss.item()
    assert torch.equal(grad, clean_grad)
    assert metrics == clean_metrics


def test_empty_responses_do_not_count_in_the_sequence_mean():
    old = infer = logp = torch.zeros(2, 2)
    mask = torch.tensor([[1, 1], [0, 0]], dtype=torch.bool)
    loss, metrics = icepop_loss(logp, old, infer, torch.tensor([1.0, 7.0]), mask)
    assert loss.item() == pytest.approx(-1.0)
    assert metrics["num_tokens"] == 2


def test_metrics_on_hand_made_mismatch():
    # k = 1, 0.4, 6, 2 on four response tokens (plus one padding token with k = 100).
    ks = [1.0, 0.4, 6.0, 2.0, 100.0]
    old = torch.zeros(1, 5)
    infer = -torch.log(torch.tensor([ks]))
    logp = torch.tensor([[0.0, 0.0, 0.0, math.log(1.5), 0.0]])  # one ratio beyond 1 + eps
    mask = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)
    _, m = icepop_loss(logp, old, infer, torch.tensor([1.0]), mask, IcePopConfig(tis_cap=1.5))
    logs = [abs(math.log(k)) for k in ks[:4]]
    assert m["masked_frac"] == pytest.approx(0.5)
    assert m["below_alpha_frac"] == pytest.approx(0.25)
    assert m["above_beta_frac"] == pytest.approx(0.25)
    assert m["tis_capped_frac"] == pytest.approx(0.5)
    assert m["mismatch_abs_mean"] == pytest.approx(sum(logs) / 4, rel=1e-5)
    assert m["mismatch_abs_max"] == pytest.approx(math.log(6.0), rel=1e-5)
    assert m["kl_k3"] == pytest.approx(sum(k - 1 - math.log(k) for k in ks[:4]) / 4, rel=1e-5)
    assert m["clip_frac"] == pytest.approx(0.25)
    assert m["num_tokens"] == 4


def test_k3_estimates_the_train_inference_kl():
    # Sample tokens from p_infer over a 4-token vocabulary; mean k3 -> KL(p_infer || p_train).
    g = torch.Generator().manual_seed(0)
    p_infer = torch.tensor([0.1, 0.2, 0.3, 0.4])
    p_train = torch.tensor([0.15, 0.15, 0.35, 0.35])
    y = torch.multinomial(p_infer, 200_000, replacement=True, generator=g)[None]
    old, infer = p_train.log()[y], p_infer.log()[y]
    _, m = icepop_loss(old.clone(), old, infer, torch.tensor([1.0]), torch.ones_like(y, dtype=torch.bool))
    exact = float((p_infer * (p_infer / p_train).log()).sum())
    assert m["kl_k3"] == pytest.approx(exact, rel=0.05)


def test_invalid_configs_and_shapes_are_rejected():
    with pytest.raises(ValueError, match="token_budget"):
        IcePopConfig(aggregation="budget")
    with pytest.raises(ValueError, match="method"):
        IcePopConfig(method="ppo")
    with pytest.raises(ValueError, match="alpha <= beta"):
        IcePopConfig(alpha=2.0, beta=1.0)
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="advantages"):
        icepop_loss(x, x, x, torch.zeros(3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="infer_logp"):
        icepop_loss(x, x, torch.zeros(2, 4), torch.zeros(2), torch.ones(2, 3))
