"""Residual MLPs (the zoo's resmlp: x + W2 phi(W1 x), LayerNorm before the branch, after the sum, or
none) against mean-field theory: the closed forms of ReLU and linear branches, whose gains telescope,
and the probe's median growth over seeds against meanfield.residual_log_growth for tanh, ReLU and
linear at width 256: within x1.25 over 4 seeds at sigma <= 1.5, depth <= 16 (finite width spreads the
log-growth over seeds, more with depth: on the full grid of those, 270 points, the median of 4 seeds
was at most 17% off, post-norm ReLU at sigma 1.5, depth 12: 1.17 for 1; the median point 1.2% off);
and, with no LayerNorm, the mean square growth over seeds against its exact expectation."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from stabilitycheck import meanfield
from stabilitycheck.config import Config
from stabilitycheck.configprobe import probe
from stabilitycheck.probing import probe_module

A = {
    "relu": 0.5,
    "linear": 1.0,
}  # E[phi(z)^2] = E[phi'(z)^2] = a: the branch adds a sigma^4 and multiplies a sigma^4


@pytest.mark.parametrize("act", ["relu", "linear"])
@pytest.mark.parametrize("sigma", [0.5, 1.0, 1.5, 3.0])
@pytest.mark.parametrize("depth", [1, 2, 7, 40])
def test_closed_forms_of_homogeneous_branches(act: str, sigma: float, depth: int) -> None:
    """With c = c' = a sigma^4: no norm grows (1 + c)^(L/2); pre-norm's gains 1 + c / (1 + c l)
    telescope to sqrt(1 + c L); post-norm's (1 + c') / (1 + c) is 1."""
    c = A[act] * sigma**4
    want = {"none": 0.5 * depth * math.log1p(c), "pre": 0.5 * math.log1p(c * depth), "post": 0.0}
    for norm, log in want.items():
        got = meanfield.residual_log_growth(sigma, act, depth, norm)
        assert got == pytest.approx(log, rel=1e-9, abs=1e-12), norm


def test_zoo_growth_reads_the_residual_stack_s_norm() -> None:
    knobs = {"activation": "relu", "init_scale": 1.0, "depth": 8}
    assert meanfield.zoo_growth("resmlp", {**knobs, "norm": "pre"}) == pytest.approx(math.sqrt(1 + 4))
    assert meanfield.zoo_growth("resmlp", {**knobs, "norm": "post"}) == pytest.approx(1.0)
    assert meanfield.zoo_growth("resmlp", {**knobs, "norm": "none"}) == pytest.approx(1.5**4)
    assert meanfield.zoo_growth("resmlp", {**knobs, "activation": "gelu", "norm": "pre"}) is None
    with pytest.raises(ValueError, match="norm"):
        meanfield.residual_log_growth(1.0, "relu", 4, "rms")


@settings(max_examples=12, deadline=None)
@given(
    norm=st.sampled_from(["none", "pre", "post"]),
    act=st.sampled_from(["tanh", "relu", "linear"]),
    sigma=st.sampled_from([0.5, 0.75, 1.0, 1.25, 1.5]),
    depth=st.integers(1, 16),
)
def test_probe_median_growth_matches_residual_mean_field(
    norm: str, act: str, sigma: float, depth: int
) -> None:
    """The median over 4 seeds of the measured growth (width 256, float64) is within x1.25 of theory."""
    c = Config.of(
        "resmlp",
        norm=norm,
        activation=act,
        init_scale=sigma,
        depth=depth,
        width=256,
        batch_size=16,
        dtype="float64",
    )
    measured = statistics.median(probe(c.with_run(seed=s)).growth for s in range(4))
    predicted = meanfield.zoo_growth("resmlp", c.values)
    assert predicted is not None
    assert abs(math.log(measured / predicted)) < math.log(1.25), (measured, predicted)


@pytest.mark.parametrize(("act", "sigma"), [("tanh", 4.0), ("tanh", 1.0), ("relu", 2.0)])
def test_pre_norm_growth_tends_to_a_power_of_depth(act: str, sigma: float) -> None:
    """Pre-norm's gains sqrt(1 + c' / (1 + c l)): for large L the log growth rises by (c' / 2c) ln 2
    per doubling of L (c, c' computed here by Monte Carlo, 2e6 draws: not the module's quadrature)."""
    z = torch.randn(2_000_000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * sigma
    phi, dphi = (
        (torch.tanh(z), 1 - torch.tanh(z) ** 2) if act == "tanh" else (z.clamp(min=0), (z > 0).double())
    )
    c = sigma**2 * float(phi.pow(2).mean())
    c_prime = sigma**4 * float(dphi.pow(2).mean())
    rise = meanfield.residual_log_growth(sigma, act, 20_000, "pre") - meanfield.residual_log_growth(
        sigma, act, 10_000, "pre"
    )
    assert rise / math.log(2) == pytest.approx(c_prime / (2 * c), rel=5e-3)


def test_the_cached_chain_reads_alike_in_any_order() -> None:
    """Depths read deep first, then shallow, then deeper (a map's rows) equal each depth's value read
    on a fresh chain in order (the chain is cached per sigma, activation and norm)."""
    order = [30, 5, 1, 17, 45, 2]
    got = {d: meanfield.residual_log_growth(1.375, "tanh", d, "none") for d in order}
    meanfield._RESIDUAL.clear()
    for d in sorted(order):
        assert meanfield.residual_log_growth(1.375, "tanh", d, "none") == got[d]


class _Res(nn.Module):
    """x + alpha W2 phi(W1 x), phi ReLU or the identity, W ~ N(0, s^2 / n) in float64, no LayerNorm."""

    def __init__(self, n: int, s: float, alpha: float, relu: bool, gen: torch.Generator) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(n, n, generator=gen, dtype=torch.float64) * s / n**0.5)
        self.w2 = nn.Parameter(torch.randn(n, n, generator=gen, dtype=torch.float64) * s / n**0.5)
        self.alpha, self.relu = alpha, relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x @ self.w1.T
        return x + self.alpha * ((torch.relu(h) if self.relu else h) @ self.w2.T)


@pytest.mark.slow
@pytest.mark.parametrize(("relu", "alpha"), [(False, 0.5), (True, 1.0), (True, 0.0)])
def test_residual_mean_square_growth_matches_exact_expectation(relu: bool, alpha: float) -> None:
    """Each block's Jacobian I + alpha W2 D W1 multiplies a fixed vector's expected squared norm by exactly
    1 + alpha^2 s^4 c (c = 1 linear, 1/2 ReLU), so E[growth^2] = (1 + alpha^2 s^4 c)^L: the mean of 80
    seeds within 4 standard errors; alpha = 0 is the identity, growth 1 exactly."""
    n, depth, s, seeds = 32, 6, 1.0, 80
    g2 = []
    for seed in range(seeds):
        gen = torch.Generator().manual_seed(seed)
        model = nn.Sequential(*[_Res(n, s, alpha, relu, gen) for _ in range(depth)])
        x = torch.randn(8, n, generator=gen, dtype=torch.float64)
        v = torch.randn(8, n, generator=gen, dtype=torch.float64)
        blocks = [(str(i), b) for i, b in enumerate(model)]
        m = probe_module(model, x, lambda out, _, v=v: (out * v).sum(), blocks=blocks)
        g2.append(m.growth**2)
    theory = (1 + alpha**2 * s**4 * (0.5 if relu else 1.0)) ** depth
    if alpha == 0:
        assert all(x == 1.0 for x in g2)  # ReZero / SkipInit: the identity exactly
        return
    t = torch.tensor(g2, dtype=torch.float64)
    mean, se = float(t.mean()), float(t.std() / math.sqrt(seeds))
    assert abs(mean - theory) < 4 * se, (mean, theory, se)
