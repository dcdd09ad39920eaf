"""Round-11 mutation-testing additions, theory side (meanfield.py): the tanh fixed point q* to the
bisection's own tolerance, and the depth range a prediction covers. Oracles: a fine trapezoid rule for
E[tanh(sqrt(q) z)^2] solved for q = sigma^2 E[...] by float64 bisection, and exact closed forms
(a linear stack at sigma = 1 keeps every variance: growth 1 at any depth)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stabilitycheck import meanfield

_Z = np.linspace(-14.0, 14.0, 40_001)
_W = np.exp(-0.5 * _Z**2) / math.sqrt(2 * math.pi) * (_Z[1] - _Z[0])
"""Trapezoid weights of N(0, 1) on [-14, 14]: for the smooth tanh^2 exact to float64 rounding."""


def _tanh_q_star(sigma: float) -> float:
    """The q > 0 of q = sigma^2 E[tanh(sqrt(q) z)^2], by bisection to float64 resolution."""
    s2 = sigma * sigma
    lo, hi = 1e-6, s2  # the map raises q below q* and lowers it above; q* < sigma^2 (tanh^2 < 1)
    while hi - lo > 1e-15 * hi:
        mid = 0.5 * (lo + hi)
        rises = s2 * float(np.sum(_W * np.tanh(math.sqrt(mid) * _Z) ** 2)) > mid
        lo, hi = (mid, hi) if rises else (lo, mid)
    return 0.5 * (lo + hi)


@pytest.mark.parametrize("sigma", [1.2, 1.5, 2.0, 3.0])
def test_tanh_q_star_is_found_to_its_default_tolerance_of_1e_12(sigma: float) -> None:
    """q_star's tol (1e-12 by default) is the relative precision of the tanh fixed point it returns;
    Gauss-Hermite's own error there is ~1e-12 too, so 1e-10 holds and a bisection stopped at 1e-6
    (off by ~1e-7) does not."""
    assert meanfield.q_star(sigma, "tanh") == pytest.approx(_tanh_q_star(sigma), rel=1e-10, abs=0)


def test_zoo_growth_predicts_up_to_max_depth_inclusive() -> None:
    """zoo_growth predicts an mlp 'up to MAX_DEPTH': a linear stack at sigma = 1 has q_l = 1 and
    chi_l = 1 at every block, so growth exactly 1 at MAX_DEPTH; one block more has no prediction."""
    knobs = {"activation": "linear", "init_scale": 1.0}
    assert meanfield.zoo_growth("mlp", {**knobs, "depth": meanfield.MAX_DEPTH}) == 1.0
    assert meanfield.zoo_growth("mlp", {**knobs, "depth": meanfield.MAX_DEPTH + 1}) is None
    deeper = {**knobs, "depth": meanfield.MAX_DEPTH + 1, "norm": "post"}
    assert meanfield.zoo_growth("resmlp", deeper) is None
