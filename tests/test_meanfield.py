"""Mean-field theory: the fixed point q* and chi_1 = chi at q* against Gaussian integrals computed here by
Simpson's rule, the fixed point found by bisection rather than by iterating the map; the linear RNN's
predicted growth against torch's gradients on the zoo's own model."""

from __future__ import annotations

import math
from typing import Any

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


def _gauss(f: Any, s: float) -> float:
    """E[f(s z)], z ~ N(0, 1), by a dense Riemann sum in float64 (independent of Gauss-Hermite)."""
    z = torch.linspace(-12.0, 12.0, 400_001, dtype=torch.float64)
    w = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi) * (z[1] - z[0])
    return float((f(s * z) * w).sum())


@pytest.mark.parametrize("sigma", [0.5, 2.0, 4.0])
def test_the_first_blocks_gain_is_at_the_input_variance_times_sigma_squared(sigma: float) -> None:
    """M1: x ~ N(0, 1), so block 0's pre-activations W x have variance q_0 = sigma^2 (not 1); its gain
    is sqrt(sigma^2 E[tanh'(sigma z)^2]), and block 1's at q_1 = sigma^2 E[tanh(sigma z)^2]."""
    from stabilitycheck.meanfield import zoo_growth

    def sech4(h: torch.Tensor) -> torch.Tensor:
        return torch.cosh(h) ** -4

    chi0 = sigma**2 * _gauss(sech4, sigma)
    q1 = sigma**2 * _gauss(lambda h: torch.tanh(h) ** 2, sigma)
    chi1 = sigma**2 * _gauss(sech4, math.sqrt(q1))
    one = zoo_growth("mlp", {"activation": "tanh", "init_scale": sigma, "depth": 1})
    two = zoo_growth("mlp", {"activation": "tanh", "init_scale": sigma, "depth": 2})
    assert one == pytest.approx(math.sqrt(chi0), rel=1e-6)
    assert two == pytest.approx(math.sqrt(chi0 * chi1), rel=1e-6)


def test_tanh_at_sigma_one_has_fixed_point_zero_and_is_exactly_critical() -> None:
    """M2: for tanh, tanh(h)^2 < h^2 for h != 0, so q -> sigma^2 E[tanh(sqrt(q) z)^2] < q for every
    q > 0 when sigma <= 1: the only fixed point is q* = 0 (reached like 1 / (2 l) at sigma = 1, too
    slowly for any iteration to converge on), and chi_1 = sigma^2 tanh'(0)^2 = 1 there (to the
    quadrature's rounding; q = 5e-5, where 10^4 iterations stop, gives 1 - 1e-4)."""
    from stabilitycheck.meanfield import chi_1, q_star

    assert q_star(1.0, "tanh") == 0.0
    assert chi_1(1.0, "tanh") == pytest.approx(1.0, rel=1e-12)
    assert q_star(0.9, "tanh") == 0.0
    assert chi_1(0.9, "tanh") == pytest.approx(0.9**2, rel=1e-12)


def _mf_brute(sigma: float, act: str, depth: int, q_in: float) -> list[float]:
    """ln growths by a 400k-point Riemann sum over z in [-14, 14], independent of the Gauss-Hermite rule."""
    z = torch.linspace(-14, 14, 400_000, dtype=torch.float64)  # symmetric, no node at 0
    w = torch.exp(-z * z / 2) / math.sqrt(2 * math.pi) * (z[1] - z[0])
    phi = {"tanh": torch.tanh, "relu": torch.relu, "linear": lambda x: x}[act]
    dphi = {
        "tanh": lambda x: 1 / torch.cosh(x) ** 2,
        "relu": lambda x: (x > 0).double(),
        "linear": torch.ones_like,
    }[act]
    q, out, acc = sigma**2 * q_in, [], 0.0
    for _ in range(depth):
        h = math.sqrt(q) * z
        chi = sigma**2 * float((w * dphi(h) ** 2).sum())
        acc += 0.5 * math.log(chi)
        out.append(acc)
        q = sigma**2 * float((w * phi(h) ** 2).sum())
    return out


@pytest.mark.parametrize(
    "sigma,act,q_in",
    [(1.5, "tanh", 1.0), (3.0, "tanh", 0.5), (0.7, "tanh", 2.0), (2.0, "relu", 1.0), (1.3, "linear", 1.0)],
)
def test_mean_field_growth_matches_a_brute_force_integral(sigma, act, q_in) -> None:
    meanfield._CHAINS.clear()
    meanfield.log_growths(
        sigma, act, 2, q_in=1.0 if q_in != 1.0 else 0.25
    )  # another q_in first: no cross-talk
    got = meanfield.log_growths(sigma, act, 4, q_in=q_in)
    assert list(got) == pytest.approx(_mf_brute(sigma, act, 4, q_in), rel=1e-6, abs=1e-9)


def test_relu_growth_is_sigma_over_sqrt2_per_block() -> None:
    meanfield._CHAINS.clear()
    got = meanfield.zoo_growth("mlp", {"activation": "relu", "init_scale": 2.0, "depth": 6})
    assert got == pytest.approx((2.0 / math.sqrt(2)) ** 6, rel=1e-12)


def test_fixed_points_at_the_edge() -> None:
    # tanh at sigma = 1: q -> 0 (as 1/(2l): E[tanh(sqrt(q) z)^2] = q - 2q^2 + ...),
    # chi at q = 0 is sigma^2 tanh'(0)^2 = 1
    assert meanfield.q_star(1.0, "tanh") == 0.0
    assert meanfield.chi_1(1.0, "tanh") == pytest.approx(1.0, abs=1e-12)
    # relu at sigma = 1: q halves each block, to 0
    assert meanfield.q_star(1.0, "relu") < 1e-9
    # linear at sigma = 1: q stays
    assert meanfield.q_star(1.0, "linear") == 1.0


def test_a_linear_rnns_last_step_growth_is_sigma_to_the_t_minus_1_as_probed() -> None:
    from stabilitycheck import Config
    from stabilitycheck.configprobe import probe

    sigma, t = 1.3, 9
    c = Config.of("rnn", seq_len=t, width=16, init_scale=sigma, activation="linear", batch_size=4)
    predicted = meanfield.zoo_growth("rnn", {"activation": "linear", "init_scale": sigma, "seq_len": t})
    assert predicted == pytest.approx(sigma ** (t - 1), rel=1e-12, abs=0)
    assert probe(c, last_step=True).growth == pytest.approx(predicted, rel=1e-4, abs=0)
