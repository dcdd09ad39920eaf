"""The kind of growth a stack shows (exponential, polynomial, irregular, flat), fitted on its
per-block backward gains over seeds (see Growth)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from stabilitycheck.spread import Spread, quantile

# a kind's rate ** blocks, or depth ** exponent, must give the growth within x2, or, where its fit
# explains 99.9% of the cumulative log growth's variance, within 5% of its log (`explains`)
LAW_SLACK, LAW_SHARE, LAW_FIT = math.log(2), 0.05, 0.999
INPUT_SPREAD, INPUT_SD = 3.0, 0.05  # input_apart: how far its log-gain lies from the others' (in sd)
FIT_R2 = 0.9  # below it no fit explains the growth (a clean stack fits >= 0.95, a lone spike 0.76)


@dataclass(frozen=True)
class Growth:
    """What kind of growth the stack shows, from the cumulative log growth C(j) of the backward signal
    between block call j and the output (j = 1..L from the input side): exponential when C is linear in
    the number of blocks L - j (a constant rate per block, e.g. a tanh MLP off criticality; so
    rate ** blocks must give the growth, `explains`), polynomial
    when it is linear in log(L / j) (growth ~ depth ** exponent, e.g. pre-norm residual stacks whose
    per-block log-gain decays like 1 / j; so depth ** exponent must give the growth) or in
    log(L + 1 - j), the same law from the output side (a linear recurrence through a Jordan block of
    size s at spectral radius 1: growth ~ T ** (s - 1)),
    whichever least-squares fit explains more of C, fitted on the seeds' typical stack (each gain the
    geometric mean over seeds) and without the input segment where its gain stands apart from the
    others' (`input_apart`: the input is not on the stack's fixed point, nor does it pass what runs
    between blocks; a tanh MLP whose blocks are its Linear layers has a first gain of sigma_w, 2.5x
    the others at 3.75, which read as depth^p on 6 blocks; the law is then checked on the growth
    past it); irregular
    when neither explains FIT_R2 of C's variance (one block's spike among gain-1 blocks, growth that
    rises then falls along the stack: no rate or exponent describes it); flat when the total growth is
    within x2 and so is the growth from every block to the output (`swing`: a non-normal recurrence
    whose gradient rises 1860x inside the stack and falls back to 1.7x at the input is no flat stack,
    and reads irregular as one that ends at 4.4x does). A recurrent subject's is its through-time
    growth's (seeds.assess). Quantiles and spreads over seeds."""

    kind: str
    rate: Spread
    exponent: Spread

    def describe(self) -> str:
        if self.kind == "exponential":
            rate = math.exp(self.rate.mid)  # 4 digits near 1: x1.008/block over 128 steps is 2.7, not x1
            digits = 4 if abs(rate - 1) < 0.01 else 3
            return f"exponential, x{rate:.{digits}g}/block"
        if self.kind == "polynomial":
            return f"polynomial, ~depth^{self.exponent.mid:.2f}"
        if self.kind == "irregular":
            return "irregular: no constant rate or depth law fits"
        return self.kind


Fit = tuple[float, float, float, float]  # rate, r2 of the linear fit, exponent, r2 of the log fit


