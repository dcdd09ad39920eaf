"""Round-10 mutation-testing additions (the probe's junctions, norms, loops, recording and carried
state). Each test's oracle is torch's own gradients, exact theory, or the documented rule spelt out
by hand on numbers chosen for it (never a number the code printed). Fast and deterministic."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from stabilitycheck.junctions import TAP_NODES, _edge, _taps
from stabilitycheck.loops import LOOPED_NOTE, looped_blocks
from stabilitycheck.norms import LOW, STACK_MIN, norm_values
from stabilitycheck.probing import probe_module
from stabilitycheck.subject import find_blocks

F64 = torch.float64


# ---------------------------------------------------------------- junctions.py


@pytest.mark.parametrize("nodes", [TAP_NODES - 1, TAP_NODES])
def test_a_norm_graph_of_up_to_tap_nodes_nodes_is_searched(nodes: int) -> None:
    """The taps search covers a graph of up to TAP_NODES nodes, its documented cap, and gives up on a
    larger one: x scaled `nodes` times has one tap."""
    x = torch.randn(3, requires_grad=True).clone()
    raw = x
    for _ in range(nodes):
        raw = raw * 1.5
    assert len(_taps(raw, _edge(x))) == 1
    assert _taps(raw * 1.5 * 1.5, _edge(x)) == []  # TAP_NODES + 1 or more


class _Inner(nn.Module):
    """A block with its own residual add inside: its output is an AddBackward0 of its input."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8, dtype=F64)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + torch.tanh(self.lin(h))


class _FromZeros(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Inner() for _ in range(3))

    def stream(self, h: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for layer in self.layers:
            h = layer(h)
            outs.append(h)
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stream(torch.zeros_like(x))[-1] * x  # block 0's input made in the forward


def test_the_next_block_taking_block_0s_own_output_is_no_residual_around_it() -> None:
    """A block ending in its own add (h + f(h)) on a zero input made in the forward, taken as it is by the
    next block, is no residual around block 0 (0 + out == out to the bit). Oracle: torch's gradients."""
    torch.manual_seed(0)
    model, x = _FromZeros(), torch.randn(4, 8, dtype=F64)
    loss = lambda o, _: o.square().sum()  # noqa: E731
    m = probe_module(model, x, loss)
    h = torch.zeros_like(x).requires_grad_()
    outs = model.stream(h)
    norms = [g.norm().item() for g in torch.autograd.grad(loss(outs[-1] * x, x), [h, *outs])]
    assert m.activation_grad_norms == pytest.approx(norms, rel=1e-9)
    assert m.gains == pytest.approx([norms[i] / norms[i + 1] for i in range(3)], rel=1e-9)


# ---------------------------------------------------------------- norms.py


def test_a_stacked_groups_norm_spoiled_by_float32_squares_is_taken_again_in_float64() -> None:
    """A stacked group's float32 norm below LOW * sqrt(numel) (squares under float32's subnormals) is
    spoilable and taken again in float64. Oracle: torch's float64 norms."""
    n = 8192
    tensors = []
    for _ in range(STACK_MIN):
        t = torch.full((n,), 2.6e-23)
        t[0] = 1e-18
        tensors.append(t)
    want = [torch.linalg.vector_norm(t, dtype=F64).item() for t in tensors]
    assert LOW < want[0] < LOW * math.sqrt(n)
    assert norm_values(tensors, False, groups=[list(range(STACK_MIN))]) == pytest.approx(
        want, rel=1e-9, abs=0
    )


# ---------------------------------------------------------------- loops.py


def _composite(n: int) -> nn.ModuleList:
    return nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(n))


