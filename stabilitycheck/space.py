"""Space: the grid of each knob to search, in order of importance, around a base Config."""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

from stabilitycheck.config import RUN_FIELDS, Config
from stabilitycheck.errors import ConfigError
from stabilitycheck.families import Scalar

INIT_SCALES = tuple(0.25 * k for k in range(2, 17))  # 0.5, 0.75, ..., 4.0
RUN_AXES = tuple(f for f in RUN_FIELDS if f in ("steps", "lr", "warmup", "clip"))
"""Run settings a search may vary like knobs."""


class FloatGrid(Sequence[float]):
    """lo, lo + step, ... <= hi without building the list (a grid may have 10**9 points)."""

    def __init__(self, lo: float, step: float, n: int) -> None:
        self.lo, self.step, self.n = lo, step, n

    def __len__(self) -> int:
        return self.n

    @overload
    def __getitem__(self, i: int) -> float: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[float]: ...
    def __getitem__(self, i: int | slice) -> float | Sequence[float]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(self.n))]
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(i)
        return round(self.lo + i * self.step, 12)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    def __hash__(self) -> int:
        return hash((self.lo, self.step, self.n))

    def __repr__(self) -> str:
        return f"FloatGrid({self.lo}, step={self.step}, n={self.n})"


@dataclass(frozen=True)
class Axis:
    """One knob and its grid, ascending: index 0 is the smallest (simplest) value. `values` is lazy
    for ranges (a range or FloatGrid), so a huge grid costs nothing until a point is asked for."""

    name: str
    values: Sequence[Scalar]

    def __post_init__(self) -> None:
        try:
            len(self.values)
        except OverflowError:  # len() of 2^63 values or more: 'internal error', exit 3, before
            raise ConfigError(
                f"knob {self.name!r} has 2^63 grid values or more; narrow its range or take a coarser step"
            ) from None
        if len(self.values) == 0:
            raise ConfigError(f"knob {self.name!r} has an empty range; give LO <= HI, e.g. {self.name}=1:8")
        lazy = isinstance(self.values, range | FloatGrid)
        if not lazy and list(self.values) != sorted(set(self.values)):
            raise ConfigError(f"knob {self.name!r} grid must be strictly ascending, got {self.values}")

    @classmethod
    def range(cls, name: str, lo: float, hi: float, step: float | None = None) -> Axis:
        """lo..hi inclusive; integers when lo, hi (and step) are ints, else a float grid of `step`
        (default: 16 points)."""
        numbers = (lo, hi) if step is None else (lo, hi, step)
        if not all(isinstance(v, int | float) and math.isfinite(v) for v in numbers):
            raise ConfigError(f"knob {name}={lo}:{hi} needs finite numbers, e.g. {name}=1:8")
        if lo > hi:
            raise ConfigError(f"knob {name}={lo}:{hi} is empty: LO must be <= HI, e.g. {name}={hi}:{lo}")
        if step is not None and step <= 0:
            raise ConfigError(f"knob {name} step must be > 0, got {step}")
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi, step or 1))
        if ints:
            return cls(name, range(int(lo), int(hi) + 1, int(step or 1)))
        step = step if step is not None else (hi - lo) / 15 or 1.0
        n = math.floor((hi - lo) / step + 1e-9)
        return cls(name, FloatGrid(float(lo), float(step), n + 1))


def trains(base: Config, axes: Sequence[Axis]) -> bool:
    """Whether any point of `axes` around `base` runs optimiser steps (`steps` above 0 in the base or
    along an axis): the criteria read after them are judged only then (verdicts.TRAINED)."""
    tops = [a.values[-1] for a in axes if a.name == "steps" and len(a.values)]  # ascending: the largest
    return base.run.steps > 0 or any(isinstance(v, int | float) and v > 0 for v in tops)


@dataclass(frozen=True)
class Space:
    """A base Config and the axes to vary; `label` names it in reports (e.g. 'mlp', 'model.py')."""

    label: str
    base: Config
    axes: tuple[Axis, ...]

    def __post_init__(self) -> None:
        names = [a.name for a in self.axes]
        if len(set(names)) != len(names):
            raise ConfigError(f"Space {self.label!r} repeats a knob: {names}; give each Axis its own knob")
        for axis in self.axes:
            if axis.name not in RUN_AXES:
                self.base.knob(axis.name)  # raises for a knob the Config does not have
        self.config(tuple(0 for _ in self.axes))  # the smallest point must be a valid Config
        self.config(self.top())

    def config(self, index: Sequence[int]) -> Config:
        """The Config at grid index `index` (one entry per axis)."""
        values: dict[str, Any] = {a.name: a.values[i] for a, i in zip(self.axes, index, strict=True)}
        return self.base.with_knobs(**values)

    def top(self) -> tuple[int, ...]:
        """The index of the largest point of every axis."""
        return tuple(len(a.values) - 1 for a in self.axes)

    def spread_points(self, extra: int = 8) -> list[tuple[int, ...]]:
        """The lowest corner, the top, the diagonal at 1/2, 1/4 and 3/4 of every axis, then `extra`
        grid points drawn with a fixed seed: where to try a model before a search (its knobs may
        not go together at either corner, as heads that divide neither end of a width range)."""
        last = [len(a.values) - 1 for a in self.axes]
        points = [tuple(0 for _ in self.axes), self.top()]
        points += [tuple(round(f * n) for n in last) for f in (0.5, 0.25, 0.75)]
        draw = random.Random(0)
        points += [tuple(draw.randrange(n + 1) for n in last) for _ in range(extra)]
        return list(dict.fromkeys(points))

    @property
    def size(self) -> int:
        """The number of points of the grid: what an exhaustive sweep costs."""
        return math.prod(len(a.values) for a in self.axes)

    def grid(self) -> Iterator[tuple[int, ...]]:
        """Every index of the grid, smallest first (lexicographic in axis order)."""

        def rec(prefix: tuple[int, ...], rest: tuple[Axis, ...]) -> Iterator[tuple[int, ...]]:
            if not rest:
                yield prefix
                return
            for i in range(len(rest[0].values)):
                yield from rec((*prefix, i), rest[1:])

        return rec((), self.axes)

    def trains(self) -> bool:
        """Whether any point runs optimiser steps."""
        return trains(self.base, self.axes)

    def with_run(self, **changes: Any) -> Space:
        """The same axes around a base Config with run settings replaced (device, dtype, steps...)."""
        return dataclasses.replace(self, base=self.base.with_run(**changes))
