"""float16 and bfloat16 against torch's own step: a step's first non-finite value is named where torch's
own forward, loss or backward first makes one, and the growth is the float64 growth of the rounded
weights within the dtype's rounding. Oracles: the same layers run by hand, autograd with retain_grad.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from stabilitycheck.probing import probe_module


def _ortho_stack(depth: int, g: float, seed: int, dtype: torch.dtype) -> nn.Sequential:
    """`depth` bias-free 32-wide layers of g x orthogonal, in `dtype`."""
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(depth):
        lin = nn.Linear(32, 32, bias=False)
        with torch.no_grad():
            lin.weight.copy_(nn.init.orthogonal_(torch.empty(32, 32), gain=g, generator=gen))
        layers.append(lin)
    return nn.Sequential(*layers).to(dtype)


def _low_loss(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """<z, output> with a fixed random z in the output's dtype."""
    z = torch.randn(out.shape, generator=torch.Generator().manual_seed(6)).to(out.dtype)
    return (out * z).sum()


def _fp16_case(depth: int, g: float, xscale: float, seed: int) -> tuple[nn.Sequential, torch.Tensor, object]:
    """A float16 stack, a copy of it before the probe, its input, and the probe's first non-finite value."""
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
