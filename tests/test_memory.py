"""The memory estimate (memory.meta_bytes) against torch's own meta forward and exact arithmetic."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
from torch import nn

from stabilitycheck.memory import PER_ACTIVATION, PER_PARAMETER, meta_bytes


def _call(model: nn.Module, inputs: Any) -> Any:
    return model(*inputs)


def _by_torch(model: nn.Module, inputs: tuple[Any, ...]) -> int:
    """The estimate's rule spelt out on torch's own meta forward of the whole sequence: parameters x 4,
    every module call's output x 2, in bytes."""
    total = 0

    def count(module: nn.Module, args: Any, output: Any) -> None:
        nonlocal total
        flat = [t for t in torch.utils._pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]
        total += PER_ACTIVATION * sum(t.numel() * t.element_size() for t in flat)

    with torch.device("meta"):
        handles = [m.register_forward_hook(count) for m in model.modules()]
        model(*inputs)
        for h in handles:
            h.remove()
    return PER_PARAMETER * sum(p.numel() * p.element_size() for p in model.parameters()) + total


CASES = {
    "lstm batch_first": (lambda: nn.LSTM(8, 6, batch_first=True), lambda: (torch.randn(3, 40, 8),)),
    "lstm 2 layers bidirectional, proj": (
        lambda: nn.LSTM(8, 6, num_layers=2, bidirectional=True, proj_size=4),
        lambda: (torch.randn(40, 3, 8),),
    ),
    "gru unbatched": (lambda: nn.GRU(8, 6), lambda: (torch.randn(40, 8),)),
    "rnn with hx": (
        lambda: nn.RNN(8, 6, num_layers=3),
        lambda: (torch.randn(40, 3, 8), torch.zeros(3, 3, 6)),
    ),
    "lstm with (h, c)": (
        lambda: nn.LSTM(8, 6, batch_first=True),
        lambda: (torch.randn(3, 40, 8), (torch.zeros(1, 3, 6), torch.zeros(1, 3, 6))),
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_a_recurrent_module_s_estimate_is_that_of_its_whole_sequence(case: str) -> None:
    """An nn.LSTM, GRU or RNN is run on its first step alone on meta, its output widened to every step;
    the estimate must be what torch's meta forward of the whole sequence gives (batch_first or not,
    unbatched, bidirectional, projected, stacked, with an initial state)."""
    make, inputs = CASES[case]
    torch.manual_seed(0)
    with torch.device("meta"):
        model, given = make(), inputs()
    want = _by_torch(model, given)
    got = meta_bytes(lambda: (make(), inputs()), _call)
    assert got == want


def test_an_lstm_s_estimate_no_longer_runs_every_step() -> None:
    """torch's meta forward of an nn.LSTM runs step by step through Python decompositions (~1 s at 128
    steps, the search's cost on an LSTM language model's file); one step costs a fraction of it. Oracle:
    the estimate takes under a quarter of torch's whole-sequence meta forward, timed here."""

    def make() -> tuple[nn.Module, tuple[Any, ...]]:
        return nn.LSTM(32, 32, batch_first=True), (torch.randn(16, 256, 32),)

    with torch.device("meta"):
        model, given = make()
        start = time.perf_counter()
        model(*given)
        whole = time.perf_counter() - start
    start = time.perf_counter()
    meta_bytes(make, _call)
    assert time.perf_counter() - start < whole / 4
