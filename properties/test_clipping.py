"""Norm and value clipping over every zoo family: torch's clipping contract, held as properties."""

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
