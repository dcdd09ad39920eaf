"""Invariants: `assert_*` functions that raise StabilityError with the numbers, like assert_close.

Every check is scale-free (a max_norm of 1e-6 is held as strictly as one of 1e6): tolerances are
relative, from one table per dtype, plus the rounding a dtype makes near zero (its subnormal spacing).
All figures in messages are Python floats computed in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NoReturn, Protocol, overload

import torch
from torch import nn

from stabilitycheck.config import Config
from stabilitycheck.errors import StabilityError, UsageError
from stabilitycheck.losses import Inputs, LossFn
from stabilitycheck.probing import Measurement, call_model, probe, probe_module

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


def _fail(header: str, *lines: str) -> NoReturn:
    """Raise StabilityError with an assert_close-style message: a header, a blank line, the details.
    Like every helper that can fail, it hides its frame: a failure report ends at the user's call."""
    __tracebackhide__ = True
    raise StabilityError("\n".join((header, "", *lines)))


def _named(tensors: Any, what: str) -> Named:
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


def _grads(parameters: TensorsLike) -> Named:
    """The gradients of `parameters` that have one, named like the parameters."""
    return [(name, p.grad) for name, p in _named(parameters, "parameters") if p.grad is not None]


def _host(values: Sequence[torch.Tensor]) -> list[float]:
    """Scalars to Python floats with one host synchronisation per device."""
    out: list[float] = [0.0] * len(values)
    by_device: dict[torch.device, list[int]] = {}
    for i, v in enumerate(values):
        by_device.setdefault(v.device, []).append(i)
    for idx in by_device.values():
        for i, f in zip(idx, torch.stack([values[i].reshape(()) for i in idx]).tolist(), strict=True):
            out[i] = float(f)
    return out


def _norms(tensors: Sequence[torch.Tensor], ord: float = 2.0) -> list[float]:
    """Per-tensor norms in float64 as Python floats."""
    if not tensors:
        return []
    ts = [t.detach() for t in tensors]
    return _host(list(torch._foreach_norm(ts, ord, dtype=ACC)))


def _total(norms: Sequence[float], ord: float) -> float:
    """The total norm of tensors with these per-tensor norms (NaN and Inf propagate)."""
    if not norms:
        return 0.0
    return float(torch.linalg.vector_norm(torch.tensor(norms, dtype=ACC), ord))


def _coarsest(tensors: Iterable[torch.Tensor]) -> torch.dtype:
    """The floating dtype with the largest tolerance among `tensors` (float64 if none is floating)."""
    dtypes = [t.dtype for t in tensors if t.is_floating_point()]
    return max(dtypes, key=rtol_of, default=torch.float64)


def _positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (0 < value < math.inf):
        raise UsageError(f"{name} must be a finite number > 0, got {name}={value!r}")
    return float(value)


def _describe_nonfinite(name: str, t: torch.Tensor) -> str:
    nan, inf = _host([t.isnan().sum(), t.isinf().sum()])
    return f"{name!r} holds {int(nan)} NaN and {int(inf)} Inf of {t.numel()} values"


def _require_finite(named: Named, header: str, hint: str = "") -> None:
    """Fail with `header` when any tensor holds NaN or Inf, naming the first and counting them all."""
    __tracebackhide__ = True
    if not named:
        return
    finite = _host([t.isfinite().all() for _, t in named])
    bad = [i for i, ok in enumerate(finite) if not ok]
    if bad:
        name, t = named[bad[0]]
        lines = [f"Non-finite tensors: {len(bad)} / {len(named)}", f"First: {_describe_nonfinite(name, t)}"]
        _fail(header, *lines, *([hint] if hint else []))


