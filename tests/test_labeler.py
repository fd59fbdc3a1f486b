"""RLAIF-V labeler verdicts from hand-set first-token logits."""

import math

import pytest
import torch

from rewards.labeler import claim_accepted, rejected_per_response, response_score, yes_no_probabilities

YES, YES_CAP, NO, NO_CAP = 0, 1, 2, 3  # token ids of "yes", "Yes", "no", "No"; id 4 is anything else


def test_probabilities_and_verdicts_from_log_probs():
    probs = torch.tensor(
        [
            [0.10, 0.20, 0.30, 0.15, 0.25],  # p_yes 0.30 < p_no 0.45 -> reject
            [0.40, 0.10, 0.20, 0.10, 0.20],  # p_yes 0.50 > p_no 0.30 -> accept
        ]
    )
    p_yes, p_no = yes_no_probabilities(torch.log(probs), [YES, YES_CAP], [NO, NO_CAP])
    assert p_yes.tolist() == pytest.approx([0.30, 0.50], abs=1e-6)
    assert p_no.tolist() == pytest.approx([0.45, 0.30], abs=1e-6)
    assert claim_accepted(p_yes, p_no).tolist() == [False, True]


def test_softmax_is_over_the_full_vocabulary():
    logits = torch.tensor([[1.0, 0.0, 0.0, 3.0]])  # V = 4
    p_yes, p_no = yes_no_probabilities(logits, [0], [1])
    z = math.e + 1 + 1 + math.e**3
    assert p_yes.item() == pytest.approx(math.e / z, rel=1e-6)  # not e / (e + 1)
    assert p_no.item() == pytest.approx(1 / z, rel=1e-6)


def test_exact_tie_rejects():
    logits = torch.zeros(1, 4)
    p_yes, p_no = yes_no_probabilities(logits, [0], [1])
    assert p_yes.item() == p_no.item() == 0.25
    assert claim_accepted(p_yes, p_no).tolist() == [False]


def test_bf16_logits_give_float32():
    p_yes, _ = yes_no_probabilities(torch.zeros(2, 8, dtype=torch.bfloat16), [0], [1])
    assert p_yes.dtype == torch.float32


def test_repeated_id_counts_once():
    logits = torch.zeros(1, 4)
    p_yes, _ = yes_no_probabilities(logits, [0, 0], [1])
    assert p_yes.item() == pytest.approx(0.25)


def test_bad_inputs():
    with pytest.raises(ValueError, match="both yes_ids and no_ids"):
        yes_no_probabilities(torch.zeros(1, 4), [0, 1], [1])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        yes_no_probabilities(torch.zeros(1, 4), [4], [1])
    with pytest.raises(ValueError, match=r"\[N, V\]"):
        yes_no_probabilities(torch.zeros(4), [0], [1])
    with pytest.raises(ValueError, match="empty"):
        yes_no_probabilities(torch.zeros(1, 4), [], [1])


def test_rejected_counts_and_score():
    accepted = torch.tensor([True, False, False, True, False])
    response_ids = torch.tensor([0, 0, 2, 2, 2])
    n_rejected = rejected_per_response(accepted, response_ids, 3)
    assert n_rejected.tolist() == [1, 0, 2]
    assert response_score(n_rejected).tolist() == [-1, 0, -2]
    assert response_score(3) == -3
