"""Invariants of gradient clipping: norm clipping bounds the total norm and keeps the direction, value
clipping bounds every entry, a rescaling keeps every gradient's direction, and clip_grad_norm_ returns
the full-model norm under torch.distributed."""

from __future__ import annotations

import functools as ft
import math
from collections.abc import Iterable, Mapping, Sequence

import torch

from stabilitycheck.distributed import full_grad_norm, local, world
from stabilitycheck.errors import StabilityError, UsageError
from stabilitycheck.invariants_common import (
    TensorsLike,
    check_factor,
    coarsest,
    fail,
    grads_of,
    named_tensors,
    norm_type_of,
    norms_of,
    positive,
    reduction_error,
    require_aligned,
    require_dense,
    require_finite,
    require_kept,
    rtol_of,
    subnormal_spacing,
    torch_total,
    total_of,
)


def assert_clipped_norm_bounded(
    parameters: TensorsLike,
    max_norm: float,
    norm_type: float = 2.0,
    before: Sequence[torch.Tensor] | None = None,
    *,
    rtol: float | None = None,
    returned: float | torch.Tensor | None = None,
) -> None:
    """After norm clipping: every gradient finite and the total norm <= max_norm (torch's contract:
    grads x min(1, max_norm / (total + 1e-6))); with `before`, the pre-clip gradients in the order of
    the parameters that have a .grad, also that clipping scaled them all by one coefficient between
    torch's and the exact min(1, max_norm / total) (so a clip per tensor fails: its factors differ),
    and changed nothing where the total was within max_norm. `returned` (with `before`): what the clip
    returned, which must be the total norm before clipping, as clip_grad_norm_'s is (a clip returning
    the clipped norm shows every logged spike at max_norm)."""
    __tracebackhide__ = True
    if returned is not None and before is None:
        raise UsageError(
            "returned= is checked against the total norm before clipping: pass before= too, "
            "[p.grad.detach().clone() for p in params if p.grad is not None] taken before clipping"
        )
    max_norm = positive("max_norm", max_norm)
    norm_type = norm_type_of(norm_type)
    named = named_tensors(parameters, "parameters")
    grads = grads_of(named)
    header = f"Gradients after clipping to max_norm={max_norm:g} are not clipped correctly."
    require_finite(
        grads,
        "Gradients after clipping are not finite.",
        "A non-finite gradient is a finding, not something to clip: "
        "use clip_grad_norm_(..., error_if_nonfinite=True).",
    )
    dtype = coarsest(g for _, g in grads)
    # torch rounds max_norm, the total, total + 1e-6, their quotient and each product in the gradient
    # dtype: up to 5 roundings of eps / 2, more than rtol alone allows in half precision.
    tol = rtol if rtol is not None else rtol_of(dtype) + 2.5 * torch.finfo(dtype).eps
    spacing = max(subnormal_spacing(g.dtype) for _, g in grads)  # float16's, beside bfloat16's finer one
    norms = norms_of([g for _, g in grads], norm_type)
    total = total_of(norms, norm_type)
    # torch sums the total in the gradients' dtype: over many elements its own rounding (1e-5 relative
    # for 1e6 float32 values, 1e-3 for an L1 norm of 4e6) moves the clipped norm off max_norm by as
    # much. Measured here on these gradients, with torch's own reduction, and allowed twice over.
    rounding = reduction_error([g for _, g in grads], norm_type, total)
    numel = sum(g.numel() for _, g in grads)
    # products that land among the subnormals, each off by up to half a spacing: by Minkowski, a
    # p-norm (p >= 1) of those errors is at most spacing / 2 x numel^(1/p) (sqrt for L2, all for L1)
    slack = spacing * numel ** (1 / max(norm_type, 1.0))
    coef = math.nan
    if before is not None:
        require_kept(named, before, "Clipping")
        if len(before) != len(grads):
            zeros = sum(not bool(g.any()) for _, g in grads)
            made = len(grads) - len(before)
            raise UsageError(
                f"before has {len(before)} tensors but {len(grads)} parameters have a .grad; pass "
                "[p.grad.detach().clone() for p in params if p.grad is not None] taken before clipping"
                + (
                    f"; or the clipping gave a gradient to {made} parameters that had none ({zeros} "
                    "gradients are all zero now): a clip must leave a missing gradient missing (under "
                    "AdamW a zero gradient still decays its weight)"
                    if 0 < made <= zeros
                    else ""
                )
            )
        pre = named_tensors(list(before), "before")
        pre = [(name, b) for (name, _), (_, b) in zip(grads, pre, strict=True)]
        require_aligned(grads, [b for _, b in pre])
        require_finite(
            pre,
            "Gradients before clipping are not finite, yet clipping returned finite ones.",
            "Clipping hid a blow-up: use clip_grad_norm_(..., error_if_nonfinite=True).",
        )
        total_before = total_of(norms_of([b for _, b in pre], norm_type), norm_type)
        rounding = max(rounding, reduction_error([b for _, b in pre], norm_type, total_before))
        coef = min(1.0, max_norm / (total_before + 1e-6))
        slack += spacing * total_before  # the coefficient itself rounds to a subnormal in half precision
    tol += 2 * rounding
    bound = max_norm * (1 + tol) + slack
    if total > bound:
        over = [i for i, n in enumerate(norms) if n > max_norm * (1 + tol) + slack]
        worst = max(range(len(norms)), key=lambda i: norms[i])
        fail(
            header,
            f"Total {norm_type:g}-norm after clipping: {total:.9g} (allowed: <= {bound:.9g}, "
            f"max_norm {max_norm:g} with rtol {tol:.2g}, torch's own rounding of the total included)",
            f"Tensors over bound on their own: {len(over)} / {len(norms)}",
            f"Largest: {grads[worst][0]!r} with norm {norms[worst]:.6g} (bound allowed {bound:.6g})",
        )
    if before is None:
        return
    if returned is not None:
        overflowed = not math.isfinite(torch_total([b for _, b in pre], norm_type))
        _check_returned(float(returned), total_before, norm_type, tol, overflowed)
    # torch's clip_coef saturates at 1; an all-zero gradient is zero after any clip
    if total_before == 0 or max_norm >= (total_before + 1e-6) * (1 + 4 * tol):
        changed = [
            name
            for (name, g), b in zip(grads, before, strict=True)
            if not torch.equal(g, b.to(g.device, g.dtype))
        ]
        if changed:
            fail(
                header,
                f"The total norm before clipping was {total_before:.6g} <= max_norm {max_norm:g}, "
                "so clipping must leave every gradient unchanged",
                f"Tensors changed: {len(changed)} / {len(grads)}; first: {changed[0]!r}",
            )
        return
    largest = max((float(b.abs().max()) for _, b in pre if b.numel()), default=0.0) * coef
    if total == 0 and total_before > 0 and largest >= spacing:  # else the right answer underflows to 0
        fail(
            header,
            f"Every gradient is zero after clipping, though the total norm before was "
            f"{total_before:.6g} (finite); expected them x {coef:.6g}",
            "clip_grad_norm_ does this when its coefficient max_norm / total is 0 in the gradient "
            "dtype (the total overflows it, or the coefficient underflows it): compute both in a "
            "wider dtype",
        )
    # torch's coefficient max_norm / (total + 1e-6) and the exact max_norm / total are both right:
    # the factor the gradients were scaled by (least squares) may lie anywhere between them, or off
    # them by the coefficient's own rounding (the total's, measured, and its dtype's: every tensor's
    # alike); each tensor may then be off that one factor by its own dtype's rounding alone
    exact = min(1.0, max_norm / total_before)
    wide = ft.reduce(torch.promote_types, (g.dtype for _, g in grads))  # the total's and coefficient's
    band = 2 * rounding + (rtol if rtol is not None else 2.5 * torch.finfo(wide).eps)
    pre_named = [(name, b) for (name, _), b in zip(grads, before, strict=True)]
    # each product rounds once in the gradient's dtype (the coefficient's roundings are in the band):
    # 2.5 eps of bfloat16 beside its rtol let a bfloat16 gradient 3.5% off pass
    own = [(rtol if rtol is not None else rtol_of(g.dtype)) + torch.finfo(g.dtype).eps / 2 for _, g in grads]
    check_factor(
        pre_named,
        grads,
        None,
        f"{header} Expected every gradient x c, c from {coef:.6g} = max_norm / (total before "
        f"{total_before:.6g} + 1e-6) (torch's) to {exact:.6g} = max_norm / total (exact).",
        [
            t + subnormal_spacing(g.dtype) / coef if coef > 0 else t
            for t, (_, g) in zip(own, grads, strict=True)
        ],
        band=(coef / (1 + band), exact * (1 + band)),  # above 0 however far torch's total rounded
    )


