"""Invariant of mixed-precision training: a GradScaler skips the steps whose gradients overflow, and its
clean step is the plain step on the unscaled gradients (assert_gradscaler_guards)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from stabilitycheck.errors import StabilityError, UsageError, no_trainable
from stabilitycheck.invariants_common import ACC, fail, host, norms_of, state_kept, to64
from stabilitycheck.losses import Inputs, LossFn, seeded_loss

CLEAN_RTOL = 0.01  # a clean scaled step against a plain one: scales of 2^k undo exactly


class ScalerLike(Protocol):
    """What assert_gradscaler_guards needs of a scaler: torch.amp.GradScaler's scale/step/update."""

    def scale(self, outputs: torch.Tensor) -> torch.Tensor: ...

    def step(self, optimizer: torch.optim.Optimizer) -> Any: ...

    def update(self) -> Any: ...


STRIDES = range(2, 8)  # a scaler checking every k-th entry alone steps on `_inside`'s


def _inside(n: int) -> int:
    """An entry from the middle of n on that no stride in STRIDES reaches from the first entry, nor,
    where one is found, strides from 3 on from the last (of an even n, one of i and n - 1 - i is
    even): the middle's odd entry, (n // 2) | 1, was every third one's wherever n = 3k + 1 (all powers
    of 4: a width-64 MLP's every matrix and bias), so a scaler checking every third entry passed."""
    middle = min((n // 2) | 1, n - 1)
    # one in every 210 entries misses every stride from the first: a window of 1000 holds one (never
    # a walk over the tensor: 13.8 s for a 38.6M-entry embedding)
    missed = [i for i in range(middle, min(n, middle + 1000)) if all(i % k for k in STRIDES)]
    both = [i for i in missed if all((n - 1 - i) % k for k in STRIDES[1:])]
    return (both or missed or [middle])[0]


def _poison(params: Sequence[nn.Parameter], value: float, target: int, inside: bool) -> None:
    """Put `value` into gradient `target`: at its first entry (the last of the last gradient), or
    `inside` at an entry in its middle that strided samples miss (`_inside`: a scaler checking only a
    tensor's ends, or every k-th entry, steps on it)."""
    grad = params[target].grad
    assert grad is not None  # targets are the parameters a clean backward reaches (_reference_step)
    flat = grad.view(-1)
    at = _inside(flat.numel()) if inside else -1 if target == len(params) - 1 else 0
    with torch.no_grad():
        flat[at] = value


def _reference_step(
    model: nn.Module,
    inputs: Inputs,
    loss_fn: LossFn,
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None,
    lr: float,
    seed: int,
    stepped_on: Sequence[torch.Tensor | None] | None = None,
    start: Sequence[torch.Tensor] | None = None,
) -> tuple[list[torch.Tensor], list[int], list[dict[str, Any]], list[torch.Tensor | None]]:
    """One plain step (no scaler) of a copy of the model from its current state, or with its trainable
    parameters at `start`, with a fresh optimizer, on its own gradients or on `stepped_on` (a clipped
    step's): the weights a correct
    scaler's clean step must give (scaling by the loss scale and unscaling undo each other), the
    indices of the parameters the backward reaches, each parameter's optimizer state after it (Adam's
    first step does not depend on the gradient's scale; its moments do) and the gradients it stepped
    on."""
    twin = copy.deepcopy(model)
    params = [p for p in twin.parameters() if p.requires_grad]
    if start is not None:
        with torch.no_grad():
            for p, w in zip(params, start, strict=True):
                p.copy_(w)
    opt = optimizer(params) if optimizer is not None else torch.optim.SGD(params, lr=lr)
    opt.zero_grad(set_to_none=True)
    seeded_loss(twin, inputs, loss_fn, seed).backward()  # type: ignore[no-untyped-call]
    reached = [i for i, p in enumerate(params) if p.grad is not None]
    if stepped_on is not None:
        for p, given in zip(params, stepped_on, strict=True):
            if p.grad is not None and given is not None:
                p.grad.copy_(given)
    opt.step()
    grads = [None if p.grad is None else p.grad.detach() for p in params]
    return [p.detach() for p in params], reached, [dict(opt.state.get(p, {})) for p in params], grads


def _power_of_two(scale: float) -> bool:
    """A positive finite power of two (NaN, a scaler with no get_scale: not known to be one)."""
    return math.isfinite(scale) and scale > 0 and math.frexp(scale)[0] == 0.5


def _rounding_alone(
    model: nn.Module, inputs: Inputs, loss_fn: LossFn, seed: int, grads: Sequence[torch.Tensor | None]
) -> frozenset[int]:
    """The parameters whose gradient `grads` (a plain step's) is mostly rounding: further from a
    float64 re-run's than that is from 0 (terms that cancel: a bias before a BatchNorm, exactly 0).
    Scaled by a loss scale that is no power of two and unscaled, such a gradient rounds to other
    noise, its Adam moments and update unlike the plain step's, with no scaler at fault (torch's own
    GradScaler failed at a scale of 768: a trial). Empty where the model cannot run in float64."""
    twin = copy.deepcopy(model).to(ACC)
    params = [p for p in twin.parameters() if p.requires_grad]
    try:
        seeded_loss(twin, to64(inputs), loss_fn, seed).backward()  # type: ignore[no-untyped-call]
    except (RuntimeError, TypeError):
        return frozenset()
    return frozenset(
        i
        for i, (g, p) in enumerate(zip(grads, params, strict=True))
        if g is not None and p.grad is not None and float((g.to(ACC) - p.grad).norm()) > float(p.grad.norm())
    )


def assert_gradscaler_guards(
    model: nn.Module,
    inputs: Inputs,
    loss_fn: LossFn,
    scaler: ScalerLike | None = None,
    *,
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
    lr: float = 0.01,
    poisons: Sequence[float] = (math.inf, -math.inf, math.nan),
    seed: int = 0,
) -> None:
    """A scaler step whose gradients hold Inf or NaN (each of `poisons`, put in after backward, in the
    first gradient and in the last, at an end entry and at one in the middle; and in every gradient
    between, the poisons taken in turn) is skipped: weights unchanged and finite, and the scale backed
    off (when the scaler has get_scale); a clean step afterwards updates the weights, and leaves the
    optimizer's state, as one plain step on the unscaled gradients does (within 1%: a scaler that
    never unscales, or unscales twice, moves them by the loss scale's factor). Weights non-finite
    before any step fail as the model's finding (no step of any scaler can be judged on them).
    Default scaler: torch.amp.GradScaler on the model's device type; default optimizer: SGD at `lr`.
    The model's parameters and buffers are left as they were (the scaler's state is not)."""
    __tracebackhide__ = True
    _guard_arguments(scaler, optimizer, poisons)
    with state_kept(model):
        _check_guards(model, inputs, loss_fn, scaler, optimizer, lr, poisons, seed)


def _number(value: Any) -> float:
    """`value` as a float (a Python number, a numpy scalar or a one-element tensor); 0.0 (finite) for
    anything else, so a poison that is no number is refused like a finite one."""
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        return 0.0


def _guard_arguments(scaler: Any, optimizer: Any, poisons: Sequence[float]) -> None:
    """One-line UsageErrors for what assert_gradscaler_guards cannot use (each raised deep inside)."""
    if scaler is not None and not all(
        callable(getattr(scaler, m, None)) for m in ("scale", "step", "update")
    ):
        raise UsageError(
            "scaler must be a torch.amp.GradScaler or one with its scale/step/update, "
            f"got {type(scaler).__name__}"
        )
    if isinstance(optimizer, torch.optim.Optimizer) or (optimizer is not None and not callable(optimizer)):
        raise UsageError(
            "optimizer must make the optimizer from the parameters (each check needs a fresh one), got "
            f"{type(optimizer).__name__}; e.g. optimizer=lambda ps: torch.optim.Adam(ps, lr=1e-3)"
        )
    if not poisons or any(math.isfinite(_number(v)) for v in poisons):
        raise UsageError(
            "poisons must be non-finite values to put in the gradients (inf, -inf, nan), "
            f"got {list(poisons)!r}"
        )


def _check_guards(
    model: nn.Module,
    inputs: Inputs,
    loss_fn: LossFn,
    scaler: ScalerLike | None,
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None,
    lr: float,
    poisons: Sequence[float],
    seed: int,
) -> None:
    __tracebackhide__ = True
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    if not params:
        raise no_trainable("assert_gradscaler_guards")
    if scaler is None:
        scaler = torch.amp.GradScaler(params[0].device.type)
    if isinstance(scaler, torch.amp.GradScaler) and any(p.dtype == torch.float16 for p in params):
        raise UsageError(
            "the model's parameters are float16: torch.amp.GradScaler cannot unscale float16 gradients; "
            "keep the weights float32 and run the forward under torch.autocast(dtype=torch.float16)"
        )
    opt = optimizer(params) if optimizer is not None else torch.optim.SGD(params, lr=lr)
    get_scale = getattr(scaler, "get_scale", None)
    kind = type(scaler).__name__

    def step(poison: float | None, target: int = 0, inside: bool = False) -> None:
        opt.zero_grad(set_to_none=True)
        scaler.scale(seeded_loss(model, inputs, loss_fn, seed)).backward()  # type: ignore[no-untyped-call]
        if poison is not None:
            _poison(params, poison, target, inside)
        scaler.step(opt)
        scaler.update()

    broken = [n for n, p in named if not bool(p.detach().isfinite().all())]
    if broken:
        fail(
            f"The model's weights hold NaN or Inf before any step, so no {kind} step can be judged.",
            f"Non-finite weight tensors: {len(broken)} / {len(named)}; first: {broken[0]!r}",
            "This is the model's finding, not the scaler's: check its initialisation or loaded state.",
        )
    # skipped steps leave the weights and a fresh optimizer as they are: the clean step's answer
    expected, reached, states, plain = _reference_step(model, inputs, loss_fn, optimizer, lr, seed)
    if not reached:
        raise UsageError(
            "no parameter got a gradient, so none can be made non-finite; check that loss_fn's value "
            "depends on the model's output (a detached output or a constant loss gives no gradient)"
        )
    ends = [
        (poison, i, inside)
        for poison in poisons
        for i in dict.fromkeys((reached[0], reached[-1]))
        for inside in (False, True)
    ]
    between = [(poisons[k % len(poisons)], i, k % 2 == 0) for k, i in enumerate(reached[1:-1])]
    for poison, target, inside in ends + between:
        weights = [p.detach().clone() for p in params]
        scale_before = float(get_scale()) if callable(get_scale) else math.nan
        step(poison, target, inside)
        where = named[target][0]
        scale_after = float(get_scale()) if callable(get_scale) else math.nan
        changed = [n for (n, p), w in zip(named, weights, strict=True) if not torch.equal(p.detach(), w)]
        nonfinite = [n for n, p in named if not bool(p.detach().isfinite().all())]
        if changed or nonfinite:
            first = changed[0] if changed else nonfinite[0]
            before_norm, after_norm = norms_of(
                [weights[[n for n, _ in named].index(first)], dict(named)[first]]
            )
            fail(
                f"{kind} stepped on a gradient holding {poison} (in {where!r}): the step was not skipped.",
                f"Weight tensors changed: {len(changed)} / {len(named)}; non-finite: "
                f"{len(nonfinite)} / {len(named)}",
                f"First: {first!r} with norm {before_norm:.6g} before the step and {after_norm:.6g} after "
                "(allowed: unchanged)",
            )
        if callable(get_scale) and not scale_after < scale_before:
            fail(
                f"{kind} skipped a step on {poison} but did not back off its scale.",
                f"Scale before: {scale_before:g}, after: {scale_after:g} (allowed: < {scale_before:g})",
            )
    unseen = _away_from_one(scaler, get_scale, kind, len(ends + between))
    weights = [p.detach().clone() for p in params]
    # what `_same_at_another_scale` restores (only a torch GradScaler's scale can be set)
    grad_scaler = scaler.state_dict() if isinstance(scaler, torch.amp.GradScaler) else {}
    held = (copy.deepcopy(opt.state_dict()), copy.deepcopy(grad_scaler))
    at = float(get_scale()) if callable(get_scale) else math.nan  # the clean step's loss scale
    step(None)
    changed = [n for (n, p), w in zip(named, weights, strict=True) if not torch.equal(p.detach(), w)]
    nonfinite = [n for n, p in named if not bool(p.detach().isfinite().all())]
    moved = any(p.grad is not None and bool(p.grad.ne(0).any()) for p in params)
    if nonfinite or (moved and not changed):  # all-zero gradients (e.g. dead ReLUs) move nothing
        fail(
            f"{kind} did not take a clean step (finite gradients): it guards by never stepping.",
            f"Weight tensors changed: {len(changed)} / {len(named)}; "
            f"non-finite: {len(nonfinite)} / {len(named)}",
            "If the scaled gradients overflow, start from a smaller init_scale.",
        )
    # the state first: a skipped step that stepped the optimizer shows there as such (Adam's step count),
    # where the clean step's update, bias-corrected by that count, only reads as a wrong update
    # a scale that is no power of two rounds a gradient of rounding alone to other noise
    noise = frozenset() if _power_of_two(at) else _rounding_alone(model, inputs, loss_fn, seed, plain)
    try:
        _check_clean_state(named, opt, states, kind, noise)
        _check_clean_step(named, weights, expected, kind, noise)
    except StabilityError as exc:

        def reference(grads: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
            stepped = iter(grads)  # `grads` are the reached parameters', in order
            on = [next(stepped) if g is not None else None for g in plain]
            wanted, _, states, _ = _reference_step(model, inputs, loss_fn, optimizer, lr, seed, on, weights)
            return wanted, states

        if not _own_clip(named, weights, opt, scaler, (held, plain), reference, lambda: step(None), noise):
            if isinstance(scaler, torch.amp.GradScaler) or not _shrunk(params, plain, at):
                raise
            raise StabilityError(  # a shrink: a wrong unscale, or torch's recipe with its clip active
                f"{exc}\nIts step shrank the unscaled gradients: if it clips after unscale_ (torch's "
                "recipe), this check cannot tell that from a wrong unscale on a scaler that is no "
                "torch.amp.GradScaler (only a GradScaler's scale can be set, to take the step again at "
                "another): pass the GradScaler, a subclass clipping in its step, or check with the clip "
                "inactive (a max_norm above the gradients')"
            ) from None
    _check_skip_after_clean(named, opt, kind, lambda: step(poisons[0], reached[0], True), poisons[0])
    if unseen:
        raise UsageError(unseen)


def _same_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two optimizer states of one parameter hold the same keys and values, tensors bit-equal."""
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a
    )


def _check_skip_after_clean(
    named: Sequence[tuple[str, nn.Parameter]],
    opt: torch.optim.Optimizer,
    kind: str,
    poisoned: Callable[[], None],
    poison: float,
) -> None:
    """A step skipped after a clean one leaves the weights and the optimizer's state bit-identical:
    every other poisoned step runs before any clean one, on an optimizer with no state, so a scaler
    that steps on the last clean gradients, or clears Adam's moments, on a skip passed."""
    __tracebackhide__ = True
    weights = [p.detach().clone() for _, p in named]
    states = [copy.deepcopy(dict(opt.state[p])) for _, p in named]
    poisoned()
    changed = [n for (n, p), w in zip(named, weights, strict=True) if not torch.equal(p.detach(), w)]
    moved = [n for (n, p), st in zip(named, states, strict=True) if not _same_state(st, dict(opt.state[p]))]
    if changed or moved:
        fail(
            f"{kind} changed the model on a step it skipped ({poison} in a gradient) after a clean step.",
            f"Weight tensors changed: {len(changed)} / {len(named)}; optimizer states changed: "
            f"{len(moved)} / {len(named)}; first: {(changed or moved)[0]!r} (allowed: bit-identical)",
        )


def _own_clip(
    named: Sequence[tuple[str, nn.Parameter]],
    weights: Sequence[torch.Tensor],
    opt: torch.optim.Optimizer,
    scaler: Any,
    held: tuple[tuple[dict[str, Any], dict[str, Any]], Sequence[torch.Tensor | None]],
    reference: Callable[[Sequence[torch.Tensor]], tuple[list[torch.Tensor], list[dict[str, Any]]]],
    step: Callable[[], None],
    noise: frozenset[int],
) -> bool:
    """Whether a GradScaler's clean step that differs from the plain one is the plain step on the
    gradients it stepped on, each entry of them the unscaled one's or a shrink of it with its sign (a
    clip of the unscaled gradients: torch's recipe, by norm, by value, per group; it failed as 'must
    unscale' wherever the clip was active), and moves the weights and the optimizer's state alike at
    16x the scale (`_same_at_another_scale`): unscaling twice or clipping before unscale_ shrinks
    them too, by a factor that follows the scale, and a step too long (5% over) is no shrink."""
    if not isinstance(scaler, torch.amp.GradScaler):
        return False
    params = [p for _, p in named]
    clipped = _clipped(params, held[1])
    if clipped is None:
        return False
    wanted, states = reference(clipped)  # from the weights before the clean step
    try:
        _check_clean_state(named, opt, states, type(scaler).__name__, noise)
        _check_clean_step(named, weights, wanted, type(scaler).__name__, noise)
    except StabilityError:
        return False
    return _same_at_another_scale(params, weights, opt, scaler, held[0], step)


def _shrunk(params: Sequence[nn.Parameter], plain: Sequence[torch.Tensor | None], at: float) -> bool:
    """Whether the clean step stepped on a shrink of the unscaled gradients (`_clipped`, by a common
    factor below 1) other than by 1 / the loss scale `at` (unscaling twice, a fault the check can
    name; each within CLEAN_RTOL): torch's recipe with its clip active, or a wrong unscale, which a
    step again at another scale alone tells apart."""
    got = _clipped(params, plain)
    if got is None:
        return False
    pairs = [(a.double(), b.double()) for a, b in zip(got, (g for g in plain if g is not None), strict=True)]
    bb = sum(float(b.pow(2).sum()) for _, b in pairs)
    ratio = sum(float((a * b.to(a.device)).sum()) for a, b in pairs) / bb if bb > 0 else math.nan
    # a step on the unscaled gradients as they are (ratio 1) is no shrink: its fault lies elsewhere
    return ratio < 1 - CLEAN_RTOL and not (at > 0 and abs(ratio * at - 1) <= CLEAN_RTOL)


def _clipped(
    params: Sequence[nn.Parameter], plain: Sequence[torch.Tensor | None]
) -> list[torch.Tensor] | None:
    """`params`' gradients after the clean step (what the optimizer stepped on), where each entry has
    the plain step's sign (or is 0) and a magnitude no larger than its, within CLEAN_RTOL: a clip of
    the unscaled gradients; None otherwise (a parameter with a gradient in one and not the other)."""
    pairs = []
    for p, g in zip(params, plain, strict=True):
        if (p.grad is None) != (g is None):
            return None
        if p.grad is not None and g is not None:
            pairs.append((p.grad.detach().clone(), g.to(p.grad.device)))
    if not pairs:
        return None
    shrunk = [
        ((a * b >= 0) & (a.abs() <= b.abs() * (1 + CLEAN_RTOL) + torch.finfo(a.dtype).tiny)).all()
        for a, b in pairs
    ]
    if not all(host(shrunk)):
        return None
    return [a for a, _ in pairs]


def _same_at_another_scale(
    params: Sequence[nn.Parameter],
    weights: Sequence[torch.Tensor],
    opt: torch.optim.Optimizer,
    scaler: Any,
    held: tuple[dict[str, Any], dict[str, Any]],
    step: Callable[[], None],
) -> bool:
    """Whether the clean step, taken again from the same weights and states at 16x the loss scale,
    moves the weights and the optimizer's state as it did (within CLEAN_RTOL): a step that unscales
    once does not depend on the scale, and where it differs from a plain step the difference is its own
    (torch's recipe, unscale_ then a clip of the unscaled gradients, failed as 'must unscale' wherever
    the clip was active); a scaler that never unscales, unscales twice or clips before unscale_ moves
    them by the scale's factor. Only a torch.amp.GradScaler can be set to another scale."""
    if not isinstance(scaler, torch.amp.GradScaler):
        return False
    moved = [p.detach().clone() for p in params]
    state = copy.deepcopy(opt.state_dict()["state"])
    with torch.no_grad():
        for p, w in zip(params, weights, strict=True):
            p.copy_(w)
    opt.load_state_dict(held[0])
    scaler.load_state_dict(held[1])
    scaler.update(16 * float(scaler.get_scale()))
    step()
    again = [p.detach() for p in params]
    pairs = [(a - w, m - w) for a, m, w in zip(again, moved, weights, strict=True)]
    for key, values in opt.state_dict()["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                pairs.append((value, state[key][name]))
    return all(
        float((a.double() - b.double()).norm())
        <= CLEAN_RTOL * float(b.double().norm()) + torch.finfo(b.dtype).tiny
        for a, b in pairs
    )


UNHIDDEN = 2.0**8  # the clean step's scale where the skipped steps backed it off to 1 or below


def _away_from_one(scaler: Any, get_scale: Any, kind: str, skipped: int) -> str:
    """The clean step runs at a scale above 1, where a scaler that never unscales, or unscales
    twice, moves the update by the scale's factor, and the scaled gradients are larger than the
    unscaled ones: each skipped step halves it, and after 16 (a 3-layer MLP with biases) torch's
    2^16 reached 1, where both passed; past 16 it is below 1, where a step that
    clips the scaled gradients (clip_grad_norm_ before unscale_) never clips and passed (any model of
    more than 6 tensors, torch's default scaler). A torch.amp.GradScaler at 1 or
    below is set to UNHIDDEN; another scaler at 1 is a usage error, and one below 1 is judged there,
    the usage error returned to be raised where it passes (a user's step wrapping a GradScaler, its
    clip before unscale_, passed at 2^-10); '' where there is none."""
    __tracebackhide__ = True
    if not callable(get_scale):
        return ""
    scale = float(get_scale())
    if scale > 1.0 + 2 * CLEAN_RTOL:  # the scaled gradients are the larger: a factor the check sees
        return ""
    if isinstance(scaler, torch.amp.GradScaler):
        scaler.update(UNHIDDEN)
        return ""
    at = f"{kind}'s scale is {scale:g} after the {skipped} skipped steps"
    start = f"start it at 2^{skipped + 8} or more (each skipped step halves it) or pass fewer poisons"
    if abs(scale - 1.0) <= 2 * CLEAN_RTOL:
        raise UsageError(
            f"{at}, where a scaler that never unscales cannot be told from one that does; {start}"
        )
    return (
        f"{at}: its clean step passed there, but a clip of the scaled gradients never fires below 1; {start}"
    )


def _check_clean_state(
    named: Sequence[tuple[str, nn.Parameter]],
    opt: torch.optim.Optimizer,
    expected: Sequence[dict[str, Any]],
    kind: str,
    noise: frozenset[int],
) -> None:
    """After the skipped steps and the clean one, each parameter's optimizer state equals the plain
    step's (`_reference_step`) within CLEAN_RTOL: one step counted, moments of the unscaled gradients
    (a scaler that never unscales, or steps on zeroed gradients, leaves Adam's weights as a correct
    one does, not its moments or its step count). Not the parameters in `noise` (`_rounding_alone`)."""
    __tracebackhide__ = True
    for i, ((name, p), want) in enumerate(zip(named, expected, strict=True)):
        if i in noise:
            continue
        got = opt.state.get(p, {})
        for key, ref in want.items():
            value = got.get(key)
            if not isinstance(ref, torch.Tensor) or not isinstance(value, torch.Tensor):
                continue
            a, b = value.detach().double().cpu(), ref.detach().double().cpu()
            off, size = float((a - b).norm()), float(b.norm())
            if a.shape != b.shape or off > CLEAN_RTOL * size + torch.finfo(torch.float32).tiny:
                fail(
                    f"{kind}'s steps left the optimizer state unlike one plain step on the unscaled "
                    "gradients.",
                    f"First: {name!r} state {key!r}: norm {float(a.norm()):.6g}, a plain step's {size:.6g} "
                    f"(allowed: within {CLEAN_RTOL:.0%} of it)",
                    "A skipped step must not step the optimizer, and a clean one must unscale once first",
                )


def _check_clean_step(
    named: Sequence[tuple[str, nn.Parameter]],
    before: Sequence[torch.Tensor],
    expected: Sequence[torch.Tensor],
    kind: str,
    noise: frozenset[int],
) -> None:
    """The clean step's update of each weight equals the plain step's (`_reference_step`) within
    CLEAN_RTOL of its norm (power-of-two loss scales undo exactly; other scales round), but the
    parameters in `noise`, whose gradient is rounding alone (`_rounding_alone`)."""
    __tracebackhide__ = True
    for i, ((name, p), w, want) in enumerate(zip(named, before, expected, strict=True)):
        if i in noise:
            continue
        got, ref = (p.detach() - w).double(), (want.to(w.device) - w).double()
        off, size = float((got - ref).norm()), float(ref.norm())
        if off > CLEAN_RTOL * size + torch.finfo(w.dtype).tiny:
            fail(
                f"{kind}'s clean step did not update the weights as a step on the unscaled gradients does.",
                f"First: {name!r}: update norm {float(got.norm()):.6g}, a plain step's {size:.6g} "
                f"(allowed: within {CLEAN_RTOL:.0%} of it)",
                "A scaler must unscale the gradients (divide by the loss scale) once before the "
                "optimizer steps",
            )
