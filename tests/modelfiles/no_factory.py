"""Broken: defines neither `build` nor `model`."""

from torch import nn

WIDTH = 8


def make_net() -> nn.Module:
    return nn.Linear(WIDTH, WIDTH)