def _check_factor(
    before: Named,
    after: Named,
    factor: float | None,
    header: str,
    rtol: float | None,
    slack: Sequence[float] | None = None,
) -> float:
    """Check after[i] == s * before[i] for one common s >= 0 (`factor`, or the least-squares one);
    returns s. Each tensor may be off by rtol of its norm, a subnormal spacing per element, and
    `slack[i]` (an absolute allowance in after's units)."""
    __tracebackhide__ = True
    if len(before) != len(after):
        raise UsageError(f"before has {len(before)} tensors but after has {len(after)}; pass them aligned")
    for (name, b), (_, a) in zip(before, after, strict=True):
        if b.shape != a.shape:
            _fail(header, f"Shape changed: {name!r} was {tuple(b.shape)}, is {tuple(a.shape)}")
    _require_finite(before, header + " (before is not finite, so no direction is defined)")
    _require_finite(after, header + " (after is not finite)")
    bs = [b.detach().to(ACC) for _, b in before]
    as_ = [a.detach().to(ACC).to(b.device) for (_, a), b in zip(after, bs, strict=True)]
    dots = _host([torch.vdot(a.reshape(-1), b.reshape(-1)) for a, b in zip(as_, bs, strict=True)])
    nb, na = _norms(bs), _norms(as_)
    if factor is None:
        bb = sum(x * x for x in nb)
        factor = sum(dots) / bb if bb > 0 else 0.0
        if factor == 0 and bb > 0 and not any(na):
            _fail(
                header,
                f"Every tensor is zero after, though before was finite and nonzero (total norm "
                f"{math.sqrt(bb):.6g}): a factor of 0 keeps no direction",
                "e.g. a clip coefficient max_norm / total that became 0 because the total overflowed",
            )
    s = factor
    resid = _norms([a - s * b for a, b in zip(as_, bs, strict=True)])
    tol = rtol if rtol is not None else rtol_of(_coarsest(t for _, t in before + after))
    spacing = subnormal_spacing(_coarsest(t for _, t in after))
    extra = list(slack) if slack is not None else [0.0] * len(bs)
    allowed = [
        tol * abs(s) * n + spacing * math.sqrt(b.numel()) + x for n, b, x in zip(nb, bs, extra, strict=True)
    ]
    over = [i for i in range(len(bs)) if resid[i] > allowed[i]]
    if s < 0 or over:
        worst = max(range(len(bs)), key=lambda i: resid[i] / allowed[i]) if over else 0
        name = before[worst][0]
        ratio = na[worst] / nb[worst] if nb[worst] > 0 else math.inf
        cosine = dots[worst] / (na[worst] * nb[worst]) if na[worst] * nb[worst] > 0 else math.nan
        _fail(
            header,
            f"Tensors off the common factor {s:.6g}: {len(over)} / {len(bs)}",
            f"Worst: {name!r} scaled by {ratio:.6g} with cosine {cosine:.6g} to before; "
            f"deviation {resid[worst]:.3g} "
            f"(allowed: factor {s:.6g}, cosine 1, deviation <= {allowed[worst]:.3g})",
            *([f"The common factor {s:.6g} is negative: the gradients were flipped"] if s < 0 else []),
            f"Ratios after/before: {_ratios(na, nb)}",
        )
    return s


def _ratios(na: Sequence[float], nb: Sequence[float], most: int = 8) -> str:
    parts = [f"{a / b:.4g}" if b > 0 else ("1" if a == 0 else "inf") for a, b in zip(na, nb, strict=True)]
    return ", ".join(parts[:most]) + (f", ... ({len(parts)} in all)" if len(parts) > most else "")


