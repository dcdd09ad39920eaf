"""Broken: the inputs from batch() do not fit the model (4 features into a Linear(5, 2))."""

import torch
from torch import nn


def build() -> nn.Module:
    return nn.Linear(5, 2)


def batch(model: nn.Module) -> torch.Tensor:
    return torch.randn(3, 4)
