"""The rescaling invariant: scaling the loss by c > 0 scales every gradient by c (backward is linear in
its upstream gradient), to within the rounding error a float64 re-run measures."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from stabilitycheck.errors import no_trainable
from stabilitycheck.invariants_common import (
    ACC,
    Named,
    check_factor,
    coarsest,
    fail,
    norms_of,
    positive,
    rtol_of,
    state_kept,
    subnormal_spacing,
    to64,
)
from stabilitycheck.losses import Inputs, LossFn, seeded_loss


def _gradients(
    model: nn.Module, inputs: Inputs, loss_fn: LossFn, scale: float, seed: int
) -> tuple[float, Named]:
    """The loss and the parameter gradients of scale x loss, computed from fresh (None) grads."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise no_trainable("assert_rescaling_equivariant")
    for _, p in params:
        p.grad = None
    loss = seeded_loss(model, inputs, loss_fn, seed)
    (loss * scale).backward()  # type: ignore[no-untyped-call]
    grads = [(n, p.grad.detach().clone()) for n, p in params if p.grad is not None]
    return float(loss.detach().to(ACC)), grads


def _rounding_error(
    model: nn.Module, inputs: Inputs, loss_fn: LossFn, grads: Named, seed: int, scale: float = 1.0
) -> tuple[list[float], list[float]]:
    """Per tensor, how far `grads` (the gradients of scale x loss) are from a float64 re-run of the
    same scale: the rounding error they carry, capped at sqrt(eps) of their norm (beyond that it is
    not rounding), and the error uncapped (a gradient that underflowed to 0 through a float16 layer:
    all of it). The model is converted in place and back (exact), so its hooks and modules are
    the ones that ran: a backward that is not linear is so in float64 too, and no rounding. Where the
    model cannot run in float64 (a hook casting its gradient to float32: autograd refuses the changed
    type), the error is taken at its cap: that model is no finding of this check."""
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    if all(t.dtype == ACC for t in tensors):
        return [0.0] * len(grads), [0.0] * len(grads)
    dtypes = [t.dtype for t in tensors]
    saved = [(p, p.grad) for p in model.parameters()]
    cap = math.sqrt(torch.finfo(coarsest(g for _, g in grads)).eps)
    sizes = norms_of([g for _, g in grads])
    try:
        for t in tensors:
            t.data = t.data.to(ACC)
        _, exact = _gradients(model, to64(inputs), loss_fn, scale, seed)
    except (RuntimeError, TypeError):
        capped = [cap * n for n in sizes]
        return capped, capped
    finally:
        for t, dtype in zip(tensors, dtypes, strict=True):
            t.data = t.data.to(dtype)
        for p, g in saved:
            p.grad = g
    if [n for n, _ in exact] != [n for n, _ in grads]:
        return [0.0] * len(grads), [0.0] * len(grads)
    errors = norms_of([g.to(ACC) - e.to(g.device) for (_, g), (_, e) in zip(grads, exact, strict=True)])
    # where the float64 gradient is smaller than the error and a rounding's share (sqrt(eps)) of the
    # total gradient norm, the gradient is mostly rounding: terms that cancel (a bias before a
    # BatchNorm, exactly 0 in theory) leave noise on the scale of the terms, which its own norm does
    # not bound (capped, torch's own backward failed at inputs x 1e-3); not one of unit norm that a
    # hook normalising it made (a review: uncapped, that bug passed)
    floats = norms_of([e for _, e in exact])
    small = cap * math.sqrt(sum(x * x for x in floats))
    wide = [e > x and x <= small for e, x in zip(errors, floats, strict=True)]
    return [e if w else min(e, cap * n) for e, n, w in zip(errors, sizes, wide, strict=True)], errors


def assert_rescaling_equivariant(
    model: nn.Module,
    inputs: Inputs,
    loss_fn: LossFn,
    c: float,
    *,
    seed: int = 0,
    rtol: float | None = None,
) -> None:
    """Scaling the loss by c > 0 scales every gradient by c (direction kept): backward is linear in
    its upstream gradient. Fails for hooks or custom backwards that clamp, normalise or ignore it.
    Tolerance per tensor: c x (rtol of its norm + a share of the total gradient norm + 4 x its
    rounding error at c=1) + 4 x its rounding error at c, each measured against a float64 re-run of
    that scale and capped at sqrt(eps) of its norm, but where the float64 gradient is smaller than
    the error (mostly rounding: a bias before a BatchNorm, exactly 0), since a gradient summed from
    cancelling terms carries more than rtol of its own norm, and the run at c need not round alike:
    terms c x A and c x B that cancel are rounded apart (an exactly linear float32 model, A - B at
    c = 1 exact, failed at c = 3 by 6.8e-4 of its norm against an allowance of 6.2e-5). The share is
    the dtype's eps where the re-run measured the rounding, rtol where it could not (float64).
    The .grad fields and the buffers (a BatchNorm's running statistics) are restored."""
    __tracebackhide__ = True
    c = positive("c", c)
    with state_kept(model):
        _check_rescaling(model, inputs, loss_fn, c, seed, rtol)


