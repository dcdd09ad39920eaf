"""A fixed model: a module-level `model` and `example_input`, no factory.

For a model you already have. Its knob is `init_scale`: the harness multiplies every weight of
rank >= 2 by it after the model's own init. The file is run again for each seed of a verdict, under
that seed, so each seed draws its own model and input (a file loading its weights reads the same
model at every seed); the imported module's model is never changed. A file
that also sets `SEQ_DIM = 1` gets a `seq_len` knob: the example input is cut along that dimension,
or tiled end to end to lengthen it. This one is a plain ReLU MLP, so it has no SEQ_DIM. With no
`loss`, the default is cross-entropy against fixed random labels over the 10 outputs.

    stabilitycheck examples/fixed_model.py
"""

from __future__ import annotations

import torch
from torch import nn

model = nn.Sequential(
    nn.Linear(32, 128),
    nn.ReLU(),
    nn.Linear(128, 128),
    nn.ReLU(),
    nn.Linear(128, 128),
    nn.ReLU(),
    nn.Linear(128, 10),
)
example_input = torch.randn(16, 32)  # (batch, features)
