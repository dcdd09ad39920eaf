"""Deliberately broken implementations: each invariant must catch one of these (tests/test_invariants.py).

Each is a plausible bug, written the way it shows up in real training code.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from stabilitycheck.config import Config
from stabilitycheck.families import knob_specs
from stabilitycheck.subject import Built
from stabilitycheck.zoo import Family, ResBlock


def _prenorm_resmlp(config: Config) -> Built:
    """The zoo's pre-norm resmlp with `config`'s run settings and those of its knobs a resmlp has."""
    names = {spec.name for spec in knob_specs("resmlp")}
    knobs = {k: v for k, v in config.values.items() if k in names}
    return Family("resmlp").build(Config("resmlp", tuple({**knobs, "norm": "pre"}.items()), config.run))


def _grads(parameters: Iterable[nn.Parameter]) -> list[torch.Tensor]:
    return [p.grad for p in parameters if p.grad is not None]


def clip_per_tensor(parameters: Iterable[nn.Parameter], max_norm: float) -> None:
    """Clips each gradient to max_norm on its own: the total can reach sqrt(n) x max_norm and the
    update direction changes (tensors are shrunk by different factors)."""
    for g in _grads(parameters):
        g.mul_(min(1.0, max_norm / (float(g.norm()) + 1e-6)))


def clip_twice_as_loose(parameters: Iterable[nn.Parameter], max_norm: float) -> None:
    """Clips to 2 x max_norm (an off-by-a-factor bug, e.g. max_norm read as a diameter)."""
    torch.nn.utils.clip_grad_norm_(list(parameters), 2.0 * max_norm)


def clip_inf_to_nan(parameters: Iterable[nn.Parameter], max_norm: float) -> float:
    """A hand-rolled clip without a finiteness check: an Inf gradient makes the coefficient 0 and
    0 x Inf = NaN, so it silently returns NaN gradients (what clip_grad_norm_ does by default)."""
    grads = _grads(parameters)
    total = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
    coef = min(1.0, max_norm / (total + 1e-6))
    for g in grads:
        g.mul_(coef)
    return total


def clip_returning_clipped_norm(
    parameters: Iterable[nn.Parameter], max_norm: float, norm_type: float = 2.0
) -> torch.Tensor:
    """Clips as torch does but returns the total norm after clipping: a training log of the returned
    norm then shows every spike capped at max_norm."""
    params = list(parameters)
    torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
    norms = [torch.linalg.vector_norm(g, norm_type) for g in _grads(params)]
    return torch.linalg.vector_norm(torch.stack(norms), norm_type)


def clip_floor_division(parameters: Iterable[nn.Parameter], max_norm: float) -> None:
    """Norm clipping with `//` where `/` was meant: the coefficient max_norm // total is 0 whenever
    clipping is needed, so every gradient is set to zero (what torch's clip_grad_norm_ does when the
    total norm overflows the gradient dtype: max_norm / inf = 0)."""
    grads = _grads(parameters)
    total = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
    coef = min(1.0, max_norm // (total + 1e-6))
    for g in grads:
        g.mul_(coef)


def clip_value_as_norm(parameters: Iterable[nn.Parameter], max_norm: float) -> None:
    """Value clipping passed off as norm clipping: each entry clamped to +-max_norm. The total
    norm can stay above max_norm and the direction changes."""
    torch.nn.utils.clip_grad_value_(list(parameters), max_norm)


def clip_value_one_sided(parameters: Iterable[nn.Parameter], clip_value: float) -> None:
    """Value clipping that forgets the negative side: clamp(max=v) only."""
    for g in _grads(parameters):
        g.clamp_(max=clip_value)


class UnguardedScaler:
    """A GradScaler stand-in that scales and unscales but never checks for Inf/NaN: it steps on them."""

    def __init__(self, init_scale: float = 2.0**16) -> None:
        self._scale = init_scale

    def scale(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs * self._scale

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.div_(self._scale)
        optimizer.step()

    def update(self) -> None:
        pass

    def get_scale(self) -> float:
        return self._scale


class NanOnlyScaler(UnguardedScaler):
    """Skips steps on NaN but not on Inf (checks `isnan` where `isfinite` was meant)."""

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if any(bool(g.isnan().any()) for g in grads):
            self._scale /= 2.0
            return
        super().step(optimizer)


class FirstGradOnlyScaler(UnguardedScaler):
    """Skips steps on Inf/NaN found in the first gradient only (checks `grads[0]` where every one
    was meant, like a scaler that looks at param_groups[0] alone)."""

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not bool(grads[0].isfinite().all()):
            self._scale /= 2.0
            return
        super().step(optimizer)


class _Guarded(UnguardedScaler):
    """Skips (and backs off) where `bad` finds a gradient to refuse; `unscale` divides the rest."""

    def bad(self, grads: list[torch.Tensor]) -> bool:
        return any(not bool(g.isfinite().all()) for g in grads)

    def unscale(self, grads: list[torch.Tensor]) -> None:
        for g in grads:
            g.div_(self._scale)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if self.bad(grads):
            self._scale /= 2.0
            return
        self.unscale(grads)
        optimizer.step()


class NeverUnscalesScaler(_Guarded):
    """Guards correctly but steps on the scaled gradients (x65536 the update)."""

    def unscale(self, grads: list[torch.Tensor]) -> None:
        pass


class UnscalesTwiceScaler(_Guarded):
    """Guards correctly but divides by the scale twice (an unscale_() then step() that unscales again)."""

    def unscale(self, grads: list[torch.Tensor]) -> None:
        for g in grads:
            g.div_(self._scale * self._scale)


class EndsOnlyScaler(_Guarded):
    """Checks only each gradient's first and last entries: a NaN inside a tensor is stepped on."""

    def bad(self, grads: list[torch.Tensor]) -> bool:
        return super().bad([g.reshape(-1)[[0, -1]] for g in grads])


