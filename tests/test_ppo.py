"""Tests for optim/ppo.py and optim/kl_controller.py on values worked out by hand."""

import math

import pytest
import torch

from optim.kl_controller import AdaptiveKLController, FixedKLController
from optim.ppo import (
    gae,
    kl_estimate,
    masked_entropy,
    masked_mean,
    ppo_policy_loss,
    ppo_policy_stats,
    ppo_value_loss,
    shape_rewards,
    whiten,
)


def t(*rows, dtype=torch.float32):
    return torch.tensor(rows, dtype=dtype)


def close(a, b, atol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), atol=atol)


# ---------------------------------------------------------------------------- masked_mean


def test_masked_mean():
    x = t([1.0, 2.0, 100.0], [4.0, float("nan"), 6.0])
    mask = t([1, 1, 0], [1, 0, 1])  # 0/1 float mask; the NaN and the 100 are masked out
    assert close(masked_mean(x, mask), (1 + 2 + 4 + 6) / 4)
    assert close(masked_mean(x, mask.bool(), dim=1), [1.5, 5.0])
    assert close(masked_mean(x, torch.zeros(2, 3)), 0.0)  # nothing valid -> 0


# ---------------------------------------------------------------------------- KL estimators


def test_kl_estimators_worked_example():
    logp, ref = t(-1.0), t(-2.0)
    assert close(kl_estimate(logp, ref, "k1"), 1.0)
    assert close(kl_estimate(logp, ref, "k2"), 0.5)
    assert close(kl_estimate(logp, ref, "k3"), math.exp(-1))  # e^-1 - 1 + 1
    assert close(kl_estimate(logp, ref, "k3"), 0.367879)
    assert close(kl_estimate(logp, ref), 1.0)  # default k1


def test_kl_clamped_and_negative_ratio():
    logp, ref = t(-3.0, -1.0), t(-2.0, -2.0)  # lr = -1, 1
    assert close(kl_estimate(logp, ref, "k1"), [-1.0, 1.0])
    assert close(kl_estimate(logp, ref, "k1_clamped"), [0.0, 1.0])
    assert close(kl_estimate(logp, ref, "k2"), [0.5, 0.5])
    assert close(kl_estimate(logp, ref, "k3"), [math.e - 2, math.exp(-1)])  # e^1 - 1 - 1


def test_k3_is_non_negative():
    g = torch.Generator().manual_seed(0)
    lr = 5 * torch.randn(1000, generator=g, dtype=torch.float64)
    k3 = kl_estimate(lr, torch.zeros_like(lr), "k3")
    assert (k3 >= 0).all()
    assert close(k3, torch.exp(-lr) - 1 + lr, atol=1e-9)


def test_unknown_kl_kind():
    with pytest.raises(ValueError, match="k1, k2, k3, k1_clamped"):
        kl_estimate(t(0.0), t(0.0), "k4")


# ---------------------------------------------------------------------------- KL controllers


def test_adaptive_kl_controller_worked_example_and_clips():
    ctl = AdaptiveKLController(0.2, target=6, horizon=10000)
    ctl.update(12, 256)  # e = clip(12/6 - 1 = 1, -0.2, 0.2) = 0.2
    assert abs(ctl.value - 0.201024) < 1e-12
    low = AdaptiveKLController(0.2, 6, 10000)
    low.update(torch.tensor(1.0), 256)  # e = clip(-5/6) = -0.2 -> 0.2 * (1 - 0.00512)
    assert abs(low.value - 0.198976) < 1e-12
    mid = AdaptiveKLController(0.2, 6, 10000)
    mid.update(6.6, 256)  # e = 0.1, inside the clip -> 0.2 * (1 + 0.00256)
    assert abs(mid.value - 0.200512) < 1e-12
    mid.update(6.0, 256)  # on target: unchanged
    assert abs(mid.value - 0.200512) < 1e-12


def test_fixed_kl_controller_never_changes():
    ctl = FixedKLController(0.1)
    for kl in (0.0, 100.0, -3.0):
        ctl.update(kl, 512)
    assert ctl.value == 0.1


# ---------------------------------------------------------------------------- shape_rewards


