"""Broken: loss() raises (it reads an attribute the model's output does not have)."""

import torch
from torch import nn


def build(width: int = 4) -> nn.Module:
    return nn.Linear(width, 3)


def loss(output: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    return output.logits.mean()  # type: ignore[no-any-return]
