"""Remedies: known fixes for exploding gradients, each a change of Config re-probed to see if it helps."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stabilitycheck.config import FAMILIES, Config
from stabilitycheck.probing import Measurement

# sigma_w at which a bias-free deep net's backward gain chi = sigma_w^2 E[phi'(h)^2] is 1
# (tanh, linear: 1; ReLU: He's sqrt 2; GELU has no fixed point without bias: He's value).
CRITICAL_SCALE = {"tanh": 1.0, "linear": 1.0, "relu": math.sqrt(2), "gelu": math.sqrt(2)}
CLIP_NORM = 1.0


@dataclass(frozen=True)
class Remedy:
    """A remedy tried on a counterexample: `config` (and what it measured) is None when it does not
    apply."""

    name: str
    config: Config | None
    fixed: bool | None
    still_fires: tuple[str, ...] = ()
    measurement: Measurement | None = None

    def describe(self) -> str:
        if self.config is None:
            return f"{self.name}: n/a"
        return f"{self.name}: {'fixed' if self.fixed else 'not fixed (' + ', '.join(self.still_fires) + ')'}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "config": None if self.config is None else self.config.to_dict(),
            "fixed": self.fixed,
            "still_fires": list(self.still_fires),
            "measurement": None if self.measurement is None else self.measurement.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Remedy:
        config = None if data["config"] is None else Config.from_dict(data["config"])
        m = data.get("measurement")
        measured = None if m is None else Measurement.from_dict(m)
        return cls(data["name"], config, data["fixed"], tuple(data["still_fires"]), measured)


def _zoo(c: Config) -> bool:
    return c.family in FAMILIES


def clip(c: Config) -> Config | None:
    """Norm clipping at 1.0 during the optimiser steps (only meaningful when there are steps)."""
    return dataclasses.replace(c, clip=CLIP_NORM) if c.steps > 0 and c.clip is None else None


def pre_norm(c: Config) -> Config | None:
    """LayerNorm before each residual branch instead of after the sum (or none)."""
    ok = c.family in ("resmlp", "transformer") and c.norm != "pre"
    return dataclasses.replace(c, norm="pre") if ok else None


def critical_init(c: Config) -> Config | None:
    """init_scale at the critical point of the activation (zoo) or the model's own init (user)."""
    target = CRITICAL_SCALE[c.activation] if _zoo(c) else 1.0
    return None if c.knob("init_scale") == target else c.with_knobs(init_scale=target)


def lstm(c: Config) -> Config | None:
    """An LSTM in place of a vanilla RNN: gated, additive cell-state updates."""
    return dataclasses.replace(c, family="lstm") if c.family == "rnn" else None


def warmup(c: Config) -> Config | None:
    """A linear learning-rate warmup over the probed steps."""
    return dataclasses.replace(c, warmup=c.steps) if c.steps > 1 and c.warmup == 0 else None


def float32(c: Config) -> Config | None:
    """float32 in place of float16/bfloat16 or autocast: enough range for what overflowed."""
    reduced = c.dtype in ("float16", "bfloat16") or c.amp != "none"
    return dataclasses.replace(c, dtype="float32", amp="none") if reduced else None


REMEDIES: dict[str, Callable[[Config], Config | None]] = {
    "clip": clip,
    "pre-norm": pre_norm,
    "critical-init": critical_init,
    "lstm": lstm,
    "warmup": warmup,
    "float32": float32,
}