def _check_returned(
    returned: float, total_before: float, norm_type: float, tol: float, overflowed: bool
) -> None:
    """The clip's return value is the total norm before clipping, within `tol` (torch's own rounding
    of it included); inf only where torch's own total overflows (`torch_total`: float16 past 65504,
    float32 squares past 3.4e38), which zeroes every gradient, a failure said below as such (an inf
    here read as 'a clip returning the norm after it')."""
    if math.isinf(returned) and overflowed:
        return
    if not abs(returned - total_before) <= tol * total_before:
        fail(
            "The clip returned another value than the total norm before clipping.",
            f"Returned {returned:.9g}; the total {norm_type:g}-norm of before= is {total_before:.9g} "
            f"(allowed: within rtol {tol:.2g})",
            "clip_grad_norm_ returns the norm before clipping, what a log of gradient spikes reads: a "
            "clip returning the norm after it shows every spike capped at max_norm",
        )


def assert_clipped_value_bounded(
    parameters: TensorsLike, clip_value: float, before: Sequence[torch.Tensor] | None = None
) -> None:
    """After value clipping: every gradient finite and every entry within [-clip_value, clip_value];
    with `before`, also that non-finite entries were not clipped into finite ones and that each
    entry equals before.clamp(-clip_value, clip_value) (clamping is exact, no tolerance)."""
    __tracebackhide__ = True
    clip_value = positive("clip_value", clip_value)
    named = named_tensors(parameters, "parameters")
    grads = grads_of(named)
    if before is not None:
        require_kept(named, before, "Value clipping")
        if len(before) != len(grads):
            raise UsageError(
                f"before has {len(before)} tensors but {len(grads)} parameters have a .grad; pass "
                "[p.grad.detach().clone() for p in params if p.grad is not None] taken before clipping"
            )
        require_aligned(grads, before)
        require_finite(
            [(name, b) for (name, _), b in zip(grads, before, strict=True)],
            "Gradients before value clipping are not finite; clipping hides that.",
            "clip_grad_value_ maps Inf to +-clip_value: check the gradients are finite before clipping.",
        )
    require_finite(grads, "Gradients after value clipping are not finite.")
    dtype = coarsest(g for _, g in grads)
    # clip_value itself rounds to the gradient dtype: relatively, or absolutely in the subnormal range
    rounded = torch.tensor(clip_value, dtype=torch.float64).to(dtype).item()
    bound = max(clip_value * (1 + rtol_of(dtype)), rounded)
    peaks = norms_of([g for _, g in grads], math.inf)
    over = [i for i, p in enumerate(peaks) if p > bound]
    if over:
        worst = max(over, key=lambda i: peaks[i])
        fail(
            f"Gradients after value clipping exceed clip_value={clip_value:g}.",
            f"Tensors over bound: {len(over)} / {len(grads)}",
            f"Worst: {grads[worst][0]!r} with largest |entry| {peaks[worst]:.6g} (allowed: <= {bound:.6g})",
        )
    if before is None:
        return
    wrong = [
        name
        for (name, g), b in zip(grads, before, strict=True)
        if not torch.equal(g, b.to(g.device).clamp(-clip_value, clip_value).to(g.dtype))
    ]
    if wrong:
        fail(
            f"Gradients after value clipping differ from before.clamp(-{clip_value:g}, {clip_value:g}).",
            f"Tensors differing: {len(wrong)} / {len(grads)}; first: {wrong[0]!r}",
        )


