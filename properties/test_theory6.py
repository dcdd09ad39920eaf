"""Theory guards from an audit: a non-normal linear recurrence grows by the exact power of its matrix (not
sigma_max^T nor rho^T) and its rise-then-fall is no rate; Pascanu et al. 2013's necessary condition (a
squashing cell with gamma sigma_max(W) < 1 cannot grow through time: tanh gamma 1, sigmoid gamma 1/4); the
per-block weight-gradient norms of pre-/post-LN Transformer layers are torch's, and their depth trend is
Xiong et al. 2020's; the phase map's frontier of an orthogonal linear stack is the exact g^L = limit line,
and the same call gives the same map; the zoo's mean-field line is an independent Gauss-Hermite chain's; a
float16 step's first non-finite value is where torch's own forward, loss or backward first makes one, and
float16/bfloat16 growth is the float64 growth of the rounded weights within the dtype's rounding.
Oracles: numpy/float64 matrix products, the bound (gamma sigma_max)^T, plain autograd with retain_grad,
a fine trapezoid rule for Gaussian integrals."""

from __future__ import annotations

import copy
import math
import statistics
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from stabilitycheck import meanfield
from stabilitycheck.config import Config
from stabilitycheck.configprobe import probe
from stabilitycheck.phasemap import phase_map
from stabilitycheck.probing import probe_module
from stabilitycheck.seeds import assess
from stabilitycheck.space import Axis
from stabilitycheck.verdicts import Limits

QUICK = settings(max_examples=15, deadline=None)


# -- 1. non-normal linear recurrence: h_(t+1) = W h_t, one call of a tied Linear per step
class Tied(nn.Module):
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
    return lam * torch.eye(n, dtype=torch.float64) + off * torch.diag(
        torch.ones(n - 1, dtype=torch.float64), 1
    )


def _linear_loss(z: torch.Tensor):  # type: ignore[no-untyped-def]
    return lambda out, x: (out * z).sum()


def _exact_norms(w: np.ndarray, z: np.ndarray, steps: int) -> list[float]:
    """|dL/dh_(T-k)| for k = 0..T: dL/dh_(T-k) = Z W^k for h_(t+1) = h_t W^T (rows)."""
    g, out = z.copy(), [float(np.linalg.norm(z))]
    for _ in range(steps):
        g = g @ w
        out.append(float(np.linalg.norm(g)))
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
    norms = _exact_norms(w.numpy(), z.numpy(), steps)
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
    exact = _exact_norms(w.numpy(), z.numpy(), steps)
    assert m.growth == pytest.approx(exact[-1] / exact[0], rel=1e-9)
    assert rho**steps * 1e3 < m.growth < sigma**steps * 1e-3  # the transient lies far between both


