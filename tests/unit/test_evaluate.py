import pytest

from rayloop.evaluate import paired_difference


def test_paired_difference_of_a_clear_gain():
    before = [0.0] * 100
    after = [1.0] * 30 + [0.0] * 70
    result = paired_difference(before, after)
    assert result["before"] == 0.0 and result["after"] == pytest.approx(0.3)
    assert result["difference"] == pytest.approx(0.3)
    assert 0.2 < result["ci_low"] < 0.3 < result["ci_high"] < 0.4


def test_paired_difference_of_no_change_straddles_zero():
    scores = [1.0, 0.0] * 50
    result = paired_difference(scores, list(reversed(scores)))
    assert result["ci_low"] < 0 < result["ci_high"]


def test_paired_difference_needs_pairs():
    with pytest.raises(ValueError, match="equal, non-zero"):
        paired_difference([1.0], [1.0, 0.0])
