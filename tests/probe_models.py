"""Models, helpers and constants shared by the probe's tests: test_probe_*.py, and test_watch,
test_loops and test_subjects."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn

from stabilitycheck.config import RUN_FIELDS, Config
from stabilitycheck.culprit import culprit_of
from stabilitycheck.families import knob_specs
from stabilitycheck.probing import Measurement
from stabilitycheck.subject import Built
from stabilitycheck.subjects import resolve


def zoo(family: str, **values: object) -> Config:
    """A zoo Config from flat keywords, dropping the knobs `family` does not have (an mlp has no
    norm or seq_len, an rnn no depth)."""
    names = {spec.name for spec in knob_specs(family)} | set(RUN_FIELDS)
    return Config.of(family, **{k: v for k, v in values.items() if k in names})


def build(config: Config) -> Built:
    return resolve(config.subject).build(config)


def culprit(m: Measurement) -> str:
    """The culprit of one measurement (a verdict over one seed)."""
    return culprit_of([m])


class NanBackward(torch.autograd.Function):
    """Identity forward; NaN gradient backward: a block whose backward alone goes wrong."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: object, g: torch.Tensor) -> torch.Tensor:
        return g * math.nan


class _Tanh(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x))


def scripted_tanh() -> nn.Module:
    """A _Tanh block as a torch.jit.script module (deprecated by torch, still what some models ship)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(_Tanh())


class _Tanhs(nn.Module):
    """`n` blocks of (nn.Linear 8, tanh) in a ModuleList."""

    def __init__(self, n: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def _square_mean(out: torch.Tensor, _: Any) -> torch.Tensor:
    return out.square().mean()


class _Chain(nn.Module):
    """h -> tanh(W_k h) over k Linear blocks; `dead_last`: the last block's output reaches the loss x 0."""

    def __init__(self, depth: int = 4, width: int = 8, scale: float = 2.0, dead_last: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.layers = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(depth))
        for layer in self.layers:
            with torch.no_grad():
                layer.weight.copy_(torch.randn(width, width, generator=g) * scale / math.sqrt(width))
        self.dead_last = dead_last

    def forward(self, x: torch.Tensor, keep: list | None = None) -> torch.Tensor:
        outs = []
        h = x
        for layer in self.layers:
            z = layer(h)  # the block's output (the probe's hook sees it), before the tanh
            if keep is not None:
                z.retain_grad()
            outs.append(z)
            h = torch.tanh(z)
        if keep is not None:
            keep.extend(outs)
        if self.dead_last:
            return torch.tanh(outs[-2]) + 0.0 * outs[-1]
        return h


def _blocks(model: _Chain):
    return [(f"layers.{i}", m) for i, m in enumerate(model.layers)]


def _loss(out, _):
    return out.pow(2).mean()


F64 = torch.float64
