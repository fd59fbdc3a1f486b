"""CSR's calibrated reward and the released rank-normalised variant on hand numbers."""

import pytest
import torch

from rewards.calibrated import calibrated_reward, rank_normalized_reward, rank_path_score, response_score, self_score


def test_self_score_mean_and_sum():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0, -9.0], [-0.5, -0.5, -9.0, -9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])  # the -9 entries are padding
    assert self_score(logprobs, mask).tolist() == pytest.approx([-2.0, -0.5])
    assert self_score(logprobs, mask.bool(), reduce="sum").tolist() == pytest.approx([-6.0, -1.0])
    with pytest.raises(ValueError, match=r"sentences \[1\] have no tokens"):
        self_score(logprobs, torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="reduce"):
        self_score(logprobs, mask, reduce="max")


def test_calibrated_reward():
    # 0.9 * 30 + 0.1 * -2 = 26.8;  0.9 * 20 + 0.1 * -0.5 = 17.95
    assert calibrated_reward([30.0, 20.0], [-2.0, -0.5]).tolist() == pytest.approx([26.8, 17.95])
    # 0.5 * 30 + 0.5 * -2 = 14;  0.5 * 20 + 0.5 * -0.5 = 9.75
    assert calibrated_reward(torch.tensor([30.0, 20.0]), torch.tensor([-2.0, -0.5]), lam=0.5).tolist() == pytest.approx(
        [14.0, 9.75]
    )
    with pytest.raises(ValueError, match="differ in shape"):
        calibrated_reward([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="lam"):
        calibrated_reward([1.0], [1.0], lam=1.5)


def test_rank_normalized_reward():
    # group "x": candidates 0, 1, 2;  group "y": candidates 3, 4 (a tie in self score).
    self_scores = [-1.0, -0.5, -2.0, -0.3, -0.3]
    clip_scores = [20.0, 25.0, 22.0, 10.0, 30.0]
    groups = ["x", "x", "x", "y", "y"]
    # self ranks: x: 1 -> 1/3, 0 -> 2/3, 2 -> 1;  y (tie keeps input order): 3 -> 1/2, 4 -> 1
    # clip ranks: x: 1 -> 1/3, 2 -> 2/3, 0 -> 1;  y: 4 -> 1/2, 3 -> 1
    # 0.1 * rank_T + 0.9 * rank_I:
    expected = [0.1 * 2 / 3 + 0.9, 0.1 / 3 + 0.9 / 3, 0.1 + 0.9 * 2 / 3, 0.05 + 0.9, 0.1 + 0.45]
    got = rank_normalized_reward(clip_scores, self_scores, groups)
    assert got.tolist() == pytest.approx(expected)
    # Interleaved group ids give the same per-candidate values.
    order = [3, 0, 4, 2, 1]
    got = rank_normalized_reward(
        [clip_scores[i] for i in order], [self_scores[i] for i in order], torch.tensor([1, 0, 1, 0, 0])
    )
    assert got.tolist() == pytest.approx([expected[i] for i in order])
    with pytest.raises(ValueError, match="must match"):
        rank_normalized_reward([1.0], [1.0, 2.0], [0, 0])


def test_rank_path_score():
    assert rank_path_score([1 / 3, 0.7]).item() == pytest.approx((1 / 3 + 0.7) / 2)
    assert rank_path_score([1 / 3, 0.7], count_root=True).item() == pytest.approx((1 / 3 + 0.7) / 3)


def test_response_score_sums_sentences():
    assert response_score([26.8, 17.95]).item() == pytest.approx(44.75)
    rewards = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 99.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    assert response_score(rewards, mask).tolist() == pytest.approx([6.0, 9.0])
