"""Token ids drawn for a language model (tokens): uniform over the vocabulary less its pads."""

from __future__ import annotations

import math

import pytest
import torch

from stabilitycheck.tokens import token_ids


@pytest.mark.parametrize("vocab,pads", [(5, [0]), (5, [4]), (6, [0, 3, 5]), (5, [5, -1, None]), (3, [])])
def test_token_ids_are_uniform_over_the_vocabulary_less_its_pads(vocab, pads) -> None:
    g = torch.Generator().manual_seed(0)
    ids = token_ids(vocab, pads, (20000,), g)
    allowed = [i for i in range(vocab) if i not in pads]
    counts = torch.bincount(ids, minlength=vocab)
    assert ids.min() >= 0 and ids.max() < vocab
    for i in range(vocab):
        if i in allowed:
            expect = 20000 / len(allowed)
            assert abs(counts[i].item() - expect) < 6 * math.sqrt(expect), (i, counts.tolist())
        else:
            assert counts[i] == 0, (i, counts.tolist())


def test_a_vocabulary_of_pads_alone_is_drawn_as_it_is() -> None:
    ids = token_ids(2, [0, 1], (1000,), torch.Generator().manual_seed(0))
    assert set(ids.tolist()) == {0, 1}
