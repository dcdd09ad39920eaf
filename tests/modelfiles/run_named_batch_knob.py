"""Broken: a batch() parameter named like a run setting (`clip`: the inputs' range), which Config.of
read as the probe's gradient clipping."""

import torch
from torch import nn


def build(width: int = 8) -> nn.Module:
    return nn.Sequential(nn.Linear(width, width), nn.Tanh())


def batch(model: nn.Module, clip: float = 3.0) -> torch.Tensor:
    return torch.randn(4, 8).clamp(-clip, clip)
