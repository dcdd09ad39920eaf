"""A module-level TorchScript model: forward hooks are not supported on it."""

import torch
from torch import nn

model = torch.jit.script(nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)))
example_input = torch.randn(4, 8)
