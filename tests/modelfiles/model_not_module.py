"""Broken: `model` is a string, not an nn.Module."""

import torch

model = "resnet18"
example_input = torch.randn(2, 4)
