"""The nearest-rank quantile (spread): the nearest rank reads q as the decimal it prints as. The property test
in test_seeds samples (k, n) at random and seldom draws the few pairs where floating point q * n lands
just above an integer (0.55 x 100 = 55.00000000000001); here every pair is checked. Oracle: ceil(k n /
100) in integer arithmetic.
Also NaN sorting below every number, the bracket of the narrowest pairs, and Spread.describe."""

from __future__ import annotations

import math

import pytest

from stabilitycheck.spread import Spread, quantile, rank


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


def _nearest_rank(xs: list[float], q: float) -> float:
    """Brute-force oracle: the smallest x (NaN lowest) such that at least q * n values are <= it."""

    def key(x: float) -> float:
        return -math.inf if math.isnan(x) else x

    for x in sorted(xs, key=key):
        if sum(1 for y in xs if key(y) <= key(x)) >= q * len(xs):
            return x
    raise AssertionError


@pytest.mark.parametrize("n", range(1, 12))
@pytest.mark.parametrize("q", [0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
def test_quantile_is_the_nearest_rank_for_every_n_and_q(n: int, q: float) -> None:
    """S1: ceil(q n)-th smallest (round() differs at q n = 2.5, 4.5 ...)."""
    from stabilitycheck.spread import quantile

    xs = [float(10 * k + 1) for k in range(n)][::-1]
    assert quantile(xs, q) == _nearest_rank(xs, q)


def test_nan_sorts_below_every_number_in_the_quantile_and_the_spread() -> None:
    """S2/S3: NaN seeds count as the lowest values; the median of [nan, nan, 0.329] is NaN, while the
    range is over the numbers: 'nan (0.329-0.329, 2 NaN)' (the docstring's example)."""
    from stabilitycheck.spread import Spread, quantile

    assert quantile([2.0, math.nan, 1.0], 1.0) == 2.0
    assert quantile([2.0, math.nan, 1.0], 0.5) == 1.0
    s = Spread.of([math.nan, 0.329, math.nan], 0.5)
    assert math.isnan(s.mid) and (s.low, s.high, s.nan) == (0.329, 0.329, 2)
    assert s.describe() == "nan (0.329-0.329, 2 NaN)"


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 10])
@pytest.mark.parametrize("q", [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
def test_quantile_is_numpys_nearest_rank(n: int, q: float) -> None:
    np = pytest.importorskip("numpy")  # torch runs without it
    xs = [float((7 * i) % n) + 0.5 * i for i in range(n)]
    want = float(np.quantile(np.array(xs), q, method="inverted_cdf"))
    assert quantile(xs, q) == want


def test_nan_sorts_below_every_number_in_a_quantile_and_the_spread() -> None:
    assert math.isnan(quantile([2.0, math.nan, 1.0], 1 / 3))
    assert quantile([2.0, math.nan, 1.0], 2 / 3) == 1.0
    s = Spread.of([math.nan, math.nan, 3.0, 1.0, 2.0], 0.5)  # r = 3: the third smallest, NaN lowest
    assert (s.low, s.mid, s.high, s.nan) == (1.0, 1.0, 3.0, 2)


NAN, INF = math.nan, math.inf


def test_the_bracket_is_the_most_confident_of_the_narrowest_pairs() -> None:
    """spread.bracket against the rule spelt out: for each width w = 1, 2, ..., the pairs (i, i + w)
    of order statistics and their coverage, the sum over k from i to i + w - 1 of C(n, k) q^k
    (1 - q)^(n - k); the first width where one reaches 90%, and of its pairs the most confident
    (at q 0.25 or 0.9 the pairs of one width differ, and the least confident one also reaches it)."""
    from stabilitycheck.spread import WANT, bracket

    def coverage(n: int, q: float, i: int, j: int) -> float:
        return sum(math.comb(n, k) * q**k * (1 - q) ** (n - k) for k in range(i, j))

    for n in (12, 24, 30):
        for q in (0.25, 0.5, 0.9):
            got = bracket([float(v) for v in range(n)], q)
            assert got is not None
            for w in range(1, n):
                pairs = {(i, i + w): coverage(n, q, i, i + w) for i in range(1, n - w + 1)}
                best = max(pairs, key=lambda p: pairs[p])
                if pairs[best] >= WANT:
                    assert (got.i, got.j) == best, (n, q, got, best)
                    assert got.confidence == pytest.approx(pairs[best], rel=1e-12)
                    break


def test_the_bracket_of_few_seeds_is_their_least_and_largest_or_none() -> None:
    """By hand: 2 seeds at the median hold it between them with probability 1/2 (one draw below, one
    above: 2 x 1/4); 5 seeds, 1 - 2 / 32 = 93.75%, the least and largest; one value, or a NaN among
    them, brackets nothing."""
    from stabilitycheck.spread import Bracket, bracket

    assert bracket([2.0, 1.0], 0.5) == Bracket(1.0, 2.0, 1, 2, 2, 0.5)
    five = bracket([5.0, 1.0, 4.0, 2.0, 3.0], 0.5)
    assert five is not None and (five.low, five.high, five.i, five.j) == (1.0, 5.0, 1, 5)
    assert five.confidence == pytest.approx(0.9375, rel=1e-12)
    # far from the median 5 seeds reach no 90%: the least and largest, at 1 - q^5 - (1 - q)^5 (not a
    # rank past either end, which the wider pairs (0, 2) at q 0.1 and (4, 6) at q 0.9 would reach)
    for q in (0.1, 0.9):
        tail = bracket([5.0, 1.0, 4.0, 2.0, 3.0], q)
        assert tail is not None and (tail.low, tail.high, tail.i, tail.j) == (1.0, 5.0, 1, 5)
        assert tail.confidence == pytest.approx(1 - q**5 - (1 - q) ** 5, rel=1e-12)
    # 6 seeds at q 0.6: no 3 ranks apart reach 90%; of 4 apart, the 2nd and 6th smallest (the largest):
    # draws below the quantile 2 to 5 of 6, 0.13824 + 0.27648 + 0.31104 + 0.186624
    upper = bracket([6.0, 1.0, 5.0, 2.0, 4.0, 3.0], 0.6)
    assert upper is not None and (upper.low, upper.high, upper.i, upper.j) == (2.0, 6.0, 2, 6)
    assert upper.confidence == pytest.approx(0.912384, rel=1e-12)
    assert bracket([3.0], 0.5) is None
    assert bracket([1.0, NAN, 2.0], 0.5) is None


def test_a_spread_of_nan_values_only_names_no_count() -> None:
    """Spread.describe by hand: the NaN count is said beside the range of the other seeds; where every
    seed is NaN there is no range of others to say it beside."""
    assert Spread(NAN, NAN, NAN, 3).describe() == "nan (nan-nan)"
    assert Spread(0.329, NAN, 0.329, 2).describe() == "nan (0.329-0.329, 2 NaN)"
