"""A tanh MLP as a factory: the knobs depth, width and init_scale, searched within SPACE.

The smallest useful model file: `build(**knobs)` returns an nn.Module and SPACE bounds the search.
`init_scale` is a parameter of build(), so the harness passes it in (weights ~ N(0, init_scale²/width);
tanh is critical at 1.0 and its gradients grow with depth above it). There is no batch(): the inputs
are inferred from the first nn.Linear (random, batch_size x width); there is no loss(): the default is
cross-entropy against fixed random labels over the output's last dimension.

    stabilitycheck examples/mlp.py
"""

from __future__ import annotations

import torch
from torch import nn

SPACE = {"depth": (1, 32), "width": (8, 64), "init_scale": (0.25, 4.0, 0.25)}


class MLP(nn.Module):
    """`depth` square tanh layers without bias, weights N(0, init_scale² / width)."""

    def __init__(self, depth: int, width: int, init_scale: float) -> None:
        super().__init__()
        layers = [nn.Linear(width, width, bias=False) for _ in range(depth)]
        for layer in layers:
            nn.init.normal_(layer.weight, std=init_scale / width**0.5)
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))  # (batch, width)
        return x


def build(depth: int = 4, width: int = 64, init_scale: float = 1.0) -> nn.Module:
    """The factory: its keyword parameters with int/float defaults are the knobs."""
    return MLP(depth, width, init_scale)
