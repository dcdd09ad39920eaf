"""What the invariants share: tolerances per dtype, named tensors, norms in float64 brought to the host
together, assert_close-style failures, and the check that tensors are one common multiple of others."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn

import torch
from torch import nn

from stabilitycheck._tree import tree_map
from stabilitycheck.errors import StabilityError, UsageError

ACC = torch.float64

DTYPE_RTOL: dict[torch.dtype, float] = {
    torch.float16: 1e-3,
    torch.bfloat16: 1.6e-2,
    torch.float32: 1.3e-6,
    torch.float64: 1e-7,
}
"""Relative tolerance per dtype: torch.testing's _DTYPE_PRECISIONS rtol. Its atol is left out on
purpose (an absolute 1e-5 would wave through any max_norm below it); the absolute slack used instead
is `subnormal_spacing(dtype)` per element, the largest rounding error a value near zero can take."""

Named = list[tuple[str, torch.Tensor]]
TensorsLike = torch.Tensor | Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | nn.Module


def rtol_of(dtype: torch.dtype) -> float:
    """The relative tolerance of `dtype` (DTYPE_RTOL; float64's for dtypes not in the table)."""
    return DTYPE_RTOL.get(dtype, DTYPE_RTOL[torch.float64])


def subnormal_spacing(dtype: torch.dtype) -> float:
    """The gap between adjacent subnormals of `dtype`: how coarsely it rounds values near zero."""
    info = torch.finfo(dtype)
    return float(info.smallest_normal * info.eps)


def torch_total(tensors: Sequence[torch.Tensor], norm_type: float) -> float:
    """The total norm as clip_grad_norm_ computes it: each tensor's norm in its own dtype, then the
    norm of those (inf where float32 squares overflow: a total past 1.8e19, far below float32's max)."""
    norms = [torch.linalg.vector_norm(t.detach(), norm_type) for t in tensors]
    device = norms[0].device  # stack promotes to the widest dtype, as clip_grad_norm_'s does
    return float(torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), norm_type))


def reduction_error(tensors: Sequence[torch.Tensor], norm_type: float, exact: float) -> float:
    """How far the total norm torch computes (`torch_total`) is from `exact`, relative; 0 for an
    exact total of 0 or inf, or where torch's overflows."""
    if not tensors or exact == 0 or not math.isfinite(exact):
        return 0.0
    got = torch_total(tensors, norm_type)
    return abs(got - exact) / exact if math.isfinite(got) else 0.0


@contextmanager
def state_kept(model: nn.Module) -> Iterator[None]:
    """The model's parameters and buffers (a BatchNorm's running statistics) as they were, whatever
    runs inside: a check leaves the model it was given untouched."""
    kept = [(t, t.detach().clone()) for t in (*model.parameters(), *model.buffers())]
    try:
        yield
    finally:
        with torch.no_grad():
            for t, before in kept:
                t.copy_(before)


def fail(header: str, *lines: str) -> NoReturn:
    """Raise StabilityError with an assert_close-style message: a header, a blank line, the details.
    Like every helper that can fail, it hides its frame: a failure report ends at the user's call."""
    __tracebackhide__ = True
    raise StabilityError("\n".join((header, "", *lines)))


def named_tensors(tensors: Any, what: str) -> Named:
    """(name, tensor) pairs from a tensor, a Module (its named parameters), a Mapping, or an iterable
    of tensors or of (name, tensor) pairs; unnamed tensors are called '[i]'."""
    if isinstance(tensors, torch.Tensor):
        return [("[0]", tensors)]
    if isinstance(tensors, nn.Module):
        return list(tensors.named_parameters())
    if isinstance(tensors, Mapping):
        items = list(tensors.items())
    else:
        items = [t if isinstance(t, tuple) else (f"[{i}]", t) for i, t in enumerate(tensors)]
    for name, t in items:
        if not isinstance(t, torch.Tensor):
            raise UsageError(f"{what} must hold tensors, got {name}={type(t).__name__}")
    return [(str(n), t) for n, t in items]


