"""A model with a NaN weight in most seeds' initialisation (a draw of torch.rand below 0.45: seed 0's
first draw is 0.496, the next four seeds' fall below), which rejects widths above 20: the top corner of
its SPACE is skipped, and the first seed alone reads stable everywhere."""

import torch
from torch import nn

SPACE = {"width": (1, 64)}


def build(width: int = 8) -> nn.Module:
    if width > 20:
        raise ValueError(f"width {width} is too large for this model (at most 20)")
    bad = torch.rand(()).item() < 0.45
    layers = [nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width)]
    if bad:
        with torch.no_grad():
            layers[0].weight[0, 0] = float("nan")  # type: ignore[index]
    return nn.Sequential(*layers)
