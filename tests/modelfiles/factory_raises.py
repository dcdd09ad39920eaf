"""Broken for some knob values: the factory rejects an odd width."""

from torch import nn

SPACE = {"width": (1, 16)}


def build(width: int = 8) -> nn.Module:
    if width % 2:
        raise ValueError(f"width must be even, got {width}")
    return nn.Linear(width, 2)
