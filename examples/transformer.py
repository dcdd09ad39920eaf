"""A Transformer encoder (torch.nn.TransformerEncoder) with post-norm versus pre-norm as a knob.

Knobs: `num_layers` (the depth), `norm_first` (0 = post-norm, 1 = pre-norm; knobs are ints or
floats, so a 0/1 int stands for the bool), and `seq_len` and `batch_size`, consumed by batch().
d_model is 32, batch_first=True. `stability_blocks()` names the encoder layers, input side first, so
the per-layer gradient profile lines up with them. No loss(): the default is cross-entropy of a fixed
random readout of the last dimension (the 32 features, to 10 classes) against fixed random labels.

    stabilitycheck examples/transformer.py
"""

from __future__ import annotations

import torch
from torch import nn

D_MODEL = 32
SPACE = {"num_layers": (1, 24), "norm_first": (0, 1), "seq_len": (1, 64)}


class Encoder(nn.Module):
    """`num_layers` encoder layers, 4 heads, no dropout; pre-norm ends with a final LayerNorm."""

    def __init__(self, num_layers: int, norm_first: bool) -> None:
        super().__init__()

        def layer() -> nn.TransformerEncoderLayer:
            return nn.TransformerEncoderLayer(
                D_MODEL,
                nhead=4,
                dim_feedforward=4 * D_MODEL,
                dropout=0.0,
                batch_first=True,
                norm_first=norm_first,
            )

        final = nn.LayerNorm(D_MODEL) if norm_first else None
        self.encoder = nn.TransformerEncoder(layer(), num_layers, norm=final, enable_nested_tensor=False)
        # TransformerEncoder deep-copies its one layer: every layer would start from the same weights;
        # each drawn on its own, as the papers' initialisation (and a user's stack) is
        self.encoder.layers = nn.ModuleList(layer() for _ in range(num_layers))

    def stability_blocks(self) -> list[tuple[str, nn.Module]]:
        return [(f"encoder.layers.{i}", m) for i, m in enumerate(self.encoder.layers)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)  # type: ignore[no-any-return]  # (batch, seq_len, D_MODEL)


def build(num_layers: int = 2, norm_first: int = 0) -> nn.Module:
    """The factory: knobs num_layers and norm_first (0 or 1)."""
    return Encoder(num_layers, bool(norm_first))


def batch(model: nn.Module, seq_len: int = 16, batch_size: int = 8) -> torch.Tensor:
    """Random input embeddings."""
    return torch.randn(batch_size, seq_len, D_MODEL)  # (batch, seq_len, D_MODEL)
