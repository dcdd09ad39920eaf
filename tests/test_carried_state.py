"""A recurrent step whose next call takes several of its tensors (an nn.LSTMCell's (h, c)) is read on
its whole state: each call's norms are those of h and c together, c's gradient that of every use
after the call returned it, as h's is (the next step's, a readout's), none of what reaches c through
h inside the call. Oracle: torch's gradients of h_t and of a copy of c_t handed on in its place as
the call returns, float64; each case was found by a review of the change and fails on the code
before its fix."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import pytest
import torch
from torch import nn

from stabilitycheck import probe_module

T, B, IN, H = 6, 3, 4, 5


def _oracle(model: nn.Module, cells: list[nn.Module], x: torch.Tensor, carried: bool = True) -> list[float]:
    """Per call of `cells`, hypot(|dL/dh_t|, |dL/dc_t|) with c_t a copy handed on in its place as the
    call returns; |dL/dh_t| alone without `carried`."""
    states: list[torch.Tensor] = []

    def alias(module: nn.Module, args: Any, out: Any) -> Any:
        h, c = out
        c = c.clone()
        states.extend((h, c))
        return type(out)(h, c) if hasattr(out, "_fields") else (h, c)

    handles = [cell.register_forward_hook(alias) for cell in cells]
    loss = model(x)
    for handle in handles:
        handle.remove()
    grads = torch.autograd.grad(loss, states, allow_unused=True)
    norms = [0.0 if g is None else g.norm().item() for g in grads]
    return [math.hypot(a, b) if carried else a for a, b in zip(norms[::2], norms[1::2], strict=True)]


def _probe(model: nn.Module, x: torch.Tensor, blocks: list[tuple[str, nn.Module]] | None = None) -> Any:
    return probe_module(model, x, lambda out, _: out, blocks=blocks)


class _Fused(torch.autograd.Function):
    """An LSTM cell whose h and c are the outputs of one autograd node, as CUDA's fused LSTM cell
    makes them: the gradient autograd gives at c leaves out what reaches it through h."""

    @staticmethod
    def forward(ctx: Any, ig: torch.Tensor, hg: torch.Tensor, cx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        i, f, g, o = (ig + hg).chunk(4, 1)
        i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
        cy = f * cx + i * g
        tc = cy.tanh()
        ctx.save_for_backward(i, f, g, o, cx, tc)
        return o * tc, cy

    @staticmethod
    def backward(ctx: Any, ghy: torch.Tensor | None, gcy: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        i, f, g, o, cx, tc = ctx.saved_tensors
        ghy = torch.zeros_like(tc) if ghy is None else ghy
        gcy = torch.zeros_like(tc) if gcy is None else gcy
        gc = gcy + ghy * o * (1 - tc * tc)
        gates = torch.cat(
            [gc * g * i * (1 - i), gc * cx * f * (1 - f), gc * i * (1 - g * g), ghy * tc * o * (1 - o)], 1
        )
        return gates, gates, gc * f


class _Cell(nn.Module):
    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.ref, self.fused = nn.LSTMCell(IN, H, dtype=torch.float64), fused

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> Any:
        if not self.fused:
            return self.ref(x, state)
        r = self.ref
        return _Fused.apply(x @ r.weight_ih.T + r.bias_ih, state[0] @ r.weight_hh.T + r.bias_hh, state[1])


class _Loop(nn.Module):
    def __init__(self, cell: nn.Module, inplace: str = "") -> None:
        super().__init__()
        self.cell, self.head, self.inplace = cell, nn.Linear(H, 2, dtype=torch.float64), inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = c = torch.zeros(B, H, dtype=torch.float64)
        for x_t in x.unbind(0):
            h, c = self.cell(x_t, (h, c))
            if self.inplace == "h":
                h.mul_(0.9)
            elif self.inplace == "c":
                c.mul_(0.5)
            elif self.inplace == "h out of place":
                h = h * 0.9
            elif self.inplace == "c out of place":
                c = c * 0.5
        return self.head(h).pow(2).sum()


def _x() -> torch.Tensor:
    return torch.randn(T, B, IN, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def test_a_cell_making_h_and_c_in_one_node_reads_as_the_composite_cell() -> None:
    """CUDA's fused LSTM cell makes h and c in one autograd node; the CPU's composes them (h from c).
    c's gradient as autograd gives it differed between the two (12% at step 0), so a model read other
    numbers on each device; read where the next call takes it, both are the partial derivative."""
    torch.manual_seed(0)
    composite = _Loop(_Cell(fused=False))
    fused = _Loop(_Cell(fused=True))
    fused.load_state_dict(composite.state_dict())
    x = _x()
    expected = _oracle(composite, [composite.cell.ref], x)
    for model in (composite, fused):
        m = _probe(model, x, blocks=[("cell", model.cell)])
        assert list(m.activation_grad_norms) == pytest.approx(expected, rel=1e-10)
        assert m.growth == pytest.approx(expected[0] / expected[-1], rel=1e-10)


class _Stacked(nn.Module):
    def __init__(self, listed: bool) -> None:
        super().__init__()
        one, two = nn.LSTMCell(IN, H, dtype=torch.float64), nn.LSTMCell(H, H, dtype=torch.float64)
        self.listed = listed
        if listed:
            self.cells = nn.ModuleList([one, two])
        else:
            self.cell1, self.cell2 = one, two
        self.head = nn.Linear(H, 2, dtype=torch.float64)

    def pair(self) -> list[nn.Module]:
        return list(self.cells) if self.listed else [self.cell1, self.cell2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        one, two = self.pair()
        h1 = c1 = h2 = c2 = torch.zeros(B, H, dtype=torch.float64)
        for x_t in x.unbind(0):
            h1, c1 = one(x_t, (h1, c1))
            h2, c2 = two(h1, (h2, c2))
        return self.head(h2).pow(2).sum()


@pytest.mark.parametrize("listed", [False, True])
def test_stacked_lstm_cells_read_each_cells_state(listed: bool) -> None:
    """Two LSTMCells stacked per token: as attributes they were read on (h, c); in an nn.ModuleList
    (another block of the stack runs between a cell's calls) on h alone (growth 0.0025 for 0.0075)."""
    torch.manual_seed(0)
    model, x = _Stacked(listed), _x()
    m = _probe(model, x)
    expected = _oracle(model, model.pair(), x)
    assert list(m.activation_grad_norms) == pytest.approx(expected, rel=1e-10)


class _Twice(nn.Module):
    """A cell returning (h, h), the output and the hidden state one tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.wx, self.wh = (
            nn.Linear(IN, H, dtype=torch.float64),
            nn.Linear(H, H, bias=False, dtype=torch.float64),
        )

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.wx(x) + self.wh(h))
        return h, h


def test_a_cell_returning_h_twice_counts_it_once() -> None:
    """Read as h and h, every norm was sqrt(2) times torch's."""
    torch.manual_seed(0)

    class Loop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cell, self.head = _Twice(), nn.Linear(H, 2, dtype=torch.float64)
            self.hs: list[torch.Tensor] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.zeros(B, H, dtype=torch.float64)
            self.hs = []
            for x_t in x.unbind(0):
                _, h = self.cell(x_t, h)
                self.hs.append(h)
            return self.head(h).pow(2).sum()

    model, x = Loop(), _x()
    m = _probe(model, x)
    loss = model(x)
    expected = [g.norm().item() for g in torch.autograd.grad(loss, model.hs)]
    assert list(m.activation_grad_norms) == pytest.approx(expected, rel=1e-10)
    assert list(m.activation_norms) == pytest.approx([h.norm().item() for h in model.hs], rel=1e-10)


def test_a_tensor_a_looped_block_passes_on_as_it_got_it_is_no_state() -> None:
    """A weight-shared block looped over depth makes a bias on its first call and returns it; later
    calls take it and return it as they got it. Counted as state, every call carried the one bias
    with its gradient summed over all its uses: growth 0.80 where torch's h chain reads 2.24."""
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.rel = nn.Linear(H, H, dtype=torch.float64), nn.Linear(H, H, dtype=torch.float64)

        def forward(
            self, h: torch.Tensor, bias: torch.Tensor | None = None
        ) -> tuple[torch.Tensor, torch.Tensor]:
            bias = torch.tanh(self.rel(h)) if bias is None else bias
            return h + 0.5 * torch.tanh(self.lin(h) + bias), bias

    class Deep(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block, self.head = Block(), nn.Linear(H, 1, dtype=torch.float64)
            self.hs: list[torch.Tensor] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h, bias, self.hs = x, None, []
            for _ in range(6):
                h, bias = self.block(h, bias)
                self.hs.append(h)
            return self.head(h).pow(2).sum()

    model = Deep()
    x = torch.randn(B, H, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    m = _probe(model, x, blocks=[("block", model.block)])
    expected = [g.norm().item() for g in torch.autograd.grad(model(x), model.hs)]
    calls = [i for i, name in enumerate(m.activation_names) if name.startswith("block")]
    assert [m.activation_grad_norms[i] for i in calls] == pytest.approx(expected, rel=1e-10)


def test_a_cell_whose_h_the_model_changes_in_place_is_read_as_returned() -> None:
    """h = o * c2, then h.mul_(0.9) after each call: the probe's re-run copied c too, whose write-back
    changed a tensor autograd had saved, and the probe raised where torch runs. Oracle: the same model
    changing h out of place, h as each call returned it."""

    class Hand(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wx, self.wh = nn.Linear(IN, H, dtype=torch.float64), nn.Linear(H, H, dtype=torch.float64)

        def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> Any:
            h, c = state
            c2 = 0.9 * c + torch.tanh(self.wx(x) + self.wh(h))
            return torch.sigmoid(self.wh(h)) * c2, c2

    torch.manual_seed(0)
    model, x = _Loop(Hand(), inplace="h"), _x()
    twin = _Loop(Hand(), inplace="h out of place")
    twin.load_state_dict(model.state_dict())
    m = _probe(model, x, blocks=[("cell", model.cell)])
    expected = _oracle(twin, [twin.cell], x)
    assert list(m.activation_grad_norms) == pytest.approx(expected, rel=1e-10)


def test_an_lstm_cell_whose_c_the_model_changes_in_place_is_read_on_h_alone() -> None:
    """c.mul_(0.5) after each call: the recorded c no longer holds the state's values, nor its
    gradient; read on h alone (a copy of c lost what reaches c through h: 0.0035 for 0.0042).
    Oracle: the same model changing c out of place, |dL/dh_t| alone."""
    torch.manual_seed(0)
    model, x = _Loop(_Cell(fused=False), inplace="c"), _x()
    twin = _Loop(_Cell(fused=False), inplace="c out of place")
    twin.load_state_dict(model.state_dict())
    m = _probe(model, x, blocks=[("cell", model.cell)])
    expected = _oracle(twin, [twin.cell.ref], x, carried=False)
    assert list(m.activation_grad_norms) == pytest.approx(expected, rel=1e-10)


class _Pair(NamedTuple):
    h: torch.Tensor
    c: torch.Tensor


class _Hand(nn.Module):
    """A cell of the model's own returning (h, c), or a namedtuple of them: which of its tensors is
    state is seen at its second call only."""

    def __init__(self, named: bool = False) -> None:
        super().__init__()
        self.wx, self.wh = nn.Linear(IN, 2 * H, dtype=torch.float64), nn.Linear(H, 2 * H, dtype=torch.float64)
        self.named = named

    def forward(self, x: torch.Tensor, state: Any) -> Any:
        h, c = state
        f, g = (self.wx(x) + self.wh(h)).chunk(2, 1)
        c = torch.sigmoid(f) * c + torch.tanh(g)
        h = torch.tanh(c) * 0.5
        return _Pair(h, c) if self.named else (h, c)


class _ReadsC(nn.Module):
    """A loop whose loss reads the cell state too (a readout on c at every step), or, with `cut`, whose
    cell state is cut from its history every two steps (truncated BPTT, c.detach_())."""

    def __init__(self, cell: nn.Module, cut: bool = False) -> None:
        super().__init__()
        self.cell, self.head, self.cut = cell, nn.Linear(H, 2, dtype=torch.float64), cut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = c = torch.zeros(B, H, dtype=torch.float64)
        loss = torch.zeros((), dtype=torch.float64)
        for t, x_t in enumerate(x.unbind(0)):
            h, c = self.cell(x_t, (h, c))
            if self.cut and t % 2:
                c.detach_()
            elif not self.cut:
                loss = loss + 0.1 * c.square().sum()
        return loss + self.head(h).pow(2).sum()


@pytest.mark.parametrize("cell", ["LSTMCell", "own", "own namedtuple"])
def test_a_cell_state_read_elsewhere_reads_every_use_at_every_call(cell: str) -> None:
    """The loss reads c at every step: call 0's c was read through the next call alone (its copy made
    at the next call), the later calls' through every use after them, so the growth mixed the two
    (0.203 for 0.286) and changed with the step the profile was read at; a namedtuple state was read
    on (h, c) at call 0 and on h after. Each call alike now; a cell of the model's own, whose state is
    seen at its second call, runs its first step again."""
    torch.manual_seed(0)
    module: nn.Module = _Cell(fused=False) if cell == "LSTMCell" else _Hand(named=cell == "own namedtuple")
    model, x = _ReadsC(module), _x()
    m = _probe(model, x, blocks=[("cell", model.cell)])
    expected = _oracle(model, [module.ref if cell == "LSTMCell" else module], x)
    assert list(m.activation_grad_norms) == pytest.approx(expected, rel=1e-10)
    assert m.growth == pytest.approx(expected[0] / expected[-1], rel=1e-10)


def test_truncated_backpropagation_with_detach_in_place_runs_as_in_torch() -> None:
    """c.detach_() every two steps: the probe handed the model a view of c, which torch refuses to
    detach in place, and the probe raised where torch runs. Oracle: torch's loss of the same model."""
    torch.manual_seed(0)
    model, x = _ReadsC(_Cell(fused=False), cut=True), _x()
    m = _probe(model, x, blocks=[("cell", model.cell)])
    assert m.loss[0] == pytest.approx(model(x).item(), rel=1e-12)


class _Masked(nn.Module):
    """A step carrying, beside h, an additive mask of the slots used so far (-inf there), which its next
    call takes: no state of the recurrence (no gradient flows through it)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.v = nn.Linear(2 * H, 8, dtype=torch.float64), nn.Linear(8, H, dtype=torch.float64)

    def forward(
        self, x: torch.Tensor, h: torch.Tensor, bias: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        p = (self.q(torch.cat([x, h], -1)) + bias).softmax(-1)
        used = p.detach().argmax(-1, keepdim=True)
        return torch.tanh(self.v(p)), bias.scatter(-1, used, float("-inf"))


def test_a_mask_carried_from_step_to_step_is_no_state() -> None:
    """Read as state, the -inf mask made every call's norm inf: a finite model read non-finite, exit 1
    (a review). Oracle: torch's loss and gradients are finite, and the probe reads h alone."""
    torch.manual_seed(0)

    class Loop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cell, self.head = _Masked(), nn.Linear(H, 1, dtype=torch.float64)
            self.hs: list[torch.Tensor] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h, bias = torch.zeros(B, H, dtype=torch.float64), torch.zeros(B, 8, dtype=torch.float64)
            self.hs = []
            for x_t in x.unbind(0):
                h, bias = self.cell(torch.cat([x_t, x_t[:, :1]], -1), h, bias)
                self.hs.append(h)
            return self.head(h).sum()

    model, x = Loop(), _x()
    m = _probe(model, x, blocks=[("cell", model.cell)])
    loss = model(x)
    grads = torch.autograd.grad(loss, [*model.hs, *model.parameters()])
    assert all(bool(g.isfinite().all()) for g in grads) and m.first_nonfinite is None
    assert list(m.activation_grad_norms) == pytest.approx([g.norm().item() for g in grads[:T]], rel=1e-10)


def test_an_accumulator_passed_on_beside_h_is_no_state() -> None:
    """A looped block taking the running sum of per-step auxiliary losses and returning it with its own
    added, (h, aux + l): the next call takes it as it came, but h is not made from it. Read as state,
    its constant gradient flattened the profile (gains 0.02, 1, 1, 1 for 4.35, 2.02, 1.25: a review).
    Oracle: the same model summing the losses outside the block, whose gradients torch reads alike."""
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(H, H, dtype=torch.float64)

        def forward(self, h: torch.Tensor, aux: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = torch.tanh(self.lin(h)) * 2.0
            return h, aux + h.square().mean(-1)

    class Deep(nn.Module):
        def __init__(self, inside: bool) -> None:
            super().__init__()
            self.block, self.head, self.inside = Block(), nn.Linear(H, 1, dtype=torch.float64), inside

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h, aux, total = x, torch.zeros(B, dtype=torch.float64), torch.zeros((), dtype=torch.float64)
            for _ in range(5):
                h, step = self.block(h, aux if self.inside else torch.zeros(B, dtype=torch.float64))
                aux, total = (step, total) if self.inside else (aux, total + step.sum())
            return self.head(h).sum() + 0.01 * (aux.sum() if self.inside else total)

    inside, outside = Deep(inside=True), Deep(inside=False)
    outside.load_state_dict(inside.state_dict())
    x = torch.randn(B, H, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    read = [_probe(model, x, blocks=[("block", model.block)]) for model in (inside, outside)]
    assert list(read[0].activation_grad_norms) == pytest.approx(
        list(read[1].activation_grad_norms), rel=1e-10
    )
    assert list(read[0].activation_norms) == pytest.approx(list(read[1].activation_norms), rel=1e-10)


def test_a_cells_state_once_seen_is_carried_from_the_first_call_of_the_next_probe() -> None:
    """A cell of one's own shows its state at its second call, and the step runs again: each probe of a
    search (a new model each) paid that forward twice, about 1.45x a probe (a review). Once its class
    was seen to carry its state, a new model of it carries it from its first call; the numbers are the
    same either way."""
    torch.manual_seed(0)

    class Counted(_Hand):
        calls = 0

        def forward(self, x: torch.Tensor, state: Any) -> Any:
            Counted.calls += 1
            return super().forward(x, state)

    first, second = _ReadsC(Counted()), _ReadsC(Counted())
    second.load_state_dict(first.state_dict())
    x = _x()
    read = []
    for model in (first, second):
        Counted.calls = 0
        read.append(_probe(model, x, blocks=[("cell", model.cell)]))
        assert Counted.calls == (2 if model is first else 1) * T  # every call of a forward
    assert list(read[1].activation_grad_norms) == list(read[0].activation_grad_norms)
    assert list(read[1].activation_norms) == list(read[0].activation_norms)


@pytest.mark.parametrize("head", ["y", "h"])
def test_an_lstm_module_stepped_per_token_is_read_on_its_state(head: str) -> None:
    """nn.LSTM stepped one token at a time returns y, (h_n, c_n), which oneDNN's CPU kernel (float32)
    makes in one autograd node: h_n read as made from y, the step was read on y, h_n and c_n, the
    head's gradient of y as the state's (a review: 0.59 .. 0.62 for 0.42 .. 0.22, 0). Read on
    (h_n, c_n), y the head's. Oracle: torch's gradients of
    h_n and of a copy of c_n handed on in its place, as the README's y paragraph reads them."""
    torch.manual_seed(0)

    class Steps(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.head = nn.LSTM(IN, H), nn.Linear(H, 2)
            self.states: list[torch.Tensor] = []
            self.copy = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            hx: Any = None
            loss = torch.zeros(())
            self.states = []
            for x_t in x.unbind(0):
                y, (h, c) = self.rnn(x_t[None], hx)
                c = c.clone() if self.copy else c
                self.states += [h, c]
                hx = (h, c)
                loss = loss + self.head(y if head == "y" else h).pow(2).sum()
            return loss

    model, x = Steps(), _x().float()
    m = _probe(model, x, blocks=[("rnn", model.rnn)])
    model.copy = True
    grads = torch.autograd.grad(model(x), model.states, allow_unused=True)
    norms = [0.0 if g is None else g.norm().item() for g in grads]
    expected = [math.hypot(a, b) for a, b in zip(norms[::2], norms[1::2], strict=True)]
    assert list(m.activation_grad_norms) == pytest.approx(expected, rel=1e-5)
    states = model.states
    forward = [
        math.hypot(h.norm().item(), c.norm().item()) for h, c in zip(states[::2], states[1::2], strict=True)
    ]
    assert list(m.activation_norms) == pytest.approx(forward, rel=1e-5)


F64 = torch.float64


class _OneStepChangesC(nn.Module):
    """An nn.LSTMCell stepped over 6 tokens; after the third call only, c is halved, in place or out
    of place (`inplace`)."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.cell, self.head = nn.LSTMCell(4, 5, dtype=F64), nn.Linear(5, 2, dtype=F64)
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = c = torch.zeros(3, 5, dtype=F64)
        for t, x_t in enumerate(x.unbind(0)):
            h, c = self.cell(x_t, (h, c))
            if t == 2:
                c = c.mul_(0.5) if self.inplace else c * 0.5
        return self.head(h).pow(2).sum()


def test_a_cell_state_changed_in_place_after_one_call_of_several_reads_every_call_on_h() -> None:
    """carrying.take: c changed in place after any one call (here the third of six) makes every call read
    on h alone. Oracle: torch's |dL/dh_t| in the same model changing c out of place."""
    torch.manual_seed(0)
    model, twin = _OneStepChangesC(True), _OneStepChangesC(False)
    twin.load_state_dict(model.state_dict())
    x = torch.randn(6, 3, 4, dtype=F64)
    m = probe_module(model, x, lambda out, _: out, blocks=[("cell", model.cell)])
    hs: list[torch.Tensor] = []
    handle = twin.cell.register_forward_hook(lambda mod, args, out: hs.append(out[0]))
    loss = twin(x)
    handle.remove()
    norms = [g.norm().item() for g in torch.autograd.grad(loss, hs)]
    assert list(m.activation_grad_norms) == pytest.approx(norms, rel=1e-10)
    assert list(m.activation_norms) == pytest.approx([h.norm().item() for h in hs], rel=1e-10)