def assert_direction_preserved(
    before: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
    after: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
    *,
    rtol: float | None = None,
) -> float:
    """`after` is `before` rescaled by ONE common factor s >= 0 (every cosine 1, every ratio s): true
    of norm clipping, false of value clipping and per-tensor clipping. Returns s. An all-zero `after`
    of a nonzero `before` fails: it keeps no direction (s = 0 is allowed only when before is zero).
    Two mappings are paired by key (in any order)."""
    __tracebackhide__ = True
    b, a = named_tensors(before, "before"), named_tensors(after, "after")
    require_dense(b, "before's")
    require_dense(a, "after's")
    if isinstance(after, Mapping) and isinstance(before, Mapping):  # paired by key, not by position
        if set(after) != set(before):
            missing, extra = sorted(set(before) - set(after)), sorted(set(after) - set(before))
            raise UsageError(
                f"before and after must name the same tensors: only in before {missing[:3]}, only in "
                f"after {extra[:3]}"
            )
        a = [(name, after[name]) for name, _ in b]
    elif isinstance(after, Mapping) and len(a) == len(b):
        b = [(name, t) for (name, _), (_, t) in zip(a, b, strict=True)]  # name both by after's keys
    return check_factor(
        b, a, None, "Gradients were not rescaled by one common factor: direction changed.", rtol
    )


