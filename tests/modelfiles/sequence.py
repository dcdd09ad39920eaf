"""A fixed sequence model with SEQ_DIM = 1: the knob seq_len cuts or tiles the example input."""

import torch
from torch import nn

SEQ_DIM = 1
SPACE = {"seq_len": (1, 64), "init_scale": (0.5, 4.0)}


class Tagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.rnn = nn.RNN(8, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(self.embed(ids) * mask.unsqueeze(-1))  # (batch, seq_len, 8)
        return self.head(h)  # type: ignore[no-any-return]


model = Tagger()
example_input = {"ids": torch.arange(10).reshape(2, 5), "mask": torch.ones(2, 5)}
