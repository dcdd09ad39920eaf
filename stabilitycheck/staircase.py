"""The staircase trace of a frontier on a grid: for each row y, the smallest x where `fires(x, y)`,
in O(nx + ny) calls when the frontier moves little between rows.

It assumes monotonicity in x and checks it: the first row is bisected, each next row is walked one x
step per call from the previous row's frontier until a quiet point sits right below a firing one,
and both sides are confirmed by one more point (two quiet below, two firing above, where the grid
allows). A row whose measured points break monotonicity (one fires below a quiet one) is bisected
again below its lowest firing point for its lowest transition, and a note says so. Every frontier
returned is a measured pair: x fires and x - 1 is quiet (or x = 0); None means the top is quiet.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Edge:
    """The frontier at grid row y: the smallest x index that fires (None: none in range), found by
    'walk', 'bisection' (monotonicity was violated, or the first row) or 'untraced' (interrupted)."""

    y: int
    x: int | None
    how: str


Fires = Callable[[int], bool]


def _bisect(fires: Fires, lo: int, hi: int) -> int:
    """The upper end of a transition in (lo, hi]: lo is stable (or -1), hi fires."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fires(mid) else (mid, hi)
    return hi


def _walk(fires: Fires, nx: int, start: int) -> int | None:
    """From `start`, one x step per verdict to the smallest x that fires (None: none does)."""
    i = min(max(start, 0), nx - 1)
    if fires(i):
        while i > 0 and fires(i - 1):
            i -= 1
        return i
    while i < nx - 1 and not fires(i + 1):
        i += 1
    return i + 1 if i < nx - 1 else None


def _confirm(fires: Fires, nx: int, f: int | None) -> None:
    """Judge one more point on each side of the frontier, so monotonicity is checked on two points."""
    top = nx if f is None else f
    if f is not None and f + 1 < nx:
        fires(f + 1)
    if top - 2 >= 0:
        fires(top - 2)


def _violation(measured: dict[int, bool]) -> tuple[int, int] | None:
    """A pair (a, b), a < b, where a fires and b does not, among the measured points of a row."""
    firing = [i for i, v in measured.items() if v]
    quiet = [i for i, v in measured.items() if not v]
    if firing and quiet and min(firing) < max(quiet):
        return min(firing), max(quiet)
    return None


def trace(
    fires: Callable[[int, int], bool],
    nx: int,
    ny: int,
    edges: list[Edge],
    notes: list[str],
    names: tuple[Callable[[int], str], Callable[[int], str]] = (
        lambda x: f"x index {x}",
        lambda y: f"row {y}",
    ),
    verb: str = "fires",
) -> None:
    """Append the frontier of every row to `edges` (see the module docstring) and what broke
    monotonicity to `notes`, naming x and y values by `names` and what a point does by `verb` (a map's
    two traces: 'fires', 'vanishes'); `fires(x, y)` judges a point (cached by the caller)."""
    name_x, name_y = names
    start = 0
    for y in range(ny):
        seen: dict[int, bool] = {}

        def at(x: int, y: int = y, seen: dict[int, bool] = seen) -> bool:
            seen[x] = fires(x, y)
            return seen[x]

        if y == 0:
            f: int | None = _bisect(at, -1, nx - 1) if at(nx - 1) else None
            how = "bisection"
        else:
            f, how = _walk(at, nx, start), "walk"
        _confirm(at, nx, f)
        bad = _violation(seen)
        if bad is not None:
            f, how = _bisect(at, -1, bad[0]), "bisection"
            notes.append(
                f"{name_y(y)}: {name_x(bad[0])} {verb} but {name_x(bad[1])} does not (not monotone in x); "
                f"bisected the row below {name_x(bad[0])} for its lowest transition: "
                + (name_x(f) if f is not None else "none")
            )
        edges.append(Edge(y, f, how))
        start = nx - 1 if f is None else f


def _at_row(fires: Callable[[int, int], bool], y: int, x: int) -> bool:
    return fires(x, y)


def recheck(
    fires: Callable[[int, int], bool],
    measured: dict[int, dict[int, bool]],
    edges: list[Edge],
    notes: list[str],
    names: tuple[Callable[[int], str], Callable[[int], str]],
    verb: str = "fires",
) -> None:
    """Check each row's frontier in `edges` against every point measured in it (`measured`, per row
    y, x -> fires), another trace's too: where one below the frontier fires (a map's vanishing trace
    met points exploding where the explosion trace drew none), the row is bisected below it for its
    lowest transition, as `trace` does, and `notes` say so."""
    name_x, name_y = names
    for k, edge in enumerate(edges):
        below = [x for x, hit in measured.get(edge.y, {}).items() if hit and (edge.x is None or x < edge.x)]
        if not below or edge.how == "untraced":
            continue
        lowest = min(below)
        f = _bisect(functools.partial(_at_row, fires, edge.y), -1, lowest)
        was = name_x(edge.x) if edge.x is not None else "none"
        notes.append(
            f"{name_y(edge.y)}: {name_x(lowest)} {verb}, below the frontier traced ({was}; measured by the "
            f"other trace: not monotone in x); bisected the row below {name_x(lowest)} for its lowest "
            f"transition: {name_x(f)}"
        )
        edges[k] = Edge(edge.y, f, "bisection")
