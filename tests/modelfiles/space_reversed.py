"""Broken: a SPACE bound with lo > hi."""

from torch import nn

SPACE = {"depth": (5, 1)}


def build(depth: int = 2) -> nn.Module:
    return nn.Sequential(*(nn.Linear(8, 8) for _ in range(depth)))
