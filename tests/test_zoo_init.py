"""The zoo's initialisation, as its module documents it: every weight matrix N(0, init_scale^2 /
fan_in), every recurrent matrix (each gate's, for LSTM and GRU) init_scale x an orthogonal matrix.
Oracles: torch's own fan-in (nn.init._calculate_fan_in_and_fan_out) and singular values
(torch.linalg.svdvals)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from stabilitycheck.config import Config
from stabilitycheck.zoo import Family

SCALE = 1.7
"""Not 1, so that a matrix left unscaled, or scaled by the square root of the scale, shows."""

KNOBS = {
    "mlp": {"depth": 2},
    "resmlp": {"depth": 2, "norm": "pre"},
    "rnn": {"seq_len": 2},
    "lstm": {"seq_len": 2},
    "gru": {"seq_len": 2},
    "transformer": {"depth": 1, "seq_len": 2, "norm": "pre"},
}


@pytest.mark.parametrize("family", list(KNOBS))
def test_weights_have_std_init_scale_over_root_fan_in_and_recurrent_matrices_are_scaled_orthogonal(
    family: str,
) -> None:
    """The sample std of a Gaussian matrix of n entries is within 6 / sqrt(2 n) (6 standard errors) of
    the true std: at width 64, n >= 4096, within 6.6%, where a fan-out in place of the fan-in, an unscaled
    matrix or a missing square root is off by 30% or more."""
    config = Config.of(family, width=64, init_scale=SCALE, dtype="float64", **KNOBS[family])
    model = Family(family).build(config).model
    matrices = [(name, p) for name, p in model.named_parameters() if p.dim() == 2]
    assert matrices
    for name, w in matrices:
        w = w.detach()
        if name.endswith("weight_hh"):  # gates stacked along rows, each (width, width)
            for gate in w.split(64):
                values = torch.linalg.svdvals(gate)
                assert values == pytest.approx(torch.full_like(values, SCALE), rel=1e-9), name
            continue
        fan_in, _ = nn.init._calculate_fan_in_and_fan_out(w)
        std = SCALE / math.sqrt(fan_in)
        tol = 6 / math.sqrt(2 * w.numel())
        assert float(w.std()) == pytest.approx(std, rel=tol), name
        assert abs(float(w.mean())) < 6 * std / math.sqrt(w.numel()), name
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert not p.detach().any(), name  # biases absent or zero


@pytest.mark.parametrize("activation", ["tanh", "linear", "relu"])
def test_the_critical_init_scale_gives_a_backward_gain_of_one_per_block(activation: str) -> None:
    """chi = sigma^2 E[phi'(sqrt(q) z)^2] is 1 at the critical scale (Schoenholz et al. 2017): ReLU's
    and linear's at any q, tanh's at its fixed point there, q* = 0 (tanh(h)^2 < h^2). phi' by
    torch.autograd, E over N(0, 1) by a trapezoid (step 1e-3: ReLU's step costs about 4e-4)."""
    sigma = Family("mlp").critical_init(Config.of("mlp", activation=activation))
    z = torch.linspace(-12, 12, 24_001, dtype=torch.float64)
    weights = torch.exp(-0.5 * z**2) / math.sqrt(2 * math.pi) * (z[1] - z[0])
    h = ((0.0 if activation == "tanh" else 1.0) * z).requires_grad_()
    phi = {"tanh": torch.tanh, "linear": lambda v: 1.0 * v, "relu": torch.relu}[activation]
    (slope,) = torch.autograd.grad(phi(h).sum(), h)
    assert sigma**2 * float((weights * slope**2).sum()) == pytest.approx(1.0, rel=1e-3)
