"""The search driver against an exhaustive grid judged by hand: a subject whose growth per seed is
(init_scale x gain(seed)) ** depth exactly (closed_form.ScaledIdentity), whose builds are counted,
and whose memory estimate is a known function of its knobs."""

from __future__ import annotations

import math

import pytest
from closed_form import LIMITS_KW, ScaledIdentity
from sortedcontainers import SortedSet

from stabilitycheck import searching
from stabilitycheck.searching import Prober, search, sweep
from stabilitycheck.seeds import assess, seed_of
from stabilitycheck.space import Axis, Space
from stabilitycheck.spread import quantile
from stabilitycheck.verdicts import Limits

LIMIT = 100.0
LIMITS = Limits(growth=LIMIT, **LIMITS_KW)
DEPTHS = Axis.range("depth", 1, 12)
SCALES = Axis("init_scale", (1.5, 2.0, 3.0))  # not 1.0: the critical-init remedy's value
GAINS = (1.3, 1.0, 0.7)
"""The first three seeds' gains: the first seed (the screen) grows faster than the median seed."""


def _gain(seed: int) -> float:
    return GAINS[[seed_of(0, i) for i in range(len(GAINS))].index(seed)]


def _space(subject: ScaledIdentity, seeds: int) -> Space:
    return Space("closed-form", subject.config().with_run(seeds=seeds), (DEPTHS, SCALES))


def _median_explodes(depth: int, scale: float) -> bool:
    growths = [(scale * g) ** depth for g in GAINS]
    assert all(abs(math.log(g / LIMIT)) > 0.05 for g in growths)  # clear of float32 rounding
    return quantile(growths, 0.5) > LIMIT


def test_the_sweep_judges_every_point_on_the_full_rule_over_seeds() -> None:
    """Oracle: the nearest-rank median of the three seeds' growths against the limit, by hand, at
    every point; the first seed alone explodes at more points than the median does."""
    subject = ScaledIdentity(gain=_gain)
    space = _space(subject, seeds=3)
    want = {index: _median_explodes(d, s) for index, d, s in _points()}
    first = {(i, j): (s * GAINS[0]) ** d > LIMIT for (i, j), d, s in _points()}
    assert sum(first.values()) > sum(want.values())  # the screen's seed alone would differ
    assert sweep(space, subject=subject, limits=LIMITS) == want


def _points() -> list[tuple[tuple[int, int], int, float]]:
    return [((i, j), d, s) for i, d in enumerate(DEPTHS.values) for j, s in enumerate(SCALES.values)]


def _index(config: object) -> tuple[int, int]:
    return (DEPTHS.values.index(config.knob("depth")), SCALES.values.index(config.knob("init_scale")))  # type: ignore[attr-defined]


def _judged(subject: ScaledIdentity) -> set[tuple[int, int]]:
    """The grid points the subject was built at (any seed): the remedies' init_scale 1.0 is off it."""
    return {_index(c) for c in subject.builds if c.knob("init_scale") in SCALES.values}


def test_a_search_counts_each_grid_point_it_judged_once_whatever_seeds_it_spent_there() -> None:
    """Three seeds per point, one seed alone where the screen steers: a point judged on the screen
    and then on the full rule is one point. Oracle: the grid points the subject itself was built at;
    and the counterexample is a 1-minimal point of the median's grid, by hand."""
    subject = ScaledIdentity(gain=_gain)
    result = search(_space(subject, seeds=3), subject=subject, limits=LIMITS, max_examples=10, seed=0)
    cx = result.counterexample
    assert cx is not None
    i, j = _index(cx.config)
    assert _median_explodes(DEPTHS.values[i], SCALES.values[j])
    assert i == 0 or not _median_explodes(DEPTHS.values[i - 1], SCALES.values[j])
    assert j == 0 or not _median_explodes(DEPTHS.values[i], SCALES.values[j - 1])
    assert result.points == len(_judged(subject))
    assert result.points < result.probes


