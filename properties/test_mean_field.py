"""Deep tanh and ReLU MLPs at any init scale: the probe's per-block gains follow mean-field theory.

Mean-field signal propagation (Poole et al. 2016, Schoenholz et al. 2017): in a bias-free net y_l =
phi(W_l y_(l-1)) with W_l ~ N(0, sigma**2 / n), the pre-activations of block l have variance q_l (q_0 =
sigma**2 q_in, q_(l+1) = sigma**2 E[phi(sqrt(q_l) z)**2]) and the backward pass through block l
multiplies the squared gradient norm by chi_l = sigma**2 E[phi'(sqrt(q_l) z)**2]. The probe's gain j is
||dL/dy_(j-1)|| / ||dL/dy_j||, across block j (y_(-1) is the input), so log gain_j -> 0.5 log chi_j as
the width grows: growth sets in where chi > 1 (tanh above sigma = 1, ReLU above He's sqrt(2), where chi
= sigma**2 / 2 exactly) and the gradient vanishes where chi < 1. `theory.layer_chis` computes chi_l by
Gaussian integrals, independently of the harness, from the actual input's second moment.

At width 256, batch 16 and depth 10-30 the mean over blocks of log gain_j - 0.5 log chi_j, a
finite-width fluctuation, was at most 0.016 (tanh, sigma 0.5-3) and 0.021 (ReLU, sigma 0.5-2.5) in
100 random draws each: TOL = 0.05 is more than twice that, while a probe that reported squared gains
would be off by 0.5 log chi, 0.35 at ReLU's sigma = 2.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from theory import gauss, layer_chis

from stabilitycheck import meanfield
from stabilitycheck.config import Config
from stabilitycheck.configprobe import probe
from stabilitycheck.probing import probe_module
from stabilitycheck.seeds import assess
from stabilitycheck.strategies import configs
from stabilitycheck.subject import Built
from stabilitycheck.verdicts import Limits
from stabilitycheck.zoo import Family

SIGMAS = {"tanh": st.floats(0.5, 3.0), "relu": st.floats(0.5, 2.5)}
"""Both phases: ordered (chi < 1) and chaotic (chi > 1), and the critical point between them."""

TOL = 0.05


def build(c: Config) -> Built:
    """The zoo model, inputs and loss of `c`."""
    return Family(c.subject).build(c)


@pytest.mark.slow
@pytest.mark.parametrize("activation", ["tanh", "relu"])
@given(data=st.data())
def test_mean_log_gain_per_block_matches_mean_field(activation: str, data: st.DataObject) -> None:
    c: Config = data.draw(
        configs(
            family="mlp",
            min_depth=10,
            max_depth=30,
            min_width=256,
            max_width=256,
            min_batch_size=16,
            max_batch_size=16,
            init_scales=SIGMAS[activation],
            activations=(activation,),
            dtypes=("float64",),
        ),
        label="config",
    )
    b = build(c)
    m = probe_module(b.model, b.inputs, b.loss_fn, blocks=b.blocks)
    chis = layer_chis(
        float(c.knob("init_scale")), activation, float(b.inputs.pow(2).mean()), int(c.knob("depth"))
    )
    measured = statistics.fmean(math.log(g) for g in m.gains)
    predicted = statistics.fmean(0.5 * math.log(x) for x in chis)
    assert measured == pytest.approx(predicted, abs=TOL), f"chi per block: {chis}"


# The harness's own mean-field code (stabilitycheck.meanfield, its Gaussian integrals and the zoo's
# predicted growth) against theory.gauss's, computed apart from it.


@pytest.mark.parametrize("sigma", [0.5, 1.5, 3.75])
@pytest.mark.parametrize("q", [0.01, 1.0, 30.0])
def test_meanfield_tanh_step_matches_own_integral(sigma: float, q: float) -> None:
    """One step of the tanh map: q' = sigma^2 E[tanh(sqrt(q) z)^2], chi = sigma^2 E[sech(sqrt(q) z)^4]."""
    q_next, chi = meanfield.step(sigma, "tanh", q)
    s = math.sqrt(q)
    assert q_next == pytest.approx(sigma**2 * gauss(lambda z: torch.tanh(s * z) ** 2), rel=1e-6)
    assert chi == pytest.approx(sigma**2 * gauss(lambda z: torch.cosh(s * z) ** -4), rel=1e-6)


