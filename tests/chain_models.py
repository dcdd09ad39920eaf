"""Models with an exactly known chain, shared by the probe's and the subjects' tests."""

from __future__ import annotations

import torch
from torch import nn


class OrthogonalTowers(nn.Module):
    """Towers of `depth` bias-free linear layers on the same input, tower i's weights gains[i] x
    orthogonal, their outputs summed: ||W^T v|| = g ||v|| exactly, so tower i's chain grows
    gains[i] ** depth and each of its gains is exactly gains[i]."""

    def __init__(self, depth: int, gains: tuple[float, ...]) -> None:
        super().__init__()
        self.towers = nn.ModuleList(
            nn.ModuleList(nn.Linear(8, 8, bias=False) for _ in range(depth)) for _ in gains
        )
        for tower, gain in zip(self.towers, gains, strict=True):
            for layer in tower:
                nn.init.orthogonal_(layer.weight, gain=gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for tower in self.towers:
            h = x
            for layer in tower:
                h = layer(h)
            outs.append(h)
        total = outs[0]
        for out in outs[1:]:
            total = total + out
        return total
