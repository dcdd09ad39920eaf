"""Broken: a factory parameter without a default that SPACE does not bound."""

from torch import nn


def build(depth: int, width: int = 8) -> nn.Module:
    return nn.Sequential(*(nn.Linear(width, width) for _ in range(depth)))
