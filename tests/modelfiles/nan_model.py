"""A model that produces NaN itself: a finding for the probe, never an error of the file."""

import torch
from torch import nn


class Poison(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x) * float("nan")  # type: ignore[no-any-return]


def build() -> nn.Module:
    return Poison()


def batch(model: nn.Module) -> torch.Tensor:
    return torch.randn(2, 4)