def _tanh_q_star(sigma: float) -> float:
    """The q > 0 of q = sigma^2 E[tanh(sqrt(q) z)^2], by bisection to float64 resolution."""
    s2 = sigma * sigma
    lo, hi = 1e-6, s2  # the map raises q below q* and lowers it above; q* < sigma^2 (tanh^2 < 1)
    while hi - lo > 1e-15 * hi:
        mid = 0.5 * (lo + hi)
        s = math.sqrt(mid)
        rises = s2 * gauss(lambda z, s=s: torch.tanh(s * z) ** 2) > mid  # type: ignore[misc]
        lo, hi = (mid, hi) if rises else (lo, mid)
    return 0.5 * (lo + hi)


@pytest.mark.parametrize("sigma", [1.2, 1.5, 2.0, 3.0])
def test_tanh_q_star_is_found_to_its_default_tolerance_of_1e_12(sigma: float) -> None:
    """q_star's tol (1e-12 by default) is the relative precision of the tanh fixed point it returns;
    Gauss-Hermite's own error there is ~1e-12 too, so 1e-10 holds and a bisection stopped at 1e-6
    (off by ~1e-7) does not."""
    assert meanfield.q_star(sigma, "tanh") == pytest.approx(_tanh_q_star(sigma), rel=1e-10, abs=0)


def _own_log_growth(sigma: float, act: str, depth: int) -> float:
    """ln of prod_l sqrt(chi_l) from an input of second moment 1: chi = sigma^2 / 2 (ReLU, He et al. 2015)
    and sigma^2 (linear) in closed form; tanh's from theory.layer_chis."""
    if act != "tanh":
        return 0.5 * depth * math.log(sigma**2 / (2 if act == "relu" else 1))
    return 0.5 * sum(math.log(chi) for chi in layer_chis(sigma, act, 1.0, depth))


@pytest.mark.parametrize("act", ["tanh", "relu", "linear"])
@pytest.mark.parametrize("sigma", [0.75, 1.25, 1.5, 2.5, 4.0])
def test_zoo_mean_field_line_is_an_independent_chain(act: str, sigma: float) -> None:
    for depth in (1, 7, 30):
        got = meanfield.zoo_growth("mlp", {"activation": act, "init_scale": sigma, "depth": depth})
        assert got is not None
        assert math.log(got) == pytest.approx(_own_log_growth(sigma, act, depth), abs=1e-6 * depth)


def test_zoo_growth_predicts_up_to_max_depth_inclusive() -> None:
    """zoo_growth predicts an mlp 'up to MAX_DEPTH': a linear stack at sigma = 1 has q_l = 1 and
    chi_l = 1 at every block, so growth exactly 1 at MAX_DEPTH; one block more has no prediction."""
    knobs = {"activation": "linear", "init_scale": 1.0}
    assert meanfield.zoo_growth("mlp", {**knobs, "depth": meanfield.MAX_DEPTH}) == 1.0
    assert meanfield.zoo_growth("mlp", {**knobs, "depth": meanfield.MAX_DEPTH + 1}) is None
    deeper = {**knobs, "depth": meanfield.MAX_DEPTH + 1, "norm": "post"}
    assert meanfield.zoo_growth("resmlp", deeper) is None


def test_zoo_gelu_at_its_critical_scale_is_ordered_with_gain_sqrt_half() -> None:
    """README: bias-free GELU at sqrt 2 is ordered, chi_1 -> sigma^2 GELU'(0)^2 = 1/2."""
    c = Config.of("mlp", depth=60, width=256, batch_size=32, init_scale=math.sqrt(2), activation="gelu")
    m = probe(c.with_run(dtype="float64"))
    deep = m.gains[40:]
    assert math.exp(sum(math.log(g) for g in deep) / len(deep)) == pytest.approx(math.sqrt(0.5), rel=0.02)


def test_relu_below_he_scale_never_explodes() -> None:
    """chi = sigma^2 / 2 < 1 below sqrt 2 (He et al. 2015): no depth explodes."""
    lim = Limits(grad_norm=None, divergence=None, nonfinite=False)
    c = Config.of("mlp", depth=32, init_scale=1.375, activation="relu", width=64, batch_size=8, seeds=3)
    assert not assess(c, limits=lim).exploded
