"""Models with an exactly known chain, shared by the probe's and the subjects' tests."""

from __future__ import annotations

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


def torch_tower_chains(model: OrthogonalTowers, x: torch.Tensor) -> list[float]:
    """Oracle: each tower's chain growth by torch.autograd.grad for the loss the tests probe with (a sum
    of squares): tower 0's from ||dL/dx|| (the input requiring grad: every use of it counts), each
    later one's from its first layer's output, over its last layer's output."""
    x = x.detach().requires_grad_()
    outs: list[torch.Tensor] = []
    handles = [
        layer.register_forward_hook(lambda m, a, o: outs.append(o)) for t in model.towers for layer in t
    ]
    loss = model(x).square().sum()
    for handle in handles:
        handle.remove()
    grads = [float(g.norm()) for g in torch.autograd.grad(loss, [x, *outs])]
    depth = len(model.towers[0])
    per_tower = [grads[1 + i * depth : 1 + (i + 1) * depth] for i in range(len(model.towers))]
    return [grads[0] / per_tower[0][-1]] + [t[0] / t[-1] for t in per_tower[1:]]
