"""probe_module's optimiser side: its training settings checked, the optimiser built, and one update
(clipped, warmed up, through a GradScaler) as torch's own loop would make it."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from stabilitycheck.config import AMPS, OPTIMIZERS, choice
from stabilitycheck.errors import ConfigError, UsageError


@dataclass(frozen=True)
class Training:
    """probe_module's training settings, checked (`training_settings`)."""

    steps: int
    warmup: int
    seed: int
    lr: float
    optimizer: str
    amp: str
    clip: float | None


def training_settings(
    steps: Any, warmup: Any, seed: Any, lr: Any, optimizer: Any, amp: Any, clip: Any
) -> Training:
    """probe_module's settings checked, counts as ints and lr as a float (numpy scalars welcome): a
    misspelt optimizer or amp ran plain SGD in float32, a negative clip reversed the gradient."""

    def bad(what: str) -> UsageError:
        return UsageError(f"probe_module: {what}")

    counts = []
    for name, value in (("steps", steps), ("warmup", warmup), ("seed", seed)):
        try:
            if isinstance(value, bool):  # an int to operator.index: steps=True ran one step
                raise TypeError
            counts.append(operator.index(value))
        except TypeError:
            raise bad(f"{name} must be a whole number, got {value!r}; pass int(...)") from None
        if counts[-1] < 0:
            raise bad(f"{name} must be >= 0, got {value!r}")
    try:
        rate = math.nan if isinstance(lr, str) else float(lr)
    except (TypeError, ValueError):
        rate = math.nan
    if not (math.isfinite(rate) and rate >= 0):
        raise bad(f"lr must be a finite number >= 0, got {lr!r}")
    for name, value, allowed in (("optimizer", optimizer, OPTIMIZERS), ("amp", amp, AMPS)):
        try:
            choice(name, value, allowed)  # a Config's own check of these names
        except ConfigError as exc:
            raise bad(str(exc).removeprefix("Run.")) from None
    if clip is not None:
        try:
            cap = float(clip)
        except (TypeError, ValueError):
            cap = math.nan
        if not (math.isfinite(cap) and cap > 0):
            raise bad(f"clip must be None or a finite number > 0, got {clip!r}")
    return Training(counts[0], counts[1], counts[2], rate, optimizer, amp, clip)


def optimizer_for(
    name: str, model: nn.Module, params: Sequence[nn.Parameter], lr: float
) -> torch.optim.Optimizer:
    """The optimiser the steps use; Adam refused upfront where the model makes sparse gradients (torch's
    Adam raises on them at the first step, which read as the knobs' fault)."""
    if name == "adam":
        sparse = [n for n, m in model.named_modules() if getattr(m, "sparse", False) is True]
        if sparse:
            raise UsageError(
                f"--optimizer adam cannot step the sparse gradients of {sparse[0] or 'the model'} "
                "(an embedding built with sparse=True): use --optimizer sgd, or sparse=False"
            )
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr)


def update(
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    params: Sequence[nn.Parameter],
    step: int,
    total: float,
    settings: Training,
    overflowed: bool = False,
) -> int:
    """One optimiser update of `params`, clipped to the `total` norm, warmed up (`settings`' lr, clip
    and warmup), through the GradScaler; 1 if it was skipped (a non-finite total, or scaled gradients
    that `overflowed`, whose unscaled total is finite)."""
    lr, clip, warmup = settings.lr, settings.clip, settings.warmup
    finite = math.isfinite(total) and not overflowed
    if clip is not None and finite:
        coef = min(1.0, clip / (total + 1e-6))  # torch's clip_grad_norm_ contract
        torch._foreach_mul_([p.grad for p in params if p.grad is not None], coef)
    if warmup:
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup)
    if scaler is None:
        opt.step()
        return 0
    scaler.step(opt)  # skips the update when the unscaled gradients hold Inf/NaN
    scaler.update()
    return 0 if finite else 1
