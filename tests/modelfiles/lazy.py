"""A factory of lazy layers (nn.LazyLinear): their weights exist only after a first call."""

import torch
from torch import nn


def build(depth: int = 4) -> nn.Module:
    return nn.Sequential(*[nn.Sequential(nn.LazyLinear(16), nn.Tanh()) for _ in range(depth)])


def batch(model: nn.Module) -> torch.Tensor:
    return torch.randn(8, 16)