def grads_of(parameters: TensorsLike) -> Named:
    """The gradients of `parameters` that have one, named like the parameters; none at all is a
    UsageError (the check passed with nothing to check: gradients passed for their parameters, or no
    backward run)."""
    named = named_tensors(parameters, "parameters")
    grads = [(name, p.grad) for name, p in named if p.grad is not None]
    require_dense(grads, "the gradient of")
    if not grads:
        raise UsageError(
            f"none of the {len(named)} parameters given has a .grad, so there is nothing to check: pass "
            "the parameters (model.parameters()), not their gradients, after backward() and the clip"
        )
    return grads


def host(values: Sequence[torch.Tensor]) -> list[float]:
    """Scalars to Python floats with one host synchronisation per device."""
    out: list[float] = [0.0] * len(values)
    by_device: dict[torch.device, list[int]] = {}
    for i, v in enumerate(values):
        by_device.setdefault(v.device, []).append(i)
    for idx in by_device.values():
        for i, f in zip(idx, torch.stack([values[i].reshape(()) for i in idx]).tolist(), strict=True):
            out[i] = float(f)
    return out


def to64(inputs: Any) -> Any:
    """`inputs` with every floating tensor in float64 (ACC), at any depth of its containers."""
    return tree_map(lambda t: t.to(ACC) if t.is_floating_point() else t, inputs)


def norms_of(tensors: Sequence[torch.Tensor], ord: float = 2.0) -> list[float]:
    """Per-tensor norms in float64 as Python floats; 0.0 for an empty tensor (torch's infinity norm
    of one raises)."""
    full = [t.detach() for t in tensors if t.numel()]
    values = iter(host(list(torch._foreach_norm(full, ord, dtype=ACC)))) if full else iter(())
    return [next(values) if t.numel() else 0.0 for t in tensors]


