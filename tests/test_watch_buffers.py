"""watchbuffers.Buffers: a flagged step's buffers put back as its first model call found them, per
dtype, and nothing put back where no model call was seen or the step was not flagged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stabilitycheck.watchbuffers import Buffers


class _Kinds(nn.Module):
    """Buffers of three dtypes and shapes (a 0-d count among them), as BatchNorm and masks hold."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.arange(6.0).reshape(2, 3))
        self.register_buffer("count", torch.tensor(7))
        self.register_buffer("mask", torch.tensor([True, False]))
        self.register_buffer("low", torch.ones(4, dtype=torch.float16))

    def write(self) -> None:
        self.mean.mul_(torch.nan)
        self.count.add_(1)
        self.mask.logical_not_()
        self.low.add_(1)


def _values(model: nn.Module) -> list[torch.Tensor]:
    return [b.clone() for b in model.buffers()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x.nan_to_num(), y.nan_to_num()) for x, y in zip(a, b, strict=True))


def test_a_flagged_step_gets_every_buffer_back_and_an_unflagged_one_keeps_what_it_wrote() -> None:
    model = _Kinds()
    buffers = Buffers(model)
    before = _values(model)
    buffers.take()
    model.write()
    buffers.take()  # a second model call of the step takes nothing: the first call's state stands
    buffers.close(torch.tensor(True))
    assert _same(_values(model), before)
    buffers.take()
    model.write()
    written = _values(model)
    buffers.close(torch.tensor(False))
    assert _same(_values(model), written) and not _same(written, before)


def test_nothing_is_put_back_where_no_model_call_was_seen_since_the_last_close() -> None:
    """A step whose model call no hook saw (its state never taken) is left as it is, not set to an
    earlier step's state."""
    model = _Kinds()
    buffers = Buffers(model)
    buffers.take()
    buffers.close(torch.tensor(False))
    model.write()
    written = _values(model)
    buffers.close(torch.tensor(True))
    assert _same(_values(model), written)


def test_a_model_without_buffers_has_nothing_to_take() -> None:
    assert not Buffers(nn.Linear(2, 2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none on this machine")
def test_a_buffer_left_on_the_cpu_of_a_cuda_model_costs_one_counted_read_per_step() -> None:
    """The flag is on the GPU; putting back a CPU buffer needs it on the host: one read, counted,
    and the buffers of both devices put back."""
    model = _Kinds().cuda()
    model.count = torch.tensor(7)  # assigned after .cuda(): stays on the CPU
    buffers = Buffers(model)
    before = _values(model)
    buffers.take()
    model.write()
    assert buffers.close(torch.tensor(True, device="cuda")) == 1
    assert _same(_values(model), before)
    buffers.take()
    assert buffers.close(torch.tensor(False, device="cuda")) == 1
