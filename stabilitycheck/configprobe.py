"""probe(config): a Config built by its subject (the one its name resolves to, or one given), then
probed under its own loss (probing.probe_module). Above the probe, which looks up no subject."""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from stabilitycheck.config import Config
from stabilitycheck.errors import NoLastStep, UsageError
from stabilitycheck.losses import OutputLoss
from stabilitycheck.measurement import Measurement
from stabilitycheck.probing import probe_module
from stabilitycheck.rng import SALT_FORWARD, derived, numpy_seeded
from stabilitycheck.subject import Subject
from stabilitycheck.subjects import resolve


def probe(config: Config, subject: Subject | None = None, *, last_step: bool = False) -> Measurement:
    """Build `config` with `subject` (default: the one its name resolves to) and probe it under its
    own loss. `last_step`: a sequence subject's loss on the last step alone, the through-time growth a
    recurrent subject's verdict judges (errors.NoLastStep where it has none)."""
    if not isinstance(config, Config):
        raise UsageError(
            f"probe takes a Config, got {type(config).__name__}; e.g. probe(Config.of('mlp', depth=8)); "
            "for a module of your own, probe_module(model, inputs, loss_fn)"
        )
    if config.run.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(
            f"Run.device={config.run.device!r} but CUDA is not available on this machine; use device='cpu'"
        )
    subject = subject or resolve(config.subject)
    m = _probe(config, subject, last_step)
    run = config.run
    reduced = run.dtype in ("float16", "bfloat16") or run.amp != "none"
    if reduced and m.first_nonfinite is not None:  # would float32 have stayed finite there?
        wide = _probe(config.with_run(dtype="float32", amp="none"), subject, last_step)
        if wide.first_nonfinite is None or wide.first_nonfinite.step > m.first_nonfinite.step:
            m = dataclasses.replace(m, overflow=m.first_nonfinite)
    return m


def _probe(config: Config, subject: Subject, last_step: bool) -> Measurement:
    built = subject.last_step(config) if last_step else subject.build(config)
    if built is None:
        raise NoLastStep(NoLastStep.said(config.subject))
    run = config.run
    # a model file's forward drawing from np.random (noise, a numpy dropout) reads the same numbers for
    # the same seed in every process (it drew from wherever the process stood: another growth in each);
    # numpy's global state is the caller's again after, at ~0.1 ms, on this path alone
    drawing = getattr(subject, "draws_numpy", False)
    with numpy_seeded(derived(run.seed, SALT_FORWARD)) if drawing else contextlib.nullcontext():
        m = probe_module(
            built.model,
            built.inputs,
            built.loss_fn,
            blocks=built.blocks,
            steps=run.steps,
            lr=run.lr,
            optimizer=run.optimizer,
            clip=run.clip,
            warmup=run.warmup,
            amp=run.amp,
            seed=run.seed,
        )
    output = built.loss_fn.note if isinstance(built.loss_fn, OutputLoss) else ""  # the entry it used
    return dataclasses.replace(m, blocks_note="; ".join(n for n in (built.blocks_note, output) if n))
