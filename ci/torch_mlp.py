"""The bench's model written as users write one: nn.Linear layers with bias and nn.Tanh in an
nn.Sequential, read as Layer blocks. The zoo's layers have no bias, and their blocks are modules."""

from __future__ import annotations

import torch
from torch import nn


def build(depth: int = 16, width: int = 256) -> nn.Module:
    """`depth` x (nn.Linear(width, width), nn.Tanh()), torch's default init."""
    return nn.Sequential(*(m for _ in range(depth) for m in (nn.Linear(width, width), nn.Tanh())))


def batch(model: nn.Module, batch_size: int = 64) -> torch.Tensor:
    """Random inputs, (batch_size, the first layer's width)."""
    return torch.randn(batch_size, model[0].in_features)