def _check_rescaling(
    model: nn.Module, inputs: Inputs, loss_fn: LossFn, c: float, seed: int, rtol: float | None
) -> None:
    __tracebackhide__ = True
    saved = [(p, p.grad) for p in model.parameters()]
    try:
        loss, g1 = _gradients(model, inputs, loss_fn, 1.0, seed)
        _, gc = _gradients(model, inputs, loss_fn, c, seed)
    finally:
        for p, g in saved:
            p.grad = g
    if [n for n, _ in g1] != [n for n, _ in gc]:
        fail(
            f"Scaling the loss by c={c:g} changed which parameters get a gradient.",
            f"At c=1: {len(g1)} tensors; at c={c:g}: {len(gc)} tensors",
        )
    if not math.isfinite(loss):
        fail(f"The loss is not finite ({loss}), so no gradient rescaling can be checked.")
    rounding, _ = _rounding_error(model, inputs, loss_fn, g1, seed)
    rounding_c, lost = _rounding_error(model, inputs, loss_fn, gc, seed, c)
    # A gradient that cancels to (near) zero, e.g. a bias before a BatchNorm, is rounding noise on the
    # scale of the terms summed into it, not of its own norm: every tensor may be off by a share of the
    # total gradient norm as well, rtol of it where no float64 re-run measured the rounding (a float64
    # model), else the dtype's eps: rtol's, 1.6% in bfloat16, passed a clamping hook on tensors 0.25%
    # of the total (an audit), whose rounding the re-run measures
    total = math.sqrt(sum(n * n for n in norms_of([g for _, g in g1])))
    dtype = coarsest(g for _, g in g1)
    measured = any(t.dtype != ACC for t in (*model.parameters(), *model.buffers()) if t.is_floating_point())
    share = torch.finfo(dtype).eps if measured and dtype.is_floating_point else rtol_of(dtype)
    floor = (rtol if rtol is not None else share) * total
    # a gradient that passed through a coarser layer carries that layer's underflow, as far as the
    # float64 re-run measures it (a float32 one behind a float16 layer went to 0 at c = 2^-20, held to
    # float32's spacing), up to the coarsest spacing per element: not more, and not to a gradient no
    # coarse layer touched (the model-wide spacing hid a hook halving a float32 head's gradient)
    spacing = max(
        (subnormal_spacing(t.dtype) for t in model.parameters() if t.is_floating_point()), default=0.0
    )
    underflow = [min(spacing * math.sqrt(g.numel()), e) for e, (_, g) in zip(lost, gc, strict=True)]
    check_factor(
        g1,
        gc,
        c,
        f"Scaling the loss by c={c:g} did not scale every gradient by {c:g}." + _subnormal_hint(g1, c),
        rtol,
        [
            c * (4.0 * e + floor) + 4.0 * ec + u
            for e, ec, u in zip(rounding, rounding_c, underflow, strict=True)
        ],
    )


def _subnormal_hint(grads: Sequence[tuple[str, torch.Tensor]], c: float) -> str:
    """Where gradients times c < 1 fall below the smallest normal number of their floating dtype (any:
    float32's is 1.2e-38), they lose precision to subnormals, not to a non-linear backward: say so
    beside the failure."""
    dtype = coarsest(g for _, g in grads)
    if c >= 1 or not dtype.is_floating_point:
        return ""
    tiny = torch.finfo(dtype).smallest_normal
    if not any(bool((g.abs() * c < tiny).logical_and(g != 0).any()) for _, g in grads):
        return ""
    return (
        f" (In {str(dtype).removeprefix('torch.')}, gradients x {c:g} fall below {tiny:.3g}, among the "
        "subnormals, and lose precision: a c near 1 or above checks the same linearity.)"
    )
