"""A model whose second layer overflows float32 to Inf: a finding located in that layer, not an error."""

import torch
from torch import nn


class Overflow(nn.Module):
    """A linear layer followed by a gain of 1e30 squared: finite weights, infinite activations."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * 1e30 * 1e30  # type: ignore[no-any-return]  # (batch, 4), +-inf in float32


def build() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 4), Overflow(), nn.Linear(4, 3))


def batch(model: nn.Module) -> torch.Tensor:
    return torch.randn(2, 4)
