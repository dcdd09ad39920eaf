"""An eager Sequential whose blocks are TorchScript modules."""

import torch
from torch import nn


def build(depth=3):
    return nn.Sequential(*(torch.jit.script(nn.Linear(8, 8)) for _ in range(depth)))
