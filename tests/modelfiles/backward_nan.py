"""Block 2's forward is finite and its backward NaN (d sqrt(u)/du at u = 0 is inf, times 0): the first
non-finite value is dL/d(output of layers.1), which block 2's backward made."""

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, i: int) -> None:
        super().__init__()
        self.lin, self.i = nn.Linear(16, 16), i

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(self.lin(x))
        return y + torch.sqrt(x.abs() * 0.0) if self.i == 2 else y


class Net(nn.Module):
    def __init__(self, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(i) for i in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def build(depth: int = 4) -> nn.Module:
    return Net(depth)


example_input = torch.randn(8, 16)
