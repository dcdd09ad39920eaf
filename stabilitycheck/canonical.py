"""The canonical smallest exploding point of a grid, verified 1-minimal on the full rule over seeds:
lowering any single knob by one grid step makes it stable."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from stabilitycheck.space import Space

Index = tuple[int, ...]


class Explodes(Protocol):
    """What the descent needs of a prober (searching.Prober): its Space and, per grid index, whether
    the Config there explodes on the full rule over seeds (`explodes`) and on a cheap screen that
    only steers (`screens`: the first seed alone; the full rule itself where there is one seed)."""

    space: Space

    def explodes(self, index: Index) -> bool: ...

    def screens(self, index: Index) -> bool: ...


def canonical(prober: Explodes, found: Index) -> Index:
    """A canonical smallest exploding point, descending from the top corner (from `found` when the top
    corner does not explode): axis by axis, the smallest value that still explodes with the later
    axes at their upper values. Each axis is bisected on the screen, then the full rule settles the
    value next to the screen's answer (`crossing`), so the binary search's many steps cost one seed
    each and the full rule is spent only at the boundary. Where explosions grow with every knob this
    is the lexicographically smallest exploding point in axis order (up to where the full rule's
    verdict is not monotone along an axis); where they do not (a tanh net saturates at large
    init_scale) it can differ from it, and each knob is then lowered while the point still explodes,
    so the result is 1-minimal on the full rule either way. The answer depends on the space, never on
    `found` when the top corner explodes: the example database and concurrency change how fast it
    comes, not what."""
    upper = prober.space.top() if prober.explodes(prober.space.top()) else found
    current = list(upper)
    for k in range(len(current)):
        lo, hi = 0, current[k]
        while lo < hi:
            mid = (lo + hi) // 2
            if prober.screens(_at(current, k, mid)):
                hi = mid
            else:
                lo = mid + 1
        current[k] = crossing(_along(prober.explodes, current, k), hi, current[k])
    return minimize(prober, tuple(current))


def _along(holds: Callable[[Index], bool], index: list[int], k: int) -> Callable[[int], bool]:
    """`holds` at `index` with axis k set to a value."""
    fixed = list(index)
    return lambda value: holds(_at(fixed, k, value))


def crossing(bad: Callable[[int], bool], guess: int, top: int) -> int:
    """A value v in [0, top] where `bad` holds and not at v - 1 nor at v - 2 (bad(top) is known), found
    from `guess`: where bad holds at guess or at guess - 1, one step down at a time while it holds at
    either of the next two values below; else a bisection from guess up to top, and the same walk down
    from there (a screen that guessed low guessed by many steps on the resmlp-pre target, where a walk
    up one step at a time spent a full verdict near the limit on each). Where bad is monotone this is
    its smallest value; where it is not (the full rule near the limit, where the median over seeds
    wobbles around it: seen as explodes at 22-24, not at 25, explodes at 26; and 31, not 32 with no
    seed exploding, 33), a crossing near `guess` that one stable value alone does not stop. A right
    guess costs three calls."""
    if bad(guess):
        return _settle(bad, guess)
    if guess > 0 and bad(guess - 1):
        return _settle(bad, guess - 1)
    good, worse = guess, top  # good: known not bad; worse: known bad
    while good + 1 < worse:
        mid = (good + worse) // 2
        if bad(mid):
            worse = mid
        else:
            good = mid
    return _settle(bad, worse)


def _settle(bad: Callable[[int], bool], value: int) -> int:
    """From a bad `value`, step down while bad holds one or two values lower."""
    while True:
        if value > 0 and bad(value - 1):
            value -= 1
        elif value > 1 and bad(value - 2):
            value -= 2
        else:
            return value


def minimize(prober: Explodes, index: Index) -> Index:
    """Lower single knobs one grid step at a time while the Config still explodes, until lowering any
    single knob makes it stable: a verified 1-minimal point."""
    current = list(index)
    changed = True
    while changed:
        changed = False
        for k in range(len(current)):
            while current[k] > 0 and prober.explodes(_at(current, k, current[k] - 1)):
                current[k] -= 1
                changed = True
    return tuple(current)


def _at(index: list[int], k: int, value: int) -> Index:
    return tuple(value if j == k else v for j, v in enumerate(index))


def lower(index: Index) -> list[Index]:
    """The one-step-lower neighbours of `index`: each knob above its lowest value lowered by one step."""
    return [_at(list(index), k, index[k] - 1) for k in range(len(index)) if index[k] > 0]


def boundary(exploded: dict[Index, bool]) -> set[Index]:
    """The grid's 1-minimal exploding points: exploding, and every one-step-lower neighbour is stable."""
    return {i for i, bad in exploded.items() if bad and not any(exploded[b] for b in lower(i))}