class _TwoTowersInterleaved(nn.Module):
    """Two stacks of composite blocks, declared b then a; the forward calls a.i then b.i, each on the
    model's input: neither stack's calls chain."""

    def __init__(self) -> None:
        super().__init__()
        self.b, self.a = _composite(3), _composite(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for a, b in zip(self.a, self.b, strict=True):
            outs += [a(x), b(x)]
        return torch.stack(outs).sum(0)


def test_interleaved_stacks_none_of_which_chains_are_all_taken_in_first_call_order() -> None:
    """loops._apart: where no stack's calls chain, all stacks are taken 'in the order the forward first
    calls them', with the order note. Oracle: the documented rule."""
    model = _TwoTowersInterleaved()
    assert find_blocks(model)[1] == "blocks: b (3) + a (3)"  # declared order
    blocks, note = looped_blocks(model, torch.randn(2, 8), *find_blocks(model))
    assert [name for name, _ in blocks] == ["a.0", "a.1", "a.2", "b.0", "b.1", "b.2"]
    assert note == "blocks: a (3) + b (3) (in the order the forward calls them)"


class _LoopsAMixedList(nn.Module):
    """A weight-tied Sequential of mixed types, one of them composite, looped on its own output."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Tanh()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(4):
            x = self.block(x)
        return x


def test_a_looped_mixed_list_holding_a_composite_module_is_one_block_per_call() -> None:
    """A mixed-type list holding a composite module, looped on its own output, is one block per call
    (`_stacks_of` is empty unless every block is composite). Oracle: the documented rule."""
    model = _LoopsAMixedList()
    assert find_blocks(model)[1] == "blocks: block (2, mixed module types)"
    blocks, note = looped_blocks(model, torch.randn(2, 8), *find_blocks(model))
    assert [name for name, _ in blocks] == ["block"]
    assert note == LOOPED_NOTE.format(names="block")


# ---------------------------------------------------------------- recording.py


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
    is not taken (recording._chain_input). Oracle: torch's gradients of the block outputs."""
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


# ---------------------------------------------------------------- carrying.py


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


# ---------------------------------------------------------------- probing.py


class _MaskedCell(nn.Module):
    """A cell of the model's own returning (h, c), c's last two units held at exactly 0 (a where)."""

    def __init__(self) -> None:
        super().__init__()
        self.wx, self.wh = nn.Linear(4, 10, dtype=F64), nn.Linear(5, 10, dtype=F64)
        self.keep = torch.tensor([True, True, True, False, False])

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        h, c = state
        f, g = (self.wx(x) + self.wh(h)).chunk(2, 1)
        c = torch.where(self.keep, torch.sigmoid(f) * c + torch.tanh(g), 0.0)
        return torch.tanh(c) * 0.5, c


class _SqrtOfLastC(nn.Module):
    """The masked cell over 6 tokens, the loss reading sqrt of c's held zeros after the last call:
    dL/dc_T is inf there, the where hands 0 on, every weight gradient is finite."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = _MaskedCell()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = c = torch.zeros(3, 5, dtype=F64)
        for x_t in x.unbind(0):
            h, c = self.cell(x_t, (h, c))
        return h.pow(2).sum() + c[:, 3:].sqrt().sum()


def test_a_carried_state_whose_gradient_is_not_finite_is_left_out_of_the_calls_norm() -> None:
    """probing._together: a carried c whose gradient norm is inf in a finite step is left out of that
    call's norm. Oracle: torch's gradients of h_t and a copy of c_t, hypot where c's is finite."""
    torch.manual_seed(0)
    model, x = _SqrtOfLastC(), torch.randn(6, 3, 4, dtype=F64)
    m = probe_module(model, x, lambda out, _: out, blocks=[("cell", model.cell)])
    states: list[torch.Tensor] = []

    def alias(module: nn.Module, args: object, out: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        h, c = out[0], out[1].clone()
        states.extend((h, c))
        return h, c

    handle = model.cell.register_forward_hook(alias)
    loss = model(x)
    handle.remove()
    grads = torch.autograd.grad(loss, states)
    model.zero_grad()
    model(x).backward()
    assert all(bool(p.grad.isfinite().all()) for p in model.parameters())  # a finite step
    hs, cs = [g.norm().item() for g in grads[::2]], [g.norm().item() for g in grads[1::2]]
    assert not math.isfinite(cs[-1]) and all(map(math.isfinite, cs[:-1]))
    want = [math.hypot(a, b) if math.isfinite(b) else a for a, b in zip(hs, cs, strict=True)]
    assert list(m.activation_grad_norms) == pytest.approx(want, rel=1e-10)
    assert m.growth == pytest.approx(want[0] / want[-1], rel=1e-10)


class _SilentThenInfinite(nn.Module):
    """Blocks whose outputs get no gradient (the loss takes them times 0: every step silent) beside a
    parameter read through sqrt, which SGD at lr 2 takes from 1 to exactly 0: its gradient goes inf."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(2))
        self.p = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x.sum() * 0 + self.p.sqrt().sum()


def test_the_profile_of_a_silent_run_is_the_step_where_a_non_finite_value_shows() -> None:
    """A run silent at every step takes its per-block profile from the step where a non-finite value
    shows (probe_module's docstring). Oracle: the documented rule on the model's design."""
    torch.manual_seed(0)
    model = _SilentThenInfinite()
    m = probe_module(model, torch.randn(4, 8), lambda out, _: out, steps=3, lr=2.0, amp="float16")
    assert not any(m.activation_grad_norms)  # silent at every step
    assert m.first_nonfinite is not None and m.first_nonfinite.step > 0
    assert m.profile_step == m.first_nonfinite.step


# ---------------------------------------------------------------- probing.py: sparse output gradients


def test_a_block_output_read_sparsely_has_its_gradient_norm_taken_densely() -> None:
    """A block returning a weight that the model reads with F.embedding(sparse=True): dL/d output is a
    sparse tensor (the norm raised NotImplementedError); its norm is the dense gradient's, torch's."""

    class Table(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(
                torch.randn(10, 8, dtype=F64, generator=torch.Generator().manual_seed(0))
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.weight

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.b = Table(), nn.Sequential(nn.Linear(8, 8, dtype=F64), nn.Tanh())
            self.idx = torch.tensor([1, 3, 3, 7])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(nn.functional.embedding(self.idx, self.q(x), sparse=True)) * x

    model = Model()
    x = torch.randn(4, 8, dtype=F64)

    def loss(out: torch.Tensor, _: object) -> torch.Tensor:
        return out.square().mean()

    m = probe_module(model, x, loss, blocks=[("q", model.q), ("b", model.b)])
    w = model.q.weight
    own = torch.autograd.grad(loss(model.b(nn.functional.embedding(model.idx, w)) * x, x), w)[0]
    assert m.activation_grad_norms[1] == pytest.approx(float(own.norm()), rel=1e-12)


# ---------------------------------------------------------------- remedies.py: why one does not apply


def test_a_remedy_that_does_not_apply_says_why() -> None:
    """'critical-init: n/a' alone could not tell an init at its critical value from a knob not found;
    each run remedy's reason follows the Config it was not made for."""
    from stabilitycheck.config import Config
    from stabilitycheck.remedies import Remedy, candidates, why_not
    from stabilitycheck.zoo import Family

    mlp = Family("mlp")
    at_critical = Config.of("mlp", init_scale=1.0, activation="tanh")
    assert candidates(at_critical, mlp)["critical-init"] is None
    assert why_not("critical-init", at_critical, mlp) == "init_scale is at its critical value, 1.0"
    assert why_not("clip", at_critical, mlp) == "no optimiser steps: --steps N"
    assert why_not("warmup", at_critical.with_run(steps=1), mlp) == "fewer than 2 optimiser steps: --steps N"
    assert why_not("float32", at_critical.with_run(dtype="float64"), mlp) == "float64 already, no autocast"
    shown = Remedy("critical-init", None, None, why="x").describe()
    assert (
        shown == "critical-init: n/a (x)"
        and Remedy.from_dict(Remedy("w", None, None, why="y").to_dict()).why == "y"
    )