def test_shape_rewards_hand_example():
    logprobs = t([0.1, -0.2, 0.3, 5.0], [0.2, 0.2, 0.2, 0.2], dtype=torch.float64)
    ref = torch.zeros_like(logprobs)  # so k1 = logprobs
    mask = t([1, 1, 1, 0], [1, 1, 1, 1]).bool()
    score = t(2.0, -1.0, dtype=torch.float64)
    rewards, kl = shape_rewards(score, logprobs, ref, mask, kl_coef=0.5)
    assert close(kl, [[0.1, -0.2, 0.3, 0.0], [0.2, 0.2, 0.2, 0.2]])
    assert close(rewards, [[-0.05, 0.1, -0.15 + 2.0, 0.0], [-0.1, -0.1, -0.1, -0.1 - 1.0]])
    rewards, kl = shape_rewards(score, logprobs, ref, mask, kl_coef=0.5, kl_kind="k1_clamped")
    assert close(kl[0], [0.1, 0.0, 0.3, 0.0])
    assert close(rewards[0], [-0.05, 0.0, 1.85, 0.0])
    # a response that does not start at position 0: the score still lands on its last token
    late = t([0, 1, 1, 0], [1, 1, 1, 1])
    rewards, kl = shape_rewards(score, logprobs, ref, late, kl_coef=0.5)
    assert close(rewards[0], [0.0, 0.1, -0.15 + 2.0, 0.0])


def test_shape_rewards_rejects_empty_rows():
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        shape_rewards(t(1.0, 1.0), torch.zeros(2, 3), torch.zeros(2, 3), t([1, 0, 0], [0, 0, 0]), kl_coef=0.1)


# ---------------------------------------------------------------------------- GAE


def test_gae_worked_examples():
    r, v, m = t([0.0, 0.0, 1.0]), t([0.5, 0.5, 0.5]), torch.ones(1, 3)
    adv, ret = gae(r, v, m)
    assert close(adv, [[0.5, 0.5, 0.5]]) and close(ret, [[1.0, 1.0, 1.0]])
    adv, ret = gae(r, v, m, gamma=1.0, lam=0.95)
    assert close(adv, [[0.45125, 0.475, 0.5]])
    assert close(ret, [[0.95125, 0.975, 1.0]])


def test_gae_hand_unrolled_gamma_09_lam_08():
    # gamma * lam = 0.72
    # row 0 ends after 3 tokens (garbage 99 / 77 past the end):
    #   A2 = 1.0 - 0.4 = 0.6
    #   A1 = (-0.2 + 0.9*0.4 - 0.5) + 0.72*0.6 = -0.34 + 0.432 = 0.092
    #   A0 = (0.1 + 0.9*0.5 - 0.3) + 0.72*0.092 = 0.25 + 0.06624 = 0.31624
    # row 1 is full length:
    #   A3 = 1 - 0.5 = 0.5
    #   A2 = (0 + 0.9*0.5 - 0.2) + 0.72*0.5 = 0.25 + 0.36 = 0.61
    #   A1 = (0.5 + 0.9*0.2 - 0) + 0.72*0.61 = 0.68 + 0.4392 = 1.1192
    #   A0 = (0 + 0.9*0 - 1) + 0.72*1.1192 = -1 + 0.805824 = -0.194176
    rewards = t([0.1, -0.2, 1.0, 99.0], [0.0, 0.5, 0.0, 1.0], dtype=torch.float64)
    values = t([0.3, 0.5, 0.4, 77.0], [1.0, 0.0, 0.2, 0.5], dtype=torch.float64)
    mask = t([1, 1, 1, 0], [1, 1, 1, 1])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert close(adv, [[0.31624, 0.092, 0.6, 0.0], [-0.194176, 1.1192, 0.61, 0.5]], atol=1e-12)
    assert close(ret, [[0.61624, 0.592, 1.0, 0.0], [0.805824, 1.1192, 0.81, 1.0]], atol=1e-12)

    # what lies past the end does not matter
    rewards2, values2 = rewards.clone(), values.clone()
    rewards2[0, 3], values2[0, 3] = -1e6, float("nan")
    adv2, ret2 = gae(rewards2, values2, mask, gamma=0.9, lam=0.8)
    assert torch.equal(adv, adv2) and torch.equal(ret, ret2)


def test_gae_masked_positions_before_the_response_are_zero():
    # mask [0, 1, 1]: the first position (say, the prompt) gets no advantage or return,
    # and the response's own advantages are those of the example above with r=[0, 1], V=[.5, .5]
    adv, ret = gae(t([7.0, 0.0, 1.0]), t([3.0, 0.5, 0.5]), t([0, 1, 1]))
    assert close(adv, [[0.0, 0.5, 0.5]]) and close(ret, [[0.0, 1.0, 1.0]])


