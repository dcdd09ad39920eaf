"""The phase map against an exhaustive grid judged by hand: a subject whose growth per seed is
(init_scale x gain(seed)) ** depth exactly (closed_form.ScaledIdentity), so every point's verdict,
each row's frontier and each row's band of seeds are known before the map is traced; and theory()
against the exact growth of a linear network, sigma ** depth."""

from __future__ import annotations

import math

import pytest
from closed_form import LIMITS_KW, ScaledIdentity

from stabilitycheck.phasemap import PhaseMap, phase_map, theory
from stabilitycheck.seeds import seed_of
from stabilitycheck.space import Axis, Space
from stabilitycheck.spread import quantile
from stabilitycheck.verdicts import Limits
from stabilitycheck.zoo import Family

LIMIT = 100.0
DEPTHS = Axis.range("depth", 1, 12)
SCALES = Axis("init_scale", (0.25, 0.5, 0.75, 1.25, 1.5, 2.0, 3.0))


def _space(subject: ScaledIdentity, seeds: int = 1) -> Space:
    return Space("closed-form", subject.config().with_run(seeds=seeds), (DEPTHS, SCALES))


def _first(row: list[bool]) -> int | None:
    return next((i for i, fires in enumerate(row) if fires), None)


def _clear_of_the_limits(growths: list[float]) -> None:
    """No growth within 5% of a limit: float32 rounding cannot move a verdict."""
    for g in growths:
        assert abs(math.log(g / LIMIT)) > 0.05 and abs(math.log(g * LIMIT)) > 0.05, g


def test_the_traced_frontiers_are_the_exhaustive_grids_own() -> None:
    """One seed per point. Oracle: per row, the smallest depth with init_scale ** depth > 100
    (explodes) and < 1/100 (vanishes), by hand. A vanishing point is no explosion: the explosion
    frontier of a row that only vanishes is None, and so is its band of exploding seeds."""
    subject = ScaledIdentity()
    limits = Limits(growth=LIMIT, vanishing=LIMIT, **LIMITS_KW)
    pm = phase_map(subject, x="depth", y="init_scale", space=_space(subject), limits=limits)
    growth = [[s**d for d in DEPTHS.values] for s in SCALES.values]
    _clear_of_the_limits([g for row in growth for g in row])
    assert [e.x for e in pm.explode] == [_first([g > LIMIT for g in row]) for row in growth]
    assert pm.vanish is not None
    assert [e.x for e in pm.vanish] == [_first([g < 1 / LIMIT for g in row]) for row in growth]
    # by hand: 0.25 ** 4 and 0.5 ** 7 fall below 1/100; 1.5 ** 12, 2 ** 7 and 3 ** 5 pass 100
    assert [e.x for e in pm.vanish][:2] == [3, 6] and [e.x for e in pm.explode][-3:] == [11, 6, 4]
    for p in pm.points:  # every measured point's verdict, by hand
        g = growth[p.y][p.x]
        assert (p.exploded, p.vanished) == (g > LIMIT, g < 1 / LIMIT), (p.x, p.y, g)
    for j, row in enumerate(growth):
        if not any(g > LIMIT for g in row):
            assert pm.band(j) == (None, None), SCALES.values[j]
    assert pm.violations == ()


GAINS = (1.0, 0.7, 1.3)
"""The first three seeds' gains: a seed's growth is (init_scale x gain) ** depth."""


def _gain(seed: int) -> float:
    return GAINS[[seed_of(0, i) for i in range(len(GAINS))].index(seed)]