def check_clip_grad_norm(parameters: Iterable[torch.Tensor], rtol: float | None = None) -> float:
    """Invariant: torch.nn.utils.clip_grad_norm_ (with an infinite max norm: nothing is scaled) returns
    the full-model gradient norm on every rank: within torch's own rounding of it (its per-tensor norms
    then their norm, measured on this rank's gradients and allowed twice, plus the dtype's tolerance)
    unless `rtol` is given; a non-finite norm as non-finite (inf for Inf gradients, NaN for NaN). The
    gradients are left as they were (an infinite max norm multiplies them by inf / inf = NaN when one
    is non-finite). Raises StabilityError with both numbers if not, and a UsageError where torch's
    clip cannot handle the parameters (e.g. DTensors on different meshes)."""
    params = list(parameters)  # a generator would be used up by the first norm
    grads = [p.grad for p in params if p.grad is not None]
    saved = [g.detach().clone() for g in grads]
    expected = full_grad_norm(params)
    try:
        got = torch.nn.utils.clip_grad_norm_(params, math.inf)
    except (RuntimeError, ValueError, NotImplementedError) as exc:
        raise UsageError(
            f"clip_grad_norm_ cannot combine these parameters ({str(exc).splitlines()[0]}); group them "
            "by mesh and clip each group, or compute the norm with stabilitycheck.distributed"
        ) from None
    finally:
        with torch.no_grad():
            for grad, before in zip(grads, saved, strict=True):
                grad.copy_(before)
    from torch.distributed.tensor import DTensor

    value = float(got.full_tensor() if isinstance(got, DTensor) else got)
    if not math.isfinite(expected):
        if math.isnan(value) == math.isnan(expected) and (math.isnan(value) or value == expected):
            return value
    else:
        shards = [local(g)[0].detach() for g in grads]
        mine = math.sqrt(sum(float(t.double().pow(2).sum()) for t in shards))
        rounding = rtol_of(coarsest(shards)) + 2 * reduction_error(shards, 2.0, mine)
        tol = rtol if rtol is not None else rounding
        if math.isclose(value, expected, rel_tol=tol):
            return value
    grads_here = [local(g)[0].detach() for g in grads]
    if math.isinf(value) and math.isfinite(expected) and not math.isfinite(torch_total(grads_here, 2.0)):
        raise StabilityError(
            f"clip_grad_norm_ returned {value:.9g} but the full-model gradient norm is {expected:.9g}: "
            "torch's total overflowed (its per-tensor norms, taken in the gradients' dtypes, read inf of "
            "finite gradients: float32 squares past 3.4e38, a float16 norm past 65504), and a clip by it "
            "zeroes every gradient; compute the norm in float64 or scale the loss down"
        )
    raise StabilityError(
        f"clip_grad_norm_ returned {value:.9g} but the full-model gradient norm is {expected:.9g} "
        f"(rank {world()[0]} of {world()[1]}; a local-shard norm?)"
    )