def test_gae_matches_scalar_loop_and_is_detached():
    g = torch.Generator().manual_seed(1)
    rewards = torch.randn(3, 6, generator=g, dtype=torch.float64)
    values = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    lengths = [6, 2, 4]
    mask = torch.tensor([[i < n for i in range(6)] for n in lengths])
    adv, ret = gae(rewards, values, mask, gamma=0.99, lam=0.9)
    assert not adv.requires_grad and not ret.requires_grad
    for b, n in enumerate(lengths):
        a_next = 0.0
        for i in reversed(range(n)):
            v_next = values[b, i + 1].item() if i + 1 < n else 0.0
            a_next = rewards[b, i].item() + 0.99 * v_next - values[b, i].item() + 0.99 * 0.9 * a_next
            assert abs(adv[b, i].item() - a_next) < 1e-12
            assert abs(ret[b, i].item() - (a_next + values[b, i].item())) < 1e-12
        assert (adv[b, n:] == 0).all() and (ret[b, n:] == 0).all()


# ---------------------------------------------------------------------------- whiten


def test_whiten_hand_values_unbiased_variance():
    x = t([1.0, 2.0, 3.0, 50.0])
    mask = t([1, 1, 1, 0])
    # mean 2; unbiased var = (1 + 0 + 1) / (3 - 1) = 1 (the biased one would be 2/3)
    assert close(whiten(x, mask), [[-1.0, 0.0, 1.0, 0.0]])
    x = t([2.0, 4.0, 6.0, 50.0])  # mean 4, unbiased var 4, std 2
    assert close(whiten(x, mask), [[-1.0, 0.0, 1.0, 0.0]])
    assert close(whiten(x, mask, shift_mean=False), [[3.0, 4.0, 5.0, 0.0]])  # mean 4 kept


def test_whiten_random_statistics():
    g = torch.Generator().manual_seed(2)
    x = 3 + 5 * torch.randn(4, 9, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 9, generator=g) > 0.3
    out = whiten(x, mask)
    valid = out[mask]
    assert abs(valid.mean().item()) < 1e-10
    assert abs(valid.var(unbiased=True).item() - 1.0) < 1e-7
    assert (out[~mask] == 0).all()
    kept = whiten(x, mask, shift_mean=False)[mask]
    assert abs(kept.mean().item() - x[mask].mean().item()) < 1e-10
    assert abs(kept.var(unbiased=True).item() - 1.0) < 1e-7
    with pytest.raises(ValueError, match="at least 2"):
        one_valid = torch.zeros_like(mask)
        one_valid[0, 0] = True
        whiten(x, one_valid)


# ---------------------------------------------------------------------------- policy loss


def policy_case(dtype=torch.float32):
    # tokens: (rho, A) = (1.1, 2), (1.5, 1), (0.5, -1), (1.5, -1); old log-probs all -1
    rho = torch.tensor([[1.1, 1.5, 0.5, 1.5]], dtype=dtype)
    old = torch.full_like(rho, -1.0)
    logprobs = old + torch.log(rho)
    adv = torch.tensor([[2.0, 1.0, -1.0, -1.0]], dtype=dtype)
    return logprobs, old, adv, torch.ones_like(rho, dtype=torch.bool)


def test_policy_loss_hand_values_with_clipping():
    logprobs, old, adv, mask = policy_case(torch.float64)
    logprobs.requires_grad_(True)
    # per token max(-A rho, -A clip(rho, 0.8, 1.2)):
    #   (1.1, 2):  max(-2.2, -2.2) = -2.2
    #   (1.5, 1):  max(-1.5, -1.2) = -1.2   clipped
    #   (0.5, -1): max(0.5, 0.8)   =  0.8   clipped
    #   (1.5, -1): max(1.5, 1.2)   =  1.5
    loss = ppo_policy_loss(logprobs, old, adv, mask, clip_eps=0.2)
    assert close(loss, (-2.2 - 1.2 + 0.8 + 1.5) / 4, atol=1e-12)
    loss.backward()
    # d/dlogp of -A rho = -A rho; clipped tokens get no gradient; divided by 4 tokens
    assert close(logprobs.grad, [[-2.2 / 4, 0.0, 0.0, 1.5 / 4]], atol=1e-12)

    stats = ppo_policy_stats(logprobs, old, adv, mask, clip_eps=0.2)
    assert close(stats["clip_fraction"], 0.5)
    expected_kl = sum(r - 1 - math.log(r) for r in (1.1, 1.5, 0.5, 1.5)) / 4
    assert close(stats["approx_kl"], expected_kl, atol=1e-12)


