"""Broken: raises while being imported."""

import torch

WIDTH = 8
raise RuntimeError("cannot find the dataset")
torch.zeros(WIDTH)
