"""Did the model really change? Two evaluations of the same items, compared item by item.

A recipe evaluates its starting model and each iteration's model on the same held-out items, so
each item is a pair (right before?, right after?). Only the items that changed carry evidence:
``better`` turned right, ``worse`` turned wrong. If the update changed nothing real, each changed
item is a coin flip between the two, and McNemar's test in its exact form (McNemar 1947; the
two-sided binomial sign test on the discordant pairs) asks how surprising the split is:

    p = min(1, 2 * P[X <= min(better, worse)]),   X ~ Binomial(better + worse, 1/2)

Why it matters here: on 200 test images the world's POPE has 2,406 questions, and a POPE F1 that is
0.1 points lower can be two answers of 2,406 (5 turned wrong, 3 turned right: p = 0.73), which
says nothing either way; a CHAIR_s halved on the same images is ~25 descriptions cleaned against
~1 spoiled (p < 1e-5).
"""

from __future__ import annotations

from math import comb
from typing import Sequence


def sign_test_p(better: int, worse: int) -> float:
    """Two-sided exact sign test of ``better`` against ``worse`` changed items (McNemar's exact test):
    ``min(1, 2 P[X <= min(better, worse)])`` for X ~ Binomial(better + worse, 1/2); 1.0 when nothing changed.

    sign_test_p(5, 3) == 2 * (1 + 8 + 28 + 56) / 256 == 0.7265625.
    """
    if better < 0 or worse < 0:
        raise ValueError(f"sign_test_p: counts must be >= 0, got better={better}, worse={worse}")
    n = better + worse
    if n == 0:
        return 1.0
    tail = sum(comb(n, i) for i in range(min(better, worse) + 1))
    return min(1.0, 2 * tail / 2**n)


def paired_change(right_before: Sequence[bool], right_after: Sequence[bool]) -> dict:
    """Items right before and after -> {"better": wrong -> right, "worse": right -> wrong, "n": items,
    "p": ``sign_test_p(better, worse)``}."""
    if len(right_before) != len(right_after):
        raise ValueError(f"paired_change: {len(right_before)} items before but {len(right_after)} after; "
                         "both evaluations must score the same items in the same order")
    better = sum(1 for b, a in zip(right_before, right_after) if a and not b)
    worse = sum(1 for b, a in zip(right_before, right_after) if b and not a)
    return {"better": better, "worse": worse, "n": len(right_before), "p": sign_test_p(better, worse)}