def test_the_largest_stable_point_is_the_judged_stable_one_with_the_largest_knob_sum() -> None:
    """One seed per point, init_scale the first axis (3 values), depth the second (12). Oracle: among
    the grid points the subject was built at, those whose growth init_scale ** depth is under the
    limit, the largest by the sum of grid indices, then lexicographically."""
    subject = ScaledIdentity()
    space = Space("closed-form", subject.config().with_run(seeds=1), (SCALES, DEPTHS))
    result = search(space, subject=subject, limits=LIMITS, max_examples=30, seed=0)
    stable = [(j, i) for i, j in _judged(subject) if SCALES.values[j] ** DEPTHS.values[i] < LIMIT]
    want = max(stable, key=lambda p: (sum(p), p))
    assert want != max(stable)  # the sum decides here, not the first knob
    assert result.largest_stable is not None
    assert _index(result.largest_stable) == (want[1], want[0])
    assert result.largest_stable_judgement is not None and not result.largest_stable_judgement.exploded


def test_a_top_corner_that_alone_explodes_is_found_when_hypothesis_misses_it() -> None:
    """Only the top corner (depth 12, init_scale 1.5: 1.5 ** 12 = 130) passes the limit; one
    Hypothesis example does not draw it. Oracle: the grid by hand, whose one exploding point is the
    answer."""
    subject = ScaledIdentity()
    space = Space(
        "closed-form", subject.config().with_run(seeds=1), (DEPTHS, Axis("init_scale", (1.25, 1.5)))
    )
    grid = {i: space.config(i) for i in space.grid()}
    exploding = [i for i, c in grid.items() if float(c.knob("init_scale")) ** int(c.knob("depth")) > LIMIT]
    assert exploding == [space.top()]
    result = search(space, subject=subject, limits=LIMITS, max_examples=1, seed=0)
    assert result.counterexample is not None and result.counterexample.config == space.config(space.top())