def test_a_map_with_seeds_judges_each_point_over_those_seeds_and_its_bands_are_theirs() -> None:
    """seeds=3 over a base of one seed. Oracle, by hand per point: the three seeds' growths
    (init_scale x gain) ** depth, the nearest-rank median judged (the frontier of each row), and the
    band of a row: the smallest measured depth where one of the seeds its verdict spent fired, and
    where all of them did."""
    subject = ScaledIdentity(gain=_gain)
    limits = Limits(growth=LIMIT, vanishing=LIMIT, **LIMITS_KW)
    pm = phase_map(subject, x="depth", y="init_scale", space=_space(subject), limits=limits, seeds=3)
    assert pm.base.run.seeds == 3

    def growths(x: int, y: int) -> list[float]:
        return [(SCALES.values[y] * g) ** DEPTHS.values[x] for g in GAINS]

    _clear_of_the_limits([g for x in range(len(DEPTHS.values)) for y in range(7) for g in growths(x, y)])
    for y, edge in enumerate(pm.explode):
        median = [quantile(growths(x, y), 0.5) for x in range(len(DEPTHS.values))]
        assert edge.x == _first([m > LIMIT for m in median]), SCALES.values[y]
    assert pm.vanish is not None
    for y, edge in enumerate(pm.vanish):
        median = [quantile(growths(x, y), 0.5) for x in range(len(DEPTHS.values))]
        assert edge.x == _first([m < 1 / LIMIT for m in median]), SCALES.values[y]
    assert all(2 <= p.seeds <= 3 for p in pm.points)  # two agreeing seeds settle a median of three
    wide = 0  # rows whose band spans more than one measured depth
    for y in range(len(SCALES.values)):
        row = sorted((p for p in pm.points if p.y == y), key=lambda p: p.x)
        spent = {p.x: growths(p.x, y)[: p.seeds] for p in row}
        for vanishing, fired in ((False, lambda g: g > LIMIT), (True, lambda g: g < 1 / LIMIT)):
            some = _first_x([p.x for p in row if any(fired(g) for g in spent[p.x])])
            every = _first_x([p.x for p in row if all(fired(g) for g in spent[p.x])])
            assert pm.band(y, vanishing) == (some, every), (SCALES.values[y], vanishing)
            wide += some is not None and every is not None and some < every
    assert wide >= 2


def _first_x(xs: list[int]) -> int | None:
    return min(xs) if xs else None


def test_an_interrupted_map_keeps_one_frontier_per_row() -> None:
    """Stopped after 9 verdicts: the rows traced so far keep their measured frontier, every other
    row is 'untraced', one Edge per row of the grid in order (the grid's own row count)."""
    subject = ScaledIdentity()
    calls: list[int] = []

    def interrupt(pm: PhaseMap) -> None:
        calls.append(pm.verdicts)
        if len(calls) == 9:
            raise KeyboardInterrupt

    limits = Limits(growth=LIMIT, **LIMITS_KW)
    pm = phase_map(
        subject, x="depth", y="init_scale", space=_space(subject), limits=limits, on_point=interrupt
    )
    assert pm.interrupted and pm.verdicts == 9
    assert [e.y for e in pm.explode] == list(range(len(SCALES.values)))
    traced = [e for e in pm.explode if e.how != "untraced"]
    assert 0 < len(traced) < len(SCALES.values) and all(e.x is None for e in pm.explode[len(traced) :])


@pytest.mark.parametrize("vanishing", [False, True])
def test_theory_of_a_linear_mlp_is_the_first_depth_past_the_limit(vanishing: bool) -> None:
    """A bias-free linear MLP's mean-field growth is sigma ** depth exactly (each block multiplies
    the backward signal by sigma). Oracle: per row, the first depth with sigma ** depth > the growth
    limit (10), or < 1 / the vanishing limit (100), by hand; None where no depth of the row does."""
    base = Family("mlp").config(activation="linear", width=8, batch_size=2, seeds=1)
    depths, sigmas = Axis.range("depth", 1, 16), Axis("init_scale", (0.5, 0.8, 1.5, 2.0))
    limits = Limits(growth=10.0, vanishing=100.0)
    pm = PhaseMap("mlp", base, depths, sigmas, limits, "default", "init_scale", (), (), None, (), 0.0, False)
    if vanishing:
        want = [_first([s**d < 1 / 100 for d in depths.values]) for s in sigmas.values]
        assert want == [6, None, None, None]  # 0.5 ** 7 = 0.0078; 0.8 ** 16 = 0.028
    else:
        want = [_first([s**d > 10 for d in depths.values]) for s in sigmas.values]
        assert want == [None, None, 5, 3]  # 1.5 ** 6 = 11.4, 2 ** 4 = 16
    assert theory(pm, vanishing) == tuple(want)
