"""A verdict about a Config's initialisation distribution, not one draw: criteria judged on a quantile
(default the median) of per-seed values, with seeds spent sequentially, more only near the limit.

The rule. The budget is K = run.seeds initialisations (weights and inputs); the q-quantile of K values
is the r-th smallest, r = ceil(q K). After each seed, a criterion whose r-th smallest value is already
known to pass (K - r + 1 seeds fire) or not (r seeds do not) is decided: the K-seed answer cannot change
(curtailment, exact). Before that, the seeds so far decide alone when every one of them lies on the same
side of every limit by at least a factor MARGIN ** (1 / n) after n seeds: one seed 100x from the limit,
two both 10x. Near the limit one seed's growth is off its 5-seed median by up to 5.2x on a tanh MLP,
3.0x on a pre-norm resmlp, 14x on a post-norm transformer and a tanh RNN, 55x on a GRU (each zoo
target at its crossing, 20 base seeds x 5 seeds); a seed 100x from the limit is beyond that spread, so
the median cannot be on the other side (10x was not: a GRU seed 12x below the limit had a median above
it). Going non-finite is not on that continuous spread (one initialisation that stays finite says
nothing of the next, and one NaN nothing of the others): while the nonfinite criterion is on (the
default) every verdict is left to the counts, at least ceil(q K) seeds; the margin decides only
growth-like criteria with nonfinite off.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from stabilitycheck.config import Config
from stabilitycheck.culprit import culprit_of
from stabilitycheck.measurement import Measurement
from stabilitycheck.probing import probe
from stabilitycheck.subject import Subject
from stabilitycheck.verdicts import CRITERIA, Limits, Verdict, bound, fires, judge, values

MARGIN = 100.0
LAW_SLACK = math.log(2)  # a polynomial kind's depth ** exponent must give the growth within x2
INPUT_SPREAD, INPUT_SD = 3.0, 0.05  # input_apart: how far its log-gain lies from the others' (in sd)
FIT_R2 = 0.9  # below it no fit explains the growth (a clean stack fits >= 0.95, a lone spike 0.76)
SEED_MIX = 0x9E3779B9  # seeds after the first: base + i * this, mod 2**32 (no overlap between bases)


def seed_of(base: int, i: int) -> int:
    """The i-th seed of a verdict that starts at `base` (the 0th is `base` itself)."""
    return (base + i * SEED_MIX) % 2**32


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
        return cls(
            min(finite or [math.nan]), quantile(xs, q), max(finite or [math.nan]), len(xs) - len(finite)
        )

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
class Growth:
    """What kind of growth the stack shows, from the cumulative log growth C(j) of the backward signal
    between block call j and the output (j = 1..L from the input side): exponential when C is linear in
    the number of blocks L - j (a constant rate per block, e.g. a tanh MLP off criticality), polynomial
    when it is linear in log(L / j) (growth ~ depth ** exponent, e.g. pre-norm residual stacks whose
    per-block log-gain decays like 1 / j; so depth ** exponent must give the growth within x2),
    whichever least-squares fit explains more of C, fitted on the seeds' typical stack (each gain the
    geometric mean over seeds) and without the input segment where its gain stands apart from the
    others' (`input_apart`: the input is not on the stack's fixed point, nor does it pass what runs
    between blocks; a tanh MLP whose blocks are its Linear layers has a first gain of sigma_w, 2.5x
    the others at 3.75, which read as depth^p on 6 blocks; the law is then checked on the growth
    past it); irregular
    when neither explains FIT_R2 of C's variance (one block's spike among gain-1 blocks, growth that
    rises then falls along the stack: no rate or exponent describes it); flat when the total growth is
    within x2; accumulated when a recurrent subject's through-time growth T (the loss on
    the last step: the exact product of the Jacobians) explains less than half the log growth G,
    ln T < ln(G) / 2: the rest is the gradient of early steps summed over every later token's loss,
    whatever the limits. Quantiles and spreads over seeds."""

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
        if self.kind == "accumulated":
            return "accumulated over tokens"
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
    if abs(exponent * math.log(n / (shape.start + 1)) - cumulative[shape.start]) > LAW_SLACK:
        r2_log = -math.inf  # a fitted shape whose depth law is not the growth: no law (depth^3.43 of 9
        # blocks is 1870, with a growth of 363: the fit's intercept carried the difference)
    return rate, r2_lin, exponent, r2_log


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
    return classify(fits, growths, q, fit_growth(typical, apart) if typical else None)


def classify(fits: Sequence[Fit], growths: Sequence[float], q: float, typical: Fit | None = None) -> Growth:
    """The kind of growth from per-seed fits and growths (see Growth); which fit explains the growth
    is read on `typical` (the typical stack's fit, kind_of) where given, else on the quantile of the
    per-seed fits."""
    rate = Spread.of([f[0] for f in fits], q)
    exponent = Spread.of([f[2] for f in fits], q)
    growth = quantile(growths, q)
    if math.isnan(exponent.mid) or math.isnan(growth):
        return Growth("n/a", rate, exponent)
    if growth > 0 and abs(math.log(growth)) < math.log(2):
        return Growth("flat", rate, exponent)
    linear, log = (
        typical[1:4:2] if typical else (quantile([f[1] for f in fits], q), quantile([f[3] for f in fits], q))
    )
    if max(linear, log) < FIT_R2:
        return Growth("irregular", rate, exponent)
    return Growth("exponential" if linear >= log else "polynomial", rate, exponent)


def over_tokens(kind: Growth, growth: float, through: float) -> Growth:
    """`kind`, or accumulated when it is growth (not flat, not n/a) of which the through-time product
    explains less than half: ln(through) < ln(growth) / 2 (see Growth)."""
    if kind.kind in ("flat", "n/a") or not growth > 1 or math.isnan(through):
        return kind
    if through <= 0 or math.log(through) < 0.5 * math.log(growth):
        return replace(kind, kind="accumulated")
    return kind


@dataclass(frozen=True)
class Judgement:
    """A Config's verdict over its initialisation distribution, with what it cost and the spreads."""

    verdict: Verdict
    seeds: tuple[int, ...]
    exploded_seeds: int
    growth: Spread
    grad_norm: Spread
    skipped_steps: int
    culprit: str
    kind: Growth
    through_time: Spread | None
    measurement: Measurement  # the seed whose growth is the quantile: its per-block profile is shown

    @property
    def exploded(self) -> bool:
        return self.verdict.exploded

    @property
    def failures(self) -> str:
        """'2 exploded', or '2 failed' where the verdict fired on vanishing or stall alone (the gradient
        shrank or the loss stalled: a failure, not an explosion): how many seeds failed on their own."""
        quiet = bool(self.verdict.names) and set(self.verdict.names) <= {"vanishing", "stall"}
        return f"{self.exploded_seeds} {'failed' if quiet else 'exploded'}"

    def summary(self) -> str:
        """'growth 36 (18-126) over 5 seeds, 2 exploded': what the numbers are."""
        n = len(self.seeds)
        return f"growth {self.growth.describe()} over {n} seed{'s' * (n != 1)}, {self.failures}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict.to_dict(),
            "seeds": list(self.seeds),
            "exploded_seeds": self.exploded_seeds,
            "growth": vars(self.growth),
            "grad_norm": vars(self.grad_norm),
            "skipped_steps": self.skipped_steps,
            "culprit": self.culprit,
            "kind": {
                "kind": self.kind.kind,
                "rate": vars(self.kind.rate),
                "exponent": vars(self.kind.exponent),
            },
            "through_time": None if self.through_time is None else vars(self.through_time),
            "measurement": self.measurement.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Judgement:
        k = d["kind"]
        return cls(
            verdict=Verdict.from_dict(d["verdict"]),
            seeds=tuple(d["seeds"]),
            exploded_seeds=d["exploded_seeds"],
            growth=Spread.from_dict(d["growth"]),
            grad_norm=Spread.from_dict(d["grad_norm"]),
            skipped_steps=d["skipped_steps"],
            culprit=d["culprit"],
            kind=Growth(k["kind"], Spread.from_dict(k["rate"]), Spread.from_dict(k["exponent"])),
            through_time=None if d["through_time"] is None else Spread.from_dict(d["through_time"]),
            measurement=Measurement.from_dict(d["measurement"]),
        )


def _decided(per_seed: list[dict[str, float]], lim: Limits, budget: int, q: float) -> bool:
    """Whether the K-seed quantile verdict is known from the seeds so far (see the module docstring)."""
    n, r = len(per_seed), max(1, math.ceil(q * budget))
    active = [c for c in CRITERIA if bound(c, lim) is not None]
    fire = {c: sum(fires(c, v[c], lim) for v in per_seed) for c in active}
    if any(fire[c] >= budget - r + 1 for c in active):
        return True
    if all(n - fire[c] >= r for c in active):
        return True
    factor = MARGIN ** (1.0 / n)
    return all(_far(c, v[c], lim, factor) for c in active for v in per_seed) and all(
        fire[c] in (0, n) for c in active
    )


def _far(name: str, value: float, lim: Limits, factor: float) -> bool:
    """The value is at least `factor` away from the criterion's bound (an infinite growth counts as
    far). Going non-finite is all or nothing, no point on the continuous spread between seeds that
    the margin relies on (one initialisation that stays finite says nothing of the next): while the
    nonfinite or overflow criterion is on, no seed is far from it, so a verdict waits for the counts;
    a NaN value is never far either."""
    b = bound(name, lim)
    if b is None:
        return True
    if name in ("overflow", "nonfinite"):
        return False
    if math.isnan(value):
        return False
    if b == 0 or value == 0 or math.isinf(value):
        return True
    return abs(math.log(value / b)) >= math.log(factor)


class SeedProbes:
    """Probes by (Config, seed), each run once: a search judges a point on its first seed, then the
    full rule there reuses that probe (and the remedies reuse any grid point's). `made` counts the
    probes run, last-step probes apart in `made_last`."""

    def __init__(self) -> None:
        self.done: dict[tuple[Config, bool], Measurement] = {}
        self.made = 0
        self.made_last = 0

    def __call__(self, config: Config, subject: Subject | None, last_step: bool = False) -> Measurement:
        key = (config.with_run(seeds=1, quantile=0.5), last_step)  # what a probe does not read
        if key not in self.done:
            self.done[key] = probe(config, subject, last_step=last_step)
            if last_step:
                self.made_last += 1
            else:
                self.made += 1
        return self.done[key]


def assess(
    config: Config,
    subject: Subject | None = None,
    limits: Limits | None = None,
    probes: SeedProbes | None = None,
    through_time: bool = True,
) -> Judgement:
    """Probe `config` over up to run.seeds initialisations and judge the run.quantile of each criterion.
    For recurrent subjects with a vanishing limit, vanishing is judged on the through-time growth (the
    loss on the last step): a per-token loss hides it under gradients from later tokens. `probes`:
    a cache of per-seed probes to reuse (a search's). `through_time`: a recurrent subject's
    through-time growth is measured (a last-step probe per seed) and its kind judged on it, as the
    search's report does; False skips that where no vanishing limit needs it (a search's points)."""
    lim = limits or Limits()
    run = config.run
    measure = probes or SeedProbes()
    ms: list[Measurement] = []
    per_seed: list[dict[str, float]] = []
    through: list[float] = []
    used: list[int] = []
    for i in range(run.seeds):
        used.append(seed_of(run.seed, i))
        seeded = config.with_run(seed=used[-1])
        m = measure(seeded, subject)
        named = values(m)
        if config.recurrent and (through_time or lim.vanishing is not None):
            through.append(measure(seeded, subject, last_step=True).growth)
            if lim.vanishing is not None:
                named["vanishing"] = through[-1]
        ms.append(m)
        per_seed.append(named)
        if _decided(per_seed, lim, run.seeds, run.quantile):
            break
    return _judgement(ms, per_seed, through, tuple(used), lim, run.quantile)


def _judgement(
    ms: list[Measurement],
    per_seed: list[dict[str, float]],
    through: list[float],
    seeds: tuple[int, ...],
    lim: Limits,
    q: float,
) -> Judgement:
    quantiles = {c: quantile([v[c] for v in per_seed], q) for c in CRITERIA}
    growth = [m.growth for m in ms]
    mid = quantile(growth, q)
    rep = next((m for m in ms if m.growth == mid or (math.isnan(mid) and math.isnan(m.growth))), ms[0])
    kind = kind_of([m.gains for m in ms], growth, q)
    return Judgement(
        verdict=judge(quantiles, lim),
        seeds=seeds,
        exploded_seeds=sum(judge(v, lim).exploded for v in per_seed),
        growth=Spread.of(growth, q),
        grad_norm=Spread.of([v["grad_norm"] for v in per_seed], q),
        skipped_steps=sum(m.skipped_steps for m in ms),
        culprit=culprit_of(ms),
        kind=over_tokens(kind, mid, quantile(through, q)) if through else kind,
        through_time=Spread.of(through, q) if through else None,
        measurement=rep,
    )


def through_time(
    config: Config,
    subject: Subject,
    q: float,
    seeds: Sequence[int] | None = None,
    probes: SeedProbes | None = None,
) -> Spread | None:
    """The through-time growth (loss on the last step) of a recurrent subject over `seeds` (default:
    every seed of the budget; a search passes the seeds its verdict used, so the spreads match)."""
    if not config.recurrent:
        return None
    measure = probes or SeedProbes()
    used = seeds if seeds is not None else [seed_of(config.run.seed, i) for i in range(config.run.seeds)]
    xs = [measure(config.with_run(seed=s), subject, last_step=True).growth for s in used]
    return Spread.of(xs, q)
