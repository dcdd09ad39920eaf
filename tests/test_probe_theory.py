"""The probe against exact and mean-field theory (float64)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from theory import chi

from stabilitycheck.config import Config
from stabilitycheck.probing import probe, probe_module
from stabilitycheck.subject import generator, readout_loss
from stabilitycheck.zoo import build, orthogonal


@pytest.mark.parametrize(("sigma", "depth"), [(0.7, 12), (1.0, 20), (1.3, 16), (2.0, 9)])
def test_deep_linear_orthogonal_mlp_growth_is_sigma_to_depth_minus_one(sigma: float, depth: int) -> None:
    # y_l = W_l y_{l-1}, W_l = sigma x orthogonal, so dL/dy_{l-1} = W_l^T dL/dy_l has exactly
    # sigma times the norm: from the last block's output back to the first's, depth - 1 factors.
    built = build(Config(depth=depth, width=32, activation="linear", dtype="float64", init_scale=sigma))
    gen = generator(123)
    with torch.no_grad():
        for _, block in built.blocks:
            block.weight.copy_(orthogonal(32, sigma, gen))
    m = probe_module(built.model, built.inputs, built.loss_fn, blocks=built.blocks)
    assert m.growth == pytest.approx(sigma ** (depth - 1), rel=1e-6)
    assert all(g == pytest.approx(sigma, rel=1e-6) for g in m.gains)


@pytest.mark.parametrize(("sigma", "seq_len"), [(0.9, 30), (1.0, 50), (1.1, 40), (1.5, 12)])
def test_linear_rnn_growth_over_t_steps_is_sigma_to_t_minus_one(sigma: float, seq_len: int) -> None:
    # Growth over a sequence of T steps is ||dL/dh_1|| / ||dL/dh_T|| for a loss on h_T alone.
    # With h_t = W h_{t-1} + U x_t and W = sigma x orthogonal, dL/dh_{t-1} = W^T dL/dh_t, so
    # the ratio is sigma ** (T - 1) exactly: one factor per transition between h_1 and h_T.
    c = Config(
        family="rnn", activation="linear", width=24, seq_len=seq_len, init_scale=sigma, dtype="float64"
    )
    built = build(c)
    labels = torch.randint(0, 10, (c.batch_size,), generator=generator(1))
    last = readout_loss(c.width, generator(2), labels)
    m = probe_module(built.model, built.inputs, lambda out, _: last(out[:, -1], None), blocks=built.blocks)
    assert len(m.activation_grad_norms) == seq_len
    assert m.growth == pytest.approx(sigma ** (seq_len - 1), rel=1e-6)


def _mean_log_gain(sigma: float, activation: str, skip: int = 5) -> float:
    c = Config(depth=30, width=512, init_scale=sigma, activation=activation, dtype="float64", batch_size=32)
    m = probe(c)
    return statistics.fmean(math.log(g) for g in m.gains[skip:])


def test_relu_mlp_at_he_init_has_no_growth() -> None:
    assert abs(_mean_log_gain(math.sqrt(2), "relu")) < 0.02


@pytest.mark.parametrize("sigma", [1.5, 2.0, 3.0])
def test_tanh_mlp_mean_log_gain_matches_mean_field(sigma: float) -> None:
    # chi = sigma^2 E[tanh'(h)^2] at the fixed point q*; the norm ratio per layer is sqrt(chi).
    _, x = chi(sigma, "tanh")
    assert _mean_log_gain(sigma, "tanh") == pytest.approx(0.5 * math.log(x), abs=0.02)


def test_tanh_mlp_below_criticality_vanishes_at_the_mean_field_rate() -> None:
    _, x = chi(0.8, "tanh")
    assert x < 1
    assert _mean_log_gain(0.8, "tanh", skip=10) == pytest.approx(0.5 * math.log(x), abs=0.02)