def _model_file(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return f"{path}:build"


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
def test_non_normal_rise_then_fall_is_no_rate(tmp_path: Path, lam: float, off: float, steps: int) -> None:
    """The exact ||Z W^k|| rises (the non-normal transient) then falls (rho < 1): no constant rate or depth
    law describes it, so the kind must not claim one."""
    w = _jordan(8, lam, off).numpy()
    z = torch.randn(4, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64).numpy()
    norms = _exact_norms(w, z, steps)
    peak = int(np.argmax(norms))
    assert 0 < peak < steps and norms[peak] > 10 * max(norms[0], norms[-1])  # the oracle: rise then fall
    spec = _model_file(tmp_path, "jordan", JORDAN_FILE)
    j = assess(Config.of(spec, seq_len=steps, lam=lam, off=off, dtype="float64", seeds=1))
    assert j.kind.kind == "irregular", j.kind.describe()


@pytest.mark.parametrize(("lam", "off", "steps"), [(0.5, 2.0, 7), (0.9, 1.0, 20), (1.02, 3.0, 10)])
def test_non_normal_exponential_rate_gives_the_exact_growth_within_x2(
    tmp_path: Path, lam: float, off: float, steps: int
) -> None:
    """Where the kind says exponential, rate^T must give the exact ||Z W^T|| / ||Z|| within x2."""
    w = _jordan(8, lam, off).numpy()
    z = torch.randn(4, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64).numpy()
    norms = _exact_norms(w, z, steps)
    spec = _model_file(tmp_path, "jordan", JORDAN_FILE)
    j = assess(Config.of(spec, seq_len=steps, lam=lam, off=off, dtype="float64", seeds=1))
    assert j.kind.kind == "exponential", j.kind.describe()
    assert abs(steps * j.kind.rate.mid - math.log(norms[-1] / norms[0])) <= math.log(2)


# -- 2. Pascanu et al. 2013: |phi'| <= gamma and gamma sigma_max(W) < 1 cannot grow through time
class Squash(nn.Module):
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


# -- 3. Xiong et al. 2020: pre-LN vs post-LN Transformer layers at init
class Encoder(nn.Module):
    def __init__(self, layers: int, norm_first: bool, d: int = 32) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True, norm_first=norm_first)
            for _ in range(layers)
        )
        self.final = nn.LayerNorm(d) if norm_first else nn.Identity()
        self.head = nn.Linear(d, 16, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(self.final(x))  # type: ignore[no-any-return]


def _ce(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    y = torch.randint(0, out.shape[-1], out.shape[:-1], generator=torch.Generator().manual_seed(12))
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def _encoder(layers: int, norm_first: bool, seed: int) -> tuple[Encoder, torch.Tensor]:
    torch.manual_seed(seed)
    model = Encoder(layers, norm_first).double()
    x = torch.randn(4, 8, 32, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    return model, x


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("layers", [1, 3, 6])
def test_transformer_layer_weight_gradient_norms_are_torchs(norm_first: bool, layers: int) -> None:
    model, x = _encoder(layers, norm_first, seed=layers)
    ref = copy.deepcopy(model)
    blocks = [(f"layers.{i}", m) for i, m in enumerate(model.layers)]
    m = probe_module(model, x, _ce, blocks=blocks)
    _ce(ref(x), x).backward()
    own = [
        math.sqrt(sum(float(p.grad.pow(2).sum()) for p in b.parameters() if p.grad is not None))
        for b in ref.layers
    ]
    assert list(m.layer_grad_norms) == pytest.approx(own, rel=1e-12)


def _last_block_grad(layers: int, norm_first: bool) -> float:
    out = []
    for seed in range(5):
        model, x = _encoder(layers, norm_first, seed=100 * layers + seed)
        blocks = [(f"layers.{i}", m) for i, m in enumerate(model.layers)]
        out.append(probe_module(model, x, _ce, blocks=blocks).layer_grad_norms[-1])
    return statistics.median(out)


def test_pre_ln_last_layer_gradient_shrinks_with_depth_and_post_ln_does_not() -> None:
    """Xiong et al. 2020, Theorem 1: post-LN's last-layer gradient is O(1) in L, pre-LN's
    O(1/sqrt(L)) (here 1/sqrt(1 + c L): the pre-LN stream's norm grows with L)."""
    pre = _last_block_grad(12, True) / _last_block_grad(2, True)
    post = _last_block_grad(12, False) / _last_block_grad(2, False)
    assert pre < 0.85, pre
    assert post > 0.9, post
    assert post > pre * 1.2


# -- 4. the phase map against an exact frontier; the zoo's mean-field line
ORTHO_FILE = """
import torch
from torch import nn

SPACE = {"depth": (1, 64), "g": (1.1, 2.0, 0.1)}


def build(depth=4, g=1.1):
    gen = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(depth):
        lin = nn.Linear(8, 8, bias=False)
        with torch.no_grad():
            lin.weight.copy_(nn.init.orthogonal_(torch.empty(8, 8), gain=g, generator=gen))
        layers.append(lin)
    return nn.Sequential(*layers)


def batch(model):
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(1))


def loss(output, inputs):
    return (output * torch.randn(output.shape, generator=torch.Generator().manual_seed(2))).sum()
"""


def test_phase_map_frontier_of_orthogonal_linear_stack_is_exact_and_repeatable(tmp_path: Path) -> None:
    """g x orthogonal layers under a loss linear in the output grow by exactly g^depth: the frontier at each
    g is the smallest depth with g^depth > limit; the same call gives the same map."""
    spec = _model_file(tmp_path, "ortho", ORTHO_FILE)
    gs = (1.1, 1.3, 1.6, 2.0)
    lim = Limits(grad_norm=None, divergence=None, nonfinite=False, growth=100.0)
    kw = dict(x=Axis("depth", tuple(range(1, 65))), y=Axis("g", gs), limits=lim, seeds=1)
    pm = phase_map(spec, **kw)  # type: ignore[arg-type]
    exact = [next((d for d in range(1, 65) if g**d > 100 * (1 + 1e-4)), None) for g in gs]
    assert [None if e.x is None else pm.x.values[e.x] for e in pm.explode] == exact
    again = phase_map(spec, **kw)  # type: ignore[arg-type]
    assert again.points == pm.points and again.explode == pm.explode


_Z = np.linspace(-12.0, 12.0, 240_001)
_W = np.exp(-0.5 * _Z**2) / math.sqrt(2 * math.pi) * (_Z[1] - _Z[0])
"""Trapezoid weights of N(0, 1) on [-12, 12], step 1e-4 (Gauss-Hermite with 160-200 nodes is 1-2% off
for sech^4(4 z), whose width 1/4 is under its node spacing near 0)."""


def _own_log_growth(sigma: float, act: str, depth: int) -> float:
    """ln of prod_l sqrt(chi_l): chi = sigma^2 / 2 (ReLU, He et al. 2015) and sigma^2 (linear) in closed
    form; tanh's chi_l = sigma^2 E[sech^4(sqrt(q_l) z)] along q_(l+1) = sigma^2 E[tanh^2(sqrt(q_l) z)],
    q_0 = sigma^2."""
    if act != "tanh":
        return 0.5 * depth * math.log(sigma**2 / (2 if act == "relu" else 1))
    q, log = sigma**2, 0.0
    for _ in range(depth):
        h = math.sqrt(q) * _Z
        log += 0.5 * math.log(sigma**2 * float((_W / np.cosh(h) ** 4).sum()))
        q = sigma**2 * float((_W * np.tanh(h) ** 2).sum())
    return log


@pytest.mark.parametrize("act", ["tanh", "relu", "linear"])
@pytest.mark.parametrize("sigma", [0.75, 1.25, 1.5, 2.5, 4.0])
def test_zoo_mean_field_line_is_an_independent_chain(act: str, sigma: float) -> None:
    for depth in (1, 7, 30):
        got = meanfield.zoo_growth("mlp", {"activation": act, "init_scale": sigma, "depth": depth})
        assert got is not None
        assert math.log(got) == pytest.approx(_own_log_growth(sigma, act, depth), abs=1e-6 * depth)


def test_relu_below_he_scale_never_explodes() -> None:
    """chi = sigma^2 / 2 < 1 below sqrt 2 (He et al. 2015): no depth explodes."""
    lim = Limits(grad_norm=None, divergence=None, nonfinite=False)
    c = Config.of("mlp", depth=32, init_scale=1.375, activation="relu", width=64, batch_size=8, seeds=3)
    assert not assess(c, limits=lim).exploded


# -- 5. float16 / bfloat16 against torch's own step
def _ortho_stack(depth: int, g: float, seed: int, dtype: torch.dtype) -> nn.Sequential:
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(depth):
        lin = nn.Linear(32, 32, bias=False)
        with torch.no_grad():
            lin.weight.copy_(nn.init.orthogonal_(torch.empty(32, 32), gain=g, generator=gen))
        layers.append(lin)
    return nn.Sequential(*layers).to(dtype)


def _low_loss(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    z = torch.randn(out.shape, generator=torch.Generator().manual_seed(6)).to(out.dtype)
    return (out * z).sum()


def _fp16_case(depth: int, g: float, xscale: float, seed: int) -> tuple[nn.Sequential, torch.Tensor, object]:
    model = _ortho_stack(depth, g, seed, torch.float16)
    ref = copy.deepcopy(model)
    x = (xscale * torch.randn(4, 32, generator=torch.Generator().manual_seed(seed + 7))).half()
    m = probe_module(model, x, _low_loss, blocks=[(str(i), b) for i, b in enumerate(model)])
    return ref, x, m.first_nonfinite


@settings(max_examples=10, deadline=None)
@given(st.sampled_from([1.05, 1.1, 1.2]), st.floats(500.0, 5000.0), st.integers(0, 1000))
def test_float16_forward_overflow_is_named_where_torch_makes_it(g: float, xscale: float, seed: int) -> None:
    depth = 40 + int(math.log(65504 / xscale) / math.log(g))
    ref, x, nf = _fp16_case(depth, g, xscale, seed)
    h, first = x, None
    for i, layer in enumerate(ref):
        h = layer(h)
        if not torch.isfinite(h).all():
            first = i
            break
    assert first is not None  # the oracle: torch's own forward overflows
    assert nf is not None and (nf.step, nf.tensor, nf.layer) == (0, "activation", str(first))  # type: ignore[attr-defined]


@settings(max_examples=10, deadline=None)
@given(st.sampled_from([1.05, 1.1, 1.2]), st.integers(0, 1000))
def test_float16_backward_overflow_is_named_where_torch_makes_it(g: float, seed: int) -> None:
    depth = 30 + int(math.log(65504 / 3) / math.log(g))
    ref, x, nf = _fp16_case(depth, g, 1e-3 * g ** -(depth / 2), seed)  # a forward far from overflow
    h, outs = x, []
    for layer in ref:
        h = layer(h)
        h.retain_grad()
        outs.append(h)
    assert all(torch.isfinite(o).all() for o in outs)
    _low_loss(h, x).backward()
    first = next(k for k in reversed(range(depth)) if not torch.isfinite(outs[k].grad).all())
    assert nf is not None and (nf.step, nf.tensor, nf.layer) == (0, "activation_grad", str(first))  # type: ignore[attr-defined]


def test_float16_loss_overflow_is_named_after_the_last_block() -> None:
    for xscale in (400.0, 700.0, 1000.0, 1400.0, 2000.0):
        ref, x, nf = _fp16_case(100, 1.02, xscale, 0)
        out = ref(x)
        if torch.isfinite(out).all() and not torch.isfinite(_low_loss(out, x)):  # the oracle: the loss alone
            break
    else:
        pytest.fail("no input scale overflows the float16 loss alone")
    assert nf is not None and (nf.step, nf.tensor, nf.layer) == (0, "loss", "(after the last block)")  # type: ignore[attr-defined]


@pytest.mark.parametrize(("dtype", "unit"), [(torch.float16, 2.0**-11), (torch.bfloat16, 2.0**-8)])
@pytest.mark.parametrize(("g", "depth"), [(1.01, 200), (1.05, 60), (1.1, 40)])
def test_low_precision_growth_is_the_float64_growth_within_rounding(
    dtype: torch.dtype, unit: float, g: float, depth: int
) -> None:
    """Random rounding over `depth` products: relative error ~ sqrt(depth) x the unit roundoff; allowed 4x."""
    model = _ortho_stack(depth, g, 3, dtype)
    wide = copy.deepcopy(model).double()
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(4))
    m = probe_module(model, x.to(dtype), _low_loss, blocks=[(str(i), b) for i, b in enumerate(model)])
    xr = x.to(dtype).double().requires_grad_()
    out = wide(xr)
    z = torch.randn(out.shape, generator=torch.Generator().manual_seed(6)).to(dtype).double()
    (out * z).sum().backward()
    exact = float(xr.grad.norm() / z.norm())  # type: ignore[union-attr]
    assert m.growth == pytest.approx(exact, rel=4 * math.sqrt(depth) * unit)
    assert exact == pytest.approx(g**depth, rel=4 * math.sqrt(depth) * unit)
