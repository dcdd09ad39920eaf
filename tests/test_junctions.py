"""The junction rules (junctions), each where a plausible bug passed every other test: a plain input's
residual add around block 0 is read only where the next call's input is raw + first *to the last bit*
(torch.equal), as the docstring says: a value merely close (allclose) is some other computation.
Oracle: the docstring, on tensors built by hand.
Also the chains a probe reads through a tower, a head, a leaf and a scaled add (probe_module)."""

from __future__ import annotations

import math

import pytest
import torch
from chain_models import _grads_of
from torch import nn

from stabilitycheck import junctions
from stabilitycheck.junctions import TAP_NODES, _edge, _taps
from stabilitycheck.probing import probe_module

skip_around = junctions.skip_around


def test_a_plain_inputs_residual_add_is_read_only_when_exact_to_the_last_bit() -> None:
    torch.manual_seed(0)
    block = nn.Linear(4, 4)
    raw = torch.randn(3, 4)  # a plain input: made in the forward, no gradient
    first = block(raw)
    exact = raw + first
    found = skip_around((exact,), raw, first, False)
    assert found is not None and found[0] is exact.grad_fn and found[1] == []
    near = (raw + 1e-6) + first  # within allclose's tolerance of raw + first, but not the same sum
    assert not torch.equal(near, raw + first) and torch.allclose(near, raw + first)
    assert skip_around((near,), raw, first, False) is None
    assert skip_around((exact,), raw, first, True) is None  # block 0 again: not read


def test_the_taps_of_a_long_hand_written_norm_are_found_under_256_nodes() -> None:
    """A LayerNorm written by hand followed by 25 scalings: ~60 autograd nodes between x and raw, under
    the documented TAP_NODES = 256 (a larger graph is taken for no norm). The gradient enters x at the
    two ops that read it (mean and subtract): oracle, a walk of the whole graph behind raw with no cap."""
    base = torch.randn(2, 8, requires_grad=True)
    x = base * 1.5
    mu = x.mean(-1, keepdim=True)
    d = x - mu
    y = d * torch.rsqrt((d * d).mean(-1, keepdim=True) + 1e-5)
    for _ in range(25):
        y = y * 1.0001 + 0.0
    raw = y
    edge = junctions._edge(x)
    start = raw.grad_fn
    assert start is not None
    expected, frontier, seen = set(), [start], {start}
    while frontier:  # brute force: every (node, input number) whose input is x's edge
        node = frontier.pop()
        for j, child in enumerate(node.next_functions):
            if child == edge:
                expected.add((node, j))
            elif child[0] is not None and child[0] is not edge[0] and child[0] not in seen:
                seen.add(child[0])
                frontier.append(child[0])
    assert 16 < len(seen) < 256
    assert len(expected) == 2
    assert set(junctions._taps(raw, edge)) == expected


def test_an_add_of_one_tensor_with_itself_is_no_residual_around_block_0() -> None:
    """Block 0 an identity (its output the very tensor it took): x = out + out adds no path around
    block 0, every gradient of the sum goes through that one tensor; the docstring's add takes block
    0's output on one side and its input on the other, two edges (the guard `other != mine`)."""
    raw = torch.randn(2, 4, requires_grad=True) * 1.0  # an embedding's output: requires grad
    first = nn.Identity()(raw)
    assert first is raw
    doubled = first + first
    assert junctions._residual_add(doubled, raw, first) is None
    block = nn.Linear(4, 4)
    out = block(raw)
    summed = raw + out  # a real residual: found, taking raw itself (no taps)
    found = junctions._residual_add(summed, raw, out)
    assert found is not None and found[0] is summed.grad_fn and found[1] == []


def test_made_from_reaches_the_older_of_two_targets() -> None:
    """x is made from a (the older target) alone, after b was made: the search must reach back to the
    oldest target, not stop at the newest. Oracle: how x was computed."""
    leaf = torch.randn(3, requires_grad=True)
    a = leaf * 2.0
    b = leaf * 3.0
    x = a + 1.0
    assert junctions.made_from(x, {a.grad_fn, b.grad_fn})
    assert junctions.made_from(x, {a.grad_fn})
    assert not junctions.made_from(x, {b.grad_fn})