def norm_type_of(value: object) -> float:
    """A norm order torch's clip_grad_norm_ computes: a number > 0, or inf."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise UsageError(f"norm_type must be a number > 0 or math.inf (2.0: the L2 norm), got {value!r}")
    return float(value)


def total_of(norms: Sequence[float], ord: float) -> float:
    """The total norm of tensors with these per-tensor norms (NaN and Inf propagate)."""
    if not norms:
        return 0.0
    return float(torch.linalg.vector_norm(torch.tensor(norms, dtype=ACC), ord))


def coarsest(tensors: Iterable[torch.Tensor]) -> torch.dtype:
    """The floating dtype with the largest tolerance among `tensors` (float64 if none is floating)."""
    dtypes = [t.dtype for t in tensors if t.is_floating_point()]
    return max(dtypes, key=rtol_of, default=torch.float64)


def positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (0 < value < math.inf):
        raise UsageError(f"{name} must be a finite number > 0, got {name}={value!r}")
    return float(value)


def _describe_nonfinite(name: str, t: torch.Tensor) -> str:
    nan, inf = host([t.isnan().sum(), t.isinf().sum()])
    return f"{name!r} holds {int(nan)} NaN and {int(inf)} Inf of {t.numel()} values"


def require_aligned(grads: Named, before: Sequence[torch.Tensor]) -> None:
    """`before` holds one tensor of each gradient's shape, in order: a UsageError where one does not
    (a wrong before= read as a clip that changed a gradient, or raised torch's own size error)."""
    for i, ((name, g), b) in enumerate(zip(grads, before, strict=True)):
        if not isinstance(b, torch.Tensor) or b.shape != g.shape:
            shape = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
            raise UsageError(
                f"before[{i}] is {shape}, but the gradient of {name!r} it stands for is {tuple(g.shape)}: "
                "pass [p.grad.detach().clone() for p in params if p.grad is not None] taken before clipping"
            )


def require_dense(named: Named, what: str) -> None:
    """A sparse tensor among `named` is a one-line UsageError (torch's ops on them raised
    NotImplementedError from inside a check)."""
    sparse = next((name for name, t in named if t.layout != torch.strided), None)
    if sparse is not None:
        raise UsageError(
            f"{what} {sparse!r} is sparse (nn.Embedding(sparse=True)), which these checks do not read, as "
            "torch's clip_grad_norm_ does not clip it: pass the dense tensors only"
        )


def require_kept(named: Named, before: Sequence[torch.Tensor], what: str) -> None:
    """Fail where `before` held a gradient for each of the parameters `named` and the clip left some
    with none (p.grad = None): dropping a gradient hides its blow-up and stops the parameter training
    (a clip deleting the Inf one passed, or told the caller their `before` was wrong)."""
    __tracebackhide__ = True
    if len(before) != len(named):
        return
    gone = [(name, b) for (name, p), b in zip(named, before, strict=True) if p.grad is None]
    if gone:
        name, b = gone[0]
        was = "finite" if bool(b.isfinite().all()) else "not finite: " + _describe_nonfinite("it", b)
        fail(
            f"{what} removed the gradient of {len(gone)} parameter(s): .grad is None where it was set.",
            f"First: {name!r}, whose gradient before was {was}",
            "A clip scales every gradient and keeps it: one dropped hides a blow-up, and its parameter "
            "stops training.",
        )


def require_finite(named: Named, header: str, hint: str = "") -> None:
    """Fail with `header` when any tensor holds NaN or Inf, naming the first and counting them all."""
    __tracebackhide__ = True
    if not named:
        return
    finite = host([t.isfinite().all() for _, t in named])
    bad = [i for i, ok in enumerate(finite) if not ok]
    if bad:
        name, t = named[bad[0]]
        lines = [f"Non-finite tensors: {len(bad)} / {len(named)}", f"First: {_describe_nonfinite(name, t)}"]
        fail(header, *lines, *([hint] if hint else []))


def check_factor(
    before: Named,
    after: Named,
    factor: float | None,
    header: str,
    rtol: float | Sequence[float] | None,
    slack: Sequence[float] | None = None,
    band: tuple[float, float] | None = None,
) -> float:
    """Check after[i] == s * before[i] for one common s >= 0 (`factor`, or fitted: `_fitted`, within
    `band` where given); returns s. Each tensor may be off by rtol of its norm (one for all, one per
    tensor, or, None, its own dtype's: one bfloat16 tensor held every float32 one to bfloat16's 1.6%,
    a float32 gradient 3% off the clip's factor passing), a subnormal spacing of its dtype per element,
    and `slack[i]` (an absolute allowance in after's units)."""
    __tracebackhide__ = True
    if len(before) != len(after):
        raise UsageError(f"before has {len(before)} tensors but after has {len(after)}; pass them aligned")
    for (name, b), (_, a) in zip(before, after, strict=True):
        if b.shape != a.shape:
            fail(header, f"Shape changed: {name!r} was {tuple(b.shape)}, is {tuple(a.shape)}")
    require_finite(before, header + " (before is not finite, so no direction is defined)")
    require_finite(after, header + " (after is not finite)")
    bs = [b.detach().to(ACC) for _, b in before]
    as_ = [a.detach().to(ACC).to(b.device) for (_, a), b in zip(after, bs, strict=True)]
    # each pair over before's largest |entry| (the ratio is unchanged): float64 squares overflowed past
    # 1e154 (a NaN factor, any after passing) and underflowed below 1e-162 (a tensor of weight 0 held
    # to its rtol against the others' factor)
    peaks = host([b.abs().max() if b.numel() else torch.zeros((), dtype=ACC) for b in bs])
    flat = [
        (a.reshape(-1) / p, b.reshape(-1) / p) if p > 0 else (a.reshape(-1), b.reshape(-1))
        for a, b, p in zip(as_, bs, peaks, strict=True)
    ]
    products = host([torch.vdot(a, b) for a, b in flat] + [torch.vdot(b, b) for _, b in flat])
    dots, squares = products[: len(flat)], products[len(flat) :]
    pairs = list(zip(before, after, strict=True))
    if rtol is None:
        tols = [rtol_of(coarsest((b, a))) for (_, b), (_, a) in pairs]
    else:
        tols = list(rtol) if isinstance(rtol, Sequence) else [rtol] * len(pairs)
    spacings = [subnormal_spacing(coarsest((a,))) for _, (_, a) in pairs]
    extra = list(slack) if slack is not None else [0.0] * len(bs)
    floors = [sp * math.sqrt(b.numel()) + x for sp, b, x in zip(spacings, bs, extra, strict=True)]
    if factor is None:
        factor = _fitted(
            dots, squares, [f / p if p > 0 else f for f, p in zip(floors, peaks, strict=True)], tols, band
        )
        if factor == 0 and sum(squares) > 0 and not any(bool(a.any()) for a, _ in flat):
            fail(
                header,
                f"Every tensor is zero after, though before was finite and nonzero (total norm "
                f"{total_of(norms_of(bs), 2.0):.6g}): a factor of 0 keeps no direction",
                "e.g. a clip coefficient max_norm / total that became 0: the total overflowed, or the "
                "coefficient or its products underflowed (max_norm 1e-30 on gradients of 1e-30)",
            )
    s = factor
    units = [p if p > 0 else 1.0 for p in peaks]  # each pair is in units of before's largest |entry|
    resid = norms_of([a - s * b for a, b in flat])
    nb, na = norms_of([b for _, b in flat]), norms_of([a for a, _ in flat])
    allowed = [tol * abs(s) * n + f / u for tol, n, f, u in zip(tols, nb, floors, units, strict=True)]
    over = [i for i in range(len(bs)) if not resid[i] <= allowed[i]]  # a NaN is over
    if not s >= 0 or over:
        worst = (
            max(range(len(bs)), key=lambda i: resid[i] / allowed[i] if allowed[i] > 0 else math.inf)
            if over
            else 0
        )
        name = before[worst][0]
        ratio = na[worst] / nb[worst] if nb[worst] > 0 else math.inf
        cosine = dots[worst] / (na[worst] * nb[worst]) if na[worst] * nb[worst] > 0 else math.nan
        fail(
            header,
            f"Tensors off the common factor {s:.6g}: {len(over)} / {len(bs)}",
            f"Worst: {name!r} scaled by {ratio:.6g} with cosine {cosine:.6g} to before; "
            f"deviation {norms_of([as_[worst] - s * bs[worst]])[0]:.3g} "  # as it is: scaled, it may overflow
            f"(allowed: factor {s:.6g}, cosine 1, deviation <= {allowed[worst] * units[worst]:.3g})",
            *([f"The common factor {s:.6g} is negative: the gradients were flipped"] if s < 0 else []),
            f"Ratios after/before: {_ratios(na, nb)}",
        )
    return s


def _fitted(
    dots: Sequence[float],
    squares: Sequence[float],
    floors: Sequence[float],
    tols: Sequence[float],
    band: tuple[float, float] | None,
) -> float:
    """The common factor s of after = s x before: each tensor's own ratio <a, b> / <b, b>, weighted by
    how finely it tells s (1 / its relative allowance squared: rtol, and its absolute floor over the
    size s gives it, at the unweighted least-squares s), within `band`. Unweighted, a bfloat16
    tensor's own rounding pulled s off the float32 tensors' beside it (torch's own clip failed), and a
    tensor whose scaled values underflow to 0 told s nothing yet counted. Equal ratios give that
    ratio exactly (x 0.5 reads 0.5)."""
    bb = sum(squares)
    first = sum(dots) / bb if bb > 0 else 0.0
    if band is not None:
        first = min(max(first, band[0]), band[1])
    ratios = [d / q if q > 0 else math.nan for d, q in zip(dots, squares, strict=True)]
    relative = [
        tol + floor / (abs(first) * math.sqrt(q)) if first != 0 and q > 0 and math.isfinite(r) else math.inf
        for r, q, tol, floor in zip(ratios, squares, tols, floors, strict=True)
    ]
    finest = min((x for x in relative if x > 0), default=math.inf)  # scale-free: an rtol of 0 or 1e-160
    weights = [(finest / x) ** 2 if 0 < x < math.inf else (1.0 if x == 0 else 0.0) for x in relative]
    total = sum(weights)
    if total > 0:
        ref = ratios[max(range(len(weights)), key=weights.__getitem__)]  # exact where all agree
        first = ref + sum(w * (r - ref) for w, r in zip(weights, ratios, strict=True) if w > 0) / total
    return min(max(first, band[0]), band[1]) if band is not None else first


def _ratios(na: Sequence[float], nb: Sequence[float], most: int = 8) -> str:
    parts = [f"{a / b:.4g}" if b > 0 else ("1" if a == 0 else "inf") for a, b in zip(na, nb, strict=True)]
    return ", ".join(parts[:most]) + (f", ... ({len(parts)} in all)" if len(parts) > most else "")
