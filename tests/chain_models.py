"""Models with an exactly known chain, shared by the probe's and the subjects' tests, and torch's own
gradient norm of each block call (_grads_of), the oracle the probe's and the junctions' tests share."""

from __future__ import annotations

from collections.abc import Callable

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


def run_tower(tower: nn.ModuleList, *inputs: torch.Tensor) -> list[torch.Tensor]:
    """One tower's layers run on each input in turn (a Siamese model's two passes): its outputs."""
    outs = []
    for h in inputs:
        for layer in tower:
            h = layer(h)
        outs.append(h)
    return outs


class TutorialCell(nn.Module):
    """The char-RNN tutorial's cell: combined = cat(x_t, h), returning (i2o(combined), i2h(combined)),
    the output first. Float64, its hidden-to-hidden part W = g x orthogonal: each step's gain through
    h is exactly g (dL/dh_t = W^T dL/dh_t+1)."""

    def __init__(self, g: float, width: int, hidden: int = 16) -> None:
        super().__init__()
        self.i2h = nn.Linear(width + hidden, hidden, bias=False, dtype=torch.float64)
        self.i2o = nn.Linear(width + hidden, 10, bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.i2h.weight[:, width:] = (
                g * torch.linalg.qr(torch.randn(hidden, hidden, dtype=torch.float64))[0]
            )

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        combined = torch.cat((x, h), 1)
        return self.i2o(combined), self.i2h(combined)


class TutorialLoop(nn.Module):
    """The tutorial's loop: the cell over the tokens from h_0 = 0, the output of the last call returned;
    with `scale`, each h multiplied by it in place after the cell returned it (the gain through h is
    then g x scale)."""

    def __init__(self, g: float, width: int, scale: float = 1.0) -> None:
        super().__init__()
        self.rnn, self.scale = TutorialCell(g, width), scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(x.shape[0], 16, dtype=x.dtype)
        out = h
        for t in range(x.shape[1]):
            out, h = self.rnn(x[:, t], h)
            if self.scale != 1.0:
                h.mul_(self.scale)
        return out


def _grads_of(blocks: list[nn.Module], run: Callable[[], torch.Tensor]) -> list[float]:
    """||dL/d output|| of each call of `blocks` in one forward `run()`, by torch."""
    outs: list[torch.Tensor] = []
    handles = [b.register_forward_hook(lambda _m, _a, o: outs.append(o)) for b in blocks]
    try:
        value = run()
    finally:
        for handle in handles:
            handle.remove()
    return [float(g.norm()) for g in torch.autograd.grad(value, outs)]
