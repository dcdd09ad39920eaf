"""Broken: a module-level model but no example_input."""

from torch import nn

model = nn.Linear(4, 2)
