"""Tests for optim/reward_loss.py on hand-worked Bradley-Terry values."""

import math

import pytest
import torch

from optim.reward_loss import reward_accuracy, reward_model_loss


def test_single_pair_hand_value():
    # BCEWithLogits(1 - 0, 1) = log(1 + e^-1) = 0.3132617
    loss = reward_model_loss(torch.tensor([1.0]), torch.tensor([0.0]))
    assert loss.dim() == 0
    assert abs(loss.item() - math.log(1 + math.exp(-1))) < 1e-6
    assert abs(loss.item() - 0.3132617) < 1e-6


def test_batch_mean_and_centering_term():
    chosen, rejected = torch.tensor([1.0, 3.0]), torch.tensor([0.0, 1.0])
    bt = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-2))) / 2
    assert abs(reward_model_loss(chosen, rejected).item() - bt) < 1e-6
    # centering: 1e-3 * |mean(1 + 0, 3 + 1)| = 1e-3 * 2.5
    assert abs(reward_model_loss(chosen, rejected, center_coef=1e-3).item() - (bt + 0.0025)) < 1e-6
    # the absolute value: scores summing to a negative mean are penalised the same way
    neg = reward_model_loss(torch.tensor([-2.0]), torch.tensor([-3.0]), center_coef=0.1)
    assert abs(neg.item() - (math.log(1 + math.exp(-1)) + 0.1 * 5.0)) < 1e-6


def test_equal_scores_give_log_two_and_wrong_order_costs_more():
    assert abs(reward_model_loss(torch.tensor([0.7]), torch.tensor([0.7])).item() - math.log(2)) < 1e-6
    right = reward_model_loss(torch.tensor([2.0]), torch.tensor([0.0])).item()
    wrong = reward_model_loss(torch.tensor([0.0]), torch.tensor([2.0])).item()
    assert abs(wrong - right - 2.0) < 1e-6  # log(1+e^2) - log(1+e^-2) = 2


def test_gradient_pushes_chosen_up_and_rejected_down():
    chosen = torch.tensor([1.0, 0.0], requires_grad=True)
    rejected = torch.tensor([0.0, 0.0], requires_grad=True)
    reward_model_loss(chosen, rejected).backward()
    # d/d r_c of mean log(1 + e^-(r_c - r_r)) = -sigmoid(-(r_c - r_r)) / B
    expected = torch.tensor([-1 / (1 + math.e) / 2, -0.5 / 2])
    assert torch.allclose(chosen.grad, expected, atol=1e-6)
    assert torch.allclose(rejected.grad, -expected, atol=1e-6)


def test_float64_gradcheck():
    chosen = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([0.1, 0.4, -0.5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c, r: reward_model_loss(c, r, center_coef=0.01), (chosen, rejected))


def test_reward_accuracy():
    acc = reward_accuracy(torch.tensor([1.0, 0.0, 2.0, 5.0]), torch.tensor([0.0, 0.0, 3.0, 1.0]))
    assert acc.dim() == 0 and acc.item() == 0.5  # 1>0, 5>1 right; tie and 2<3 wrong


def test_shape_errors():
    with pytest.raises(ValueError, match="chosen_scores"):
        reward_model_loss(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="chosen_scores"):
        reward_accuracy(torch.zeros(3, 1), torch.zeros(3, 1))
