"""Growth through time against exact linear algebra and Pascanu et al. 2013's bound.

A linear recurrence h_(t+1) = W h_t with a non-normal W (a Jordan-like block) grows by the exact power of
its matrix, ||Z W^T|| / ||Z||, neither sigma_max^T nor rho^T, and its transient rise-then-fall is no
rate. A squashing cell h_(t+1) = phi(W h_t + b) with |phi'| <= gamma and gamma sigma_max(W) < 1 cannot
grow through time: every step's gain is at most gamma sigma_max (tanh gamma 1, sigmoid gamma 1/4).
Oracles: float64 matrix products and the bound itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from stabilitycheck.config import Config
from stabilitycheck.configprobe import probe
from stabilitycheck.probing import probe_module
from stabilitycheck.seeds import assess

QUICK = settings(max_examples=15, deadline=None)


class Tied(nn.Module):
    """h_(t+1) = W h_t, one call of the same bias-free Linear per step."""

    def __init__(self, w: torch.Tensor, steps: int) -> None:
        super().__init__()
        self.cell = nn.Linear(w.shape[0], w.shape[0], bias=False).double()
        with torch.no_grad():
            self.cell.weight.copy_(w)
        self.steps = steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.steps):
            x = self.cell(x)
        return x


def _jordan(n: int, lam: float, off: float) -> torch.Tensor:
    """lam on the diagonal, off above it: non-normal, spectral radius lam, sigma_max up to lam + off."""
    return lam * torch.eye(n, dtype=torch.float64) + off * torch.diag(
        torch.ones(n - 1, dtype=torch.float64), 1
    )


def _linear_loss(z: torch.Tensor):  # type: ignore[no-untyped-def]
    """L = <z, output>: dL/d output = z whatever the output."""
    return lambda out, x: (out * z).sum()


def _exact_norms(w: torch.Tensor, z: torch.Tensor, steps: int) -> list[float]:
    """|dL/dh_(T-k)| for k = 0..T: dL/dh_(T-k) = Z W^k for h_(t+1) = h_t W^T (rows), in float64."""
    g, out = z, [float(torch.linalg.vector_norm(z))]
    for _ in range(steps):
        g = g @ w
        out.append(float(torch.linalg.vector_norm(g)))
    return out


@QUICK
@given(
    st.integers(2, 10),
    st.floats(0.1, 1.1),
    st.floats(0.0, 4.0),
    st.integers(1, 40),
    st.integers(0, 2**16),
)
def test_non_normal_linear_rnn_growth_is_the_exact_matrix_power(
    n: int, lam: float, off: float, steps: int, seed: int
) -> None:
    w = _jordan(n, lam, off)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, n, generator=gen, dtype=torch.float64)
    z = torch.randn(3, n, generator=gen, dtype=torch.float64)
    m = probe_module(Tied(w, steps), x, _linear_loss(z))
    norms = _exact_norms(w, z, steps)
    assert m.growth == pytest.approx(norms[-1] / norms[0], rel=1e-9)
    exact_gains = [norms[k + 1] / norms[k] for k in range(steps)][::-1]  # input side first
    assert list(m.gains) == pytest.approx(exact_gains, rel=1e-9)


@pytest.mark.parametrize(("lam", "off", "steps"), [(0.5, 2.0, 40), (0.3, 4.0, 40), (0.9, 1.0, 80)])
def test_non_normal_growth_is_neither_sigma_max_nor_rho_to_the_t(lam: float, off: float, steps: int) -> None:
    w = _jordan(8, lam, off)
    z = torch.randn(4, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    m = probe_module(Tied(w, steps), torch.ones(4, 8, dtype=torch.float64), _linear_loss(z))
    sigma = float(torch.linalg.matrix_norm(w, ord=2))
    rho = float(torch.linalg.eigvals(w).abs().max())
    exact = _exact_norms(w, z, steps)
    assert m.growth == pytest.approx(exact[-1] / exact[0], rel=1e-9)
    assert rho**steps * 1e3 < m.growth < sigma**steps * 1e-3  # the transient lies far between both


JORDAN_FILE = """
import torch
from torch import nn

SPACE = {"seq_len": (1, 200)}


class Net(nn.Module):
    def __init__(self, seq_len, lam, off):
        super().__init__()
        self.cell = nn.Linear(8, 8, bias=False)
        w = lam * torch.eye(8) + off * torch.diag(torch.ones(7), 1)
        with torch.no_grad():
            self.cell.weight.copy_(w)
        self.seq_len = seq_len

    def forward(self, x):
        for _ in range(self.seq_len):
            x = self.cell(x)
        return x


def build(seq_len=10, lam=0.5, off=2.0):
    return Net(seq_len, lam, off)


def batch(model, seq_len=10):
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(1))


def loss(output, inputs):
    z = torch.randn(output.shape, generator=torch.Generator().manual_seed(2), dtype=output.dtype)
    return (output * z).sum()