class EvenEntriesScaler(_Guarded):
    """Checks every other entry of each gradient (a strided sample): a NaN at an odd entry is stepped on."""

    def bad(self, grads: list[torch.Tensor]) -> bool:
        return super().bad([g.reshape(-1)[::2] for g in grads])


class ThirdEntriesScaler(_Guarded):
    """Checks every third entry of each gradient: a NaN elsewhere is stepped on."""

    def bad(self, grads: list[torch.Tensor]) -> bool:
        return super().bad([g.reshape(-1)[::3] for g in grads])


class StaleOnSkipScaler(_Guarded):
    """On a step it should skip, steps on the last clean step's gradients (kept for 'resuming')."""

    def __init__(self, init_scale: float = 2.0**16) -> None:
        super().__init__(init_scale)
        self.last: list[torch.Tensor] | None = None

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        grads = [p.grad for p in params if p.grad is not None]
        if not self.bad(grads):
            self.unscale(grads)
            self.last = [g.clone() for g in grads]
        elif self.last is None:
            self._scale /= 2.0
            return
        else:
            self._scale /= 2.0
            for p, g in zip(params, self.last, strict=True):
                p.grad = g.clone()
        optimizer.step()


class ClearsStateOnSkipScaler(_Guarded):
    """Skips a step on Inf/NaN but resets the optimizer's state there (Adam's moments and step count)."""

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if self.bad(grads):
            optimizer.state.clear()
        super().step(optimizer)


class WeightsOnlyScaler(_Guarded):
    """Checks only the gradients of matrices (dim >= 2): a NaN in a bias is stepped on."""

    def bad(self, grads: list[torch.Tensor]) -> bool:
        return super().bad([g for g in grads if g.dim() >= 2])


class PositiveInfScaler(_Guarded):
    """Checks `== inf` and `isnan` where `isfinite` was meant: -Inf is stepped on."""

    def bad(self, grads: list[torch.Tensor]) -> bool:
        return any(bool((g == math.inf).any() or g.isnan().any()) for g in grads)


class NeverStepsScaler(UnguardedScaler):
    """Guards against Inf by never stepping at all (and still backs off the scale)."""

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        self._scale /= 2.0


class PostNormInDisguise(ResBlock):
    """Named and configured as a pre-norm block, but its forward applies the LayerNorm after the
    residual sum: ln(x + f(x)), i.e. post-norm. The skip path then goes through every LayerNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(x + self.branch(x))  # type: ignore[no-any-return]


def disguised_prenorm(config: Config) -> Built:
    """The zoo's pre-norm resmlp of `config`, same weights and block names, with every block's
    forward replaced by the post-norm one (the class is swapped in place, so nothing else differs)."""
    built = _prenorm_resmlp(config)
    for block in built.model.layers:  # type: ignore[union-attr]
        block.__class__ = PostNormInDisguise
    return built


class _IgnoresGradOutput(torch.autograd.Function):
    """Mean squared error whose backward ignores grad_output: a common bug in custom Functions."""

    @staticmethod
    def forward(ctx: Any, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(output, target)
        return (output - target).pow(2).mean()

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        output, target = ctx.saved_tensors
        return 2 * (output - target) / output.numel(), None  # forgot `grad_output *`


def loss_ignoring_grad_output(output: torch.Tensor, inputs: Any) -> torch.Tensor:
    """A loss that is not scaled linearly: scaling it by c leaves its gradient unchanged."""
    target = torch.zeros_like(output).fill_(0.5)
    return _IgnoresGradOutput.apply(output, target)  # type: ignore[no-any-return]


def clamp_grad_hooks(model: nn.Module, bound: float = 1e-3) -> None:
    """Tensor hooks that clamp every parameter gradient to +-bound during backward (clipping done
    inside autograd): backward stops being linear in the loss."""
    for p in model.parameters():
        p.register_hook(lambda g: g.clamp(-bound, bound))


def inject(parameters: Iterable[nn.Parameter], value: float = math.inf) -> None:
    """Put `value` into the first entry of the first gradient."""
    g = _grads(parameters)[0]
    with torch.no_grad():
        g.view(-1)[0] = value


def clip_always_normalise(parameters: Iterable[nn.Parameter], max_norm: float) -> None:
    """Rescales to norm max_norm even when the gradients were smaller: scales small gradients UP."""
    grads = _grads(parameters)
    total = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
    for g in grads:
        g.mul_(max_norm / (total + 1e-6))


class NormIsIdentity(ResBlock):
    """A pre-norm block whose LayerNorm never runs (an inverted `if norm` in its constructor): with
    no norm and no bound on the branch, each block multiplies the stream by about 1 + init_scale**2."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


def prenorm_without_norm(config: Config) -> Built:
    """The zoo's pre-norm resmlp of `config` with every block's LayerNorm skipped (class swapped)."""
    built = _prenorm_resmlp(config)
    for block in built.model.layers:  # type: ignore[union-attr]
        block.__class__ = NormIsIdentity
    return built


class ZeroesAndStepsScaler(_Guarded):
    """Backs off on a non-finite gradient but, instead of skipping, zeroes the gradients and steps: SGD
    and Adam's first moves leave the weights unchanged, but the optimizer counts a step."""

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if self.bad(grads):
            self._scale /= 2.0
            for g in grads:
                g.zero_()
            optimizer.step()
            return
        super().step(optimizer)
