"""Mean-field theory: the fixed point q* and chi_1 = chi at q* against Gaussian integrals computed here by
Simpson's rule, the fixed point found by bisection rather than by iterating the map; the linear RNN's
predicted growth against torch's gradients on the zoo's own model."""

from __future__ import annotations

import math

import pytest
import torch
from meanfield_oracle import Z as _Z
from meanfield_oracle import mean, tanh_fixed_point

from stabilitycheck import meanfield
from stabilitycheck.zoo import Family


@pytest.mark.parametrize("sigma", [1.05, 1.3, 2.0, 4.0, 8.0, 20.0])
def test_tanh_q_star_and_chi_1_in_the_chaotic_phase_match_quadrature(sigma: float) -> None:
    q = tanh_fixed_point(sigma)
    chi = sigma**2 * mean((1 - torch.tanh(math.sqrt(q) * _Z) ** 2) ** 2)
    assert meanfield.q_star(sigma, "tanh") == pytest.approx(q, rel=1e-6)
    assert meanfield.chi_1(sigma, "tanh") == pytest.approx(chi, rel=1e-6)


@pytest.mark.parametrize("sigma", [1.00001, 1.0001, 1.0003])
def test_tanh_q_star_and_chi_1_just_above_the_critical_point(sigma: float) -> None:
    """Just above sigma = 1 the map's slope at q* is nearly 1: iterating it 10,000 times stopped short
    (q* 16% high at 1.0001, chi_1 = 0.99997, the ordered side). q* ~ (sigma^2 - 1) / (2 sigma^2) and
    chi_1 = sigma^2 E[tanh'^2] > 1: the chaotic phase, however barely."""
    q = tanh_fixed_point(sigma)
    chi = sigma**2 * mean((1 - torch.tanh(math.sqrt(q) * _Z) ** 2) ** 2)
    assert q == pytest.approx((sigma**2 - 1) / (2 * sigma**2), rel=3e-3)
    assert meanfield.q_star(sigma, "tanh") == pytest.approx(q, rel=1e-6)
    assert meanfield.chi_1(sigma, "tanh") == pytest.approx(chi, rel=1e-9)
    assert meanfield.chi_1(sigma, "tanh") > 1


@pytest.mark.parametrize(
    ("activation", "sigma", "expected"),
    [
        ("relu", 1.414, 0.0),
        ("relu", 1.4143, math.inf),
        ("linear", 0.9999, 0.0),
        ("linear", 1.00001, math.inf),
    ],
)
def test_relu_and_linear_q_star_near_criticality(activation: str, sigma: float, expected: float) -> None:
    """q -> a q with a = sigma^2 / 2 (ReLU) or sigma^2 (linear): q* is 0 for a < 1 and infinite for a > 1,
    however close a is to 1 (10,000 iterations of the map left q 0.049 at ReLU sigma 1.414, 3.4 at 1.4143)."""
    assert meanfield.q_star(sigma, activation) == expected


@pytest.mark.parametrize("q0", [0.25, 1.0, 7.0])
def test_relu_q_star_is_a_fixed_point_of_the_map_only_at_sigma_root_two(q0: float) -> None:
    """E[relu(sqrt(q) z)^2] = q / 2 (computed here): at sigma = sqrt(2) every q is fixed, so q* is the
    q it starts from; below, q shrinks to 0 geometrically."""
    half = mean(torch.relu(math.sqrt(q0) * _Z) ** 2) / q0
    assert half == pytest.approx(0.5, rel=1e-9)
    assert meanfield.q_star(math.sqrt(2), "relu", q0) == pytest.approx(q0, rel=1e-9)
    assert meanfield.q_star(1.0, "relu", q0) == pytest.approx(0.0, abs=1e-9)
    step = mean((_Z > 0).double())  # E[relu'(z)^2]: 1/2 to Simpson's error on a step, ~3e-4
    assert meanfield.chi_1(1.7, "relu") == pytest.approx(1.7**2 * step, rel=1e-3)


@pytest.mark.parametrize(("sigma", "seq_len"), [(1.5, 1), (0.8, 6), (1.3, 9)])
def test_the_linear_rnns_predicted_last_step_growth_is_torchs(sigma: float, seq_len: int) -> None:
    """The prediction for the zoo's linear RNN judged on its last step, against the model itself:
    ||dL/dh_1|| / ||dL/dh_T|| by torch.autograd.grad on the hidden states of its T steps."""
    config = Family("rnn").config(
        width=8, batch_size=3, seq_len=seq_len, init_scale=sigma, activation="linear", dtype="float64"
    )
    built = Family("rnn").last_step(config)
    assert built is not None
    hs: list[torch.Tensor] = []
    handle = built.model.cell.register_forward_hook(lambda mod, i, out: hs.append(out))
    loss = built.loss_fn(built.model(built.inputs), built.inputs)
    handle.remove()
    grads = torch.autograd.grad(loss, hs)
    predicted = meanfield.zoo_growth("rnn", dict(config.values))
    assert predicted == pytest.approx(float(grads[0].norm() / grads[-1].norm()), rel=1e-9)


@pytest.mark.parametrize("activation", ["relu", "tanh", "linear"])
def test_a_scale_whose_square_underflows_predicts_growth_0(activation: str) -> None:
    """init_scale 1e-170 is a valid knob (any value > 0), but sigma^2 underflows to 0: chi 0, and the
    prediction took ln 0, a ValueError (found by mutation testing). Oracle: the relu growth (sigma^2 /
    2)^(depth / 2), 1e-510 at depth 3, is 0.0 in float64; so is any activation's, whose chi <= sigma^2."""
    knobs = {"activation": activation, "init_scale": 1e-170, "depth": 3}
    assert meanfield.zoo_growth("mlp", knobs) == 0.0
    assert (1e-170**2 / 2) ** 1.5 == 0.0
