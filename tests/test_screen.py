"""The search steers on the first seed and claims only on the full rule over seeds: the settling step
against brute force, a lying screen that still yields a point 1-minimal on the full rule, the
per-seed probe cache against fresh probes, and a seeds search against the exhaustive full-rule grid."""

from __future__ import annotations

import itertools
import random

from hypothesis import given
from hypothesis import strategies as st

from stabilitycheck.canonical import Index, boundary, canonical, crossing
from stabilitycheck.config import Config
from stabilitycheck.judgement import Judgement
from stabilitycheck.searching import Prober, search, sweep
from stabilitycheck.seeds import SeedProbes, assess
from stabilitycheck.space import Axis, Space
from stabilitycheck.subjects import resolve
from stabilitycheck.verdicts import Limits


@given(st.integers(0, 40), st.integers(0, 40), st.integers(0, 40))
def test_crossing_finds_the_threshold_of_a_monotone_predicate(threshold: int, guess: int, top: int) -> None:
    """Oracle: the smallest value where v >= threshold holds, whatever the guess."""
    top = max(top, threshold)
    guess = min(guess, top)
    assert crossing(lambda v: v >= threshold, guess, top) == threshold


@given(st.lists(st.booleans(), min_size=1, max_size=40), st.data())
def test_crossing_of_any_predicate_is_a_bad_value_above_two_good_ones(
    bits: list[bool], data: st.DataObject
) -> None:
    """Oracle: brute force over the list: bad at the answer, not one step below it, nor two."""
    bits[-1] = True  # bad(top) is known
    top = len(bits) - 1
    guess = data.draw(st.integers(0, top))
    v = crossing(lambda i: bits[i], guess, top)
    assert bits[v] and (v == 0 or not bits[v - 1])
    assert v < 2 or not bits[v - 2]


def test_crossing_walks_down_from_the_guess_where_the_value_below_it_is_bad() -> None:
    """Guards the walk's start, brute force over every bad/good pattern of 8 values and every guess:
    where bad holds at guess - 1 but not at guess, the answer is found walking down from guess - 1
    (at or below it), never by bisecting up from the guess (on a wobbling median that climbed to a
    crossing far above: bad only at 4 and from 9 on, guess 5, read 9)."""
    for pattern in itertools.product([False, True], repeat=7):
        bits = [*pattern, True]
        for guess in range(1, 8):
            if bits[guess - 1] and not bits[guess]:
                assert crossing(lambda i, b=bits: b[i], guess, 7) <= guess - 1, (bits, guess)
    assert crossing(lambda v: v == 4 or v >= 9, 5, 10) == 4


def test_one_stable_value_with_no_exploding_seed_does_not_end_the_walk_down() -> None:
    """The wobble of a 5-seed median, as measured on a tanh MLP model file: explodes at depth 31, not
    at 32 (no seed exploded there), explodes at 33. From a guess of 33 the crossing is 31."""
    bad = {30: False, 31: True, 32: False, 33: True}
    assert crossing(lambda v: bad.get(v, v > 33), 33, 40) == 31


class Grid:
    """A prober over a fixed grid verdict (the full rule) whose screen is a given, possibly lying,
    function; counts the full-rule calls."""

    def __init__(self, space: Space, full: dict[Index, bool], screen: dict[Index, bool]) -> None:
        self.space, self.full, self.screen = space, full, screen
        self.asked: dict[Index, None] = {}  # in the order asked

    def explodes(self, index: Index) -> bool:
        self.asked[index] = None
        return self.full[index]

    def screens(self, index: Index) -> bool:
        return self.screen[index]

    def steer(self, index: Index) -> None:
        """The screen here is fixed: steering changes nothing (a lying screen stays lying)."""


SPACE = Space("grid", Config.of("mlp"), (Axis.range("depth", 1, 12), Axis.range("width", 1, 8)))


def _grid(rng: random.Random, noise: float) -> dict[Index, bool]:
    """Explodes above a staircase falling with width (monotone in both knobs), each point flipped
    with probability `noise` (then non-monotone)."""
    cut = dict(enumerate(sorted((rng.randint(0, 11) for _ in range(8)), reverse=True)))
    return {
        (d, w): (d >= cut[w]) != (rng.random() < noise) or (d, w) == (11, 7)
        for d in range(12)
        for w in range(8)
    }


def test_a_lying_screen_still_gives_a_point_one_minimal_on_the_full_rule() -> None:
    """A deliberately broken screen (random, inverted, always stable, always exploding): the descent
    still ends on a point of the full rule's boundary (brute force: boundary() of the whole grid)."""
    rng = random.Random(0)
    for trial in range(200):
        full = _grid(rng, noise=0.1 if trial % 2 else 0.0)
        screens = {
            "random": {i: rng.random() < 0.5 for i in full},
            "inverted": {i: not bad for i, bad in full.items()},
            "stable": dict.fromkeys(full, False),
            "explodes": dict.fromkeys(full, True),
        }
        for name, screen in screens.items():
            grid = Grid(SPACE, full, screen)
            assert canonical(grid, (11, 7)) in boundary(full), (trial, name)


def test_a_top_corner_exploding_on_the_screen_alone_is_never_claimed() -> None:
    """The screen explodes at the top corner, the full rule does not (one seed's draw): the descent
    ends on the full rule's boundary (brute force) or, where its second way would settle the axes
    against a top corner it takes as exploding, returns None; started again from a failure on the
    full rule with screened_top False, it ends on the boundary."""
    rng = random.Random(7)
    again = 0
    for _ in range(300):
        full = {**_grid(rng, noise=0.1), (11, 7): False}
        bad = [i for i, b in full.items() if b]
        if not bad:
            continue
        screen = {**{i: rng.random() < 0.5 for i in full}, (11, 7): True}
        found = rng.choice(bad)
        got = canonical(Grid(SPACE, full, screen), found)
        if got is None:
            again += 1
            got = canonical(Grid(SPACE, full, screen), found, screened_top=False)
        assert got in boundary(full), (found, got)
    assert again >= 20  # the second way was needed, and the top corner found stable there


