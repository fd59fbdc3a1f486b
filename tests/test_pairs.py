"""RLAIF-V pair construction and length balancing on constructed data with known answers."""

import random
from fractions import Fraction

import pytest

from rewards.pairs import build_preference_pairs, candidate_pairs, length_balance


def words(n, tag):
    return " ".join(f"{tag}{i}" for i in range(n))


def response(score, text, n_claims=3, n_judged=None):
    return {"text": text, "score": score, "n_claims": n_claims, "n_judged": n_claims if n_judged is None else n_judged}


def four_responses():
    # scores 0, -1, -1, -3; response 2 had a claim the labeler did not judge.
    return [
        response(0, "r0"),
        response(-1, "r1"),
        response(-1, "r2", n_judged=2),
        response(-3, "r3"),
    ]


def test_candidate_pairs():
    # i < j with |dS| >= 1: (0,1) (0,2) (0,3) (1,3) (2,3); (1,2) has dS = 0.
    # Dropping the pairs with response 2 (incomplete judgement) leaves (0,1) (0,3) (1,3).
    assert candidate_pairs(four_responses()) == [(0, 1), (0, 3), (1, 3)]
    # The higher score is chosen whatever the list order.
    assert candidate_pairs([response(-2, "a"), response(0, "b")]) == [(1, 0)]
    # Identical texts carry no preference.
    assert candidate_pairs([response(0, "same "), response(-1, " same")]) == []
    assert candidate_pairs(four_responses(), min_score_gap=3) == [(0, 3)]


def test_at_most_two_pairs_seeded_and_order_independent():
    many = {"idx": 0, "question": "Q0", "image": "img0.png", "responses": four_responses()}
    few = {"idx": 1, "question": "Q1", "image": "img1.png", "responses": [response(0, "a"), response(-1, "b")]}
    for seed in (0, 1, 7):
        expected = random.Random(seed).sample([(0, 1), (0, 3), (1, 3)], 2)
        expected_texts = [(f"r{c}", f"r{r}") for c, r in expected]
        for order in ([many, few], [few, many]):  # "few" has <= 2 pairs: draws no random numbers
            records = build_preference_pairs(order, seed=seed, balance_lengths=False)
            got = [(rec["chosen"], rec["rejected"]) for rec in records if rec["idx"] == 0]
            assert got == expected_texts
            assert [(rec["chosen"], rec["rejected"]) for rec in records if rec["idx"] == 1] == [("a", "b")]


# Length balancing. Pairs as (chosen words, rejected words), ratio = (rej - ch) / rej:
#   A (10, 10) ratio 0      C (8, 10)  ratio 1/5 (exactly a threshold: kept at r = 0.2)
#   D (12, 6)  ratio -1     B (1, 20)  ratio 19/20
# kept sets and gap |sum ch - sum rej| / n:
#   r in {0, .., 0.18}:  {A, D}        |22 - 16| / 2 = 3
#   r in {0.2, .., 0.94}: {A, C, D}    |30 - 26| / 3 = 4/3   <- smallest
#   r in {0.96, 0.98}:   {A, B, C, D}  |31 - 46| / 4 = 15/4
# ties go to the larger r: r = 0.94, kept {A, C, D}.
LENGTHS = {"A": (10, 10), "B": (1, 20), "C": (8, 10), "D": (12, 6)}


def length_records(names):
    return [{"name": n, "chosen": words(LENGTHS[n][0], "c"), "rejected": words(LENGTHS[n][1], "r")} for n in names]


def test_length_balance_hand_worked():
    kept, r = length_balance(length_records("ABCD"))
    assert [rec["name"] for rec in kept] == ["A", "C", "D"]
    assert r == Fraction(47, 50)
    # The released gap, relative to the rejected mean (0.375, 4/26, 15/46), picks the same set.
    kept, r = length_balance(length_records("ABCD"), relative=True)
    assert [rec["name"] for rec in kept] == ["A", "C", "D"] and r == Fraction(47, 50)


def test_length_balance_threshold_is_inclusive_and_empty_sets_skipped():
    kept, r = length_balance(length_records("C"), thresholds=[0.2])
    assert [rec["name"] for rec in kept] == ["C"] and r == 0.2
    kept, r = length_balance(length_records("B"), thresholds=[0.0, 0.5, 0.96])  # only 0.96 keeps B
    assert [rec["name"] for rec in kept] == ["B"] and r == 0.96
    assert length_balance([]) == ([], None)


def test_build_preference_pairs_end_to_end():
    instructions = []
    for idx, name in enumerate("ABCD"):
        n_chosen, n_rejected = LENGTHS[name]
        instructions.append(
            {
                "idx": idx,
                "question": f"Describe image {idx}.",
                "image": f"images/{idx}.png",
                "origin_dataset": "synthetic",
                "origin_split": "train",
                "responses": [response(-1, words(n_rejected, "r"), n_claims=4), response(0, words(n_chosen, "c"))],
            }
        )
    records = build_preference_pairs(instructions, seed=0)
    # B (idx 1) is the pair dropped by length balancing.
    assert [rec["idx"] for rec in records] == [0, 2, 3]
    first = records[0]
    assert first == {
        "ds_name": "RLAIF-V",
        "image": "images/0.png",
        "image_path": "images/0.png",
        "question": "Describe image 0.",
        "chosen": words(10, "c"),
        "rejected": words(10, "r"),
        "origin_dataset": "synthetic",
        "origin_split": "train",
        "idx": 0,
        "chosen_score": 0,
        "rejected_score": -1,
    }


def test_missing_fields_are_named():
    with pytest.raises(ValueError, match="instruction 0: missing field 'image'"):
        build_preference_pairs([{"idx": 0, "question": "q", "responses": []}])
    with pytest.raises(ValueError, match="has no 'n_judged'"):
        candidate_pairs([{"text": "a", "score": 0, "n_claims": 1}])