def _least_squares(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """(slope, r2) of y = a + slope x."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx > 0 else 0.0
    total = sum((y - my) ** 2 for y in ys)
    resid = sum((y - my - slope * (x - mx)) ** 2 for x, y in zip(xs, ys, strict=True))
    return slope, (1 - resid / total) if total > 0 else 1.0


def explains(law: float, growth: float, r2: float) -> bool:
    """Whether a law's log growth `law` gives the log growth `growth`: within x2 (LAW_SLACK), or, where
    the law's fit has r2 >= LAW_FIT (a constant rate but for a few blocks), within LAW_SHARE of its
    log, past ~1e+-6. A non-normal recurrence's gradient grows as C rho^T, its constant C set by the
    few steps next to the output: a tanh RNN at spectral radius 0.60 over 255 steps gains x0.600-x0.602
    at every step but those, growth 1.1e-57 = 0.27 x 0.6008^255 (r2 0.99999), and read irregular
    under x2 alone. Gains rising along the stack fit no better than r2 0.97 (x1.5 to x8 over 16 blocks:
    rate ** 16 is 2.4x off a growth of 4e8) and stay held to x2; so does a C past x2 on a growth
    within 1e+-6."""
    miss = abs(law - growth)
    return miss <= LAW_SLACK or (r2 >= LAW_FIT and miss <= LAW_SHARE * abs(growth))


def fit_growth(gains: Sequence[float], apart: bool | None = None) -> Fit:
    """The exponential and polynomial fits of one seed's cumulative log growth (see Growth); `apart`:
    whether the input segment is left out of them (None: as `input_apart` says of these gains)."""
    kept = [g for g in gains if not math.isnan(g)]  # NaN: a junction between chains, no gain there
    if not kept or not all(g > 0 and math.isfinite(g) for g in kept):
        return math.nan, math.nan, math.nan, math.nan
    logs = [0.0 if math.isnan(g) else math.log(g) for g in gains]
    n = len(logs) + 1  # block calls
    cumulative = [sum(logs[j:]) for j in range(n - 1)]
    if n < 4:
        return cumulative[0] / (n - 1), math.nan, math.nan, math.nan
    shape = range(1 if (input_apart(gains) if apart is None else apart) else 0, n - 1)
    ys = [cumulative[j] for j in shape]
    rate, r2_lin = _least_squares([float(n - 1 - j) for j in shape], ys)
    exponent, r2_log = _least_squares([math.log(n / (j + 1)) for j in shape], ys)
    if not explains(exponent * math.log(n / (shape.start + 1)), cumulative[shape.start], r2_log):
        r2_log = -math.inf  # a fitted shape whose depth law is not the growth: no law (depth^3.43 of 9
        # blocks is 1870, with a growth of 363: the fit's intercept carried the difference)
    # the same law counted from the output: C linear in log(n - j), a per-block log-gain decaying like
    # 1 / (distance to the output), as a recurrence's through a Jordan block, ||W^k|| ~ k^(size - 1)
    # (W = I + N read 'irregular' where its growth doubles as T does)
    back, r2_back = _least_squares([math.log(n - j) for j in shape], ys)
    if explains(back * math.log(n - shape.start), cumulative[shape.start], r2_back) and r2_back > r2_log:
        exponent, r2_log = back, r2_back
    if not explains(rate * (n - 1 - shape.start), cumulative[shape.start], r2_lin):
        r2_lin = -math.inf  # the same of a rate: gains rising from x1.04 to x2 along 24 blocks fit a
        # line, but x1.1/block gives 9.9 where the growth is 25
    return rate, r2_lin, exponent, r2_log


def swing(gains: Sequence[float]) -> float:
    """The largest |ln| of the growth from a block call to the output, over the stack (junctions, NaN,
    count as gain 1, as in fit_growth); NaN where a gain is not a positive finite number."""
    if not all(math.isnan(g) or (g > 0 and math.isfinite(g)) for g in gains):
        return math.nan
    largest = running = 0.0
    for g in reversed(gains):
        running += 0.0 if math.isnan(g) else math.log(g)
        largest = max(largest, abs(running))
    return largest


def input_apart(gains: Sequence[float]) -> bool:
    """Whether the input segment's gain stands apart from the stack's (see Growth): 4 blocks or more,
    its log-gain more than INPUT_SPREAD standard deviations (at least INPUT_SD) from the others' mean,
    and the others carrying at least half the log growth (else the input segment is the growth, as
    one block's spike, and leaving it out would fit what is left of nothing)."""
    if len(gains) < 4 or not all(g > 0 and math.isfinite(g) for g in gains):
        return False
    logs = [math.log(g) for g in gains]
    rest = logs[1:]
    far = abs(logs[0] - statistics.fmean(rest)) > INPUT_SPREAD * max(statistics.pstdev(rest), INPUT_SD)
    return far and abs(sum(rest)) >= abs(sum(logs)) / 2


def _typical_stack(profiles: Sequence[Sequence[float]]) -> list[float] | None:
    """Each block's geometric-mean gain over the seeds; NaN where every seed has NaN there (a junction
    between chains, the same in every draw); None where the stacks differ in length or a gain is
    otherwise not a positive number."""
    if len({len(p) for p in profiles}) != 1:
        return None
    typical = []
    for gains in zip(*profiles, strict=True):
        if all(math.isnan(g) for g in gains):
            typical.append(math.nan)
        elif all(g > 0 and math.isfinite(g) for g in gains):
            typical.append(math.exp(statistics.fmean(math.log(g) for g in gains)))
        else:
            return None
    return typical


def kind_of(profiles: Sequence[Sequence[float]], growths: Sequence[float], q: float) -> Growth:
    """The kind of growth of per-seed gain profiles: which fit explains the growth is read on the seeds'
    typical stack, each block's gain the geometric mean over seeds (a block's noise between
    initialisations averages out: at width 15 one seed's gains spread 0.5-2.5 around a tanh MLP's
    1.5), whose input segment is left apart or not for every seed alike; on the quantile of the
    per-seed fits where there is no typical stack (_typical_stack)."""
    typical = _typical_stack(profiles)
    apart = input_apart(typical) if typical else None
    fits = [fit_growth(p, apart) for p in profiles]
    wide = swing(typical) if typical else quantile([swing(p) for p in profiles], q)
    return classify(fits, growths, q, fit_growth(typical, apart) if typical else None, wide)


def classify(
    fits: Sequence[Fit], growths: Sequence[float], q: float, typical: Fit | None = None, wide: float = 0.0
) -> Growth:
    """The kind of growth from per-seed fits and growths (see Growth); which fit explains the growth
    is read on `typical` (the typical stack's fit, kind_of) where given, else on the quantile of the
    per-seed fits. `wide`: the stack's `swing` (0 where unknown): flat needs it within x2 too."""
    rate = Spread.of([f[0] for f in fits], q)
    exponent = Spread.of([f[2] for f in fits], q)
    growth = quantile(growths, q)
    inside = not wide >= math.log(2)  # NaN (a gain that is no positive number): as before, the ends alone
    if growth > 0 and abs(math.log(growth)) < math.log(2) and inside:  # also where a short stack has no fit
        return Growth("flat", rate, exponent)
    if math.isnan(exponent.mid) or math.isnan(growth):
        return Growth("n/a", rate, exponent)
    linear, log = (
        typical[1:4:2] if typical else (quantile([f[1] for f in fits], q), quantile([f[3] for f in fits], q))
    )
    if max(linear, log) < FIT_R2:
        return Growth("irregular", rate, exponent)
    return Growth("exponential" if linear >= log else "polynomial", rate, exponent)
