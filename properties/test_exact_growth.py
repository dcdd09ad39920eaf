"""Exact growth in linear networks: the probe's growth is sigma ** depth (an MLP, measured from its
input) and sigma ** (T - 1) (an RNN, over its T steps) at any shape, seed and sigma.

With y_l = W_l y_(l-1) and W_l = sigma x an orthogonal matrix, dL/dy_(l-1) = W_l^T dL/dy_l has exactly
sigma times the norm of dL/dy_l (an orthogonal matrix keeps norms). So from the last block's output
back to the MLP's input y_(-1) = x the gradient norm is multiplied by sigma ** depth, one factor per
block, block 0 included, and every per-block gain is sigma. A linear RNN h_t = W h_(t-1) + U x_t with W =
sigma x orthogonal and the loss on h_T alone has growth ||dL/dh_1|| / ||dL/dh_T|| = sigma ** (T - 1)
for the same reason (Pascanu et al. 2013: the gradient over T steps scales as the T-th power of W's
singular value). The loss is linear, L = <v, y> with a fixed random v, so dL/dy = v is never zero
(a cross-entropy saturates at growth 2 ** 33 and its gradient rounds to 0: growth 0/0). Everything
is float64, so the only error is rounding: about n ulps; in float32 and bfloat16 the growth is the
float64 product of the weights as rounded to the dtype.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from stabilitycheck.config import Config
from stabilitycheck.losses import LossFn, generator
from stabilitycheck.probing import probe_module
from stabilitycheck.strategies import configs
from stabilitycheck.subject import Built
from stabilitycheck.zoo import Family, orthogonal

SIGMAS = st.floats(0.5, 2.0)
"""sigma ** 127 stays within float64 at both ends (0.5 ** 127 = 5.9e-39, 2 ** 127 = 1.7e38)."""

RTOL = 1e-9
"""Rounding of n <= 128 float64 matrix products is about 128 * 1.1e-16 relative: far below 1e-9."""


def build(c: Config) -> Built:
    """The zoo model, inputs and loss of `c`."""
    return Family(c.subject).build(c)


def linear(family: str, **bounds: int) -> st.SearchStrategy[Config]:
    """Linear float64 zoo Configs of `family` at any width 1..48, batch 1..8, seed and sigma in SIGMAS."""
    return configs(
        family=family,
        min_width=1,
        max_width=48,
        max_batch_size=8,
        activations=("linear",),
        norms=("none",),
        dtypes=("float64",),
        init_scales=SIGMAS,
        **bounds,  # type: ignore[arg-type]
    )


def linear_loss(c: Config) -> LossFn:
    """L = <v, y> over the last output (the last time step for a sequence), v fixed by the seed."""
    k = c.values
    v = torch.randn(k["batch_size"], k["width"], generator=generator(c.run.seed + 1), dtype=torch.float64)
    return lambda out, _: (v * (out[:, -1] if c.recurrent else out)).sum()


@given(linear("mlp", max_depth=64))
def test_linear_orthogonal_mlp_grows_by_exactly_sigma_per_block(c: Config) -> None:
    sigma, depth = float(c.knob("init_scale")), int(c.knob("depth"))
    built = build(c)
    gen = generator(c.run.seed + 2)
    with torch.no_grad():
        for _, block in built.blocks:
            block.weight.copy_(orthogonal(int(c.knob("width")), sigma, gen))
    m = probe_module(built.model, built.inputs, linear_loss(c), blocks=built.blocks)
    assert len(m.gains) == depth
    assert m.growth == pytest.approx(sigma**depth, rel=RTOL)
    assert m.gains == pytest.approx([sigma] * depth, rel=RTOL)


@given(linear("rnn", max_seq_len=128))
def test_linear_rnn_grows_by_exactly_sigma_per_step(c: Config) -> None:
    built = build(c)  # the zoo's recurrent matrix is init_scale x orthogonal
    m = probe_module(built.model, built.inputs, linear_loss(c), blocks=built.blocks)
    seq_len = int(c.knob("seq_len"))
    assert len(m.activation_grad_norms) == seq_len
    assert m.growth == pytest.approx(float(c.knob("init_scale")) ** (seq_len - 1), rel=RTOL)


class _Lin(nn.Module):
    """x @ W^T with W given."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T


@pytest.mark.parametrize(
    ("dtype", "rtol"), [(torch.float64, 1e-12), (torch.float32, 1e-6), (torch.bfloat16, 3e-3)]
)
def test_deep_linear_orthogonal_growth_is_g_to_the_depth(dtype: torch.dtype, rtol: float) -> None:
    """32 layers of g x orthogonal under a loss linear in the output: growth is g^32, and exactly the float64
    product of the weights as rounded to the dtype."""
    gen = torch.Generator().manual_seed(0)
    g, depth, n = 1.1, 32, 64
    ws = [orthogonal(n, g, gen).to(dtype) for _ in range(depth)]
    model = nn.Sequential(*[_Lin(w) for w in ws])
    x = torch.randn(4, n, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(4, n, generator=gen, dtype=torch.float64)
    blocks = [(str(i), b) for i, b in enumerate(model)]
    m = probe_module(model, x, lambda out, _: (out.double() * v).sum(), blocks=blocks)
    exact = v.clone()
    for w in reversed(ws):  # dL/dx = v W_L ... W_1 on the rounded weights, in float64
        exact = exact @ w.double()
    assert m.growth == pytest.approx(float(exact.norm() / v.norm()), rel=rtol)
    assert m.growth == pytest.approx(g**depth, rel=max(rtol, 2e-3 if dtype == torch.bfloat16 else rtol))
