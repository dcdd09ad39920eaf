"""The probe: forward, backward and optimiser steps on a model (each step: probestep.run_step),
read into a Measurement: every gradient norm, the per-block gains along the chain, and where a value
first goes non-finite."""

from __future__ import annotations

import dataclasses
import functools
import math
import random
from collections.abc import Sequence

import torch
from torch import nn

from stabilitycheck._tree import tensors as tensors_of
from stabilitycheck._validation import article
from stabilitycheck.blocks import BYPASSED, find_blocks, own_blocks, shown_blocks
from stabilitycheck.errors import UsageError, UserCodeError, no_trainable
from stabilitycheck.layout import block_of, combined, layout_of, per_block, trainable
from stabilitycheck.loops import looped_blocks
from stabilitycheck.losses import Inputs, LossFn
from stabilitycheck.measurement import (
    Measurement as Measurement,  # `X as X`: what probe_module returns
)
from stabilitycheck.measurement import NonFinite
from stabilitycheck.nesting import refusing_inside
from stabilitycheck.probestep import OutOfOrder, Run, back_to, run_step, start_of
from stabilitycheck.readings import (
    Step,
    chains_of,
    cut_before,
    gains_of,
    growth_of,
    locate,
    unscored,
)
from stabilitycheck.recording import Recorder
from stabilitycheck.rng import SALT_FORWARD, derived
from stabilitycheck.updates import Training, optimizer_for, training_settings, update

AUTOCAST = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def probe_module(
    model: nn.Module,
    inputs: Inputs,
    loss_fn: LossFn,
    *,
    blocks: Sequence[tuple[str, nn.Module]] | None = None,
    steps: int = 0,
    lr: float = 0.01,
    optimizer: str = "sgd",
    clip: float | None = None,
    warmup: int = 0,
    amp: str = "none",
    seed: int = 0,
) -> Measurement:
    """Probe any module: forward + backward at step 0, then `steps` optimiser steps, each followed
    by another forward + backward. Per-block numbers come from step 0, or where no gradient reached
    any block output there (a zero-initialised head: every gain 0 / 0), from the first step where
    one did or a non-finite value shows (`profile_step`: the growth is a ratio of gradients, whatever
    the head's scale). A non-finite value stops the run; the step that shows it is re-run in float64
    with the hooks on to name the block.

    `amp` ('bfloat16' or 'float16') runs the forward under torch.autocast; float16 also uses a
    torch.amp.GradScaler, whose loss scale is recorded per step, with the steps it skipped. `seed`
    seeds what the forward draws (dropout masks, noise; with torch or Python's `random`, the caller's
    states given back) through rng.derived, not as itself: a model built right after
    torch.manual_seed(seed) drew its weights from that stream. numpy's global generator is not
    seeded: a forward drawing from it reads other numbers at each call.
    """
    if not isinstance(model, nn.Module):
        raise UsageError(
            f"probe_module: the first argument must be the model (an nn.Module), got {article(model)}"
        )
    settings = training_settings(steps, warmup, seed, lr, optimizer, amp, clip)
    chosen = ""  # how the blocks were found, where they were not given
    modules = tuple(model.modules())  # the one walk of the model: see layout.trainable
    if any(t.device.type == "meta" for t in (*tensors_of(inputs), *_tensors_of(modules))):
        raise UsageError(  # before any forward (finding blocks runs one): an embedding lookup of meta
            # ids in CPU weights read memory never written, another growth at each call
            "probe_module: the model or its inputs are on the meta device (shapes, no values): nothing "
            "can be measured there; build them on a real device (cpu, cuda)"
        )
    if blocks is None:
        blocks, chosen = looped_blocks(model, inputs, *find_blocks(model))
    else:
        blocks = own_blocks(model, blocks, "probe_module", modules)
    params = trainable(modules)
    if not params:  # unnamed: probe(config) and the CLI come here too, where the user called no
        raise no_trainable()  # probe_module
    if not blocks:
        raise UsageError(
            "probe_module: no blocks to measure (an empty blocks= or stability_blocks()): the growth would "
            "read 1, stable, whatever the model does; give the model's repeated blocks, e.g. "
            "blocks=[(f'layers.{i}', m) for i, m in enumerate(model.layers)]"
        )
    run = functools.partial(_measure, model, modules, inputs, loss_fn, settings=settings, chosen=chosen)
    handles = refusing_inside(blocks, "probe_module")
    try:
        return run(tuple(blocks), ordered=False)
    except OutOfOrder as late:  # another block ran before block 0: its input is the chain's entry
        return run(tuple(blocks[i] for i in late.order), ordered=True)
    finally:
        for handle in handles:
            handle.remove()


def _tensors_of(modules: Sequence[nn.Module]) -> list[torch.Tensor]:
    """Every parameter and buffer of the modules."""
    return [t for m in modules for t in (*m._parameters.values(), *m._buffers.values()) if t is not None]


