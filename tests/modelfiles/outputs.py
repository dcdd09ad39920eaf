"""Models whose outputs are a tuple, a dict, an object with .logits, or one with .loss (Hugging Face style),
or a dict/tuple whose first tensor is a 0-d auxiliary loss (not the output).

Each factory is picked with `outputs.py:NAME`; every model returns the same logits, so they measure alike.
"""

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class WithLogits:
    logits: torch.Tensor
    hidden: torch.Tensor


@dataclass
class WithLoss:
    loss: torch.Tensor
    logits: torch.Tensor


class Net(nn.Module):
    """A two-layer tanh net returning its logits packed as `kind` says."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.layers = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 5))

    def forward(self, x: torch.Tensor) -> object:
        h = self.layers[1](self.layers[0](x))
        logits = self.layers[2](h)
        if self.kind == "tuple":
            return (logits, h)
        if self.kind == "dict":
            return {"hidden_count": 2, "logits": logits, "hidden": h}
        if self.kind == "attrs":
            return WithLogits(logits=logits, hidden=h)
        if self.kind == "aux_dict":
            return {"aux_loss": (h**2).mean(), "out": logits}
        if self.kind == "aux_tuple":
            return ((h**2).mean(), logits, None)
        if self.kind == "loss":
            return WithLoss(loss=logits.logsumexp(dim=-1).mean(), logits=logits)
        return logits


def plain() -> nn.Module:
    return Net("plain")


def as_tuple() -> nn.Module:
    return Net("tuple")


def as_dict() -> nn.Module:
    return Net("dict")


def as_attrs() -> nn.Module:
    return Net("attrs")


def aux_dict() -> nn.Module:
    return Net("aux_dict")


def aux_tuple() -> nn.Module:
    return Net("aux_tuple")


def with_loss() -> nn.Module:
    return Net("loss")


def batch(model: nn.Module, batch_size: int = 4) -> torch.Tensor:
    return torch.randn(batch_size, 6)