def test_a_truthful_screen_asks_the_full_rule_only_near_the_boundary() -> None:
    """With the screen equal to the full rule on a monotone grid, the full rule is asked at the top
    corner, the screen's answer and its one-step-lower neighbours (the 1-minimality check), nowhere
    else: at most 2 plus one per axis."""
    rng = random.Random(1)
    for _ in range(50):
        full = _grid(rng, noise=0.0)
        grid = Grid(SPACE, full, full)
        canonical(grid, (11, 7))
        assert len(grid.asked) <= len(SPACE.axes) + 2, sorted(grid.asked)


class Steered(Grid):
    """A Grid whose first screen crosses `early` steps before the full rule along depth (a seed above
    the median), and whose screen after `steer` is the full rule itself (the quantile's seed)."""

    def __init__(self, full: dict[Index, bool], early: int) -> None:
        low = {(d, w): full[min(d + early, 11), w] for d, w in full}
        super().__init__(SPACE, full, low)
        self.steered = 0

    def steer(self, index: Index) -> None:
        self.steered += 1
        self.screen = self.full  # the first steer is at the first answer: the screen explodes at the top


def _frontier(full: dict[Index, bool]) -> set[Index]:
    """The points whose full verdict differs from a one-step neighbour's (the frontier, both sides)."""
    steps = ((1, 0), (-1, 0), (0, 1), (0, -1))
    return {
        (d, w)
        for (d, w), bad in full.items()
        if any((n := (d + a, w + b)) in full and full[n] != bad for a, b in steps)
    }


def test_a_screen_crossing_early_is_steered_and_climbs_to_the_full_rules_boundary() -> None:
    """Oracle: boundary() of the whole grid. A screen crossing 1-4 steps early along depth is wrong at
    its first answer; steered there, it climbs to the full rule's crossing: apart from that answer the
    full rule is asked only on the frontier (where a one-step neighbour's verdict
    differs) and on the climbed line above the answer (a bisection of that gap), never along a
    bisection from the top corner through either side."""
    rng = random.Random(2)
    wrong = 0  # grids where the first answer was stable on the full rule
    for _ in range(50):
        full = _grid(rng, noise=0.0)
        grid = Steered(full, early=rng.randint(1, 4))
        assert canonical(grid, (11, 7)) in boundary(full)
        first, *rest = grid.asked  # not the top corner: the screen explodes there
        assert grid.steered == (not full[first])
        wrong += not full[first]
        above = {p for p in full if sum(a != b for a, b in zip(p, first, strict=True)) == 1 and p > first}
        assert set(rest) <= _frontier(full) | above, sorted(set(rest) - _frontier(full) - above)
    assert wrong >= 25


def test_steering_screens_with_the_seed_of_the_full_rules_quantile() -> None:
    """Oracle: the full rule's own Judgement at the point. After `steer` there, the screen's one-seed
    growth is the full rule's quantile growth, and judging it probes nothing new."""
    space = Space(
        "mlp",
        Config.of("mlp", width=8, batch_size=4, seeds=5),
        (Axis.range("depth", 4, 12), Axis.range("init_scale", 1.5, 3.0, 0.5)),
    )
    prober = Prober(space, resolve("mlp"), Limits(growth=1e9, nonfinite=False), lambda _: None, None)
    index = (6, 2)
    full = prober(index)
    assert isinstance(full, Judgement) and len(full.seeds) >= 3
    made = prober.cache.made
    prober.steer(index)
    screen = prober.screen(index)
    assert isinstance(screen, Judgement)
    assert screen.growth.mid == full.growth.mid != prober.first.get((index, space.base.run.seed))
    assert prober.screen_seed in full.seeds[1:] and prober.cache.made == made  # not the first seed


def test_a_cached_probe_is_the_fresh_probe_and_runs_once() -> None:
    """Oracle: assess without a cache. The first seed's judgement, then the full rule from the same
    cache, give the full rule's own Judgement with the first seed probed once."""
    config = Config.of("mlp", depth=6, width=8, init_scale=2.0, batch_size=4, seeds=5)
    fresh = assess(config)
    cache = SeedProbes()
    first = assess(config.with_run(seeds=1), probes=cache)
    assert cache.made == 1
    again = assess(config, probes=cache)
    assert again == fresh
    assert cache.made == len(fresh.seeds)  # the first seed's probe was reused
    assert first.measurement == fresh.measurement or len(fresh.seeds) > 1
    assess(config, probes=cache)
    assert cache.made == len(fresh.seeds)  # nothing probed twice


def test_a_seeds_search_ends_on_the_full_rules_boundary() -> None:
    """Oracle: sweep() judges every grid point on the full rule (3 seeds); the search's point is one
    of that grid's 1-minimal points."""
    space = Space(
        "mlp",
        Config.of("mlp", width=8, batch_size=4, activation="linear", seeds=3),
        (Axis.range("depth", 1, 10), Axis.range("init_scale", 1.0, 2.5, 0.5)),
    )
    limits = Limits(growth=10.0)
    grid = sweep(space, limits=limits)
    assert not all(grid.values()) and any(grid.values())
    result = search(space, limits=limits, max_examples=10, seed=0)
    cx = result.counterexample
    assert cx is not None
    found = tuple(a.values.index(cx.config.knob(a.name)) for a in space.axes)  # type: ignore[arg-type]
    assert found in boundary(grid)
    assert result.points <= result.probes <= 3 * result.points