"""


@pytest.mark.parametrize(
    ("lam", "off", "steps"), [(0.5, 2.0, 30), (0.5, 2.0, 60), (0.9, 1.0, 160), (0.3, 4.0, 20)]
)
def test_non_normal_rise_then_fall_is_no_rate(
    model_file: Callable[[str, str], str], lam: float, off: float, steps: int
) -> None:
    """The exact ||Z W^k|| rises (the non-normal transient) then falls (rho < 1): no constant rate or depth
    law describes it, so the kind must not claim one."""
    w = _jordan(8, lam, off)
    z = torch.randn(4, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    norms = _exact_norms(w, z, steps)
    peak = max(range(len(norms)), key=norms.__getitem__)
    assert 0 < peak < steps and norms[peak] > 10 * max(norms[0], norms[-1])  # the oracle: rise then fall
    spec = model_file("jordan", JORDAN_FILE)
    j = assess(Config.of(spec, seq_len=steps, lam=lam, off=off, dtype="float64", seeds=1))
    assert j.kind.kind == "irregular", j.kind.describe()


@pytest.mark.parametrize(("lam", "off", "steps"), [(0.5, 2.0, 7), (0.9, 1.0, 20), (1.02, 3.0, 10)])
def test_non_normal_exponential_rate_gives_the_exact_growth_within_x2(
    model_file: Callable[[str, str], str], lam: float, off: float, steps: int
) -> None:
    """Where the kind says exponential, rate^T must give the exact ||Z W^T|| / ||Z|| within x2."""
    w = _jordan(8, lam, off)
    z = torch.randn(4, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    norms = _exact_norms(w, z, steps)
    spec = model_file("jordan", JORDAN_FILE)
    j = assess(Config.of(spec, seq_len=steps, lam=lam, off=off, dtype="float64", seeds=1))
    assert j.kind.kind == "exponential", j.kind.describe()
    assert abs(steps * j.kind.rate.mid - math.log(norms[-1] / norms[0])) <= math.log(2)


class Squash(nn.Module):
    """h_(t+1) = act(W h_t + b), one cell called once per step."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor, act: nn.Module, steps: int) -> None:
        super().__init__()
        lin = nn.Linear(w.shape[0], w.shape[0]).double()
        with torch.no_grad():
            lin.weight.copy_(w)
            lin.bias.copy_(b)
        self.cell = nn.Sequential(lin, act)
        self.steps = steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.steps):
            x = self.cell(x)
        return x

    def stability_blocks(self) -> list[tuple[str, nn.Module]]:
        return [("cell", self.cell)]


def _scaled(n: int, smax: float, gen: torch.Generator, jordan: bool) -> torch.Tensor:
    """A Jordan-like or Gaussian matrix scaled to largest singular value `smax`."""
    a = _jordan(n, 0.5, 3.0) if jordan else torch.randn(n, n, generator=gen, dtype=torch.float64)
    return a * (smax / float(torch.linalg.matrix_norm(a, ord=2)))


@QUICK
@given(
    st.sampled_from([("tanh", 1.0), ("sigmoid", 0.25)]),
    st.floats(0.05, 0.999),
    st.integers(1, 60),
    st.integers(0, 2**16),
    st.booleans(),
    st.floats(0.0, 2.0),
)
def test_squashing_cell_through_time_growth_obeys_pascanus_bound(
    act: tuple[str, float], frac: float, steps: int, seed: int, jordan: bool, bias: float
) -> None:
    """sigma_max(W) = frac / gamma < 1 / gamma: |dL/dh_0| <= (gamma sigma_max)^T |dL/dh_T| and every step's
    gain <= gamma sigma_max (the loss on h_T alone)."""
    name, gamma = act
    gen = torch.Generator().manual_seed(seed)
    w = _scaled(12, frac / gamma, gen, jordan)
    b = bias * torch.randn(12, generator=gen, dtype=torch.float64)
    model = Squash(w, b, nn.Tanh() if name == "tanh" else nn.Sigmoid(), steps)
    x = 2 * torch.randn(4, 12, generator=gen, dtype=torch.float64)
    z = torch.randn(4, 12, generator=gen, dtype=torch.float64)
    m = probe_module(model, x, _linear_loss(z))
    assert len(m.gains) == steps
    assert m.growth <= frac**steps * (1 + 1e-12)
    assert max(m.gains) <= frac * (1 + 1e-12)


@pytest.mark.parametrize("s", [0.5, 0.95])
def test_zoo_tanh_rnn_below_unit_sigma_max_never_grows_through_time(s: float) -> None:
    for i in range(3):
        c = Config.of("rnn", seq_len=20, init_scale=s, width=16, batch_size=4, dtype="float64", seed=i)
        assert probe(c, last_step=True).growth <= s**19 * (1 + 1e-12)
    assert not assess(
        Config.of("rnn", seq_len=20, init_scale=s, width=16, batch_size=4, dtype="float64")
    ).exploded


@pytest.mark.parametrize("s", [0.5, 0.9, 1.5, 3.0])
def test_tanh_rnn_through_time_growth_is_at_most_s_to_the_t_minus_1(s: float) -> None:
    """The zoo's tanh RNN, sigma_max(W) = s (an orthogonal W scaled), in float32 over 10 seeds."""
    for seed in range(10):
        c = Config.of("rnn", activation="tanh", init_scale=s, seq_len=20, width=16, batch_size=4)
        c = c.with_run(seed=seed)
        assert probe(c, last_step=True).growth <= s**19 * (1 + 1e-5)
