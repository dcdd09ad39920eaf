"""Random token ids for a model that takes them: uniform over its vocabulary less its pad ids. A pad
is no token (its embedding row is zero), and a pre-norm block 0 normalising a zero row has gain
1/sqrt(eps): every seed whose ids held one read growth 40-4e4 (recurrent_gemma, olmoe; a model
file's nn.Embedding(padding_idx=0) under pre-norm blocks read 127 for 1.9)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def token_ids(vocab: int, pads: Iterable[object], shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    """Ids of `shape` drawn from `gen`, uniform over [0, vocab) less the pads in it (a vocabulary of
    pads alone is drawn as it is: there is nothing else)."""
    left_out = sorted({p for p in pads if isinstance(p, int) and 0 <= p < vocab})
    if len(left_out) == vocab:
        left_out = []
    ids = torch.randint(0, vocab - len(left_out), shape, generator=gen)
    for pad in left_out:  # ascending: each id at or past a pad moves up one, uniform over the rest
        ids += ids >= pad
    return ids
