"""Invariants: `assert_*` functions that raise StabilityError with the numbers, like assert_close.

Every check's tolerances are relative (a max_norm of 1e-6 is held as strictly as one of 1e6), from
one table per dtype, plus the rounding a dtype makes near zero (its subnormal spacing); the one fixed
figure is torch's clip epsilon 1e-6, which widens the coefficients a clip may use at totals near it.
All figures in messages are Python floats computed in float64.

One import for all of them; they live by theme in invariants_clip.py, invariants_gradscaler.py,
invariants_rescaling.py and invariants_training.py, on the tolerances and checks of invariants_common.py.
"""

from __future__ import annotations

from stabilitycheck.invariants_clip import (
    assert_clipped_norm_bounded,
    assert_clipped_value_bounded,
    assert_direction_preserved,
    check_clip_grad_norm,
)
from stabilitycheck.invariants_common import ACC, DTYPE_RTOL, Named, TensorsLike, rtol_of, subnormal_spacing
from stabilitycheck.invariants_gradscaler import ScalerLike, assert_gradscaler_guards
from stabilitycheck.invariants_rescaling import assert_rescaling_equivariant
from stabilitycheck.invariants_training import assert_bounded_growth, assert_finite_training

__all__ = [
    "ACC",
    "DTYPE_RTOL",
    "Named",
    "ScalerLike",
    "TensorsLike",
    "assert_bounded_growth",
    "assert_clipped_norm_bounded",
    "assert_clipped_value_bounded",
    "assert_direction_preserved",
    "assert_finite_training",
    "assert_gradscaler_guards",
    "assert_rescaling_equivariant",
    "check_clip_grad_norm",
    "rtol_of",
    "subnormal_spacing",
]
