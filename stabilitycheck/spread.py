"""Numbers over seeds: the nearest-rank quantile a verdict is judged on, the spread a report shows
beside it (min, quantile, max, and how many seeds gave NaN), and the bracket the seeds put the
distribution's quantile in."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from itertools import accumulate


def rank(q: float, n: int) -> int:
    """ceil(q n), at least 1, with q read as the decimal it prints as: in floating point 0.55 x 100 is
    55.00000000000001 and 0.28 x 25 is 7.000000000000001, one rank too high."""
    return max(1, math.ceil(Fraction(repr(float(q))) * n))


def quantile(xs: Sequence[float], q: float) -> float:
    """Nearest-rank q-quantile (the `rank(q, n)`-th smallest); NaN sorts below every number."""
    ordered = sorted(xs, key=lambda x: -math.inf if math.isnan(x) else x)
    return ordered[rank(q, len(ordered)) - 1]


@dataclass(frozen=True)
class Spread:
    """min, q-quantile and max of one number over the seeds probed; the range is over the seeds whose
    value is a number, `nan` counts the others (NaN: the model made NaN there)."""

    low: float
    mid: float
    high: float
    nan: int = 0

    @classmethod
    def of(cls, xs: Sequence[float], q: float) -> Spread:
        finite = [x for x in xs if not math.isnan(x)]
        ends = finite or [math.nan]
        return cls(min(ends), quantile(xs, q), max(ends), len(xs) - len(finite))

    @classmethod
    def from_dict(cls, d: dict[str, float | None]) -> Spread:
        """Inverse of vars(spread); null (how strict JSON writes NaN) is NaN."""
        low, mid, high = (math.nan if (x := d[k]) is None else x for k in ("low", "mid", "high"))
        return cls(low, mid, high, int(d.get("nan") or 0))

    def describe(self) -> str:
        """'36 (18-126)': the quantile (nearest rank: over 2 seeds the lower), then the range over seeds;
        'nan (0.329-0.329, 3 NaN)' where some seeds' values are NaN (the range is over the others)."""
        others = f", {self.nan} NaN" if self.nan and not math.isnan(self.low) else ""
        return f"{self.mid:.3g} ({self.low:.3g}-{self.high:.3g}{others})"


@dataclass(frozen=True)
class Bracket:
    """Where n values put their distribution's q-quantile: between their i-th and j-th smallest
    (`low`, `high`) with probability `confidence`, whatever the distribution."""

    low: float
    high: float
    i: int
    j: int
    n: int
    confidence: float


WANT = 0.9  # the confidence a bracket is narrowed to, where the seeds allow it


def bracket(xs: Sequence[float], q: float) -> Bracket | None:
    """The order statistics x_(i) <= x_(j) holding the q-quantile of the distribution the values were
    drawn from with probability sum_{k=i}^{j-1} C(n, k) q^k (1 - q)^(n - k) (the number of draws
    below the quantile is binomial), the fewest ranks apart that reach WANT, the most confident among
    those; the least and largest where none do (5 seeds at the median: 93.75%; 24 seeds: the 8th and
    17th smallest, 93.6%, where the least and largest only widen as seeds are added). None under two
    values, or where one is NaN."""
    n = len(xs)
    if n < 2 or any(math.isnan(x) for x in xs):
        return None
    below = list(accumulate((math.comb(n, k) * q**k * (1 - q) ** (n - k) for k in range(n + 1)), initial=0.0))
    pairs = [(i, j) for i in range(1, n) for j in range(i + 1, n + 1)]
    covered = {(i, j): below[j] - below[i] for i, j in pairs}  # P(i <= draws below the quantile < j)
    reaching = [p for p in pairs if covered[p] >= WANT] or [(1, n)]
    i, j = min(reaching, key=lambda p: (p[1] - p[0], -covered[p]))
    ordered = sorted(xs)
    return Bracket(ordered[i - 1], ordered[j - 1], i, j, n, covered[i, j])
