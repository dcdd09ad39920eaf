"""The rescaling invariant: scaling the loss by c > 0 scales every gradient by c (backward is linear in
its upstream gradient), to within the rounding error a float64 re-run measures."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from stabilitycheck._tree import tree_map
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


def _to64(inputs: Inputs) -> Inputs:
    """`inputs` with every floating tensor in float64, at any depth of its containers."""
    return tree_map(lambda t: t.to(ACC) if t.is_floating_point() else t, inputs)


def _float64_gradients(
    model: nn.Module, inputs: Inputs, loss_fn: LossFn, seed: int, scale: float
) -> Named | None:
    """The gradients of scale x loss from a float64 re-run, or None where the model cannot run in
    float64 (a hook casting its gradient to float32: autograd refuses the changed type). The model is
    converted in place and back (exact), so its hooks and modules are the ones that ran: a backward
    that is not linear is so in float64 too, and no rounding."""
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    dtypes = [t.dtype for t in tensors]
    saved = [(p, p.grad) for p in model.parameters()]
    try:
        for t in tensors:
            t.data = t.data.to(ACC)
        return _gradients(model, _to64(inputs), loss_fn, scale, seed)[1]
    except (RuntimeError, TypeError):
        return None
    finally:
        for t, dtype in zip(tensors, dtypes, strict=True):
            t.data = t.data.to(dtype)
        for p, g in saved:
            p.grad = g


def _linear_in_float64(grads: Named, exact1: Named, exactc: Named, c: float) -> bool:
    """Whether the float64 re-runs scale by c to within the rtol of each gradient's own dtype, of its
    norm plus the total's (a gradient that cancels to zero is rounding noise on the total's scale; a
    loss computed in float32 rounds its float64 re-run to about float32's eps): a backward linear in
    exact arithmetic, so what the model's dtypes lose beyond that is rounding. A non-linear hook (a
    clamp, a noise draw, an offset) moves the float64 gradients by more than that."""
    sizes = norms_of([e for _, e in exact1])
    total = math.sqrt(sum(n * n for n in sizes))
    moved = norms_of([ec - c * e1 for (_, e1), (_, ec) in zip(exact1, exactc, strict=True)])
    rtols = [rtol_of(g.dtype) for _, g in grads]
    return all(m <= r * c * (n + total) for m, n, r in zip(moved, sizes, rtols, strict=True))


def _errors(grads: Named, exact: Named | None) -> list[float]:
    """Per tensor, how far `grads` are from their float64 re-run (inf where there is none)."""
    if exact is None:
        return [math.inf] * len(grads)
    return norms_of([g.to(ACC) - e.to(g.device) for (_, g), (_, e) in zip(grads, exact, strict=True)])


def _rounding_errors(
    model: nn.Module, inputs: Inputs, loss_fn: LossFn, g1: Named, gc: Named, seed: int, c: float
) -> tuple[list[float], list[float], list[float]]:
    """The rounding error each gradient carries at c = 1 and at c, measured against a float64 re-run
    of each, and the error at c uncapped (a gradient that underflowed to 0 through a float16 layer: all
    of it). Where the float64 re-runs are linear, the rounding at c = 1 is taken whole (a model whose
    forward cancels, a BatchNorm over inputs x 1e-3, carried 1e-4 of each norm and 6e-3 of a bias's)
    and the one at c up to twice c times it (beyond that it is underflow, not rounding); else, or
    where the model cannot run in float64, each is capped at sqrt(eps) of its norm, for beyond that
    it is not rounding."""
    if all(t.dtype == ACC for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()):
        zeros = [0.0] * len(g1)
        return zeros, zeros, zeros
    exact1 = _float64_gradients(model, inputs, loss_fn, seed, 1.0)
    exactc = _float64_gradients(model, inputs, loss_fn, seed, c)
    names = [n for n, _ in g1]
    if any(e is not None and [n for n, _ in e] != names for e in (exact1, exactc)):
        zeros = [0.0] * len(g1)
        return zeros, zeros, zeros
    e1, ec = _errors(g1, exact1), _errors(gc, exactc)
    cap = math.sqrt(torch.finfo(coarsest(g for _, g in g1)).eps)
    caps1 = [cap * n for n in norms_of([g for _, g in g1])]
    capsc = [cap * n for n in norms_of([g for _, g in gc])]
    if exact1 is not None and exactc is not None and _linear_in_float64(g1, exact1, exactc, c):
        return e1, [min(e, max(k, 2.0 * c * r)) for e, k, r in zip(ec, capsc, e1, strict=True)], ec
    capped1 = [min(e, k) for e, k in zip(e1, caps1, strict=True)]
    cappedc = [min(e, k) for e, k in zip(ec, capsc, strict=True)]
    return capped1, cappedc, [k if math.isinf(e) else e for e, k in zip(ec, capsc, strict=True)]


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
    Tolerance per tensor: c x (rtol of its norm + rtol of the total gradient norm + 4 x its rounding
    error at c=1) + 4 x its rounding error at c, each measured against a float64 re-run of that scale
    (capped at sqrt(eps) of its norm where those re-runs do not scale by c: see _rounding_errors),
    since a gradient summed from cancelling terms carries more than rtol of its own norm, and the run
    at c need not round alike: terms c x A and c x B that cancel are rounded apart (an exactly linear
    float32 model, A - B at c = 1 exact, failed at c = 3 by 6.8e-4 of its norm against an allowance
    of 6.2e-5).
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
    rounding, rounding_c, lost = _rounding_errors(model, inputs, loss_fn, g1, gc, seed, c)
    # A gradient that cancels to (near) zero, e.g. a bias before a BatchNorm, is rounding noise on the
    # scale of the terms summed into it, not of its own norm: every tensor may be off by rtol of the
    # total gradient norm as well (a bug that matters moves a tensor by more than that).
    floor = (rtol if rtol is not None else rtol_of(coarsest(g for _, g in g1))) * math.sqrt(
        sum(n * n for n in norms_of([g for _, g in g1]))
    )
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
