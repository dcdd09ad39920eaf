"""A model with a sparse embedding: torch's Adam raises at its first step on the sparse gradient."""

import torch
from torch import nn

SPACE = {"depth": (1, 4)}


class Net(nn.Module):
    def __init__(self, depth: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16, sparse=True)
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(depth))
        self.head = nn.Linear(16, 50)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        for layer in self.layers:
            h = torch.tanh(layer(h))
        return self.head(h)


def build(depth: int = 2) -> nn.Module:
    return Net(depth)


def batch(model: nn.Module, batch_size: int = 4) -> torch.Tensor:
    return torch.randint(0, 50, (batch_size, 8))
