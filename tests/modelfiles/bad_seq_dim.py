"""Broken: SEQ_DIM is not a dimension of the example input."""

import torch
from torch import nn

SEQ_DIM = 3
model = nn.Linear(4, 2)
example_input = torch.randn(2, 4)