def test_policy_loss_masked_positions_change_nothing():
    logprobs, old, adv, mask = policy_case()
    base = ppo_policy_loss(logprobs, old, adv, mask)
    pad = torch.tensor([[1000.0, -5.0]])  # exp(1000 - ...) would overflow if not masked
    lp = torch.cat([logprobs, pad], 1).requires_grad_(True)
    loss = ppo_policy_loss(lp, torch.cat([old, -pad], 1), torch.cat([adv, pad], 1), torch.cat([mask, torch.zeros(1, 2, dtype=torch.bool)], 1))
    assert torch.equal(loss, base)
    loss.backward()
    assert torch.isfinite(lp.grad).all() and (lp.grad[:, 4:] == 0).all()


def test_policy_loss_gradcheck():
    g = torch.Generator().manual_seed(3)
    old = torch.randn(2, 5, generator=g, dtype=torch.float64)
    # log-ratios in +-0.1 (unclipped) or 0.5 / -0.6 (clipped), all away from log(1 +- 0.2)
    shift = 0.1 * (2 * torch.rand(2, 5, generator=g, dtype=torch.float64) - 1)
    shift[0, 1], shift[1, 2] = 0.5, -0.6
    logprobs = (old + shift).requires_grad_(True)
    adv = torch.randn(2, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda lp: ppo_policy_loss(lp, old, adv, mask), (logprobs,))


# ---------------------------------------------------------------------------- value loss


def test_value_loss_hand_values():
    values = t([1.0, 0.5, 0.9], dtype=torch.float64).requires_grad_(True)
    old = t([0.5, 0.5, 0.5], dtype=torch.float64)
    returns = t([0.0, 1.0, 1.0], dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    # t0: max((1-0)^2, (0.7-0)^2) = 1;  t1: 0.25 both;  t2: max((0.9-1)^2, (0.7-1)^2) = 0.09 clipped
    loss = ppo_value_loss(values, old, returns, mask, clip_eps=0.2)
    assert close(loss, 0.5 * (1.0 + 0.25 + 0.09) / 3, atol=1e-12)
    loss.backward()
    # 0.5 * d(v-R)^2/dv / 3 = (v - R) / 3 on the unclipped terms; 0 where the clipped one wins
    assert close(values.grad, [[1.0 / 3, -0.5 / 3, 0.0]], atol=1e-12)


def test_value_loss_masked_positions_change_nothing_and_gradcheck():
    g = torch.Generator().manual_seed(4)
    old = torch.randn(2, 4, generator=g, dtype=torch.float64)
    delta = 0.1 * (2 * torch.rand(2, 4, generator=g, dtype=torch.float64) - 1)
    delta[0, 0], delta[1, 1] = 0.5, -0.45  # clipped, away from the +-0.2 kink
    values = (old + delta).requires_grad_(True)
    returns = torch.randn(2, 4, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda v: ppo_value_loss(v, old, returns, mask), (values,))
    garbage = returns.clone()
    garbage[mask == 0] = 1e4
    assert torch.equal(ppo_value_loss(values, old, returns, mask), ppo_value_loss(values, old, garbage, mask))


# ---------------------------------------------------------------------------- entropy


def test_masked_entropy_uniform_is_log_v_and_mask_matters():
    V = 6
    logits = torch.zeros(2, 3, V, dtype=torch.bfloat16)
    logits[1, 2, 0] = 30.0  # a near-deterministic position, masked out below
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    h = masked_entropy(logits, mask)
    assert h.dtype == torch.float32 and h.dim() == 0
    assert close(h, math.log(V), atol=1e-5)
    assert masked_entropy(logits, torch.ones(2, 3)).item() < math.log(V) - 0.1


def test_masked_entropy_matches_reference():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 5, 7, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    p = torch.softmax(logits.double(), -1)
    per_token = -(p * p.log()).sum(-1)
    assert close(masked_entropy(logits, mask), per_token[mask].mean(), atol=1e-5)
