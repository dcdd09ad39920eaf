"""Theory guards from an audit: broken norm clipping is caught, orthogonal deep linear stacks grow by g^L
in every dtype, residual stacks by (1 + alpha^2 s^4 c)^(L/2) in mean square, the tanh mean field to 1e-6,
GELU at sqrt 2 is ordered, the tanh RNN obeys Pascanu's bound, and the seed rule's spread is the
nearest-rank quantile. Oracles:
torch's clip_grad_norm_, exact float64 products, a trapezoid integral, an exact expectation under Monte Carlo,
plain autograd."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from stabilitycheck import meanfield
from stabilitycheck.config import Config
from stabilitycheck.configprobe import probe
from stabilitycheck.errors import StabilityError
from stabilitycheck.invariants import assert_clipped_norm_bounded
from stabilitycheck.probing import probe_module
from stabilitycheck.seeds import assess
from stabilitycheck.zoo import Family, orthogonal


# -- 5. clipping mutants (Pascanu 2013)
def _grads(seed: int, micro: int = 1) -> tuple[list[nn.Parameter], list[list[torch.Tensor]]]:
    c = Config.of("mlp", depth=3, width=16, batch_size=4, init_scale=1.0).with_run(seed=seed, dtype="float64")
    b = Family("mlp").build(c)
    params = list(b.model.parameters())
    per = []
    for k in range(micro):
        for p in params:
            p.grad = None
        b.loss_fn(b.model(b.inputs * (1 + 0.5 * k)), b.inputs).backward()
        per.append([p.grad.detach().clone() for p in params])  # type: ignore[union-attr]
    return params, per


def _total(gs: list[torch.Tensor], p: float = 2.0) -> float:
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, p) for g in gs]), p))


def _clip(gs: list[torch.Tensor], m: float) -> list[torch.Tensor]:
    c = min(1.0, m / (_total(gs) + 1e-6))
    return [g * c for g in gs]


MUTANTS = {
    "per_parameter": lambda gs, m: [g * min(1.0, m / (float(g.norm()) + 1e-6)) for g in gs],
    "by_max_abs": lambda gs, m: [g * min(1.0, m / (_total(gs, math.inf) + 1e-6)) for g in gs],
    "unclamped": lambda gs, m: [g * (m / (_total(gs) + 1e-6)) for g in gs],
    "value_as_norm": lambda gs, m: [g.clamp(-m, m) for g in gs],
}


CASES = [
    *((name, frac) for name in ("per_parameter", "by_max_abs", "value_as_norm") for frac in (0.05, 0.5, 0.9)),
    *(("clip_before_last_accumulation", frac) for frac in (0.05, 0.5, 0.9)),
    ("unclamped", 1.5),  # the coefficient max_norm / total > 1 scales small gradients up
    ("unclamped", 3.0),
]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("name", "frac"), CASES)
def test_broken_norm_clipping_is_caught_with_before(seed: int, frac: float, name: str) -> None:
    params, (g1, g2) = _grads(seed, micro=2)
    full = [a + b for a, b in zip(g1, g2, strict=True)]
    m = _total(full) * frac
    ref = _clip(full, m)
    if name == "clip_before_last_accumulation":
        after = [a + b for a, b in zip(_clip(g1, m), g2, strict=True)]
    else:
        after = MUTANTS[name](full, m)
    assert _total([a - r for a, r in zip(after, ref, strict=True)]) > 1e-4 * m  # it differs from torch's
    for p, a in zip(params, after, strict=True):
        p.grad = a.clone()
    with pytest.raises(StabilityError):
        assert_clipped_norm_bounded(params, m, before=full)
    # and torch's own clip of the same gradients passes
    for p, g in zip(params, full, strict=True):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(params, m)
    assert_clipped_norm_bounded(params, m, before=full)


# -- 1. orthogonal deep linear, reduced precision
class _Lin(nn.Module):
    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T


@pytest.mark.parametrize(
    ("dtype", "rtol"), [(torch.float64, 1e-12), (torch.float32, 1e-6), (torch.bfloat16, 3e-3)]
)
def test_deep_linear_orthogonal_growth_is_g_to_the_depth(dtype: torch.dtype, rtol: float) -> None:
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


# -- 2. residual: E[growth^2] = (1 + alpha^2 s^4 c)^L
class _Res(nn.Module):
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


# -- 3. mean field to 1e-6; GELU at sqrt 2 is ordered
def _trap(f: Callable[[torch.Tensor], torch.Tensor], s: float) -> float:
    """E[f(s z)], z ~ N(0, 1), by the trapezoid rule in h = s z on [-14 s, 14 s], step <= 1e-3."""
    h = torch.linspace(-14 * s, 14 * s, int(max(400_001, 28 * s / 1e-3)) | 1, dtype=torch.float64)
    density = torch.exp(-0.5 * (h / s) ** 2) / (s * math.sqrt(2 * math.pi))
    return float((f(h) * density).sum() * (h[1] - h[0]))


@pytest.mark.parametrize("sigma", [0.5, 1.5, 3.75])
@pytest.mark.parametrize("q", [0.01, 1.0, 30.0])
def test_meanfield_tanh_step_matches_own_integral(sigma: float, q: float) -> None:
    q_next, chi = meanfield.step(sigma, "tanh", q)
    s = math.sqrt(q)
    assert q_next == pytest.approx(sigma**2 * _trap(lambda h: torch.tanh(h) ** 2, s), rel=1e-6)
    assert chi == pytest.approx(sigma**2 * _trap(lambda h: torch.cosh(h.clamp(-300, 300)) ** -4, s), rel=1e-6)


def test_zoo_gelu_at_its_critical_scale_is_ordered_with_gain_sqrt_half() -> None:
    """README: bias-free GELU at sqrt 2 is ordered, chi_1 -> sigma^2 GELU'(0)^2 = 1/2."""
    c = Config.of("mlp", depth=60, width=256, batch_size=32, init_scale=math.sqrt(2), activation="gelu")
    m = probe(c.with_run(dtype="float64"))
    deep = m.gains[40:]
    assert math.exp(sum(math.log(g) for g in deep) / len(deep)) == pytest.approx(math.sqrt(0.5), rel=0.02)