def assert_clipped_norm_bounded(
    parameters: TensorsLike,
    max_norm: float,
    norm_type: float = 2.0,
    before: Sequence[torch.Tensor] | None = None,
    *,
    rtol: float | None = None,
) -> None:
    """After norm clipping: every gradient finite and the total norm <= max_norm (torch's contract:
    grads x min(1, max_norm / (total + 1e-6))); with `before`, the pre-clip gradients in the order of
    the parameters that have a .grad, also that clipping scaled them by exactly that coefficient."""
    __tracebackhide__ = True
    max_norm = _positive("max_norm", max_norm)
    grads = _grads(parameters)
    header = f"Gradients after clipping to max_norm={max_norm:g} are not clipped correctly."
    _require_finite(
        grads,
        "Gradients after clipping are not finite.",
        "A non-finite gradient is a finding, not something to clip: "
        "use clip_grad_norm_(..., error_if_nonfinite=True).",
    )
    dtype = _coarsest(g for _, g in grads)
    # torch rounds max_norm, the total, total + 1e-6, their quotient and each product in the gradient
    # dtype: up to 5 roundings of eps / 2, more than rtol alone allows in half precision.
    tol = rtol if rtol is not None else rtol_of(dtype) + 2.5 * torch.finfo(dtype).eps
    spacing = subnormal_spacing(dtype)
    norms = _norms([g for _, g in grads], norm_type)
    total = _total(norms, norm_type)
    numel = sum(g.numel() for _, g in grads)
    slack = spacing * math.sqrt(numel)  # products that land among the subnormals
    coef = math.nan
    if before is not None:
        if len(before) != len(grads):
            raise UsageError(
                f"before has {len(before)} tensors but {len(grads)} parameters have a .grad; pass "
                "[p.grad.detach().clone() for p in params if p.grad is not None] taken before clipping"
            )
        pre = _named(list(before), "before")
        pre = [(name, b) for (name, _), (_, b) in zip(grads, pre, strict=True)]
        _require_finite(
            pre,
            "Gradients before clipping are not finite, yet clipping returned finite ones.",
            "Clipping hid a blow-up: use clip_grad_norm_(..., error_if_nonfinite=True).",
        )
        total_before = _total(_norms([b for _, b in pre], norm_type), norm_type)
        coef = min(1.0, max_norm / (total_before + 1e-6))
        slack += spacing * total_before  # the coefficient itself rounds to a subnormal in half precision
    bound = max_norm * (1 + tol) + slack
    if total > bound:
        over = [i for i, n in enumerate(norms) if n > max_norm * (1 + tol) + slack]
        worst = max(range(len(norms)), key=lambda i: norms[i])
        _fail(
            header,
            f"Total {norm_type:g}-norm after clipping: {total:.6g} (allowed: <= {bound:.6g}, "
            f"max_norm {max_norm:g} with rtol {tol:.2g})",
            f"Tensors over bound on their own: {len(over)} / {len(norms)}",
            f"Largest: {grads[worst][0]!r} with norm {norms[worst]:.6g} (bound allowed {bound:.6g})",
        )
    if before is None:
        return
    if max_norm >= (total_before + 1e-6) * (1 + 4 * tol):  # torch's clip_coef saturates at 1
        changed = [
            name
            for (name, g), b in zip(grads, before, strict=True)
            if not torch.equal(g, b.to(g.device, g.dtype))
        ]
        if changed:
            _fail(
                header,
                f"The total norm before clipping was {total_before:.6g} <= max_norm {max_norm:g}, "
                "so clipping must leave every gradient unchanged",
                f"Tensors changed: {len(changed)} / {len(grads)}; first: {changed[0]!r}",
            )
        return
    largest = max(float(b.abs().max()) for _, b in pre) * coef if pre else 0.0
    if total == 0 and total_before > 0 and largest >= spacing:  # else the right answer underflows to 0
        _fail(
            header,
            f"Every gradient is zero after clipping, though the total norm before was "
            f"{total_before:.6g} (finite); expected them x {coef:.6g}",
            "clip_grad_norm_ does this when the total norm overflows the gradient dtype "
            "(coefficient max_norm / inf = 0): compute the total in a wider dtype",
        )
    pre_named = [(name, b) for (name, _), b in zip(grads, before, strict=True)]
    _check_factor(
        pre_named,
        grads,
        coef,
        f"{header} Expected every gradient x {coef:.6g} = min(1, max_norm / (total before "
        f"{total_before:.6g} + 1e-6)).",
        tol + spacing / coef if coef > 0 else tol,
    )


