"""Subject: anything that turns a Config into (model, inputs, loss, blocks). The zoo, model files and
Hugging Face model types are Subjects; search, remedies and reports are written once against this."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from stabilitycheck.blocks import Blocks
from stabilitycheck.config import Config
from stabilitycheck.families import Scalar
from stabilitycheck.losses import Inputs, LossFn

if TYPE_CHECKING:
    from stabilitycheck.space import Space


@dataclass(frozen=True)
class Built:
    """What a Subject builds: the model, its inputs, the loss, its blocks (input side first), and one
    line saying how the blocks were chosen."""

    model: nn.Module
    inputs: Inputs
    loss_fn: LossFn
    blocks: Blocks
    blocks_note: str = ""


class Subject(Protocol):
    """What only the subject knows: its knobs and their space, how to build, its memory needs, which
    knob is its init scale (and the critical value), and which architecture remedies apply."""

    name: str  # what Config.subject holds, e.g. "mlp", "/abs/model.py:build", "hf:gpt2"
    init_knob: str | None  # the knob that scales the initialisation, if any
    # what critical_init's value is, for the critical-init remedy's 'n/a' beside it: a value known
    # to be critical, or the model's own init taken as one (a model file's default, a config's)
    critical_note: str

    def config(self, **values: Scalar) -> Config:
        """A Config of this subject: every knob at its default unless given (run settings by name)."""
        ...

    def space(self) -> Space:
        """The knobs to search and their grids, around `config()`."""
        ...

    def build(self, config: Config) -> Built:
        """The model, inputs, loss and blocks of `config`, all drawn from config.run.seed."""
        ...

    def memory_estimate(self, config: Config) -> int | None:
        """Bytes a probe of `config` needs (None: unknown, guarded by catching out-of-memory)."""
        ...

    def critical_init(self, config: Config) -> Scalar | None:
        """The value of `init_knob` at which the backward signal neither grows nor shrinks."""
        ...

    def variants(self, config: Config) -> dict[str, Config | None]:
        """Architecture remedies (e.g. pre-norm, LSTM in place of RNN): Config, or None where n/a."""
        ...

    def last_step(self, config: Config) -> Built | None:
        """For sequence subjects: the same model and inputs with the loss on the last step alone
        (the through-time product of Jacobians); None for other subjects."""
        ...


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a Run.dtype string."""
    return {
        "float32": torch.float32,
        "float64": torch.float64,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
    }[name]
