"""Broken: SPACE names a parameter the factory does not have (a typo)."""

from torch import nn

SPACE = {"detph": (1, 8)}


def build(depth: int = 2) -> nn.Module:
    return nn.Sequential(*(nn.Linear(8, 8) for _ in range(depth)))
