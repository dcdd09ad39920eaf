"""A verdict about a Config's initialisation distribution, not one draw: criteria judged on a quantile
(default the median) of per-seed values, with seeds spent sequentially, more only near the limit.

The rule. The budget is K = run.seeds initialisations (weights and inputs); the q-quantile of K values
is the r-th smallest, r = ceil(q K) (NaN sorting lowest, never firing). After each seed, a criterion
whose r-th smallest value is already known to pass or not is decided: the K-seed answer cannot change
(curtailment, exact). One that fires above its bound is known to fire once K - r + 1 seeds fire, not
to once r do not; vanishing, which fires below its bound, once r seeds lie below it with fewer than r
NaN possible, not to once r are NaN or too few seeds are left to put r below. A verdict stops once
every criterion is decided; a search's points once whether
the point explodes is (one criterion decided to fire, or all decided not to), naming only the criteria
decided to fire. Before that, the seeds so far decide alone that no criterion fires when every one
of them lies below every limit it could pass (above vanishing's) by at least a factor MARGIN ** (1 / n)
after n seeds: one seed 1000x from the
limit, two both 31.6x, three 10x. Near the limit one seed's growth is off its 5-seed median by up to
5.2x on a tanh MLP and 28x on a post-norm transformer (each zoo target at its crossing, 20 base seeds
x 5 seeds; 760x on a GRU's per-token growth, when recurrent subjects were judged on it); a seed 1000x
from the limit is beyond that spread, so the median cannot be on the other side (100x is not; nor
is 10x: a GRU seed 12x below the limit had a median above it). A
recurrent subject's through-time growth, a product over up to 256 steps, spreads further: up to
2200x-5000x at 64-256 steps of the zoo's RNN and GRU at sigma_w 4 (40-60 base seeds x 5), a GRU
seed at 2.56e4 where its 5-seed median was 11.8; so its verdicts are left to the counts, as are
all while going non-finite is judged: that is not on the continuous spread either (one
initialisation that stays finite says nothing of the next, and one NaN nothing of the others).
With the nonfinite criterion on (the default) every verdict waits for at least ceil(q K) seeds; the
margin decides only with nonfinite off, and with divergence off or optimiser steps run (without
them divergence reads NaN, never far; with them a loss ratio of 1 is 2x from its limit of 2, far
from 10 seeds on). It never decides that a
criterion fires: a seed still to come may go NaN (an overflow, which counts with nonfinite off too),
which sorts lowest and never fires, so two seeds 31.6x over the limit could not say that the
5-seed median fires (a float16 ReLU stack: 2.64e4, 7494, then three NaN); that no
criterion fires, NaN cannot undo, but for vanishing, which NaN sorting lowest counts towards: with
vanishing on, the margin decides nothing (seeds at 1, 1 then NaN, NaN, 0 read a median of 0: a
review). A growth of exactly 0 (no gradient came back: a dead ReLU layer) is never far either: it
is no point on that spread (one seed's 0 beside 2164, 140, 359 and 1774 decided 'stable' for a
median of 359; the same audit).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from stabilitycheck.config import Config, kind
from stabilitycheck.configprobe import probe
from stabilitycheck.culprit import culprit_of
from stabilitycheck.errors import NoLastStep
from stabilitycheck.growthkind import Growth, kind_of
from stabilitycheck.judgement import Judgement
from stabilitycheck.measurement import Measurement
from stabilitycheck.spread import Spread, quantile, rank
from stabilitycheck.subject import Subject
from stabilitycheck.verdicts import CRITERIA, Limits, Verdict, bound, criterion, fires, judge, values

MARGIN = 1000.0
SEED_MIX = 0x9E3779B9  # seeds after the first: base + i * this, mod 2**32; two bases share a seed
# only where they differ by k * this mod 2**32 (|k| < the seeds): with 5 seeds, by 626,627,285 at least


def seed_of(base: int, i: int) -> int:
    """The i-th seed of a verdict that starts at `base` (the 0th is `base` itself)."""
    return (base + i * SEED_MIX) % 2**32


def _decided(
    per_seed: list[dict[str, float]],
    lim: Limits,
    budget: int,
    q: float,
    every: bool = False,
    margin: bool = True,
    apart: bool = False,
) -> bool:
    """Whether the K-seed quantile verdict is known from the seeds so far (see the module docstring):
    whether the point explodes, or with `every`, which criteria fire too, or with `apart`, whether it
    explodes on a criterion other than vanishing and whether it vanishes, each (a map traces both
    frontiers: stopped at the first criterion known to fire, a point of a row whose vanishing was
    still open read 'not vanishing', its frontier none where it was 37); without `margin`, by the
    counts alone."""
    settled = _settled(per_seed, lim, budget, q, margin)
    if every:
        return None not in settled.values()
    if apart and "vanishing" in settled:
        rest = [s for c, s in settled.items() if c != "vanishing"]
        return settled["vanishing"] is not None and (True in rest or all(s is False for s in rest))
    return True in settled.values() or all(s is False for s in settled.values())


def _settled(
    per_seed: list[dict[str, float]], lim: Limits, budget: int, q: float, margin: bool = True
) -> dict[str, bool | None]:
    """Per active criterion, whether its K-seed quantile is known to fire (True) or not (False) from the
    seeds so far, or None while that is open: by the counts (the module docstring's, r = ceil(q K)),
    or, with `margin`, all at once by the margin (every seed far from every limit, none firing: then
    none fires)."""
    n, r = len(per_seed), rank(q, budget)
    unseen = budget - n
    active = [c for c in CRITERIA if bound(c, lim) is not None]
    fire = {c: sum(fires(c, v[c], lim) for v in per_seed) for c in active}
    factor = MARGIN ** (1.0 / n)
    far = (
        margin
        and "vanishing" not in active  # NaN sorts lowest: seeds to come could make it fire
        and all(_far(c, v[c], lim, factor) for c in active for v in per_seed)
        and not any(fire.values())
    )

    def known(c: str) -> bool | None:
        if far:
            return False
        if c == "vanishing":  # fires below its bound: on the r-th smallest value, NaN sorting lowest
            nan = sum(math.isnan(v[c]) for v in per_seed)
            if nan + fire[c] >= r and nan + unseen < r:  # r-th smallest below, whatever comes
                return True
            if nan >= r or nan + fire[c] + unseen < r:  # r-th smallest NaN, or not enough below
                return False
            return None
        if fire[c] >= budget - r + 1:  # fewer than r values can lie at or under the bound
            return True
        if n - fire[c] >= r:
            return False
        return None

    return {c: known(c) for c in active}


def _far(name: str, value: float, lim: Limits, factor: float) -> bool:
    """The value is at least `factor` away from the criterion's bound (an infinite growth counts as
    far). Going non-finite is all or nothing, no point on the continuous spread between seeds that
    the margin relies on (one initialisation that stays finite says nothing of the next): while the
    nonfinite or overflow criterion is on, no seed is far from it, so a verdict waits for the counts;
    a NaN value is never far either, nor exactly 0 (no gradient came back: see the module docstring)."""
    b = bound(name, lim)
    if b is None:
        return True
    if name in ("overflow", "nonfinite"):
        return False
    if math.isnan(value) or value == 0:
        return False
    return max(value / b, b / value) >= factor  # ratios, not logs: exact where the factor is; inf: far


class SeedProbes:
    """Probes by (Config, seed), each run once: a search judges a point on its first seed, then the
    full rule there reuses that probe (and the remedies reuse any grid point's). `made` counts the
    probes run, last-step probes apart in `made_last`."""

    def __init__(self) -> None:
        self.done: dict[tuple[Config, bool], Measurement] = {}
        self.without: set[Config] = set()  # subjects with no last step, at these configs
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

    def last(self, config: Config, subject: Subject | None) -> Measurement | None:
        """The last-step probe of `config` at init (no optimiser steps: the growth is read at step 0,
        and steps on that loss would train a model no one trains, which went non-finite where the
        model's own training did not), or None where its subject has none (a model file whose loss
        is on the last step already, or whose calls do not form one chain: errors.NoLastStep), which is
        remembered for every seed of the config: that is how the model is built, not what it draws."""
        key = config.with_run(seed=0, seeds=1, quantile=0.5)
        if key in self.without:
            return None
        try:
            return self(config.with_run(steps=0, warmup=0, clip=None), subject, last_step=True)
        except NoLastStep:
            self.without.add(key)
            return None


def assess(
    config: Config,
    subject: Subject | None = None,
    limits: Limits | None = None,
    probes: SeedProbes | None = None,
    every: bool = True,
    apart: bool = False,
) -> Judgement:
    """Probe `config` over up to run.seeds initialisations and judge the run.quantile of each criterion.
    A recurrent subject (`stepped`: a zoo family, a model file's cell stepped per token) is judged on
    its through-time growth, the loss on the last step alone (a second probe per seed), for growth and
    vanishing: the product of the step Jacobians, whose norms above 1 make a gradient explode with
    sequence length (Pascanu et al. 2013). Its own per-token loss adds every later token's gradient
    to each step's: a linear cell at W = 0.999 I, whose product shrinks, read growth 101 > 100 at 106
    tokens, and one at W = I, T at T tokens; that growth is kept as `per_token`; the weight-gradient
    norm, going non-finite, divergence and stall stay the model's own loss's. `probes`: a cache of
    per-seed probes to reuse (a search's). `every`: seeds are spent until every criterion's verdict is
    known; False stops once whether the point explodes is (a search's points), and the verdict then
    names only the criteria known to fire; with `apart`, once whether it vanishes is known too (a
    map's points, `_decided`)."""
    lim = limits or Limits()
    run = config.run
    measure = probes or SeedProbes()
    ms: list[Measurement] = []
    per_seed: list[dict[str, float]] = []
    through: list[Measurement] = []
    used: list[int] = []
    margin = True  # none for a recurrent subject, judged through time or not (a map's last-step one)
    for i in range(run.seeds):
        used.append(seed_of(run.seed, i))
        seeded = config.with_run(seed=used[-1])
        m = measure(seeded, subject)
        named = values(m)
        margin = margin and not stepped(config, m)
        last = None if margin else measure.last(seeded, subject)
        if last is not None:
            through.append(last)
            named["growth"] = named["vanishing"] = last.growth
        ms.append(m)
        per_seed.append(named)
        if _decided(per_seed, lim, run.seeds, run.quantile, every, margin, apart):
            break
    return _judgement(ms, per_seed, through, tuple(used), lim, run.quantile, run.seeds, margin)


def _judgement(
    ms: list[Measurement],
    per_seed: list[dict[str, float]],
    through: list[Measurement],
    seeds: tuple[int, ...],
    lim: Limits,
    q: float,
    budget: int,
    margin: bool = True,
) -> Judgement:
    """The Judgement of the seeds spent; the verdict names the criteria known to fire over the whole
    budget (one whose quantile over the seeds spent passes its limit while its K-seed verdict is still
    open is not named: the seeds spent were enough to know the point explodes, not why); `margin`:
    as `_decided`'s."""
    quantiles = {c: quantile([v[c] for v in per_seed], q) for c in CRITERIA}
    settled = _settled(per_seed, lim, budget, q, margin)
    fired = tuple(criterion(c, quantiles[c], lim) for c in CRITERIA if settled.get(c) is True)
    known = Verdict(bool(fired), fired)
    judged = through or ms  # the probes the growth is judged on
    # a non-finite value is named where the model's own loss met it (the verdict's nonfinite is its)
    shown = ms if any(m.first_nonfinite is not None for m in ms) else judged
    growth = [m.growth for m in judged]
    mid = quantile(growth, q)
    at = next((i for i, g in enumerate(growth) if g == mid or (math.isnan(mid) and math.isnan(g))), 0)
    # the profile is the quantile seed's probe of the growth judged (its own-loss probe was shown,
    # labelled the q growth's, whose first over last read that seed's per-token growth), but
    # where a recurrent subject's own loss met a non-finite value, to say where: that seed's own-loss
    # probe if it met one, else, where the verdict fired on one, the first seed's that did
    went = "nonfinite" in known.names or "overflow" in known.names  # overflow: nonfinite's, in float16
    own_loss = bool(through) and (ms[at].first_nonfinite is not None or went)
    if own_loss and ms[at].first_nonfinite is None:
        at = next(i for i, m in enumerate(ms) if m.first_nonfinite is not None)
    return Judgement(
        verdict=known,
        seeds=seeds,
        exploded_seeds=sum(judge(v, lim).exploded for v in per_seed),
        seeds_fired=tuple(c for c in CRITERIA if any(fires(c, v[c], lim) for v in per_seed)),
        growth=Spread.of(growth, q),
        grad_norm=Spread.of([v["grad_norm"] for v in per_seed], q),
        skipped_steps=sum(m.skipped_steps for m in ms),
        culprit=culprit_of(shown, went if known.exploded else None, q),
        kind=_kind(judged, q),
        per_token=Spread.of([m.growth for m in ms], q) if through else None,
        measurement=ms[at] if own_loss else judged[at],
        measured_seed=seeds[at],
        values=tuple(per_seed),
        own_loss=own_loss,
    )


def stepped(config: Config, m: Measurement) -> bool:
    """Whether `config`'s subject is judged on a through-time growth (the loss on the last step alone)
    in place of the growth `m` read: a zoo recurrent family, or a model file whose one block is called
    per step (a cell of its own, stepped per token: its last-step loss reads the last call's output)."""
    return config.recurrent or (kind(config.subject) == "file" and m.per_call)


def _kind(ms: Sequence[Measurement], q: float) -> Growth:
    """The kind of growth of these probes' gain profiles from the first chain reached on
    (Measurement.fitted_gains, growthkind.kind_of)."""
    return kind_of([m.fitted_gains for m in ms], [m.growth for m in ms], q)
