"""The nearest-rank quantile (spread): the nearest rank reads q as the decimal it prints as. The property test
in test_seeds samples (k, n) at random and seldom draws the few pairs where floating point q * n lands
just above an integer (0.55 x 100 = 55.00000000000001); here every pair is checked. Oracle: ceil(k n /
100) in integer arithmetic."""

from __future__ import annotations

from stabilitycheck.spread import quantile, rank


def test_the_rank_is_the_integer_ceil_for_every_hundredth_and_count() -> None:
    wrong = [
        (k, n) for k in range(1, 101) for n in range(1, 201) if rank(k / 100, n) != max(1, -(-k * n // 100))
    ]
    assert wrong == []


def test_the_documented_float_traps_pick_the_decimal_rank() -> None:
    assert rank(0.55, 100) == 55
    assert rank(0.28, 25) == 7
    assert quantile([float(i) for i in range(1, 101)], 0.55) == 55.0
    assert quantile([float(i) for i in range(1, 26)], 0.28) == 7.0
