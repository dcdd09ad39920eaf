"""Verdict: which named criteria a Measurement trips, against documented limits."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from stabilitycheck.errors import ConfigError
from stabilitycheck.measurement import Measurement, ratio
from stabilitycheck.readings import paths_of

CRITERIA = ("overflow", "nonfinite", "grad_norm", "growth", "divergence", "vanishing", "stall")


@dataclass(frozen=True)
class Limits:
    """Thresholds of the criteria; None switches a criterion off.

    - grad_norm = 1e3: the zoo's readout cross-entropy has an output gradient of norm <= sqrt(2)
      per example, so at a stable init the total norm is O(1)-O(10); usual clip thresholds are
      1-5, and a norm a thousand times above them means the update is dominated by a blow-up.
    - growth = 1e2: input-side over output-side activation-gradient norm. Critical inits keep it
      O(1) at any depth (mean-field chi = 1); two orders of magnitude means exponential growth
      (a gain of 1.1 per layer, chi = 1.21, passes it at depth 49), beyond what per-layer learning
      rates absorb.
    - divergence = 2.0: final loss over initial loss after `steps` steps. A stable optimiser at a
      sane learning rate does not double the loss; bounded models (tanh with a fixed readout)
      cannot go non-finite, so a doubled loss is how their explosion shows.
    - nonfinite = True: NaN/Inf anywhere; reported as `overflow` when the same Config in float32
      stays finite (a float16/bfloat16 range problem: loss scaling or wider types fix it).
    - vanishing = None: growth below 1/limit is measured and shown, a failure only when asked for.
    - stall = None: final over initial loss above this limit (e.g. 0.95: the loss fell by less
      than 5% over the steps), a failure only when asked for. Deep post-norm Transformers without
      warmup stall near chance rather than explode (Liu et al. 2020): this is how that shows.
    """

    grad_norm: float | None = 1e3
    growth: float | None = 1e2
    divergence: float | None = 2.0
    vanishing: float | None = None
    stall: float | None = None
    nonfinite: bool = True

    def __post_init__(self) -> None:
        for name in ("grad_norm", "growth", "divergence", "vanishing", "stall"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int | float) and value > 0):
                raise ConfigError(f"Limits.{name}={value!r} must be a number > 0 or None (off)")


@dataclass(frozen=True)
class Criterion:
    """One criterion that fired: its name, the measured value and the limit it passed."""

    name: str
    value: float
    limit: float

    def describe(self) -> str:
        """A short text like 'growth 3.2e+04 > 1e+02'."""
        if self.name in ("nonfinite", "overflow"):
            return self.name
        op = "<" if self.name == "vanishing" else ">"
        # 3 significant digits, more where 3 print the value as its limit ('growth 100 > 100' for 100.06)
        digits = next((d for d in range(3, 18) if f"{self.value:.{d}g}" != f"{self.limit:.{d}g}"), 3)
        return f"{self.name} {self.value:.{digits}g} {op} {self.limit:.{digits}g}"


@dataclass(frozen=True)
class Verdict:
    """Whether the Measurement counts as an explosion, and which criteria fired (in CRITERIA order)."""

    exploded: bool
    criteria: tuple[Criterion, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.criteria)

    @property
    def how(self) -> str:
        """'vanishes' where vanishing alone fired, 'stalls' where stall alone did, else 'explodes':
        the word for a failing point."""
        alone: dict[tuple[str, ...], str] = {("vanishing",): "vanishes", ("stall",): "stalls"}
        return alone.get(self.names, "explodes")

    def to_dict(self) -> dict[str, Any]:
        return {"exploded": self.exploded, "criteria": [vars(c) for c in self.criteria]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Verdict:
        return cls(data["exploded"], tuple(Criterion(**_nan_for_null(c)) for c in data["criteria"]))


def _nan_for_null(d: dict[str, Any]) -> dict[str, Any]:
    """A criterion read back from strict JSON, where NaN was written null."""
    return {k: math.nan if v is None and k in ("value", "limit") else v for k, v in d.items()}


def _above(value: float, limit: float | None) -> bool:
    """value > limit, where an infinite value counts and NaN does not (nonfinite covers it)."""
    return limit is not None and not math.isnan(value) and value > limit


def peak_grad_norm(m: Measurement) -> float:
    """The largest total gradient norm over the steps; under a GradScaler a non-finite step is one the
    scaler skipped (counted in `skipped_steps`), not an explosion, so it is left out. NaN where no
    step has a number to show (a NaN is the nonfinite criterion's, never shown as a norm of 0)."""
    scaled = bool(m.loss_scale)
    values = [g for g in m.grad_norm if not math.isnan(g) and not (scaled and math.isinf(g))]
    return max(values, default=math.nan)


def vanishing(m: Measurement) -> float:
    """What the vanishing criterion reads: the growth, or across several chains the smallest of their
    paths' growths (readings.paths_of: in series, their product) and each chain's own (the growth
    shows the largest where one chain grows: a decoder vanishing beside an encoder growing 1.06 must
    still fire)."""
    chains = m.chain_growths
    if not chains or any(math.isnan(c) for c in chains):
        return m.growth
    return min(paths_of(chains, m.chain_feeds)[1], *chains)


def values(m: Measurement) -> dict[str, float]:
    """Each criterion's raw value for one Measurement (nonfinite/overflow: +inf when present, else 0)."""
    rise = ratio(m.loss[-1], m.loss[0]) if len(m.loss) > 1 else math.nan
    return {
        "overflow": math.inf if m.overflow is not None else 0.0,
        "nonfinite": math.inf if m.first_nonfinite is not None and m.overflow is None else 0.0,
        "grad_norm": peak_grad_norm(m),
        "growth": m.growth,
        "divergence": rise,
        "vanishing": vanishing(m),
        "stall": rise,
    }


def bound(name: str, lim: Limits) -> float | None:
    """The bound a criterion's value is compared with (vanishing: 1/limit, from below); None when off."""
    if name in ("overflow", "nonfinite"):
        return 0.0 if lim.nonfinite else None
    if name == "vanishing":
        return None if lim.vanishing is None else 1.0 / lim.vanishing
    limit: float | None = getattr(lim, name)
    return limit


TRAINED = ("divergence", "stall")  # criteria read after optimiser steps: without any, never judged


def limits_text(lim: Limits, trained: bool = True) -> str:
    """The active criteria and their bounds, as a verdict compares them, in CRITERIA order: 'nonfinite,
    grad_norm > 1000, growth > 100, divergence > 2' ('overflow' is nonfinite's float32 check, not
    listed apart); without `trained` (no optimiser step run), those of TRAINED left out."""
    parts = []
    for name in CRITERIA:
        b = bound(name, lim)
        if b is None or name == "overflow" or (name in TRAINED and not trained):
            continue
        parts.append(name if name == "nonfinite" else f"{name} {'<' if name == 'vanishing' else '>'} {b:g}")
    return ", ".join(parts) or "none"


def fires(name: str, value: float, lim: Limits) -> bool:
    """Whether a criterion's value passes its bound (vanishing: below it; NaN never fires)."""
    b = bound(name, lim)
    if b is None or math.isnan(value):
        return False
    return value < b if name == "vanishing" else _above(value, b)


def criterion(name: str, value: float, lim: Limits) -> Criterion:
    """The Criterion `name` fired with `value`, against its limit (inf for going non-finite)."""
    return Criterion(
        name, value, math.inf if name in ("overflow", "nonfinite") else float(bound(name, lim) or 0)
    )


def judge(named: dict[str, float], lim: Limits) -> Verdict:
    """The Verdict of criterion values (one seed's, or quantiles over seeds)."""
    fired = [criterion(name, named[name], lim) for name in CRITERIA if fires(name, named[name], lim)]
    return Verdict(exploded=bool(fired), criteria=tuple(fired))


def verdict(m: Measurement, limits: Limits | None = None) -> Verdict:
    """Judge one Measurement against `limits` (defaults: Limits())."""
    return judge(values(m), limits or Limits())
