"""Tests for optim/dpo.py on values worked out by hand.

The running example: policy chosen -1, policy rejected -3, reference chosen -2, reference
rejected -2, so h = (pc - pr) - (rc - rr) = 2 - 0 = 2.
"""

import math

import pytest
import torch

from optim.dpo import dpo_loss, dpo_with_sft_loss, preference_metrics


def t(*values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


PC, PR, RC, RR = t(-1.0), t(-3.0), t(-2.0), t(-2.0)  # h = 2


def test_sigmoid_hand_value_and_rewards():
    losses, chosen, rejected = dpo_loss(PC, PR, RC, RR, beta=0.5)  # beta * h = 1
    assert torch.allclose(losses, t(math.log(1 + math.exp(-1))), atol=1e-6)  # 0.3132617
    assert torch.allclose(chosen, t(0.5)) and torch.allclose(rejected, t(-0.5))  # 0.5*(-1+2), 0.5*(-3+2)


def test_sigmoid_label_smoothing_hand_value():
    # 0.9 * log(1 + e^-1) + 0.1 * log(1 + e^1) = log(1 + e^-1) + 0.1, since log(1+e) - log(1+e^-1) = 1
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.1)
    assert torch.allclose(losses, t(math.log(1 + math.exp(-1)) + 0.1), atol=1e-6)
    assert abs(losses.item() - 0.4132617) < 1e-6


def test_hinge_hand_values():
    assert torch.allclose(dpo_loss(PC, PR, RC, RR, beta=0.25, loss_type="hinge")[0], t(0.5))  # 1 - 0.5
    assert torch.allclose(dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="hinge")[0], t(0.0))  # relu(1 - 1)
    assert torch.allclose(dpo_loss(PC, PR, RC, RR, beta=1.0, loss_type="hinge")[0], t(0.0))  # relu(1 - 2)


def test_ipo_hand_values():
    assert torch.allclose(dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="ipo")[0], t(1.0))  # (2 - 1)^2
    assert torch.allclose(dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="ipo")[0], t(9.0))  # (2 - 5)^2


def test_policy_equal_to_reference():
    logps = t(-4.0, -10.0, -0.5)
    other = t(-7.0, -1.0, -3.0)
    losses, chosen, rejected = dpo_loss(logps, other, logps, other, beta=0.1)
    assert torch.allclose(losses, torch.full((3,), math.log(2.0)), atol=1e-6)
    assert torch.all(chosen == 0) and torch.all(rejected == 0)
    ipo, _, _ = dpo_loss(logps, other, logps, other, beta=0.1, loss_type="ipo")
    assert torch.allclose(ipo, torch.full((3,), 25.0))  # (0 - 1/0.2)^2


def test_sigmoid_gradient_signs_and_value():
    pc, pr = PC.clone().requires_grad_(True), PR.clone().requires_grad_(True)
    losses, chosen, rejected = dpo_loss(pc, pr, RC, RR, beta=0.5)
    losses.sum().backward()
    # a gradient step raises the chosen log-prob and lowers the rejected one
    assert pc.grad.item() < 0 and pr.grad.item() > 0
    # d/d pc of -logsigmoid(beta*h) = -beta * sigmoid(-beta*h) = -0.5 * sigmoid(-1)
    expected = -0.5 / (1 + math.e)
    assert abs(pc.grad.item() - expected) < 1e-6 and abs(pr.grad.item() + expected) < 1e-6
    assert not chosen.requires_grad and not rejected.requires_grad


@pytest.mark.parametrize("loss_type,label_smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("hinge", 0.0), ("ipo", 0.0)])
def test_gradcheck(loss_type, label_smoothing):
    g = torch.Generator().manual_seed(0)
    # h = 2 +- noise keeps beta*h = 0.6 +- 0.15 away from the hinge kink at beta*h = 1
    inputs = [(-5 + 0.1 * torch.randn(4, generator=g, dtype=torch.float64)).requires_grad_(True) for _ in range(4)]
    with torch.no_grad():
        inputs[0] += 2.0

    def fn(pc, pr, rc, rr):
        return dpo_loss(pc, pr, rc, rr, beta=0.3, label_smoothing=label_smoothing, loss_type=loss_type)[0]

    assert torch.autograd.gradcheck(fn, tuple(inputs))


def test_dpo_with_sft_loss_combination():
    pc, pr = t(-1.0, -2.0), t(-3.0, -2.0)
    rc, rr = t(-2.0, -2.0), t(-2.0, -2.0)
    # pair 0: h = 2, beta*h = 1; pair 1: h = 0 -> loss log 2
    dpo_mean = (math.log(1 + math.exp(-1)) + math.log(2)) / 2
    avg = t(-0.25, -0.75)  # mean -0.5
    loss, chosen, rejected = dpo_with_sft_loss(pc, pr, rc, rr, policy_chosen_avg_logps=avg, w_dpo=2.0, w_sft=0.5, beta=0.5)
    assert loss.dim() == 0
    assert abs(loss.item() - (2.0 * dpo_mean + 0.5 * 0.5)) < 1e-6
    assert torch.allclose(chosen, t(0.5, 0.0)) and torch.allclose(rejected, t(-0.5, 0.0))
    # defaults: plain mean DPO loss, the SFT log-prob is not needed
    plain, _, _ = dpo_with_sft_loss(pc, pr, rc, rr, beta=0.5)
    assert abs(plain.item() - dpo_mean) < 1e-6
    with pytest.raises(ValueError, match="policy_chosen_avg_logps"):
        dpo_with_sft_loss(pc, pr, rc, rr, w_sft=1.0)


def test_sft_term_gradient_raises_chosen_avg_logp():
    avg = t(-1.0, -2.0).requires_grad_(True)
    loss, _, _ = dpo_with_sft_loss(PC.repeat(2), PR.repeat(2), RC.repeat(2), RR.repeat(2),
                                   policy_chosen_avg_logps=avg, w_sft=1.0)
    loss.backward()
    assert torch.allclose(avg.grad, t(-0.5, -0.5))  # d(-mean)/d avg_i = -1/B


def test_preference_metrics():
    m = preference_metrics(t(1.0, 0.0, 2.0, 3.0), t(0.0, 0.0, 3.0, 1.0))
    assert set(m) == {"reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward"}
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in m.values())
    assert m["reward_accuracy"].item() == 0.5  # 1 > 0 and 3 > 1; the tie 0 = 0 counts as wrong
    assert abs(m["reward_margin"].item() - 0.5) < 1e-6  # (1 + 0 - 1 + 2) / 4
    assert abs(m["chosen_reward"].item() - 1.5) < 1e-6
    assert abs(m["rejected_reward"].item() - 1.0) < 1e-6


def test_errors():
    with pytest.raises(ValueError, match="sigmoid, hinge, ipo"):
        dpo_loss(PC, PR, RC, RR, loss_type="kto")
    with pytest.raises(ValueError, match="shape"):
        dpo_loss(PC, PR, RC, t(1.0, 2.0))
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(PC, PR, RC, RR, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(PC, PR, RC, RR, label_smoothing=0.1, loss_type="ipo")
