"""Numbers over seeds: the nearest-rank quantile a verdict is judged on, and the spread a report shows
beside it (min, quantile, max, and how many seeds gave NaN)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def quantile(xs: Sequence[float], q: float) -> float:
    """Nearest-rank q-quantile (the ceil(q n)-th smallest); NaN sorts below every number."""
    ordered = sorted(xs, key=lambda x: -math.inf if math.isnan(x) else x)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


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
