"""The canonical smallest exploding point of a grid, verified 1-minimal: lowering any single knob by one
grid step makes it stable."""

from __future__ import annotations

from typing import Protocol

from stabilitycheck.space import Space

Index = tuple[int, ...]


class Explodes(Protocol):
    """What the descent needs of a prober (searching.Prober): its Space and, per grid index, whether
    the Config there explodes."""

    space: Space

    def explodes(self, index: Index) -> bool: ...


def canonical(prober: Explodes, found: Index) -> Index:
    """A canonical smallest exploding point, descending from the top corner (from `found` when the top
    corner does not explode): axis by axis, the smallest value that still explodes with the later
    axes at their upper values (a binary search). Where explosions grow with every knob this is the
    lexicographically smallest exploding point in axis order; where they do not (a tanh net saturates
    at large init_scale) it can differ from it, and each knob is then lowered while the point still
    explodes, so the result is 1-minimal either way. The answer depends on the space, never on
    `found` when the top corner explodes: the example database and concurrency change how fast it
    comes, not what."""
    upper = prober.space.top() if prober.explodes(prober.space.top()) else found
    current = list(upper)
    for k in range(len(current)):
        lo, hi = 0, current[k]
        while lo < hi:
            mid = (lo + hi) // 2
            if prober.explodes(_at(current, k, mid)):
                hi = mid
            else:
                lo = mid + 1
        current[k] = hi
    return minimize(prober, tuple(current))


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


def boundary(exploded: dict[Index, bool]) -> set[Index]:
    """The grid's 1-minimal exploding points: exploding, and every one-step-lower neighbour is stable."""
    return {
        i
        for i, bad in exploded.items()
        if bad and all(not exploded[_at(list(i), k, i[k] - 1)] for k in range(len(i)) if i[k] > 0)
    }