def assert_clipped_value_bounded(
    parameters: TensorsLike, clip_value: float, before: Sequence[torch.Tensor] | None = None
) -> None:
    """After value clipping: every gradient finite and every entry within [-clip_value, clip_value];
    with `before`, also that non-finite entries were not clipped into finite ones and that each
    entry equals before.clamp(-clip_value, clip_value) (clamping is exact, no tolerance)."""
    __tracebackhide__ = True
    clip_value = _positive("clip_value", clip_value)
    grads = _grads(parameters)
    if before is not None:
        if len(before) != len(grads):
            raise UsageError(f"before has {len(before)} tensors but {len(grads)} parameters have a .grad")
        _require_finite(
            [(name, b) for (name, _), b in zip(grads, before, strict=True)],
            "Gradients before value clipping are not finite; clipping hides that.",
            "clip_grad_value_ maps Inf to +-clip_value: check the gradients are finite before clipping.",
        )
    _require_finite(grads, "Gradients after value clipping are not finite.")
    dtype = _coarsest(g for _, g in grads)
    # clip_value itself rounds to the gradient dtype: relatively, or absolutely in the subnormal range
    rounded = torch.tensor(clip_value, dtype=torch.float64).to(dtype).item()
    bound = max(clip_value * (1 + rtol_of(dtype)), rounded)
    peaks = _norms([g for _, g in grads], math.inf)
    over = [i for i, p in enumerate(peaks) if p > bound]
    if over:
        worst = max(over, key=lambda i: peaks[i])
        _fail(
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
        _fail(
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
    of a nonzero `before` fails: it keeps no direction (s = 0 is allowed only when before is zero)."""
    __tracebackhide__ = True
    b, a = _named(before, "before"), _named(after, "after")
    if isinstance(after, Mapping) and not isinstance(before, Mapping) and len(a) == len(b):
        b = [(name, t) for (name, _), (_, t) in zip(a, b, strict=True)]  # name both by after's keys
    return _check_factor(
        b, a, None, "Gradients were not rescaled by one common factor: direction changed.", rtol
    )


def _gradients(
    model: nn.Module, inputs: Inputs, loss_fn: LossFn, scale: float, seed: int
) -> tuple[float, Named]:
    """The loss and the parameter gradients of scale x loss, computed from fresh (None) grads."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for _, p in params:
        p.grad = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        loss = loss_fn(call_model(model, inputs), inputs)
    (loss * scale).backward()
    grads = [(n, p.grad.detach().clone()) for n, p in params if p.grad is not None]
    return float(loss.detach().to(ACC)), grads


def _to64(inputs: Inputs) -> Inputs:
    """`inputs` with every floating tensor in float64 (tensors, tuples, lists and dicts)."""
    if isinstance(inputs, torch.Tensor):
        return inputs.to(ACC) if inputs.is_floating_point() else inputs
    if isinstance(inputs, dict):
        return {k: _to64(v) for k, v in inputs.items()}
    if isinstance(inputs, tuple | list):
        return type(inputs)(_to64(v) for v in inputs)
    return inputs


def _rounding_error(
    model: nn.Module, inputs: Inputs, loss_fn: LossFn, grads: Named, seed: int
) -> list[float]:
    """Per tensor, how far `grads` (the c=1 gradients) are from a float64 re-run: the rounding error
    they carry, capped at sqrt(eps) of their norm (beyond that it is not rounding). The model is
    converted in place and back (exact), so its hooks and modules are the ones that ran."""
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    if all(t.dtype == ACC for t in tensors):
        return [0.0] * len(grads)
    dtypes = [t.dtype for t in tensors]
    saved = [(p, p.grad) for p in model.parameters()]
    try:
        for t in tensors:
            t.data = t.data.to(ACC)
        _, exact = _gradients(model, _to64(inputs), loss_fn, 1.0, seed)
    finally:
        for t, dtype in zip(tensors, dtypes, strict=True):
            t.data = t.data.to(dtype)
        for p, g in saved:
            p.grad = g
    if [n for n, _ in exact] != [n for n, _ in grads]:
        return [0.0] * len(grads)
    errors = _norms([g.to(ACC) - e.to(g.device) for (_, g), (_, e) in zip(grads, exact, strict=True)])
    cap = math.sqrt(torch.finfo(_coarsest(g for _, g in grads)).eps)
    return [min(e, cap * n) for e, n in zip(errors, _norms([g for _, g in grads]), strict=True)]


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
    Tolerance per tensor: c x (rtol of its norm + 4 x its rounding error at c=1, measured against a
    float64 re-run and capped at sqrt(eps) of its norm), since a gradient summed from cancelling terms
    carries more than rtol of its own norm, and the run at c makes rounding errors of the same size.
    The .grad fields are restored."""
    __tracebackhide__ = True
    c = _positive("c", c)
    saved = [(p, p.grad) for p in model.parameters()]
    try:
        loss, g1 = _gradients(model, inputs, loss_fn, 1.0, seed)
        _, gc = _gradients(model, inputs, loss_fn, c, seed)
    finally:
        for p, g in saved:
            p.grad = g
    if [n for n, _ in g1] != [n for n, _ in gc]:
        _fail(
            f"Scaling the loss by c={c:g} changed which parameters get a gradient.",
            f"At c=1: {len(g1)} tensors; at c={c:g}: {len(gc)} tensors",
        )
    if not math.isfinite(loss):
        _fail(f"The loss is not finite ({loss}), so no gradient rescaling can be checked.")
    rounding = _rounding_error(model, inputs, loss_fn, g1, seed)
    _check_factor(
        g1,
        gc,
        c,
        f"Scaling the loss by c={c:g} did not scale every gradient by {c:g}.",
        rtol,
        [4.0 * c * e for e in rounding],
    )


@overload
def assert_finite_training(model: Config) -> Measurement: ...


@overload
def assert_finite_training(
    model: nn.Module,
    inputs: Inputs,
    loss_fn: LossFn,
    *,
    steps: int = 10,
    lr: float = 1e-3,
    optimizer: str = "adam",
    clip: float | None = None,
    blocks: Sequence[tuple[str, nn.Module]] | None = None,
    seed: int = 0,
) -> Measurement: ...


def assert_finite_training(
    model: nn.Module | Config,
    inputs: Inputs | None = None,
    loss_fn: LossFn | None = None,
    *,
    steps: int = 10,
    lr: float = 1e-3,
    optimizer: str = "adam",
    clip: float | None = None,
    blocks: Sequence[tuple[str, nn.Module]] | None = None,
    seed: int = 0,
) -> Measurement:
    """Weights, activations, gradients and loss stay finite over `steps` optimiser steps (probe_module
    does the steps and names the first non-finite value). Returns the Measurement for further checks.
    Given a Config instead of a model, probes it (`probe(config)`) with its own steps, lr and optimiser."""
    __tracebackhide__ = True
    if isinstance(model, Config):
        if inputs is not None or loss_fn is not None:
            raise UsageError("assert_finite_training(config) takes no inputs or loss_fn; the Config has them")
        steps, lr, optimizer = model.run.steps, model.run.lr, model.run.optimizer
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UsageError(f"steps must be an int >= 1, got steps={steps!r}")
    if isinstance(model, Config):
        m = probe(model)
    elif inputs is None or loss_fn is None:
        raise UsageError("assert_finite_training(model, inputs, loss_fn): pass inputs and loss_fn too")
    else:
        m = probe_module(
            model,
            inputs,
            loss_fn,
            blocks=blocks,
            steps=steps,
            lr=lr,
            optimizer=optimizer,
            clip=clip,
            seed=seed,
        )
    nf = m.first_nonfinite
    if nf is not None:
        losses = ", ".join(f"{x:.4g}" for x in m.loss)
        norms = ", ".join(f"{x:.3g}" for x in m.grad_norm)
        _fail(
            f"Training went non-finite within {steps} {optimizer} steps at lr={lr:g}.",
            f"Steps finite: {nf.step} / {steps}",
            f"First non-finite: step {nf.step}, layer {nf.layer!r}, tensor {nf.tensor!r} (norm {nf.value})",
            f"Loss per step: {losses}",
            f"Total gradient norm per step: {norms}",
        )
    return m


def assert_bounded_growth(measurement: Measurement, limit: float, *, gain_limit: float | None = None) -> None:
    """The overall growth (input-side over output-side activation-gradient norm) is <= limit and so is
    every per-layer gain (or <= gain_limit). NaN and Inf count as over: never hidden."""
    __tracebackhide__ = True
    limit = _positive("limit", limit)
    per_layer = limit if gain_limit is None else _positive("gain_limit", gain_limit)
    m = measurement
    names = m.activation_names[1:]  # gain i is across the block whose output is activation i + 1
    over = [i for i, g in enumerate(m.gains) if not g <= per_layer]
    growth_bad = not m.growth <= limit
    if not over and not growth_bad:
        return
    lines = [
        f"Overall growth: {m.growth:.4g} (allowed: <= {limit:g})",
        f"Layers over bound: {len(over)} / {len(m.gains)}",
    ]
    if m.gains:
        worst = max(range(len(m.gains)), key=lambda i: math.inf if math.isnan(m.gains[i]) else m.gains[i])
        lines.append(
            f"Worst layer: {names[worst]!r} with gain {m.gains[worst]:.4g} (allowed: <= {per_layer:g})"
        )
    if m.activation_grad_norms:
        lines.append(
            f"Activation-gradient norm at {m.activation_names[0]!r}: {m.activation_grad_norms[0]:.4g}, "
            f"at {m.activation_names[-1]!r}: {m.activation_grad_norms[-1]:.4g}"
        )
    _fail("Gradient growth is above the limit.", *lines)


class ScalerLike(Protocol):
    """What assert_gradscaler_guards needs of a scaler: torch.amp.GradScaler's scale/step/update."""

    def scale(self, outputs: torch.Tensor) -> torch.Tensor: ...

    def step(self, optimizer: torch.optim.Optimizer) -> Any: ...

    def update(self) -> Any: ...


def _poison(params: Sequence[nn.Parameter], value: float) -> str:
    """Put `value` into one entry of the first gradient; returns that parameter's index as a name."""
    for i, p in enumerate(params):
        if p.grad is not None:
            with torch.no_grad():
                p.grad[(0,) * p.grad.dim()] = value
            return str(i)
    raise UsageError("no parameter got a gradient, so none can be made non-finite")


def assert_gradscaler_guards(
    model: nn.Module,
    inputs: Inputs,
    loss_fn: LossFn,
    scaler: ScalerLike | None = None,
    *,
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
    lr: float = 0.01,
    poisons: Sequence[float] = (math.inf, math.nan),
    seed: int = 0,
) -> None:
    """A scaler step whose gradients hold Inf or NaN (each of `poisons`, put in after backward) is
    skipped: weights unchanged and finite, and the scale backed off (when the scaler has get_scale);
    a clean step afterwards does update the weights. Default scaler: torch.amp.GradScaler on the
    model's device type; default optimizer: SGD at `lr`."""
    __tracebackhide__ = True
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    if not params:
        raise UsageError("the model has no parameters that require grad")
    if scaler is None:
        scaler = torch.amp.GradScaler(params[0].device.type)
    opt = optimizer(params) if optimizer is not None else torch.optim.SGD(params, lr=lr)
    get_scale = getattr(scaler, "get_scale", None)
    kind = type(scaler).__name__

    def step(poison: float | None) -> None:
        opt.zero_grad(set_to_none=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            loss = loss_fn(call_model(model, inputs), inputs)
        scaler.scale(loss).backward()
        if poison is not None:
            _poison(params, poison)
        scaler.step(opt)
        scaler.update()

    for poison in poisons:
        weights = [p.detach().clone() for p in params]
        scale_before = float(get_scale()) if callable(get_scale) else math.nan
        step(poison)
        scale_after = float(get_scale()) if callable(get_scale) else math.nan
        changed = [n for (n, p), w in zip(named, weights, strict=True) if not torch.equal(p.detach(), w)]
        nonfinite = [n for n, p in named if not bool(p.detach().isfinite().all())]
        if changed or nonfinite:
            first = changed[0] if changed else nonfinite[0]
            before_norm, after_norm = _norms(
                [weights[[n for n, _ in named].index(first)], dict(named)[first]]
            )
            _fail(
                f"{kind} stepped on a gradient holding {poison}: the step was not skipped.",
                f"Weight tensors changed: {len(changed)} / {len(named)}; non-finite: "
                f"{len(nonfinite)} / {len(named)}",
                f"First: {first!r} with norm {before_norm:.6g} before the step and {after_norm:.6g} after "
                "(allowed: unchanged)",
            )
        if callable(get_scale) and not scale_after < scale_before:
            _fail(
                f"{kind} skipped a step on {poison} but did not back off its scale.",
                f"Scale before: {scale_before:g}, after: {scale_after:g} (allowed: < {scale_before:g})",
            )
    weights = [p.detach().clone() for p in params]
    step(None)
    changed = [n for (n, p), w in zip(named, weights, strict=True) if not torch.equal(p.detach(), w)]
    nonfinite = [n for n, p in named if not bool(p.detach().isfinite().all())]
    moved = any(p.grad is not None and bool(p.grad.ne(0).any()) for p in params)
    if nonfinite or (moved and not changed):  # all-zero gradients (e.g. dead ReLUs) move nothing
        _fail(
            f"{kind} did not take a clean step (finite gradients): it guards by never stepping.",
            f"Weight tensors changed: {len(changed)} / {len(named)}; "
            f"non-finite: {len(nonfinite)} / {len(named)}",
            "If the scaled gradients overflow, start from a smaller init_scale.",
        )
