"""rewards/paired.py: the exact sign test (McNemar's) against values worked out by hand."""

import pytest

from rewards.paired import paired_change, sign_test_p


def test_sign_test_closed_form():
    assert sign_test_p(5, 3) == pytest.approx(2 * (1 + 8 + 28 + 56) / 256)  # 0.7265625
    assert sign_test_p(3, 5) == sign_test_p(5, 3)  # two-sided: the direction does not matter
    assert sign_test_p(10, 0) == pytest.approx(2 / 1024)
    assert sign_test_p(24, 2) == pytest.approx(2 * (1 + 26 + 325) / 2**26)
    assert sign_test_p(4, 4) == 1.0 and sign_test_p(0, 0) == 1.0  # capped at 1; nothing changed


def test_sign_test_rejects_negative_counts():
    with pytest.raises(ValueError, match="counts must be >= 0"):
        sign_test_p(-1, 3)


def test_paired_change_counts_only_the_items_that_changed():
    before = [True, True, False, False, True, False]
    after = [True, False, True, True, True, False]
    assert paired_change(before, after) == {"better": 2, "worse": 1, "n": 6, "p": pytest.approx(1.0)}
    with pytest.raises(ValueError, match="the same items"):
        paired_change(before, after[:5])