def _measure(
    model: nn.Module,
    modules: tuple[nn.Module, ...],
    inputs: Inputs,
    loss_fn: LossFn,
    blocks: Sequence[tuple[str, nn.Module]],
    *,
    settings: Training,
    chosen: str,
    ordered: bool,
) -> Measurement:
    """probe_module's run on `blocks` of the model (whose `modules` are given) under its checked
    `settings` (`chosen`: how the blocks were found, or ''); `ordered`: in the order of
    their calls already (else step 0 raises OutOfOrder where another block ran before block 0)."""
    steps, seed, lr, amp = settings.steps, settings.seed, settings.lr, settings.amp
    names = tuple(name for name, _ in blocks)
    layout = layout_of(model, blocks, trainable(modules))  # again: a lazy layer's first call made its own
    params, owner = layout.params, layout.owner
    device = params[0].device
    scaler = torch.amp.GradScaler(device.type) if amp == "float16" else None
    opt = optimizer_for(settings.optimizer, model, params, lr) if steps > 0 or scaler is not None else None
    run = Run(
        model,
        modules,
        inputs,
        loss_fn,
        names,
        params,
        Recorder(blocks, input_side=True),
        opt,
        AUTOCAST.get(amp),
        scaler,
        ordered,
    )
    losses: list[float] = []
    totals: list[float] = []
    scales: list[float] = []
    skipped = 0
    nonfinite: NonFinite | None = None
    # the caller's Python state, given back as torch's is; numpy's global generator is left alone:
    # saving and restoring its state costs ~0.1 ms a probe, 1.5-2.5% of a 16x256 MLP's step
    caller = random.getstate()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            forward = derived(seed, SALT_FORWARD)
            torch.default_generator.manual_seed(forward)
            random.seed(forward)  # a forward's `random` draws (a LayerDrop)
            if device.type == "cuda":
                index = torch.cuda.current_device() if device.index is None else device.index
                torch.cuda.default_generators[index].manual_seed(forward)
            # weights are measured after the last update; at steps=0 they are the caller's own
            profiling = True  # until the per-block profile is read: see probe_module
            for step in range(steps + 1):
                start = start_of(modules)  # a re-run of the step starts where it did
                hooked = profiling
                last = run_step(run, start, hooks=hooked, weights=0 < step == steps)
                if step == 0 and not last.calls:
                    raise _never_called(names, sorted(run.rec.empty))
                scales.append(last.scale)
                found = None if last.finite else locate(step, last, names, owner, scaler is None)
                if found is not None:  # name it, in float64
                    back_to(start)
                    exact = run_step(run, start, hooks=True, exact=True, weights=True)
                    nonfinite = locate(step, exact, names, owner, scaler is None)
                    if nonfinite is None:  # the re-run stayed finite: the model draws on what
                        # is not restored (a counter, Python's random); the step as it ran is the finding
                        nonfinite = dataclasses.replace(found, reproduced=False)
                    else:
                        last = exact
                overflowed = scaler is not None and not math.isfinite(sum(last.grads))
                unscaled = last
                if overflowed and found is None:
                    # the scaled gradients overflowed (the scaler skips this step): the total norm (the
                    # per-block profile too, while it is read) from an unscaled float64-norm re-run of the
                    # same step; non-finite there too, at scale 1, the dtype cannot hold the gradient: a
                    # finding
                    back_to(start)
                    unscaled = run_step(run, start, hooks=hooked, exact=True)
                    if not unscaled.finite:
                        nonfinite = locate(step, unscaled, names, owner)
                if hooked and (step == 0 or found is not None or not _silent(unscaled)):
                    first, profile_step = unscaled, step  # the per-block profile
                    profiling = _silent(unscaled)
                losses.append(last.loss)
                totals.append(combined(unscaled.grads))
                if nonfinite is not None or step == steps:
                    skipped += overflowed  # no update follows, but the scaler would have skipped it
                    break
                assert opt is not None  # built whenever steps > 0
                skipped += update(opt, scaler, params, step, totals[-1], settings, overflowed)
    finally:
        run.rec.remove()
        random.setstate(caller)
    act = tuple(first.backward)
    unreached = first.unreached | unscored(act, first.breaks, first.unreached, first.cuts)
    chains, feeds = chains_of(act, first.breaks, unreached, first.feeds)
    credit = _credited(params, blocks, owner, first.ran)  # the block each weight's norms count in
    return Measurement(
        layer_names=names,
        activation_names=first.calls,
        loss=tuple(losses),
        grad_norm=tuple(totals),
        layer_grad_norms=per_block(first.grads, credit, len(names)),
        activation_norms=tuple(first.forward),
        activation_grad_norms=act,
        gains=gains_of(act, first.breaks, unreached),
        growth=growth_of(chains, feeds, len(act)),
        chain_starts=tuple(sorted(b for b in first.breaks if 0 < b < len(act))),
        chain_growths=chains if len(chains) > 1 else (),
        chain_feeds=feeds if len(chains) > 1 else (),
        profile_step=profile_step,
        state_end=max((i for i in range(len(act)) if i not in unreached), default=-1) in first.carried,
        between_gain=first.between,
        cut_before=cut_before(first.severed, first.unreached),
        blocks_note="; ".join(n for n in (chosen, _uncalled(names, first.ran | run.rec.empty)) if n),
        weight_norms=per_block(last.weights, credit, len(names)) if last.weights else (),
        first_nonfinite=nonfinite,
        steps_run=len(losses) - 1,
        loss_scale=tuple(scales) if scaler else (),
        skipped_steps=skipped,
        allow_tf32=tf32_allowed(modules, device),
    )


