"""Broken: a factory parameter named like a run setting (`steps`: the model's unroll count), which
Config.of read as the probe's optimiser steps: build() always got steps=2 and the probe ran 2 SGD steps."""

import torch
from torch import nn


class Unrolled(nn.Module):
    def __init__(self, steps: int) -> None:
        super().__init__()
        self.cell = nn.Linear(8, 8)
        self.steps = steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.steps):
            x = torch.tanh(self.cell(x))
        return x


def build(depth: int = 1, steps: int = 2) -> nn.Module:
    return Unrolled(steps)
