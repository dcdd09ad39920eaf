"""A model whose initialisation puts a NaN weight in some seeds only: a draw of torch.rand (the
seed's own generator) in a band decides, so which of the first 5 seeds are broken is fixed by the seed
(test_seeds.py looks them up)."""

import torch
from torch import nn

BAND = (0.0, 0.3)  # a seed whose first draw falls here is broken


def build(depth: int = 2, width: int = 16) -> nn.Module:
    bad = BAND[0] < torch.rand(1).item() < BAND[1]
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    if bad:
        with torch.no_grad():
            layers[0].weight[0, 0] = float("nan")  # type: ignore[index]
    return nn.Sequential(*layers)
