"""The canonical descent and the 1-minimality check against fixed boolean grids judged by brute
force: boundary() by its definition, the lexicographically smallest exploding point where the screen
is (or is steered to) the full rule, and the cost of a climb that overshoots."""

from __future__ import annotations

import itertools
import math
import random

from stabilitycheck.canonical import Index, boundary, canonical, minimize
from stabilitycheck.config import Config
from stabilitycheck.space import Axis, Space


def _lower_by_hand(index: Index) -> list[Index]:
    """Each knob above 0 lowered by one, written out per axis."""
    out = []
    for k, v in enumerate(index):
        if v >= 1:
            out.append((*index[:k], v - 1, *index[k + 1 :]))
    return out


def test_boundary_is_every_exploding_point_whose_lower_neighbours_are_all_stable() -> None:
    """Oracle: the definition, point by point over random grids of 1-3 axes (some of size 1 and 2,
    where a knob at index 1 has the lowest value as its only lower neighbour)."""
    rng = random.Random(0)
    for _ in range(300):
        shape = [rng.randint(1, 5) for _ in range(rng.randint(1, 3))]
        grid = {i: rng.random() < 0.5 for i in itertools.product(*map(range, shape))}
        want = {i for i, bad in grid.items() if bad and all(not grid[b] for b in _lower_by_hand(i))}
        assert boundary(grid) == want, (shape, sorted(i for i, b in grid.items() if b))


DEPTHS, WIDTHS = 12, 8
SPACE = Space("grid", Config.of("mlp"), (Axis.range("depth", 1, DEPTHS), Axis.range("width", 1, WIDTHS)))


class Grid:
    """A prober over a fixed full-rule grid whose screen is a list of grids (default: the full rule
    itself): the first until the descent's first `steer`, the next one after each `steer`, the last
    one from then on. Records the points the full rule was asked at."""

    def __init__(self, space: Space, full: dict[Index, bool], *screens: dict[Index, bool]) -> None:
        self.space, self.full = space, full
        self.screens_after = list(screens) or [full]
        self.steered = 0
        self.asked: dict[Index, None] = {}

    def explodes(self, index: Index) -> bool:
        self.asked[index] = None
        return self.full[index]

    def screens(self, index: Index) -> bool:
        return self.screens_after[min(self.steered, len(self.screens_after) - 1)][index]

    def steer(self, index: Index) -> None:
        self.steered += 1


def _monotone(rng: random.Random) -> dict[Index, bool]:
    """Explodes at depth >= cut(width), the cut falling with width: monotone in both knobs, the top
    corner exploding."""
    cut = sorted((rng.randint(0, DEPTHS - 1) for _ in range(WIDTHS)), reverse=True)
    return {(d, w): d >= cut[w] for d in range(DEPTHS) for w in range(WIDTHS)}


def _noisy(rng: random.Random, flip: float) -> dict[Index, bool]:
    """A monotone grid with each point flipped with probability `flip` (then not monotone)."""
    return {i: bad != (rng.random() < flip) for i, bad in _monotone(rng).items()}


def test_minimize_ends_one_minimal_below_where_it_starts_on_any_grid() -> None:
    """Oracle: boundary() of the whole grid (checked against its definition above). From any
    exploding point of a non-monotone grid (where lowering one knob can make another one lowerable
    again, down to its lowest value), the point minimize() returns is on the boundary, at or below
    the start on every knob."""
    rng = random.Random(5)
    for _ in range(200):
        full = _noisy(rng, 0.2)
        want = boundary(full)
        for start in rng.sample([i for i, bad in full.items() if bad], 5):
            got = minimize(Grid(SPACE, full), start)
            assert got in want and all(a <= b for a, b in zip(got, start, strict=True)), (start, got)


def test_a_truthful_screen_ends_on_the_smallest_exploding_point_whatever_failure_it_starts_from() -> None:
    """Oracle: min() of the grid's exploding points (lexicographic in axis order: the smallest depth,
    then the smallest width there). The top corner explodes, so the failure Hypothesis found must not
    change the answer: each exploding point of the grid is given as the failure."""
    rng = random.Random(3)
    for _ in range(40):
        full = _monotone(rng)
        want = min(i for i, bad in full.items() if bad)
        for found in (i for i, bad in full.items() if bad):
            assert canonical(Grid(SPACE, full), found) == want, (found, want)


def test_a_screen_crossing_early_is_steered_to_the_full_rules_smallest_exploding_point() -> None:
    """A first screen crossing 1-4 depth steps early (a seed above the median), steered to the full
    rule itself at its first answer: the answer is still min() of the full rule's exploding points
    (brute force), whether the climb from the early answer goes up the width or, with no explosion
    up the width, up the depth at the top width."""
    rng = random.Random(4)
    climbs = 0
    for _ in range(200):
        full = _monotone(rng)
        early = rng.randint(1, 4)
        first = {(d, w): full[min(d + early, DEPTHS - 1), w] for d, w in full}
        grid = Grid(SPACE, full, first, full)
        assert canonical(grid, SPACE.top()) == min(i for i, bad in full.items() if bad)
        climbs += grid.steered >= 1
    assert climbs >= 100  # the early answer was stable on the full rule and climbed from


def test_a_climb_that_overshoots_is_bisected_on_the_full_rule_not_walked_down() -> None:
    """One knob, 64 values: the full rule explodes from index 20, the first screen from 5 (stable on
    the full rule there), and the seed steered to at 5 explodes from 60 alone. Oracle: the answer is
    20 (the full rule's threshold), and the full rule is asked at the top, at 5, at 60 and along a
    bisection of 5..60 (ceil(log2 55) = 6 points), not at the 40 points walked down from 60."""
    space = Space("line", Config.of("mlp"), (Axis.range("depth", 1, 64),))
    line = range(64)
    full = {(d,): d >= 20 for d in line}
    first = {(d,): d >= 5 for d in line}
    overshoot = {(d,): d >= 60 for d in line}
    grid = Grid(space, full, first, overshoot)
    assert canonical(grid, space.top()) == (20,)
    assert len(grid.asked) <= 3 + math.ceil(math.log2(60 - 5)), sorted(grid.asked)
