"""A factory parameter without a default, bounded by SPACE: its default is the lower bound."""

from torch import nn

SPACE = {"depth": (2, 16)}


def build(depth: int, width: int = 8, act: str = "tanh", bias: bool = False) -> nn.Module:
    return nn.Sequential(*(nn.Linear(width, width, bias=bias) for _ in range(depth)))
