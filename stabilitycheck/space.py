"""Space: the grid of each knob to search, in order of importance, around a base Config."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from stabilitycheck.config import Config, Scalar
from stabilitycheck.errors import ConfigError

INIT_SCALES = tuple(0.25 * k for k in range(2, 17))  # 0.5, 0.75, ..., 4.0


@dataclass(frozen=True)
class Axis:
    """One knob and its grid, ascending: index 0 is the smallest (simplest) value."""

    name: str
    values: tuple[Scalar, ...]

    def __post_init__(self) -> None:
        if not self.values:
            raise ConfigError(f"knob {self.name!r} has an empty range; give LO <= HI, e.g. {self.name}=1:8")
        if list(self.values) != sorted(set(self.values)):
            raise ConfigError(f"knob {self.name!r} grid must be strictly ascending, got {self.values}")

    @classmethod
    def range(cls, name: str, lo: float, hi: float, step: float | None = None) -> Axis:
        """lo..hi inclusive; integers when lo, hi (and step) are ints, else a float grid of `step`
        (default: 16 points)."""
        if lo > hi:
            raise ConfigError(f"knob {name}={lo}:{hi} is empty: LO must be <= HI, e.g. {name}={hi}:{lo}")
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi, step or 1))
        if ints:
            return cls(name, tuple(range(int(lo), int(hi) + 1, int(step or 1))))
        step = step if step is not None else (hi - lo) / 15 or 1.0
        if step <= 0:
            raise ConfigError(f"knob {name} step must be > 0, got {step}")
        n = math.floor((hi - lo) / step + 1e-9)
        return cls(name, tuple(round(lo + k * step, 12) for k in range(n + 1)))


@dataclass(frozen=True)
class Space:
    """A base Config and the axes to vary; `label` names it in reports (e.g. 'mlp', 'model.py')."""

    label: str
    base: Config
    axes: tuple[Axis, ...]

    def __post_init__(self) -> None:
        names = [a.name for a in self.axes]
        if len(set(names)) != len(names):
            raise ConfigError(f"Space {self.label!r} repeats a knob: {names}")
        for axis in self.axes:
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

    def with_base(self, **changes: Any) -> Space:
        """The same axes around a base Config with fields replaced (device, dtype, steps...)."""
        return dataclasses.replace(self, base=dataclasses.replace(self.base, **changes))


def _zoo(label: str, axes: tuple[Axis, ...], **base: Any) -> Space:
    defaults: dict[str, Any] = {"width": 32, "batch_size": 8, "activation": "tanh"}
    return Space(label, Config(**{**defaults, **base}), axes)


def default_spaces() -> dict[str, Space]:
    """The zoo's searches: one Space per family (and norm placement), sized to finish fast on CPU."""
    scale = Axis("init_scale", INIT_SCALES)
    depth = Axis.range("depth", 1, 64)
    seq = Axis.range("seq_len", 1, 256)
    tdepth = Axis.range("depth", 1, 24)
    transformer: dict[str, Any] = {"family": "transformer", "seq_len": 16, "activation": "gelu"}
    return {
        "mlp": _zoo("mlp", (depth, scale), family="mlp"),
        "resmlp-post": _zoo("resmlp-post", (depth, scale), family="resmlp", norm="post"),
        "resmlp-pre": _zoo("resmlp-pre", (depth, scale), family="resmlp", norm="pre"),
        "rnn": _zoo("rnn", (seq, scale), family="rnn", depth=1),
        "lstm": _zoo("lstm", (seq, scale), family="lstm", depth=1),
        "gru": _zoo("gru", (seq, scale), family="gru", depth=1),
        "transformer-post": _zoo("transformer-post", (tdepth, scale), norm="post", **transformer),
        "transformer-pre": _zoo("transformer-pre", (tdepth, scale), norm="pre", **transformer),
    }
