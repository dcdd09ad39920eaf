"""Subject: anything that turns a Config into (model, inputs, loss); the zoo and model files are Subjects."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from stabilitycheck.config import Config

Inputs = Any  # a tensor, a tuple/list of tensors or a dict of tensors
LossFn = Callable[[Any, Inputs], torch.Tensor]

NUM_CLASSES = 10


@dataclass(frozen=True)
class Built:
    """What a Subject builds: the model, its inputs, the loss, and its blocks (input side first)."""

    model: nn.Module
    inputs: Inputs
    loss_fn: LossFn
    blocks: tuple[tuple[str, nn.Module], ...]


class Subject(Protocol):
    """Turns a Config into a Built; `name` labels it in reports."""

    name: str

    def build(self, config: Config) -> Built: ...


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a Config.dtype string."""
    return {
        "float32": torch.float32,
        "float64": torch.float64,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
    }[name]


def generator(seed: int) -> torch.Generator:
    """A CPU generator: every random number of a build comes from it, so builds replay exactly."""
    return torch.Generator().manual_seed(seed)


def readout_loss(features: int, gen: torch.Generator, labels: torch.Tensor) -> LossFn:
    """Cross-entropy of a fixed random readout (N(0, 1/features), not trained) against fixed labels.

    At init its output gradient is nearly independent of the forward pass, so per-layer gains
    match mean-field theory (the mean of squared outputs would not; see DESIGN.md "Which loss").
    """
    weight = torch.randn(NUM_CLASSES, features, generator=gen, dtype=torch.float64)
    weight /= features**0.5
    cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def loss(output: torch.Tensor, inputs: Inputs) -> torch.Tensor:
        acc = torch.float64 if output.dtype == torch.float64 else torch.float32
        key = (output.device, acc)
        if key not in cache:
            cache[key] = (weight.to(output.device, acc), labels.to(output.device))
        w, y = cache[key]
        logits = output.to(acc) @ w.T  # (..., NUM_CLASSES)
        return nn.functional.cross_entropy(logits.reshape(-1, NUM_CLASSES), y.reshape(-1))

    return loss


def find_blocks(model: nn.Module) -> tuple[tuple[str, nn.Module], ...]:
    """The model's blocks, input side first: its `stability_blocks()` if defined, else the
    longest ModuleList/Sequential inside it, else its leaf modules that own parameters."""
    declared = getattr(model, "stability_blocks", None)
    if callable(declared):
        return tuple(declared())
    best: tuple[str, Sequence[nn.Module]] | None = None
    for name, module in model.named_modules():
        is_list = isinstance(module, nn.ModuleList | nn.Sequential) and len(module) >= 2
        if is_list and (best is None or len(module) > len(best[1])):
            best = (name, list(module))
    if best is not None:
        prefix = f"{best[0]}." if best[0] else ""
        return tuple((f"{prefix}{i}", m) for i, m in enumerate(best[1]))
    return tuple(
        (name, m)
        for name, m in model.named_modules()
        if not list(m.children()) and any(True for _ in m.parameters(recurse=False))
    )
