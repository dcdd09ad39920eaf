"""The checks of `watch`'s arguments, when it starts: each wrong one a one-line UsageError that says
what was passed and what to pass instead (never a traceback from deep inside a training run)."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from stabilitycheck.errors import UsageError
from stabilitycheck.spikes import SpikeRule
from stabilitycheck.watchstate import check_replayable

MAX_FLUSH_EVERY = 10_000  # the device buffer holds this many rows; a finding is out within as many steps


def count(name: str, value: Any, most: int | None = None) -> int:
    """`value` as a whole number >= 1 (an int, not a bool, a float or a string), at most `most`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"watch: {name} must be a whole number >= 1, got {value!r}")
    if most is not None and value > most:
        raise UsageError(
            f"watch: {name} must be at most {most:,} (a row per step is buffered until then, and a "
            f"finding waits as long), got {value:,}"
        )
    return value


def check_arguments(model: Any, optimizer: Any, rule: Any, report: Any, scaler: Any) -> None:
    """The types of watch's arguments (a swapped pair, a dict for a rule, a path for a stream)."""
    if not isinstance(model, nn.Module):
        raise UsageError(
            f"watch: the first argument must be the model (a torch.nn.Module), got {type(model).__name__}; "
            "call watch(model, optimizer, ...)"
        )
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise UsageError(
            "watch: the second argument must be the torch.optim.Optimizer that steps the model (or "
            f"None), got {type(optimizer).__name__}; call watch(model, optimizer, ...)"
        )
    if rule is not None and not isinstance(rule, SpikeRule):
        raise UsageError(
            f"watch: rule must be a stabilitycheck.spikes.SpikeRule, got {type(rule).__name__}; "
            "e.g. rule=SpikeRule(window=64)"
        )
    if report is not None and not callable(getattr(report, "write", None)):
        raise UsageError(
            f"watch: report must be a text stream (e.g. sys.stderr or an open file) or None, got {report!r}"
        )
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise UsageError(f"watch: scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")


def check_clip(max_norm: Any) -> float | None:
    """clip_grad_norm= as a positive finite number, or None."""
    if max_norm is None:
        return None
    if isinstance(max_norm, bool) or not isinstance(max_norm, int | float) or not 0 < max_norm < float("inf"):
        raise UsageError(
            "watch: clip_grad_norm must be the max_norm your loop passes to "
            f"torch.nn.utils.clip_grad_norm_ before each step (a number > 0), got {max_norm!r}"
        )
    return float(max_norm)


def check_skip(skip: Any) -> bool:
    """skip= as a bool (True or False, not a truthy string)."""
    if not isinstance(skip, bool):
        raise UsageError(f"watch: skip must be True or False, got {skip!r}")
    return skip


def check_modes(
    model: nn.Module,
    world: int,
    skip: bool,
    bundle: Any,
    compute_loss: Any,
    optimizer: torch.optim.Optimizer | None,
    fused: bool,
    hook_optimizer: bool,
) -> None:
    """Which combinations of skip=, bundle= and the optimizer work; a warning for the costly one."""
    if world > 1 and (skip or bundle is not None):
        raise UsageError(
            "watch: skip= and bundle= are single-process only (under torch.distributed the rule "
            "runs at each flush, on every rank's rows); drop them, or watch a single-process run"
        )
    if bundle is not None and compute_loss is None:
        raise UsageError(
            "watch: bundle= needs compute_loss=fn(model, batch) -> loss (a module-level function) "
            "and w.loss(loss, batch=batch) each step, so `stabilitycheck replay` can re-run the step"
        )
    if bundle is not None:
        check_replayable(model, compute_loss)
    if skip and optimizer is None:
        raise UsageError("watch: skip=True needs the optimizer whose steps it skips")
    if skip and not fused:
        if not hook_optimizer:
            raise UsageError(
                "watch: skip=True through a callback needs a fused optimizer (e.g. "
                "torch.optim.AdamW(..., fused=True)): its found_inf input skips a step on the device"
            )
        warnings.warn(
            f"watch: skip=True with a non-fused {type(optimizer).__name__}: deciding costs one host "
            "sync per step (counted in host_reads); pass fused=True to skip on the device",
            stacklevel=4,
        )


def check_loss(loss: Any) -> torch.Tensor:
    """A step's loss: a tensor of one element (metadata only: no host read)."""
    if not isinstance(loss, torch.Tensor):
        packed = isinstance(loss, dict | tuple | list)  # a model's outputs (HF's have a "loss" entry)
        hint = "the tensor backward() is called on, e.g. out['loss']" if packed else "`loss`, not loss.item()"
        raise UsageError(f"watch: w.loss() takes the loss tensor, got {type(loss).__name__}; pass {hint}")
    if not loss.is_floating_point():
        raise UsageError(
            f"watch: w.loss() takes the float loss that backward() is called on, got a {loss.dtype} tensor"
        )
    if loss.numel() != 1:
        raise UsageError(
            f"watch: w.loss() takes the scalar loss, got shape {tuple(loss.shape)}; pass the reduced "
            "loss (e.g. loss.mean()) that backward() is called on"
        )
    return loss


def check_optimizer_params(params: list[Any], optimizer: Any, skip: bool) -> None:
    """The watched optimizer must step the watched model: one holding none of its parameters (another
    model's) closes rows at the wrong time and, with skip=True, skips the wrong update; with skip=True,
    trainable parameters another optimizer steps are updated on a flagged step, which is said here."""
    if optimizer is None:
        return
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = [p for p in params if p.requires_grad]
    if not any(id(p) in held for p in params):
        raise UsageError(
            f"watch: the {type(optimizer).__name__} holds none of the model's parameters (the optimizer of "
            "another model?); call watch(model, optimizer) with the optimizer that steps this model"
        )
    outside = sum(id(p) not in held for p in trainable)
    if skip and outside:
        warnings.warn(
            f"watch: skip=True skips the {type(optimizer).__name__}'s step only, and {outside} of the "
            f"model's {len(trainable)} trainable parameters are not in it (another optimizer's): they are "
            "still updated on a flagged step",
            stacklevel=4,
        )
