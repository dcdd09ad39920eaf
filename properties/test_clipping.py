"""Norm and value clipping over every zoo family: torch's clipping contract, held as properties; and norm
clipping done wrong, five ways, each caught by the invariant given the gradients before clipping."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, event, given
from hypothesis import strategies as st
from torch import nn

from stabilitycheck.config import Config
from stabilitycheck.errors import StabilityError
from stabilitycheck.invariants import (
    assert_clipped_norm_bounded,
    assert_clipped_value_bounded,
    assert_direction_preserved,
    rtol_of,
    subnormal_spacing,
)
from stabilitycheck.strategies import configs
from stabilitycheck.subject import Built, torch_dtype
from stabilitycheck.zoo import Family

small = configs(max_depth=4, max_width=16, max_seq_len=6, max_batch_size=3, init_scales=(1.0, 0.5, 2.0))
max_norms = st.one_of(st.floats(-6, 6).map(lambda e: 10.0**e), st.sampled_from([1e-6, 1e6]))
"""Log-uniform from 1e-6 to 1e6 (shrinking to 1.0), plus both ends exactly."""


def build(c: Config) -> Built:
    """The zoo model, inputs and loss of `c`."""
    return Family(c.subject).build(c)


def backward(c: Config) -> tuple[nn.Module, list[torch.Tensor]]:
    """The model of `c` after one backward, and copies of its gradients (assumed finite)."""
    b = build(c)
    b.loss_fn(b.model(b.inputs), b.inputs).backward()
    grads = [p.grad.detach().clone() for p in b.model.parameters() if p.grad is not None]
    assume(all(bool(g.isfinite().all()) for g in grads))
    return b.model, grads


def total_norm(grads: list[torch.Tensor], norm_type: float) -> float:
    norms = torch.stack([torch.linalg.vector_norm(g, norm_type, dtype=torch.float64) for g in grads])
    return float(torch.linalg.vector_norm(norms, norm_type))


@given(small, max_norms, st.sampled_from([2.0, 1.0, math.inf]))
def test_norm_clipping_bounds_the_norm_and_keeps_the_direction(
    c: Config, max_norm: float, norm_type: float
) -> None:
    model, before = backward(c)
    returned = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, norm_type)
    pre = total_norm(before, norm_type)
    f16_max = torch.finfo(torch.float16).max
    if c.run.dtype == "float16" and pre > 2 * f16_max:
        # torch's own finding (tests/test_invariants.py): the float16 total norm overflows to Inf
        # past 65504 and every finite gradient is multiplied by max_norm / Inf = 0. The contract check
        # must catch it wherever the correctly clipped gradients are above float16's resolution.
        event("float16 total norm past 65504: torch zeroes the gradients")
        assert math.isinf(float(returned))
        if max_norm >= 1e-2:
            with pytest.raises(StabilityError, match="not clipped correctly"):
                assert_clipped_norm_bounded(model, max_norm, norm_type, before=before)
        return
    assume(c.run.dtype != "float16" or pre < f16_max / 2)  # near 65504 float16 rounding decides
    assert math.isclose(float(returned), pre, rel_tol=4 * rtol_of(torch_dtype(c.run.dtype)))
    event(f"clipped: {max_norm < pre}")
    coef = min(1.0, max_norm / (pre + 1e-6))
    largest = max(float(g.abs().max()) for g in before) * coef
    spacing = subnormal_spacing(torch_dtype(c.run.dtype))
    if float(max_norm / (returned + 1e-6)) == 0 and largest >= spacing:
        # torch's own finding: it computes the coefficient in the gradients' dtype, where below
        # half float16's smallest subnormal (3e-8) it rounds to 0 and every gradient is zeroed,
        # though the correctly clipped largest entry is representable. The check must catch it.
        event("float16 clip coefficient underflows: torch zeroes the gradients")
        with pytest.raises(StabilityError, match="Every gradient is zero after clipping"):
            assert_clipped_norm_bounded(model, max_norm, norm_type, before=before)
        return
    assert_clipped_norm_bounded(model, max_norm, norm_type, before=before, returned=returned)
    if largest < spacing:  # the right answer is all zeros: no direction
        event("every clipped entry underflows the dtype")
        return
    assert_direction_preserved(before, [p.grad for p in model.parameters() if p.grad is not None])


@given(small, st.floats(0.05, 0.95))
def test_value_clipping_bounds_entries_and_turns_the_direction(c: Config, quantile: float) -> None:
    """Value clipping at a quantile of |g| shrinks the entries above it (ratio < 1) and keeps the rest
    (ratio 1): when some entry is over twice the clip value and one under it is more than the dtype
    resolves near zero (a few subnormal spacings per element, the check's absolute allowance), no
    common factor exists, so the direction check must fail. (A float16 clip value at the subnormal
    spacing, 6e-8, leaves every entry at +-6e-8: no direction is left to check, and none is failed.)"""
    model, before = backward(c)
    flat = torch.cat([g.reshape(-1).to(torch.float64).abs() for g in before])
    clip_value = float(torch.quantile(flat, quantile))
    assume(clip_value > 0)
    resolved = 4 * subnormal_spacing(torch_dtype(c.run.dtype)) * math.sqrt(flat.numel())
    torch.nn.utils.clip_grad_value_(model.parameters(), clip_value)
    assert_clipped_value_bounded(model, clip_value, before=before)
    after = [p.grad for p in model.parameters() if p.grad is not None]
    if not bool((flat > clip_value).any()):
        assert_direction_preserved(before, after)
    elif bool((flat > 2 * clip_value).any()) and bool(((flat > resolved) & (flat <= clip_value)).any()):
        with pytest.raises(StabilityError, match="not rescaled by one common factor"):
            assert_direction_preserved(before, after)


@given(small, st.sampled_from([math.inf, -math.inf, math.nan]), st.data())
def test_nonfinite_gradients_raise_with_error_if_nonfinite_and_are_named_without(
    c: Config, value: float, data: st.DataObject
) -> None:
    model, _ = backward(c)
    params = [p for p in model.parameters() if p.grad is not None]
    target = params[data.draw(st.integers(0, len(params) - 1), label="tensor")]
    with torch.no_grad():
        target.grad.view(-1)[data.draw(st.integers(0, target.numel() - 1), label="entry")] = value  # type: ignore[union-attr]
    poisoned = [p.grad.clone() for p in params]  # type: ignore[union-attr]
    with pytest.raises(RuntimeError, match="non-finite"):
        torch.nn.utils.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    for p, g in zip(params, poisoned, strict=True):  # it raised before touching any gradient
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0, equal_nan=True)
    torch.nn.utils.clip_grad_norm_(params, 1.0)  # the default: no error, NaN everywhere it can
    with pytest.raises(StabilityError, match="Gradients after clipping are not finite"):
        assert_clipped_norm_bounded(model, 1.0, before=poisoned)


def _grads(seed: int, micro: int = 1) -> tuple[list[nn.Parameter], list[list[torch.Tensor]]]:
    """A float64 MLP's parameters and the gradients of `micro` micro-batches (inputs x1, x1.5, ...)."""
    c = Config.of("mlp", depth=3, width=16, batch_size=4, init_scale=1.0).with_run(seed=seed, dtype="float64")
    b = build(c)
    params = list(b.model.parameters())
    per = []
    for k in range(micro):
        for p in params:
            p.grad = None
        b.loss_fn(b.model(b.inputs * (1 + 0.5 * k)), b.inputs).backward()
        per.append([p.grad.detach().clone() for p in params])  # type: ignore[union-attr]
    return params, per


def _clip(gs: list[torch.Tensor], m: float) -> list[torch.Tensor]:
    """torch's norm clipping written out: every gradient times min(1, m / (total + 1e-6))."""
    c = min(1.0, m / (total_norm(gs, 2.0) + 1e-6))
    return [g * c for g in gs]


MUTANTS = {  # norm clipping done wrong, as one might write it
    "per_parameter": lambda gs, m: [g * min(1.0, m / (float(g.norm()) + 1e-6)) for g in gs],
    "by_max_abs": lambda gs, m: [g * min(1.0, m / (total_norm(gs, math.inf) + 1e-6)) for g in gs],
    "unclamped": lambda gs, m: [g * (m / (total_norm(gs, 2.0) + 1e-6)) for g in gs],
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
    """Pascanu et al. 2013's rescaling of the whole gradient, against clipping per parameter, by the largest
    entry, without the min(1, .), by value, or before the last micro-batch's gradient is added: each leaves
    gradients that differ from torch's, and the invariant given the gradients before clipping fails them."""
    params, (g1, g2) = _grads(seed, micro=2)
    full = [a + b for a, b in zip(g1, g2, strict=True)]
    m = total_norm(full, 2.0) * frac
    ref = _clip(full, m)
    if name == "clip_before_last_accumulation":
        after = [a + b for a, b in zip(_clip(g1, m), g2, strict=True)]
    else:
        after = MUTANTS[name](full, m)
    differs = total_norm([a - r for a, r in zip(after, ref, strict=True)], 2.0)
    assert differs > 1e-4 * m  # from torch's
    for p, a in zip(params, after, strict=True):
        p.grad = a.clone()
    with pytest.raises(StabilityError):
        assert_clipped_norm_bounded(params, m, before=full)
    # and torch's own clip of the same gradients passes
    for p, g in zip(params, full, strict=True):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(params, m)
    assert_clipped_norm_bounded(params, m, before=full)
