"""Broken: a SPACE bound that is a number, not (lo, hi)."""

from torch import nn

SPACE = {"depth": 8}


def build(depth: int = 2) -> nn.Module:
    return nn.Sequential(*(nn.Linear(8, 8) for _ in range(depth)))
