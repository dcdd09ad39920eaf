"""A file defining a layer instance but no factory and no `model`."""

from torch import nn

layer = nn.Linear(2, 2)