def tf32_allowed(modules: Sequence[nn.Module], device: torch.device) -> bool:
    """Whether torch may run the model's float32 work on `device` in TF32: CUDA matmuls set to it, or
    cuDNN enabled and set to it (its default) where the model has a convolution or a recurrent module,
    which run through cuDNN. Read from torch's fp32_precision settings where it has them: its
    allow_tf32 flags raise once those are set ("a mix of the legacy and new APIs"), after the whole
    run. A convolution called as a function (F.conv2d) with no such module is not seen."""
    if device.type != "cuda":
        return False
    backends = torch.backends
    if hasattr(backends.cuda.matmul, "fp32_precision"):  # torch 2.9 on
        matmul = backends.cuda.matmul.fp32_precision == "tf32"
        conv = backends.cudnn.conv.fp32_precision == "tf32"  # type: ignore[attr-defined]
        rnn = backends.cudnn.rnn.fp32_precision == "tf32"  # type: ignore[attr-defined]
    else:
        matmul, conv = bool(backends.cuda.matmul.allow_tf32), bool(backends.cudnn.allow_tf32)
        rnn = conv
    conv, rnn = conv and backends.cudnn.enabled, rnn and backends.cudnn.enabled  # off: torch's own kernels
    convs = conv and any(isinstance(m, nn.modules.conv._ConvNd) for m in modules)
    return matmul or convs or (rnn and any(isinstance(m, nn.RNNBase) for m in modules))


def _credited(
    params: Sequence[nn.Parameter],
    blocks: Sequence[tuple[str, nn.Module]],
    owner: Sequence[int],
    ran: frozenset[int],
) -> Sequence[int]:
    """The block each parameter's gradient norm counts in: its first owner, or, where blocks never
    ran in the profile's step, its first owner that ran (layout.block_of)."""
    return owner if len(ran) == len(blocks) or not ran else block_of(params, blocks, ran)


def _uncalled(names: Sequence[str], ran: frozenset[int]) -> str:
    """A note naming the blocks no hook saw in the profile's step, where others ran: unmeasured, and
    unsaid before (HRNet's downsampling blocks, called as `down.forward(y)`: 3 of 15, and the chain
    they were on fell into chains of one: an audit)."""
    missing = [name for b, name in enumerate(names) if b not in ran]
    if not missing or not ran:
        return ""
    return (
        f"{len(missing)} of {len(names)} blocks not called through __call__ in the measured step "
        f"({shown_blocks(missing)}), not measured: a forward calling `block.forward(x)` bypasses module "
        "hooks, or the model skips them"
    )


def _silent(step: Step) -> bool:
    """No gradient reached any block output in a finite step (every dL/d output exactly 0): behind a
    zero-initialised head (torchvision's VisionTransformer, timm's MLP-Mixer) every gain is 0 / 0."""
    return step.finite and bool(step.backward) and not any(step.backward)


def _never_called(names: Sequence[str], empty: Sequence[int]) -> UserCodeError:
    """No block's forward hook recorded an output in the step's forward: its growth would read 1 (no
    gain measured), stable, whatever the gradients did (a tanh stack at sigma_w 4, 30 layers deep,
    total gradient norm 3.6e3, read growth 1). `empty`: the blocks that ran but returned no floating
    tensor the probe reads (None, updating a state dict; a dataclass), which were said to be bypassed."""
    if empty:
        ran = [names[b] for b in empty]
        return UserCodeError(
            f"the blocks ran but returned no floating-point tensor the probe reads ({shown_blocks(ran)}: "
            f"{len(ran)} of {len(names)}; None, ints, or a dataclass: it reads tensors, tuples, lists and "
            "dicts), so there is no output whose gradient to measure: declare blocks that return their "
            "output (blocks=... or stability_blocks())"
        )
    return UserCodeError(
        f"no block ran through its __call__ in the model's forward ({shown_blocks(names)}: {len(names)} in "
        f"all), so no hook saw one and no gain can be measured: {BYPASSED}, or the blocks are not the "
        "modules the forward runs (pass the ones it calls: blocks=... or stability_blocks())"
    )
