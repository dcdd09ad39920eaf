"""An RNN language model (nn.Embedding -> nn.RNN with tanh -> nn.Linear) scored per token.

Shows knobs consumed by batch(): `seq_len` and `batch_size` are parameters of batch(), not of build(),
and are searched like build()'s own knobs. `loss(output, inputs)` is next-token cross-entropy.
build() has no `init_scale`, so the harness multiplies every weight of rank >= 2 (the embedding,
the RNN's W_ih and W_hh, the readout) by Config.init_scale after PyTorch's own init; SPACE bounds it
like a knob. Its blocks are its three layers (no repeated stack): the growth is the product of the
RNN's gain (dL/d its input over dL/d its output, every token's gradient carried back) and the
readout's. With a large scale the RNN's gain grows with seq_len and the search finds an explosion,
the readout adding its own factor (about x3 at the point found); at PyTorch's own init, scale 1, this
RNN's gradients vanish instead. Declare the RNN alone as the block (stability_blocks()) to judge it
on its own gain.

    stabilitycheck examples/rnn_lm.py
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

VOCAB = 50
# init_scale up to 8: at 4 the median over seeds of the top corner stays below growth 100 (tanh saturates)
SPACE = {"width": (8, 64), "num_layers": (1, 4), "seq_len": (1, 64), "init_scale": (0.5, 8.0, 0.5)}


class RNNLM(nn.Module):
    """Token ids in, next-token logits out."""

    def __init__(self, width: int, num_layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.rnn = nn.RNN(width, width, num_layers=num_layers, nonlinearity="tanh", batch_first=True)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(self.embed(tokens))  # (batch, seq_len + 1, width)
        return self.head(h)  # type: ignore[no-any-return]  # (batch, seq_len + 1, VOCAB)


def build(width: int = 64, num_layers: int = 1) -> nn.Module:
    """The factory: knobs width and num_layers."""
    return RNNLM(width, num_layers)


def batch(model: nn.Module, seq_len: int = 32, batch_size: int = 8) -> torch.Tensor:
    """seq_len + 1 random tokens per row: the model is scored on predicting each of the last seq_len."""
    return torch.randint(0, VOCAB, (batch_size, seq_len + 1))


def loss(output: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: position t predicts token t + 1."""
    logits = output[:, :-1]  # (batch, seq_len, VOCAB)
    return F.cross_entropy(logits.reshape(-1, VOCAB), inputs[:, 1:].reshape(-1))
