"""Broken: forward returns a dict without any tensor in it."""

import torch
from torch import nn


class Counter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> dict[str, int]:
        return {"count": int(self.linear(x).numel())}


def build() -> nn.Module:
    return Counter()


def batch(model: nn.Module) -> torch.Tensor:
    return torch.randn(2, 4)
