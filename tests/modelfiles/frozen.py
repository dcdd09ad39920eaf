"""Broken: every parameter is frozen (requires_grad=False)."""

from torch import nn


def build(width: int = 4) -> nn.Module:
    model = nn.Linear(width, 3)
    model.requires_grad_(False)
    return model