# -- 4. Pascanu's bound for the zoo's tanh RNN
@pytest.mark.parametrize("s", [0.5, 0.9, 1.5, 3.0])
def test_tanh_rnn_through_time_growth_is_at_most_s_to_the_t_minus_1(s: float) -> None:
    for seed in range(10):
        c = Config.of("rnn", activation="tanh", init_scale=s, seq_len=20, width=16, batch_size=4)
        c = c.with_run(seed=seed)
        assert probe(c, last_step=True).growth <= s**19 * (1 + 1e-5)


# -- 6. the seed rule's numbers from own autograd
def _own_growth(c: Config) -> float:
    b = Family(c.subject).build(c)
    x = b.inputs.clone().requires_grad_(True)
    h, last = x, x
    for layer in b.model.layers:
        h = layer(h)
        h.retain_grad()
        last = h
    b.loss_fn(b.model.ln_f(h), x).backward()
    return float(x.grad.double().norm() / last.grad.double().norm())  # type: ignore[union-attr]


@pytest.mark.parametrize(("seeds", "q"), [(5, 0.5), (8, 0.75), (8, 0.25)])
def test_assess_spread_is_the_nearest_rank_quantile_of_own_autograd(seeds: int, q: float) -> None:
    c = Config.of("resmlp", depth=22, init_scale=1.0, width=32, batch_size=8, norm="none", activation="relu")
    j = assess(c.with_run(seeds=seeds, quantile=q))
    own = sorted(_own_growth(c.with_run(seed=s)) for s in j.seeds)
    assert j.growth.mid == pytest.approx(own[max(1, math.ceil(q * len(own))) - 1], rel=1e-5)
    assert (j.growth.low, j.growth.high) == pytest.approx((own[0], own[-1]), rel=1e-5)
    again = assess(c.with_run(seeds=seeds, quantile=q))
    assert again.growth == j.growth and again.seeds == j.seeds