def test_only_an_add_of_alpha_one_is_a_residual_written_around_block_0() -> None:
    """J1: the residual add around block 0 is the add, alpha 1, of block 0's output and its input (its
    input side hands dL/d sum on unchanged: torch's own AddBackward0 scales the second input by alpha).
    torch.add(raw, first, alpha=2) is an AddBackward0 too, but no identity: it is left unread."""
    from stabilitycheck.junctions import skip_around

    w = torch.randn(4, requires_grad=True)
    raw = w * 1.0
    first = torch.tanh(raw)
    one = torch.add(raw, first)
    found = skip_around((one,), raw, first, False)
    assert found is not None and found[0] is one.grad_fn
    two = torch.add(raw, first, alpha=2.0)
    assert type(two.grad_fn).__name__ == "AddBackward0"
    assert skip_around((two,), raw, first, False) is None


def test_a_call_taking_block_0s_input_takes_no_chain_when_it_is_the_entry() -> None:
    """J3: with `entry`, outputs[0] is block 0's input, no output of chain 0: a second tower taking that
    input (or what is computed from it) runs beside the first and takes no chain; a call taking chain
    0's last output (or a sum on it) takes chain 0. Without `entry`, outputs[0] is chain 0's own."""
    from stabilitycheck.junctions import taken_chains

    w = torch.randn(4, requires_grad=True)
    inp = w * 1.0
    out0 = torch.tanh(inp)
    out1 = torch.tanh(out0)
    outputs = [inp, out0, out1]
    assert taken_chains(outputs, [], (inp,), True) == frozenset()
    assert taken_chains(outputs, [], (torch.sin(inp),), True) == frozenset()
    assert taken_chains(outputs, [], (out1 + 1,), True) == frozenset({0})
    assert taken_chains(outputs, [], (inp,), False) == frozenset({0})


def _loss(out, _):
    return out.pow(2).mean()


class _ScaledSkip(nn.Module):
    """stem, then x + 0.5 * block0(x) written as `mul` or as torch.add(..., alpha=0.5): the same function."""

    def __init__(self, alpha_form: bool, width: int = 6) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(11)
        self.stem = nn.Linear(width, width, bias=False)
        self.layers = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(3))
        with torch.no_grad():
            for m in (self.stem, *self.layers):
                m.weight.copy_(torch.randn(width, width, generator=g) / math.sqrt(width))
        self.alpha_form = alpha_form

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        x = self.stem(inp)
        out = self.layers[0](x)
        h = torch.add(x, out, alpha=0.5) if self.alpha_form else x + 0.5 * out
        h = self.layers[1](torch.tanh(h))
        return self.layers[2](torch.tanh(h))


def test_an_add_with_alpha_reads_as_the_same_function_written_with_a_multiply() -> None:
    inp = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    got = []
    for alpha_form in (False, True):
        model = _ScaledSkip(alpha_form)
        blocks = [(f"layers.{i}", m) for i, m in enumerate(model.layers)]
        got.append(probe_module(model, inp, _loss, blocks=blocks))
    plain, alpha = got
    assert alpha.activation_names == plain.activation_names
    assert list(alpha.activation_grad_norms) == pytest.approx(
        list(plain.activation_grad_norms), rel=1e-6, abs=0
    )
    assert alpha.growth == pytest.approx(plain.growth, rel=1e-6, abs=0)


F64 = torch.float64


def _square(out: torch.Tensor, _: object) -> torch.Tensor:
    return out.square().sum()


