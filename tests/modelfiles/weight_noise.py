"""A tanh stack of Gaussian weight-noise layers (NoisyNet, Bayes-by-backprop style): each forward draws
W = mu + sigma * eps afresh, eps ~ N(0, 1) independent of mu ~ N(0, 1 / width), sigma = 1 / sqrt(width).
Its forward's weights are N(0, 2 / width); an eps that copied the init's draws would make W = 2 mu."""

import math

import torch
from torch import nn

SPACE = {"depth": (1, 40)}


class NoisyLinear(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.mu = nn.Parameter(torch.randn(width, width) / math.sqrt(width))
        self.sigma = 1 / math.sqrt(width)
        self.eps = torch.zeros(width, width)  # the last forward's draw, for the tests

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.eps = torch.randn_like(self.mu)
        return torch.tanh(x @ (self.mu + self.sigma * self.eps).T)


class Net(nn.Module):
    def __init__(self, depth: int, width: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(NoisyLinear(width) for _ in range(depth))
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)

    def stability_blocks(self) -> list[tuple[str, nn.Module]]:
        return [(f"layers.{i}", m) for i, m in enumerate(self.layers)]


def build(depth: int = 16, width: int = 64) -> Net:
    return Net(depth, width)


def batch(model: Net, batch_size: int = 16, width: int = 64) -> torch.Tensor:
    return torch.randn(batch_size, width)
