"""The memory estimate (memory.meta_bytes) against torch's own meta forward and exact arithmetic."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
from torch import nn

from stabilitycheck.memory import PER_ACTIVATION, PER_PARAMETER, meta_bytes, parameter_bytes


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


class _Encoder(nn.LSTM):
    """A user's subclass of nn.LSTM whose forward takes the input alone and returns the output alone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x)[0]


def test_a_subclass_of_a_recurrent_module_keeps_its_own_forward() -> None:
    """Only torch's own nn.RNN/LSTM/GRU forward is run on one step: a subclass's forward(x) returning
    the output alone raised there, and the estimate fell back to the parameters alone (4258.5 MiB
    read 2.5 MiB at 4096 steps: a review). Oracle: torch's own whole-sequence meta forward."""

    def make() -> tuple[nn.Module, tuple[Any, ...]]:
        return _Encoder(8, 6, batch_first=True), (torch.randn(3, 40, 8),)

    with torch.device("meta"):
        model, given = make()
    assert meta_bytes(make, _call) == _by_torch(model, given)


def test_a_factory_returning_one_object_keeps_its_weights() -> None:
    """A factory returning the same module at every call (a module-level model) lost its weights to
    the estimate's move to the meta device; the build after it failed ('Cannot copy out of meta
    tensor', a review). The estimate moves a copy. Oracle: the module's own weights, unchanged."""
    shared = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    before = [p.detach().clone() for p in shared.parameters()]
    meta_bytes(lambda: (shared, (torch.randn(2, 4),)), _call)
    parameter_bytes(lambda: shared)
    assert all(
        p.device.type == "cpu" and torch.equal(p, b) for p, b in zip(shared.parameters(), before, strict=True)
    )
    # the copy is made on meta, its weights never copied (a 192 MiB model held in memory added nothing
    # to the process's peak, measured); its estimate is the rule's on its shapes: the parameters x 4,
    # then x 2 the outputs of the Linear, the Tanh and the model, each 2 x 4 float32
    assert (
        meta_bytes(lambda: (shared, (torch.randn(2, 4),)), _call) == 4 * 4 * (4 * 4 + 4) + 2 * 4 * (2 * 4) * 3
    )
