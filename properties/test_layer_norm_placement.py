"""Pre-LN against post-LN Transformer layers at initialisation (Xiong et al. 2020): the probe's per-block
weight-gradient norms of torch's TransformerEncoderLayer are torch's own, and their trend with depth is
the paper's: the last layer's gradient is O(1) in depth after LayerNorm on the residual sum (post-LN)
and shrinks with depth with LayerNorm on the branch input (pre-LN). Oracles: plain autograd, Theorem 1.
"""

from __future__ import annotations

import copy
import math
import statistics

import pytest
import torch
from torch import nn

from stabilitycheck.probing import probe_module


class Encoder(nn.Module):
    """torch's TransformerEncoderLayer stacked, pre-LN (with a final LayerNorm) or post-LN, then a head."""

    def __init__(self, layers: int, norm_first: bool, d: int = 32) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True, norm_first=norm_first)
            for _ in range(layers)
        )
        self.final = nn.LayerNorm(d) if norm_first else nn.Identity()
        self.head = nn.Linear(d, 16, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(self.final(x))  # type: ignore[no-any-return]


def _ce(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against fixed random labels."""
    y = torch.randint(0, out.shape[-1], out.shape[:-1], generator=torch.Generator().manual_seed(12))
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def _encoder(layers: int, norm_first: bool, seed: int) -> tuple[Encoder, torch.Tensor]:
    """A float64 encoder drawn at `seed` and a fixed input of 4 sequences of 8 tokens."""
    torch.manual_seed(seed)
    model = Encoder(layers, norm_first).double()
    x = torch.randn(4, 8, 32, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    return model, x


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("layers", [1, 3, 6])
def test_transformer_layer_weight_gradient_norms_are_torchs(norm_first: bool, layers: int) -> None:
    """Per-block weight-gradient norms equal those of a plain backward on a copy of the model."""
    model, x = _encoder(layers, norm_first, seed=layers)
    ref = copy.deepcopy(model)
    blocks = [(f"layers.{i}", m) for i, m in enumerate(model.layers)]
    m = probe_module(model, x, _ce, blocks=blocks)
    _ce(ref(x), x).backward()
    own = [
        math.sqrt(sum(float(p.grad.pow(2).sum()) for p in b.parameters() if p.grad is not None))
        for b in ref.layers
    ]
    assert list(m.layer_grad_norms) == pytest.approx(own, rel=1e-12)


def _last_block_grad(layers: int, norm_first: bool) -> float:
    """The median over 5 seeds of the last layer's weight-gradient norm."""
    out = []
    for seed in range(5):
        model, x = _encoder(layers, norm_first, seed=100 * layers + seed)
        blocks = [(f"layers.{i}", m) for i, m in enumerate(model.layers)]
        out.append(probe_module(model, x, _ce, blocks=blocks).layer_grad_norms[-1])
    return statistics.median(out)


def test_pre_ln_last_layer_gradient_shrinks_with_depth_and_post_ln_does_not() -> None:
    """Xiong et al. 2020, Theorem 1: post-LN's last-layer gradient is O(1) in L, pre-LN's
    O(1/sqrt(L)) (here 1/sqrt(1 + c L): the pre-LN stream's norm grows with L)."""
    pre = _last_block_grad(12, True) / _last_block_grad(2, True)
    post = _last_block_grad(12, False) / _last_block_grad(2, False)
    assert pre < 0.85, pre
    assert post > 0.9, post
    assert post > pre * 1.2
