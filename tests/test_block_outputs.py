"""What the probe reads of a block's output and hands the loss of the model's inputs: blocks returning
nothing it reads are said so; a dict-subclass batch reaches the model and the loss as itself."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from stabilitycheck import probe_module
from stabilitycheck.errors import UserCodeError


class Writes(nn.Module):
    """A layer writing its output into a state dict and returning None."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, state: dict[str, torch.Tensor]) -> None:
        state["h"] = torch.tanh(self.lin(state["h"]))


@dataclasses.dataclass
class Out:
    """A block's output as a plain dataclass."""

    h: torch.Tensor


class Boxed(nn.Module):
    """A layer returning its h in a plain dataclass."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, h: torch.Tensor) -> Out:
        return Out(torch.tanh(self.lin(h)))


class Chain(nn.Module):
    """Three layers of one kind, called on h or on a state dict."""

    def __init__(self, kind: type[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(kind() for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state, h = {"h": x}, x
        for layer in self.layers:
            got = layer(state) if isinstance(layer, Writes) else layer(h)
            h = state["h"] if got is None else got.h
        return h


@pytest.mark.parametrize("kind", [Writes, Boxed])
def test_blocks_returning_nothing_the_probe_reads_are_said_so(kind: type[nn.Module]) -> None:
    """Blocks that run through __call__ and return None (their output in a state dict) or a dataclass:
    the error said that no block ran through __call__, that the forward bypassed the hooks."""
    model = Chain(kind)
    blocks = [(f"layers.{i}", b) for i, b in enumerate(model.layers)]
    says = r"ran but returned no floating-point tensor the probe reads \(layers.0, layers.1, layers.2: 3 of 3"
    with pytest.raises(UserCodeError, match=says):
        probe_module(model, torch.randn(4, 8), lambda out, _: out.sum(), blocks=blocks)


def test_an_attribute_dict_batch_reaches_the_loss_as_itself() -> None:
    """A loss reading batch.y of a dict subclass: the inputs as the forward left them were rebuilt as a
    plain dict (AttributeError), as the model's copies were. Oracle: the model's own loss."""

    class AttrDict(dict[str, torch.Tensor]):
        __getattr__ = dict.__getitem__

    torch.manual_seed(7)
    layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = layers

        def forward(self, batch: AttrDict) -> torch.Tensor:
            assert isinstance(batch, AttrDict)  # the model's copy keeps its class too
            h = batch["x"]
            for layer in self.layers:
                h = torch.tanh(layer(h))
            return h

    batch, model = AttrDict(x=torch.randn(4, 8), y=torch.randn(4, 8)), Model()
    blocks = [(f"layers.{i}", b) for i, b in enumerate(layers)]
    m = probe_module(model, (batch,), lambda out, inp: ((out - inp[0].y) ** 2).mean(), blocks=blocks)
    assert m.loss[0] == pytest.approx(((model(batch) - batch.y) ** 2).mean().item(), rel=1e-6)
