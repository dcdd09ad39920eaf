"""The probe's block recorder (recording): the cut check, block 0's entry, a stack entered again, a
hand-written cell's truncated windows. Oracles: torch's own gradients and the models' construction."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from stabilitycheck.probing import probe_module


def test_the_cut_check_reads_lists_and_a_slice_is_no_cut() -> None:
    """blockcalls.cut by hand: a state passed as a list, [h.detach(), c], is cut as a tuple is; a
    detached slice of h at its start (the same data pointer, another shape) beside a live view of h
    is no cut: the gradient reaches h through the view."""
    from stabilitycheck.blockcalls import cut as _cut

    x = torch.randn(2, 3)
    h = torch.randn(2, 3, requires_grad=True) * 1.0
    assert _cut((x, [h.detach(), x]), {}, h)
    assert not _cut((h.detach()[:, :2], h.view(2, 3)), {}, h)


F64 = torch.float64


class _Step(nn.Module):
    """tanh(W x + U h), h optional: called as (x, h) it takes two tensors of one shape."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Linear(8, 8, dtype=F64)
        self.u = nn.Linear(8, 8, bias=False, dtype=F64)

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        return torch.tanh(self.w(x) + (self.u(h) if h is not None else 0))


class _FirstTakesTwo(nn.Module):
    """Block 0 called once as (x, h0), h0 a learned state of x's shape; the later blocks on h."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Step() for _ in range(3))
        self.h0 = nn.Parameter(torch.randn(8, dtype=F64))

    def stream(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = [self.layers[0](x, self.h0.expand_as(x))]
        for layer in self.layers[1:]:
            outs.append(layer(outs[-1]))
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stream(x)[-1]


def test_block_0_taking_a_second_positional_tensor_of_its_inputs_shape_has_no_entry() -> None:
    """Block 0 called as (x, h0), two tensors of one shape: which is the chain is unknowable, so its input
    is not taken (blockcalls.chain_input). Oracle: torch's gradients of the block outputs."""
    torch.manual_seed(0)
    model, x = _FirstTakesTwo(), torch.randn(4, 8, dtype=F64)
    loss = lambda o, _: o.square().sum()  # noqa: E731
    m = probe_module(model, x, loss)
    outs = model.stream(x)
    norms = [g.norm().item() for g in torch.autograd.grad(loss(outs[-1], x), outs)]
    assert m.activation_grad_norms == pytest.approx(norms, rel=1e-9)
    assert m.gains == pytest.approx([norms[0] / norms[1], norms[1] / norms[2]], rel=1e-9)


def _tanh_stack(n: int) -> nn.ModuleList:
    return nn.ModuleList(nn.Sequential(nn.Linear(8, 8, dtype=F64), nn.Tanh()) for _ in range(n))


class _TowerAgainAfterAnother(nn.Module):
    """Stack a runs, then stack b on a's output, then a again on a's own first output (not b's)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = _tanh_stack(2), _tanh_stack(2)

    def stream(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for stack, h in ((self.a, x), (self.b, None), (self.a, None)):
            h = outs[1] if h is None else h
            for layer in stack:
                h = layer(h)
                outs.append(h)
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = self.stream(x)
        return outs[3] + outs[5]


def test_a_stack_entered_again_after_another_stack_starts_a_chain() -> None:
    """A stack entered again after another stack ran, on its own earlier output, starts a chain fed by
    chain 0 (no gain across the other's output). Oracle: construction and torch's gradients."""
    torch.manual_seed(0)
    model, x = _TowerAgainAfterAnother(), torch.randn(4, 8, dtype=F64)
    loss = lambda o, _: o.square().sum()  # noqa: E731
    m = probe_module(model, x, loss)
    assert m.chain_starts == (5,)
    assert m.chain_feeds == ((), (0,))
    given = x.clone().requires_grad_()
    outs = model.stream(given)
    norms = [g.norm().item() for g in torch.autograd.grad(loss(outs[3] + outs[5], x), [given, *outs])]
    assert m.activation_grad_norms == pytest.approx(norms, rel=1e-9)
    assert math.isnan(m.gains[4])
    assert m.gains[5] == pytest.approx(norms[5] / norms[6], rel=1e-9)


class _HandCell(nn.Module):
    """tanh(W x_t + U h), input width 4, state 6."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Linear(4, 6, dtype=F64)
        self.u = nn.Linear(6, 6, bias=False, dtype=F64)

    def forward(self, x_t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.w(x_t) + self.u(h))


class _HandCellTruncated(nn.Module):
    """A hand-written cell(x_t, h) (input width 4, state 6: block 0's input is taken, then dropped at
    its next call) stepped per token with `h = h.detach()` every `k` tokens."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.cell = _HandCell()
        self.head = nn.Linear(6, 1, dtype=F64)
        self.k = k
        self.states: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], 6)
        self.states, outs = [], []
        for t, x_t in enumerate(x.unbind(1)):
            if t and t % self.k == 0:
                h = h.detach()
            h = self.cell(x_t, h)
            h.retain_grad()
            self.states.append(h)
            outs.append(self.head(h))
        return torch.stack(outs, 1)


def test_a_hand_written_cells_truncated_windows_before_a_last_token_loss_are_unscored() -> None:
    """Truncated BPTT in a hand-written cell whose entry is dropped: under a last-token loss the windows
    before are unscored, growth the last window's. Oracle: torch's gradients of each step's h."""
    torch.manual_seed(3)
    k, steps = 5, 20
    model, x = _HandCellTruncated(k), torch.randn(4, steps, 4, dtype=F64)
    loss = lambda o, _: o[:, -1].pow(2).mean()  # noqa: E731
    m = probe_module(model, x, loss, blocks=[("cell", model.cell)])
    assert m.chain_starts == (5, 10, 15)
    loss(model(x), x).backward()
    grads = [float(h.grad.norm()) for h in model.states]
    assert not any(grads[:15]) and all(grads[15:])
    assert m.growth == pytest.approx(grads[15] / grads[19], rel=1e-9)
