"""Invariants of training: it stays finite over optimiser steps, and the gradient growth stays bounded
(a GradScaler's guards: invariants_gradscaler)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import overload

from torch import nn

from stabilitycheck.config import Config
from stabilitycheck.configprobe import probe
from stabilitycheck.culprit import culprit_of
from stabilitycheck.errors import UsageError
from stabilitycheck.invariants_common import fail, positive
from stabilitycheck.losses import Inputs, LossFn
from stabilitycheck.measurement import Measurement, shown
from stabilitycheck.probing import probe_module


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
    steps: int | None = None,
    lr: float | None = None,
    optimizer: str | None = None,
    clip: float | None = None,
    blocks: Sequence[tuple[str, nn.Module]] | None = None,
    seed: int | None = None,
) -> Measurement:
    """Weights, activations, gradients and loss stay finite over `steps` optimiser steps (probe_module
    does the steps and names the first non-finite value; for a module, 10 Adam steps at lr 1e-3 by
    default). Returns the Measurement for further checks. Given a Config instead of a model, probes it
    (`probe(config)`) with its own steps, lr and optimiser: a keyword beside it is refused, not
    ignored (steps=50, lr=1e30 beside a Config ran its 3 steps at 0.01 and passed)."""
    __tracebackhide__ = True
    if isinstance(model, Config):
        if inputs is not None or loss_fn is not None:
            raise UsageError("assert_finite_training(config) takes no inputs or loss_fn; the Config has them")
        given = (steps, lr, optimizer, clip, blocks, seed)
        names = ("steps", "lr", "optimizer", "clip", "blocks", "seed")
        passed = [name for name, value in zip(names, given, strict=True) if value is not None]
        if "blocks" in passed:  # no Config holds blocks: they are the built model's own
            raise UsageError(
                "assert_finite_training(config) reads the blocks of the model the Config builds, not "
                "blocks=; for blocks of your own, call it on the module: "
                "assert_finite_training(model, inputs, loss_fn, blocks=...)"
            )
        if passed:
            raise UsageError(
                f"assert_finite_training(config) takes its run settings from the Config, not {passed[0]}=; "
                f"put them in it, e.g. Config.of(..., steps=50, lr=1e-3), or config.with_run(...)"
            )
        steps, lr, optimizer = model.run.steps, model.run.lr, model.run.optimizer
    steps, lr, optimizer = 10 if steps is None else steps, 1e-3 if lr is None else lr, optimizer or "adam"
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        if isinstance(model, Config):
            raise UsageError(
                f"assert_finite_training(config) trains for the Config's run.steps, which is {steps!r}; "
                "give it steps, e.g. Config.of(..., steps=10)"
            )
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
            seed=0 if seed is None else seed,
        )
    nf = m.first_nonfinite
    if nf is not None:
        losses = ", ".join(f"{x:.4g}" for x in m.loss)
        norms = ", ".join(f"{x:.3g}" for x in m.grad_norm)
        fail(
            f"Training went non-finite within {steps} {optimizer} steps at lr={lr:g}.",
            f"Steps finite: {nf.step} / {steps + 1} (step 0 at init, then one per update)",
            f"First non-finite: step {nf.step}, layer {nf.layer!r}, tensor {nf.tensor!r} (norm {nf.value})",
            f"Loss per step: {losses}",
            f"Total gradient norm per step: {norms}",
        )
    return m


def _nothing_reached(m: Measurement) -> str:
    """Why no gradient reached any block output, and what to do: a loss at exactly 0 (saturated: a
    cross-entropy on one sample whose logits grew far apart) gives no gradient, however many steps;
    else a zero-initialised head, which one update makes non-zero, or a loss that does not read the
    blocks."""
    said = "unmeasured: no gradient reached any block output (every dL/d output is 0"
    if m.loss and m.loss[min(m.profile_step, len(m.loss) - 1)] == 0.0:
        return (
            f"{said}: the loss is exactly 0, saturated or multiplied by 0); use a batch of more than one "
            "sample or a loss linear in the output"
        )
    if m.steps_run == 0:
        return (
            f"{said}: a zero-initialised head, or a loss that does not depend on the blocks); probe with "
            "steps=1 to read it after one update"
        )
    return (
        f"{said} after {m.steps_run} steps: a loss that does not depend on the blocks, or a head kept at 0)"
    )


def assert_bounded_growth(measurement: Measurement, limit: float, *, gain_limit: float | None = None) -> None:
    """The overall growth (input-side over output-side activation-gradient norm) is <= limit and so is
    every per-layer gain (or <= gain_limit). NaN and Inf count as over: never hidden; but a ratio of
    two gradient norms that are both exactly 0 (no gradient reached there: dead ReLUs) is no growth,
    nor is a gain the probe does not take (NaN between finite norms: across an encoder-decoder's
    junction, or next to an output the loss does not depend on). Where no gradient reached any block
    output, nothing was measured: that fails, saying so."""
    __tracebackhide__ = True
    if not isinstance(measurement, Measurement):
        raise UsageError(
            f"assert_bounded_growth takes a Measurement, got {type(measurement).__name__}: probe first, "
            "e.g. assert_bounded_growth(probe(config), 100) or probe_module(model, inputs, loss_fn)"
        )
    limit = positive("limit", limit)
    per_layer = limit if gain_limit is None else positive("gain_limit", gain_limit)
    m = measurement
    names = m.activation_names[1:]  # gain i is across the block whose output is activation i + 1
    acts = m.activation_grad_norms

    def silent(i: int, j: int) -> bool:
        return acts[i] == 0.0 and acts[j] == 0.0

    def taken(i: int) -> bool:
        return not (math.isnan(m.gains[i]) and math.isfinite(acts[i]) and math.isfinite(acts[i + 1]))

    over = [i for i, g in enumerate(m.gains) if not g <= per_layer and not silent(i, i + 1) and taken(i)]
    # no gradient reached any block output (a zero-initialised head at steps=0, a loss that does not
    # depend on the blocks): nothing was measured, which is no pass (torchvision's ViT passed any limit)
    none = bool(acts) and all(a == 0.0 for a in acts)
    growth_bad = none or not m.growth <= limit
    if not over and not growth_bad:
        return
    unread = math.isnan(m.growth) and all(math.isfinite(a) for a in acts)  # readings.chains_of
    why = (
        f"; {_nothing_reached(m)}"
        if none
        else "; unmeasured: the loss reaches one block output of a chain of several, no gain between two"
    )
    lines = [
        f"Overall growth: {m.growth:.4g} (allowed: <= {limit:g}){why if unread else ''}",
        f"Layers over bound: {len(over)} / {len(m.gains)}",
    ]
    gains = [i for i in range(len(m.gains)) if taken(i)]
    nf = m.first_nonfinite
    if nf is not None:  # NaN gains lie everywhere past it: the first of them named layers.0
        lines.insert(0, f"First non-finite value: {nf.describe()}; made in {shown(culprit_of([m]))}")
    elif gains:
        worst = max(gains, key=lambda i: math.inf if math.isnan(m.gains[i]) else m.gains[i])
        lines.append(
            f"Worst layer: {names[worst]!r} with gain {m.gains[worst]:.4g} (allowed: <= {per_layer:g})"
        )
    if m.activation_grad_norms:
        lines.append(
            f"Activation-gradient norm at {m.activation_names[0]!r}: {m.activation_grad_norms[0]:.4g}, "
            f"at {m.activation_names[-1]!r}: {m.activation_grad_norms[-1]:.4g}"
        )
    headline = (
        "A value went non-finite: the growth is not bounded."
        if nf is not None
        else "Gradient growth could not be measured."
        if unread and not over
        else "Gradient growth is above the limit."
    )
    fail(headline, *lines)
