"""Hand-made Measurements shared by the tests of the verdicts, the culprit, the seeds' rule and the
measurement itself: every field set by hand, so each expected value is worked from the numbers given."""

from __future__ import annotations

import math
from typing import Any

from stabilitycheck.measurement import Measurement


def _m_abc(**kw: Any) -> Measurement:
    base: dict[str, Any] = dict(
        layer_names=("a", "b", "c"),
        activation_names=("in", "a", "b", "c"),
        loss=(1.0, 1.0),
        grad_norm=(1.0, 1.0),
        layer_grad_norms=(1.0, 1.0, 1.0),
        activation_norms=(1.0, 1.0, 1.0, 1.0),
        activation_grad_norms=(1.0, 1.0, 1.0, 1.0),
        gains=(1.0, 1.0, 1.0),
        growth=1.0,
        weight_norms=(),
        first_nonfinite=None,
        steps_run=1,
    )
    base.update(kw)
    return Measurement(**base)


def _stack_seed(gains: list[float], grads: tuple[float, ...] | None = None) -> Measurement:
    """One seed's Measurement of a stack with these gains (block i named b<i>)."""
    names = tuple(f"b{i}" for i in range(len(gains)))
    return Measurement(
        layer_names=names,
        activation_names=("(input)", *names),
        loss=(1.0,),
        grad_norm=(1.0,),
        layer_grad_norms=grads or (1.0,) * len(names),
        activation_norms=(1.0,) * (len(names) + 1),
        activation_grad_norms=(1.0,) * (len(names) + 1),
        gains=tuple(gains),
        growth=math.prod(g for g in gains if not math.isnan(g)),
        weight_norms=(),
        first_nonfinite=None,
        steps_run=0,
    )


def _measurement(**kw) -> Measurement:
    base = dict(
        layer_names=("a", "b"),
        activation_names=("a", "b"),
        loss=(1.0,),
        grad_norm=(2.0,),
        layer_grad_norms=(1.0, 1.0),
        activation_norms=(1.0, 1.0),
        activation_grad_norms=(2.0, 1.0),
        gains=(2.0,),
        growth=2.0,
        weight_norms=(),
        first_nonfinite=None,
        steps_run=0,
        chain_starts=(1,),
        chain_growths=(1.0, 1.0),
        chain_feeds=((), (0,)),
    )
    base.update(kw)
    return Measurement(**base)