def test_a_point_is_skipped_as_too_large_exactly_where_its_estimate_passes_half_the_free_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Oracle: the estimate by hand (1000 bytes per block) against half of the free memory (8000
    bytes): depths up to 4 are judged, 5 and more are skipped as too large."""
    monkeypatch.setattr(searching, "free_memory", lambda device: 8000)
    subject = ScaledIdentity(memory=lambda config: 1000 * int(config.knob("depth")))
    space = _space(subject, seeds=1)
    prober = Prober(space, subject, LIMITS, lambda _: None, None)
    for index, depth, _ in _points():
        got = prober(index)
        if depth * 1000 > 8000 // 2:
            assert isinstance(got, str) and got.startswith("too large"), (depth, got)
        else:
            assert not isinstance(got, str), (depth, got)


def test_the_example_database_key_tells_spaces_apart() -> None:
    """A stored failure replays only in its own search: two spaces differing in one thing (the base
    Config, a grid's length beyond its first values, a knob's name) have different keys; the same
    space built twice has one."""
    subject = ScaledIdentity()
    base = subject.config().with_run(seeds=1)
    space = Space("a", base, (DEPTHS, SCALES))
    others = [
        Space("a", base.with_run(seeds=3), (DEPTHS, SCALES)),
        Space("a", base, (Axis.range("depth", 1, 13), SCALES)),
        Space("a", base, (DEPTHS, Axis("init_scale", (1.5, 2.0, 3.0, 4.0)))),
    ]
    key = searching._digest(space)
    assert searching._digest(Space("a", base, (Axis.range("depth", 1, 12), SCALES))) == key
    assert all(searching._digest(o) != key for o in others)


def test_an_interrupted_search_reports_the_smallest_exploding_point_seen_as_not_minimal() -> None:
    """Ctrl-C before the descent ends: the counterexample is the exploding point judged so far with
    the smallest sum of grid indices (then lexicographically), marked not verified minimal. Oracle:
    the grid points the subject was built at, judged by hand (init_scale ** depth > 100)."""
    subject = ScaledIdentity()
    lines: list[str] = []

    def progress(line: str) -> None:
        if not line.endswith(": judging"):  # a point judged, not one starting
            lines.append(line)
        if len(lines) == 6:
            raise KeyboardInterrupt

    space = _space(subject, seeds=1)
    result = search(space, subject=subject, limits=LIMITS, max_examples=30, seed=0, progress=progress)
    exploding = [(i, j) for i, j in _judged(subject) if SCALES.values[j] ** DEPTHS.values[i] > LIMIT]
    assert len(exploding) >= 2
    want = min(exploding, key=lambda p: (sum(p), p))
    assert want != max(exploding, key=lambda p: (sum(p), p))
    assert result.interrupted and not result.minimal
    assert result.counterexample is not None and _index(result.counterexample.config) == want


def test_after_a_steer_the_screen_judges_new_points_on_the_quantiles_seed() -> None:
    """Three seeds of gains 1.3, 1.0 and 0.7: the full rule's median seed is the one of gain 1.0, at
    any point. Steered at one point, the screen at points the full rule has not judged is that
    seed's alone: its growth is (init_scale x 1.0) ** depth by hand, not the first seed's."""
    subject = ScaledIdentity(gain=_gain)
    space = _space(subject, seeds=3)
    prober = Prober(space, subject, LIMITS, lambda _: None, None)
    prober.steer((5, 1))
    median_seed = seed_of(0, GAINS.index(1.0))
    for (i, j), depth, scale in _points():
        if (i, j) == (5, 1):
            continue
        got = prober.screen((i, j))
        assert not isinstance(got, str) and got.seeds == (median_seed,), (i, j)
        assert got.growth.mid == pytest.approx(scale**depth, rel=1e-5), (i, j)


def test_explosions_of_the_screens_seed_alone_are_no_counterexample() -> None:
    """Three seeds of gains 1.3, 1.0 and 0.7 at init_scale 1.25 and 1.45: the first seed (the screen)
    explodes from depth 8 (1.885 ** 8 = 159), the median seed nowhere (1.45 ** 12 = 87). Oracle: the
    nearest-rank median by hand passes the limit at no point, so the search reports no counterexample,
    though the screen saw explosions (some point was built with its seed's growth over the limit)."""
    subject = ScaledIdentity(gain=_gain)
    space = Space(
        "closed-form", subject.config().with_run(seeds=3), (DEPTHS, Axis("init_scale", (1.25, 1.45)))
    )
    assert not any(_median_explodes(d, s) for d in DEPTHS.values for s in (1.25, 1.45))
    result = search(space, subject=subject, limits=LIMITS, max_examples=20, seed=0)
    assert any(subject.growth(c) > LIMIT for c in subject.builds)
    assert result.counterexample is None


def test_the_counterexamples_judgement_is_a_fresh_verdicts_with_every_criterion_known() -> None:
    """Three seeds of gains 1.3, 1.0 and 0.7, a growth limit of 100 and a weight-gradient limit of
    500: at depth 5, init_scale 3 the first two seeds' growths (3.9 ** 5, 3 ** 5) settle that the
    point explodes, but their gradient norms (2 sqrt(5) x (init_scale x gain) ** 4: 1035 and 362) leave that
    criterion's median open, so a fresh verdict spends the third seed. Oracle: assess() of the
    counterexample's Config afresh, as its reproduction line runs it: the same seeds, growth spread
    and verdict."""
    subject = ScaledIdentity(gain=_gain)
    limits = Limits(growth=LIMIT, grad_norm=500.0, divergence=None)
    result = search(_space(subject, seeds=3), subject=subject, limits=limits, max_examples=10, seed=0)
    cx = result.counterexample
    assert cx is not None
    fresh = assess(cx.config, subject, limits)
    assert len(fresh.seeds) == 3
    got = cx.judgement
    assert (got.seeds, got.growth, got.verdict) == (fresh.seeds, fresh.growth, fresh.verdict)


def test_the_search_path_does_not_depend_on_the_literals_of_the_modules_loaded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Hypothesis draws some integers from the literals (from 100 up) in the source of the local modules
    loaded: grid indices drawn from 0 made the path depend on what the caller had imported and how the
    package was installed (the zoo's GRU, 256 lengths, ended stable from the command line and at
    seq_len=221 from Python). Oracle: the same search with no such literals and with every index a
    literal visits the same points (Hypothesis' pool of them replaced, as a module full of them would)."""
    from hypothesis.internal.conjecture import providers

    subject = ScaledIdentity()
    space = Space(
        "cf",
        subject.config().with_run(seeds=1),
        (Axis.range("depth", 1, 300), Axis("init_scale", tuple(0.9 + 0.01 * i for i in range(20)))),
    )

    def visited(literals: range) -> list[str]:
        pool = providers.Constants(integers=SortedSet(literals))
        monkeypatch.setattr(providers, "_get_local_constants", lambda: pool)
        providers.CONSTANTS_CACHE.cache.clear()
        lines: list[str] = []
        limits = Limits(growth=1e300, **LIMITS_KW)  # nothing explodes: every example runs
        search(space, subject=subject, limits=limits, max_examples=100, progress=lines.append)  # type: ignore[arg-type]
        return lines

    none = visited(range(0))
    assert visited(range(100, 300)) == none and len(none) > 50