class _PassesItsInputOn(nn.Module):
    """A layer returning its output and, beside it, half its input."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8, dtype=F64)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tanh(self.lin(x)), 0.5 * x


class _TowerOnTheInputHandedOn(nn.Module):
    """An encoder of three such layers; a second tower of two layers runs on the half of the model's
    input that encoder layer 0 hands on, not on anything the encoder computed."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.ModuleList(_PassesItsInputOn() for _ in range(3))
        self.tower = nn.ModuleList(nn.Sequential(nn.Linear(8, 8, dtype=F64), nn.Tanh()) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, side = self.enc[0](x)
        for layer in self.enc[1:]:
            h, _ = layer(h)
        for layer in self.tower:
            side = layer(side)
        return h.sum() + side.sum()


def test_a_tower_on_the_input_block_0_hands_on_runs_beside_the_chain() -> None:
    """junctions.taken_chains: block 0's input (the `(input)` entry) is not an output of chain 0, 'a
    second tower taking that input too runs beside the first'; the tower's gradient reaches the input
    through 0.5 * x, never through the encoder, so no path crosses both. Oracle: the documented rule."""
    model = _TowerOnTheInputHandedOn()
    blocks = [(f"enc.{i}", b) for i, b in enumerate(model.enc)]
    blocks += [(f"tower.{i}", b) for i, b in enumerate(model.tower)]
    m = probe_module(model, torch.randn(4, 8, dtype=F64), lambda out, _: out, blocks=blocks)
    assert m.activation_names == ("(input)", "enc.0", "enc.1", "enc.2", "tower.0", "tower.1")
    assert m.chain_starts == (4,)
    assert m.chain_feeds == ((), ())
    assert m.growth == pytest.approx(max(m.chain_growths), rel=1e-12)


class _Decoding(nn.Module):
    """A decoder layer: its own input and the encoder's memory."""

    def __init__(self) -> None:
        super().__init__()
        self.own, self.mem = nn.Linear(8, 8, dtype=F64), nn.Linear(8, 8, dtype=F64)

    def forward(self, y: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.own(y) + self.mem(memory))


class _HeadOnDecoderPlusSkip(nn.Module):
    """Two encoder layers, two decoder layers on the encoder's memory, and a head on the decoder's
    output plus the decoder's own input (a skip around the decoder)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.ModuleList(nn.Sequential(nn.Linear(8, 8, dtype=F64), nn.Tanh()) for _ in range(2))
        self.dec = nn.ModuleList(_Decoding() for _ in range(2))
        self.head = nn.Linear(8, 4, dtype=F64)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for layer in self.enc:
            x = layer(x)
        h = y
        for layer in self.dec:
            h = layer(h, x)
        return self.head(h + y)  # type: ignore[no-any-return]


def test_a_head_after_a_decoder_takes_the_decoders_chain_alone() -> None:
    """junctions.taken_chains: 'a head after a decoder takes the decoder's alone (the encoder's reach
    it through the decoder)': the head's input, the decoder's output plus a skip, is no merge of two
    chains, so the head goes on with the decoder's chain. Oracle: the documented rule, and torch's
    |dL/d dec.0| / |dL/d head| for the decoder chain's growth."""
    model = _HeadOnDecoderPlusSkip()
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(4, 8, dtype=F64, generator=gen), torch.randn(4, 8, dtype=F64, generator=gen)
    blocks = [(f"enc.{i}", b) for i, b in enumerate(model.enc)]
    blocks += [*((f"dec.{i}", b) for i, b in enumerate(model.dec)), ("head", model.head)]
    m = probe_module(model, (x, y), _square, blocks=blocks)
    assert m.activation_names == ("(input)", "enc.0", "enc.1", "dec.0", "dec.1", "head")
    assert m.chain_starts == (3,)
    assert m.chain_feeds == ((), (0,))
    dec0, _, head = _grads_of([*model.dec, model.head], lambda: _square(model(x, y), None))
    assert m.chain_growths[1] == pytest.approx(dec0 / head, rel=1e-12)


class _LearnedStart(nn.Module):
    """A block returning its learned state as it is (a leaf: no autograd node), whatever it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.state = nn.Parameter(torch.randn(4, 8, dtype=F64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.state


class _StartsFromALearnedState(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.start = _LearnedStart()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8, dtype=F64), nn.Tanh()) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.start(x)
        for layer in self.layers:
            h = layer(h)
        return h


def test_a_block_taking_the_leaf_the_block_before_returned_goes_on_with_its_chain() -> None:
    """junctions.comes_from: a call goes on with the chain where what it takes 'is out or is computed from
    it'; the learned state start returns is a leaf (no autograd node to trace back to), and layers.0
    takes it as it is. Oracle: the documented rule, and torch's |dL/d start| / |dL/d layers.2|."""
    model = _StartsFromALearnedState()
    blocks = [("start", model.start), *((f"layers.{i}", b) for i, b in enumerate(model.layers))]
    x = torch.randn(4, 8, dtype=F64)
    m = probe_module(model, x, _square, blocks=blocks)
    assert m.activation_names[-4:] == ("start", "layers.0", "layers.1", "layers.2")
    assert m.chain_starts == ()
    out: list[torch.Tensor] = []

    def run() -> torch.Tensor:
        out.append(_square(model(x), None))
        return out[0]

    start, *_, last = _grads_of([model.start, *model.layers], run)
    assert m.growth == pytest.approx(start / last, rel=1e-12)


class _TwoHeadsOnTwoInputs(nn.Module):
    """A list of two heads, each on its own input: head 1 does not take head 0's output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(8, 8, dtype=F64), nn.Tanh()) for _ in range(2))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.heads[0](a) + self.heads[1](b)  # type: ignore[no-any-return]


def test_block_1_not_taking_block_0s_output_starts_a_chain() -> None:
    """Every block but a lone block 0 is checked for a junction, a stack's later blocks too (a head per
    stage is a chain of its own): heads.1 takes b, not heads.0's output, so it starts a chain at call 2.
    Oracle: the documented rule (stack_starts' docstring)."""
    gen = torch.Generator().manual_seed(5)
    a, b = torch.randn(4, 8, dtype=F64, generator=gen), torch.randn(4, 8, dtype=F64, generator=gen)
    m = probe_module(_TwoHeadsOnTwoInputs(), (a, b), _square)
    assert m.activation_names == ("(input)", "heads.0", "heads.1")
    assert m.chain_starts == (2,)


def _starts_by_rule(stacks: list[str]) -> list[int]:
    """stack_starts' docstring, spelt out: the first block of each run of blocks in one container,
    except block 0 where it is a one-block stack (a recurrent cell called per token)."""
    runs = [b for b in range(len(stacks)) if b == 0 or stacks[b] != stacks[b - 1]]
    return [b for b in runs if b > 0 or (len(stacks) > 1 and stacks[1] == stacks[0])]


@pytest.mark.parametrize(
    "stacks",
    [
        ["cell"],
        ["cell", "head"],
        ["layers", "layers", "head"],
        ["enc", "enc", "dec", "dec"],
        ["stages.0", "stages.1", "stages.1", "heads", "heads"],
        ["fwd", "bwd"],
        ["a", "a", "b", "a", "a"],
    ],
)
def test_the_blocks_checked_in_a_pre_hook_are_each_stacks_first_but_a_lone_block_0(stacks: list[str]) -> None:
    """Oracle: the rule of junctions.stack_starts' docstring, spelt out by hand."""
    from stabilitycheck.junctions import stack_starts

    assert stack_starts(stacks) == _starts_by_rule(stacks)


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


def _orthogonal(g: float, width: int = 16) -> torch.Tensor:
    """g x a random orthogonal matrix: ||W^T v|| = g ||v|| for every v, so a chain of k such linear maps
    grows g^k exactly, whatever gradient reaches it."""
    q, _ = torch.linalg.qr(torch.randn(width, width, dtype=torch.float64))
    return g * q


class _AttributeTower(nn.Module):
    """A shared tower of three linear blocks held as attributes (`a0`, `a1`, `a2`: each a stack of its
    own), or the first alone in a list (`layout='lists'`), run on two inputs; the loss weighs the
    second output x20."""

    def __init__(self, g: float, layout: str) -> None:
        super().__init__()
        blocks = [nn.Linear(16, 16, bias=False, dtype=torch.float64) for _ in range(3)]
        for block in blocks:
            block.weight.data = _orthogonal(g)
        if layout == "attributes":
            self.a0, self.a1, self.a2 = blocks
        else:
            self.first, self.rest = nn.ModuleList(blocks[:1]), nn.ModuleList(blocks[1:])

    def tower(self) -> list[nn.Module]:
        return [self.a0, self.a1, self.a2] if hasattr(self, "a0") else [self.first[0], *self.rest]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for half in x.chunk(2, dim=-1):
            for block in self.tower():
                half = block(half)
            outs.append(half)
        return torch.cat([outs[0], 20 * outs[1]], -1)


@pytest.mark.parametrize("layout", ["attributes", "lists"])
def test_a_shared_tower_whose_first_block_is_a_stack_of_its_own_is_two_chains(layout: str) -> None:
    """Oracle: each pass is a chain of three maps g x orthogonal, growing g^3 exactly. Block 0 alone
    in its stack (an attribute, or alone in its list) was never checked for a junction: its second
    call, on the second input, continued the first pass's chain, and the growth read g^3 x the ratio
    of the two outputs' unrelated gradients: 0.0041 for 1.3^3 = 2.197."""
    torch.manual_seed(0)
    model = _AttributeTower(1.3, layout)
    names = {id(m): name for name, m in model.named_modules()}
    blocks = [(names[id(block)], block) for block in model.tower()]
    x = torch.randn(4, 32, dtype=torch.float64)
    m = probe_module(model, x, lambda out, _: out.square().sum(), blocks=blocks)
    assert m.chain_starts == (4,)  # the first from the input (block 0's gain too), the second from a0
    assert m.chain_growths == pytest.approx((1.3**3, 1.3**2), rel=1e-12)
    assert m.growth == pytest.approx(1.3**3, rel=1e-12)


class _Cell(nn.Module):
    def __init__(self, g: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(_orthogonal(g))

    def forward(self, u: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return u + h @ self.weight.T


class _FreshStates(nn.Module):
    """One linear cell over T tokens, its state reset to zeros every `every` tokens (or run a second
    time over the reversed tokens from zeros: `twice`); returns every state."""

    def __init__(self, g: float, every: int, twice: bool = False) -> None:
        super().__init__()
        self.cell, self.every, self.twice = _Cell(g), every, twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        states = []
        orders = [range(x.shape[1]), reversed(range(x.shape[1]))] if self.twice else [range(x.shape[1])]
        h = torch.zeros_like(x[:, 0])
        for order in orders:
            for i, t in enumerate(order):
                h = torch.zeros_like(h) if i % self.every == 0 else h
                h = self.cell(x[:, t], h)
                states.append(h)
        return torch.stack(states, 1)


def test_a_cell_run_again_from_a_fresh_state_starts_a_chain() -> None:
    """Oracle: a window of k calls of the cell u + W h, W = g x orthogonal, grows g^(k-1) exactly
    (the first call's gain through h, k - 1 of them). A cell is block 0 and a stack of its own: its
    calls were never checked, so a state reset to zeros every 4 tokens continued the chain, and under
    a loss on the last token the windows before, which it takes nothing from, read the model's growth
    as 0 (for 1.3^3); a second pass over the reversed tokens, its loss x20, read 0.18 for 1.2^7 = 3.58."""
    torch.manual_seed(0)
    x = torch.randn(3, 16, 16, dtype=torch.float64)
    reset = _FreshStates(1.3, every=4)
    last = probe_module(reset, x, lambda out, _: out[:, -1].sum(), blocks=[("cell", reset.cell)])
    assert last.chain_starts == (4, 8, 12)
    assert last.growth == pytest.approx(1.3**3, rel=1e-12)
    each = _FreshStates(1.3, every=1)  # a window of one call, g^0: its first restart is a cut too
    assert probe_module(each, x, lambda out, _: out[:, -1].sum(), blocks=[("cell", each.cell)]).growth == 1.0
    every = probe_module(reset, x, lambda out, _: out.square().sum(), blocks=[("cell", reset.cell)])
    states: list[torch.Tensor] = []
    handle = reset.cell.register_forward_hook(lambda module, args, out: states.append(out))
    loss = reset(x).square().sum()
    handle.remove()
    grads = [g.norm().item() for g in torch.autograd.grad(loss, states)]  # brute force, per window
    assert every.chain_growths == pytest.approx([grads[i] / grads[i + 3] for i in range(0, 16, 4)], rel=1e-12)

    both = _FreshStates(1.2, every=8, twice=True)
    ends = lambda out, _: out[:, 7].sum() + 20 * out[:, 15].sum()  # noqa: E731  # each pass's last state
    two = probe_module(both, x[:, :8], ends, blocks=[("cell", both.cell)])
    assert two.chain_starts == (8,)
    assert two.chain_growths == pytest.approx((1.2**7, 1.2**7), rel=1e-12)


class _StackedCells(nn.Module):
    """Two linear cells held as attributes, c0 then c1 at every token, both states reset to zeros every
    `every` tokens; returns every h1."""

    def __init__(self, g: float, every: int) -> None:
        super().__init__()
        self.c0, self.c1, self.every = _Cell(g), _Cell(g), every

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h0 = h1 = torch.zeros_like(x[:, 0])
        states = []
        for t in range(x.shape[1]):
            if t % self.every == 0:
                h0, h1 = torch.zeros_like(h0), torch.zeros_like(h1)
            h0 = self.c0(x[:, t], h0)
            h1 = self.c1(h0, h1)
            states.append(h1)
        return torch.stack(states, 1)


def test_stacked_attribute_cells_reset_every_k_tokens_read_the_last_window() -> None:
    """Oracle: autograd's gradients of every call's output, the last window's first over its last.
    c0's restart came after c1's call, not its own, and was no cut: under a loss on the last token the
    windows before, which get no gradient, read the growth NaN (found by a review)."""
    torch.manual_seed(0)
    x = torch.randn(3, 12, 16, dtype=torch.float64)
    model = _StackedCells(1.3, every=4)
    blocks = [("c0", model.c0), ("c1", model.c1)]
    m = probe_module(model, x, lambda out, _: out[:, -1].sum(), blocks=blocks)
    outs: list[torch.Tensor] = []
    handles = [
        c.register_forward_hook(lambda module, args, out: outs.append(out)) for c in (model.c0, model.c1)
    ]
    loss = model(x)[:, -1].sum()
    for h in handles:
        h.remove()
    grads = [g.norm().item() for g in torch.autograd.grad(loss, outs)]
    assert m.chain_starts == (8, 16)
    assert m.growth == pytest.approx(grads[16] / grads[23], rel=1e-12)


class _BesideAnotherCell(nn.Module):
    """Cell `a` (the block) per token takes [x_t, h_b] and its own state times a mask; cell `b`, no
    block, runs beside it: h_b's graph reaches back to the first token."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.GRUCell(16, 8), nn.GRUCell(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ha = hb = torch.zeros(x.shape[0], 8)
        keep, states = torch.ones(8), []
        for t in range(x.shape[1]):
            hb = self.b(x[:, t], hb)
            state = (ha * keep).clamp(-10, 10) if getattr(self, "two", False) else ha * keep
            ha = self.a(torch.cat([x[:, t], hb], -1), state)
            states.append(ha)
        return torch.stack(states, 1)


def test_a_cells_junction_check_searches_no_graph_where_its_state_is_one_node_away(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The check of block 0's later calls searched each argument's graph in turn: h_b's first, back to
    the first token at every token, a probe quadratic in the tokens (x12 a bare step at 512, found by
    a review). `ha * keep` takes block 0's last output one node away: no search at all."""
    from stabilitycheck import chaining

    searched: list[int] = []
    real = chaining.made_from
    monkeypatch.setattr(chaining, "made_from", lambda *a: searched.append(1) or real(*a))
    torch.manual_seed(0)
    model = _BesideAnotherCell()  # and its state two nodes away, (h * keep).clamp(...): as near
    model.two = True
    m = probe_module(
        model, torch.randn(2, 64, 8), lambda out, _: out.square().mean(), blocks=[("a", model.a)]
    )
    assert m.chain_starts == () and math.isfinite(m.growth)
    assert searched == []


def test_a_tower_pass_behind_a_zero_gate_says_it_has_no_growth_not_dropped() -> None:
    """A shared tower of attribute blocks, its first pass behind a gate at 0: that chain gets no
    gradient, and its growth 0 / 0 is said (NaN), as a list-held tower's is; a review found it
    dropped as a cell's window (a restart is a cut only for a block 0 called more than once before)."""
    torch.manual_seed(0)
    model = _AttributeTower(1.3, "attributes")
    names = {id(m): name for name, m in model.named_modules()}
    blocks = [(names[id(block)], block) for block in model.tower()]
    x = torch.randn(4, 32, dtype=torch.float64)
    m = probe_module(
        model, x, lambda out, _: (0.0 * out[:, :16]).sum() + out[:, 16:].square().sum(), blocks=blocks
    )
    assert m.chain_starts == (4,)
    assert math.isnan(m.chain_growths[0]) and m.chain_growths[1] == pytest.approx(1.3**2, rel=1e-12)
