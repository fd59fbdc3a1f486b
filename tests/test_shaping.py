"""Fact-RLHF shaping rules (LLaVA-RLHF release) on hand-worked numbers."""

import pytest
import torch

from rewards.shaping import REWARD_SCALE, length_penalty, missing_end_penalty, shaped_score, symbolic_reward


def test_length_penalty():
    assert length_penalty(448, 896) == pytest.approx(-5.0)
    assert length_penalty(448, 896, coef=2.0) == pytest.approx(-1.0)
    assert length_penalty(448, 896, multiplier=0.5) == pytest.approx(-2.5)
    out = length_penalty(torch.tensor([0, 896, 224]), 896)
    assert out.dtype == torch.float32
    assert out.tolist() == pytest.approx([0.0, -10.0, -2.5])
    with pytest.raises(ValueError, match="positive"):
        length_penalty(1, 0)


def test_symbolic_multiple_choice():
    assert symbolic_reward("B. A red circle.", kind="multiple_choice", truth="B") == 2.0
    assert symbolic_reward("  I think the correct option is B. It is red.", kind="multiple_choice", truth="B") == 2.0
    # As released the phrase needs the period: "correct option is B" alone earns nothing.
    assert symbolic_reward("The correct option is B", kind="multiple_choice", truth="B") == 0.0
    assert symbolic_reward("A. A blue box.", kind="multiple_choice", truth="B") == 0.0
    assert symbolic_reward("B. yes", kind="multiple_choice", truth="B", coef=1.0) == 1.0


def test_symbolic_yes_no():
    assert symbolic_reward("No, there is none.", kind="yes_no", truth="no") == 1.0  # 2 * 0.5
    assert symbolic_reward(" Yes.", kind="yes_no", truth="No") == -1.0  # 2 * -0.5
    assert symbolic_reward("Maybe.", kind="yes_no", truth="no") == 0.0
    assert symbolic_reward("No", kind="yes_no", truth="no", coef=1.0) == 0.5
    assert symbolic_reward("Yes", kind="yes_no", truth="yes") == 0.0  # no reward for truth "yes"


def test_symbolic_yes_no_with_reward_yes_mirrors_the_no_rule():
    assert symbolic_reward("Yes, there is.", kind="yes_no", truth="yes", reward_yes=True) == 1.0
    assert symbolic_reward("No.", kind="yes_no", truth=True, reward_yes=True) == -1.0
    assert symbolic_reward("Maybe.", kind="yes_no", truth="yes", reward_yes=True) == 0.0
    assert symbolic_reward("No.", kind="yes_no", truth="no", reward_yes=True) == 1.0  # the "no" half unchanged
    assert symbolic_reward("No", kind="yes_no", truth=True) == 0.0
    assert symbolic_reward("anything", kind="general") == 0.0
    with pytest.raises(ValueError, match="kind"):
        symbolic_reward("x", kind="essay")
    with pytest.raises(ValueError, match="option letter"):
        symbolic_reward("x", kind="multiple_choice", truth="BC")


def test_missing_end_penalty():
    assert missing_end_penalty(False) == -8.0
    assert missing_end_penalty(True) == 0.0
    assert missing_end_penalty(torch.tensor([True, False]), penalty=-3.0).tolist() == [0.0, -3.0]


def test_shaped_score():
    rm = torch.tensor([1.0, 2.0, -0.5])
    tokens = torch.tensor([448, 896, 0])
    has_end = torch.tensor([True, False, True])
    symbolic = torch.tensor([0.0, 2.0, -1.0])
    # 1 - 5 = -4;  2 - 8 - 10 + 2 = -14;  -0.5 - 0 - 1 = -1.5
    out = shaped_score(rm, response_tokens=tokens, max_response_tokens=896, has_end=has_end, symbolic=symbolic)
    assert out.tolist() == pytest.approx([-4.0, -14.0, -1.5])
    # Absolute mode: the unfinished response's score is replaced by -8: -8 - 10 + 2 = -16.
    out = shaped_score(
        rm, response_tokens=tokens, max_response_tokens=896, has_end=has_end, symbolic=symbolic,
        relative_end_penalty=False,
    )  # fmt: skip
    assert out.tolist() == pytest.approx([-4.0, -16.0, -1.5])
    with pytest.raises(ValueError, match="differ"):
        shaped_score(rm, response_tokens=tokens, max_response_tokens=896, has_end=torch.tensor([True]))


def test_reward_scale_constant():
    assert REWARD_SCALE == 10.0
