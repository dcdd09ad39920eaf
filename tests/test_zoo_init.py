"""The zoo's initialisation, as its module documents it: every weight matrix N(0, init_scale^2 /
fan_in), every recurrent matrix (each gate's, for LSTM and GRU) init_scale x an orthogonal matrix.
Oracles: torch's own fan-in (nn.init._calculate_fan_in_and_fan_out) and singular values
(torch.linalg.svdvals).
Also the zoo's structure: the pre-norm variant offered for every norm, a residual block's layernorm."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from stabilitycheck.config import Config
from stabilitycheck.subjects import resolve
from stabilitycheck.zoo import MATRICES, Family

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


@pytest.mark.parametrize("norm,offered", [("post", True), ("none", True), ("pre", False)])
def test_the_pre_norm_variant_is_offered_for_every_norm_but_pre(norm: str, offered: bool) -> None:
    """Family.variants: the pre-norm remedy is the same Config with norm='pre', for a post-norm or
    norm-free residual stack, and none where it is pre-norm already or has no norm knob (mlp)."""
    config = Config.of("resmlp", depth=3, norm=norm)
    got = Family("resmlp").variants(config)["pre-norm"]
    assert got == (config.with_knobs(norm="pre") if offered else None)
    assert Family("mlp").variants(Config.of("mlp", depth=3))["pre-norm"] is None


@pytest.mark.parametrize("norm", ["pre", "post", "none"])
def test_a_residual_block_places_its_layernorm_as_documented(norm: str) -> None:
    """ResBlock: x + W2 act(W1 x) with the LayerNorm before the branch (pre: x + W2 act(W1 LN(x))),
    after the sum (post: LN(x + W2 act(W1 x))) or none; the stack ends in a final LayerNorm only when
    pre-norm (GPT-2). Oracle: the same sums by hand with torch's F.layer_norm, F.linear and tanh."""
    built = Family("resmlp").build(
        Config.of("resmlp", depth=2, width=8, norm=norm, batch_size=3, dtype="float64")
    )
    x, block = built.inputs, built.model.layers[0]
    F = torch.nn.functional

    def ln(h: torch.Tensor) -> torch.Tensor:  # a fresh LayerNorm: weight 1, bias 0
        return F.layer_norm(h, (8,))

    def branch(h: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.tanh(F.linear(h, block.w1)), block.w2)

    want = {"pre": x + branch(ln(x)), "post": ln(x + branch(x)), "none": x + branch(x)}[norm]
    torch.testing.assert_close(block(x), want, rtol=1e-12, atol=1e-12)
    h = built.model.layers[1](block(x))
    torch.testing.assert_close(built.model(x), ln(h) if norm == "pre" else h, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", sorted(MATRICES))
def test_the_memory_estimate_counts_every_weight(family: str) -> None:
    """The estimate counted activations alone: `--knob width=20000` at 1-8 layers (up to 3.2e9
    weights) was built, its activations 7-59 MiB, and the process was killed at 24 GB after 138 s; it
    is now skipped as too large in 2 s. Oracle: the built model's own weight count, x4 (weight,
    gradient, two Adam moments) in float64, what the estimate adds beyond the activations (which
    grow with the batch: estimate(1 row) x 2 - estimate(2 rows) leaves the weights)."""
    knobs = {"width": 16, "seq_len": 5} if family in ("rnn", "lstm", "gru") else {"width": 16, "depth": 3}
    subject = resolve(family)
    built = subject.build(Config.of(family, **knobs))
    weights = sum(p.numel() for p in built.model.parameters())
    one, two = (subject.memory_estimate(Config.of(family, batch_size=b, **knobs)) for b in (1, 2))
    assert 2 * one - two == 4 * 8 * weights


@pytest.mark.parametrize("family", sorted(MATRICES))
def test_the_activation_estimate_bounds_what_autograd_saves(family: str) -> None:
    """A recurrent family counted every token in each of its seq_len step calls (seq_len^2): a
    width-256 RNN at 256 steps read 12 GiB, skipped as too large, where it peaks at ~0.3 GiB; and an
    LSTM's or GRU's cell saves more per row than the 6 tensors counted. Oracle: the bytes autograd
    itself saves for the backward (torch.autograd.graph.saved_tensors_hooks, parameters aside, which
    the estimate counts apart), in float64 at two sequence lengths or depths: the activation part of
    the estimate lies between 1x and 5x of them."""
    from stabilitycheck.memory import PER_PARAMETER

    subject = resolve(family)
    recurrent = family in ("rnn", "lstm", "gru")
    for size in (30, 120):
        knobs: dict[str, int] = {"width": 32, "batch_size": 4}
        knobs.update({"seq_len": size} if recurrent else {"depth": size // 15})
        if family == "transformer":
            knobs["seq_len"] = size
        config = Config.of(family, dtype="float64", **knobs)
        built = subject.build(config)
        own = {p.untyped_storage().data_ptr() for p in built.model.parameters()}
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor, saved: dict[int, int] = saved) -> torch.Tensor:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            built.loss_fn(built.model(built.inputs), built.inputs)
        kept = sum(n for ptr, n in saved.items() if ptr not in own)
        weights = sum(p.numel() for p in built.model.parameters())
        activations = subject.memory_estimate(config) - PER_PARAMETER * 8 * weights
        assert kept <= activations <= 5 * kept, (size, kept, activations)
