"""Blocks a forward calls again on their own output (stabilitycheck.loops): a recurrent cell of the
user's own, a weight-tied block looped over depth, found where the module tree has no stack, list or
torch cell. Oracles: exact gains of linear maps W = g x orthogonal (||W^T v|| = g ||v||), torch's own
gradients, and the model's state (buffers, modes, random state) compared before and after.
Also find_blocks' choice and order of stacks around looped blocks (first call, declared, heads apart)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
from chain_models import TutorialCell, TutorialLoop
from probe_models import scripted_tanh
from torch import nn

from stabilitycheck.blocks import LEAVES_NOTE, find_blocks
from stabilitycheck.config import Config
from stabilitycheck.configprobe import probe
from stabilitycheck.loops import LOOPED_NOTE, looped_blocks
from stabilitycheck.probing import probe_module


def orthogonal(g: float, n: int) -> torch.Tensor:
    return g * torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))[0]


class LeafRNN(nn.Module):
    """A linear RNN written with two leaf layers, h' = W h + U x_t: W is called again on what it made."""

    def __init__(self, g: float) -> None:
        super().__init__()
        self.w = nn.Linear(16, 16, bias=False, dtype=torch.float64)
        self.u = nn.Linear(5, 16, bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.w.weight.copy_(orthogonal(g, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(x.shape[0], 16, dtype=x.dtype)
        for t in range(x.shape[1]):
            h = self.w(h) + self.u(x[:, t])
        return h


class Block(nn.Module):
    """Linear, batch norm, tanh, dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.norm, self.drop = nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(torch.tanh(self.norm(self.lin(x))))


class TiedResidual(nn.Module):
    """One residual block applied `depth` times (weights tied over depth), with dropout and batch norm."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        self.depth = depth
        self.block = Block()
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.depth):
            x = x + self.block(x)
        return self.head(x)


class Shared(nn.Module):
    """A tower (one composite module) run once on each of two inputs: called twice, never on its own
    output."""

    def __init__(self) -> None:
        super().__init__()
        self.tower = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
        self.head = nn.Linear(16, 2)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat((self.tower(a), self.tower(b)), 1))


def test_the_tutorial_cell_is_found_and_read_on_its_hidden_state() -> None:
    """The char-RNN tutorial's loop, no blocks declared: the leaf layers i2h and i2o were the blocks,
    their calls interleaved (growth 7.8 over 12 tokens where h grows 1.3^10 = 13.8). The cell is the
    block now, each call read on h. Oracle, exact: every gain through h is g; the last call's h
    reaches no loss."""
    torch.manual_seed(0)
    g, tokens = 1.3, 12
    m = probe_module(
        TutorialLoop(g, 16), torch.randn(4, tokens, 16, dtype=torch.float64), lambda o, _: o.sum()
    )
    assert m.layer_names == ("rnn",) and len(m.activation_names) == tokens
    assert m.gains[:-1] == pytest.approx([g] * (tokens - 2), rel=1e-12) and math.isnan(m.gains[-1])
    assert m.growth == pytest.approx(g ** (tokens - 2), rel=1e-12)


def test_a_leaf_layer_called_again_on_its_own_output_is_the_block() -> None:
    """h' = W h + U x_t written with two leaf layers: W is the recurrence (each call takes what the last
    made), U is not (each call takes a new token). Oracle, exact: each gain is g, from the entry h_0
    over the 10 calls of W."""
    torch.manual_seed(0)
    g, tokens = 1.2, 10
    model = LeafRNN(g)
    x = torch.randn(3, tokens, 5, dtype=torch.float64)
    assert find_blocks(model)[1].startswith(LEAVES_NOTE)
    assert looped_blocks(model, x, *find_blocks(model)) == (
        (("w", model.w),),
        LOOPED_NOTE.format(names="w"),
    )
    m = probe_module(model, x, lambda o, _: o.sum())
    assert set(m.layer_names) == {"w"}
    assert m.gains == pytest.approx([g] * (len(m.activation_names) - 1), rel=1e-12)
    assert m.growth == pytest.approx(g ** (len(m.activation_names) - 1), rel=1e-12)
    assert len(m.activation_names) >= tokens


def test_a_block_looped_over_depth_is_read_per_call_against_torchs_gradients() -> None:
    """A residual block with weights tied over 6 applications: one block, 6 calls. Oracle: torch's
    dL/d(output) of each call (the probe's loss, a sum of squares), in eval mode as the probe's
    comparison needs no dropout draws; the gains are their ratios."""
    torch.manual_seed(0)
    model = TiedResidual(6).double().eval()
    x = torch.randn(5, 8, dtype=torch.float64)
    m = probe_module(model, x, lambda o, _: o.square().sum())
    assert m.layer_names == ("block",)
    outs: list[torch.Tensor] = []
    handle = model.block.register_forward_hook(lambda mod, i, out: outs.append(out))
    loss = model(x).square().sum()
    handle.remove()
    norms = [float(v.norm()) for v in torch.autograd.grad(loss, outs)]
    calls = [i for i, name in enumerate(m.activation_names) if name.startswith("block[")]
    assert [m.activation_grad_norms[i] for i in calls] == pytest.approx(norms, rel=1e-9)


class Scripted(nn.Module):
    """A TorchScript layer beside an eager one, as attributes: no stack, the leaf modules its blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = scripted_tanh(), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


@pytest.mark.parametrize(
    "model",
    [Shared(), nn.Sequential(nn.Linear(8, 8)), Scripted()],
    ids=["shared", "one-layer", "scripted"],
)
def test_a_module_never_called_on_its_own_output_leaves_find_blocks_choice(model: nn.Module) -> None:
    """A tower run on two inputs is called twice but never on its own output; a one-layer model is not
    looped at all; a TorchScript layer takes no hooks (left out, not an error): find_blocks' choice
    stands, note and all."""
    inputs = (torch.randn(2, 8), torch.randn(2, 8)) if isinstance(model, Shared) else torch.randn(2, 8)
    chosen = find_blocks(model)
    assert looped_blocks(model, inputs, *chosen) == chosen


def test_the_forward_that_finds_them_changes_nothing_of_the_model() -> None:
    """The finding forward runs on a copy: batch norm's running statistics and batch counter stay,
    torch's random state is as before (dropout drew on it), and every module's mode stays, a mixed
    one (the head in eval mode, the rest training) too."""
    torch.manual_seed(0)
    model = TiedResidual(3)
    model.head.eval()
    x = torch.randn(4, 8)
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    state = torch.get_rng_state()
    blocks, note = looped_blocks(model, x, *find_blocks(model))
    assert blocks == (("block", model.block),) and note == LOOPED_NOTE.format(names="block")
    assert torch.equal(torch.get_rng_state(), state)
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(v, buffers[k]) for k, v in model.state_dict().items())


MODEL_FILE = """
import torch
from torch import nn

SPACE = {"seq_len": (1, 32)}


class RNN(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.i2h = nn.Linear(2 * n, n, bias=False)
        self.i2o = nn.Linear(2 * n, 4, bias=False)
        with torch.no_grad():
            self.i2h.weight[:, n:] = 1.3 * torch.linalg.qr(torch.randn(n, n))[0]

    def forward(self, x, h):
        combined = torch.cat((x, h), 1)
        return self.i2o(combined), self.i2h(combined)


class Net(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.rnn = RNN(n)

    def forward(self, x):
        h = torch.zeros(x.shape[1], x.shape[2])
        for t in range(x.shape[0]):
            out, h = self.rnn(x[t], h)
        return out


def build(seq_len=8, width=16):
    return Net(width)


def batch(model, seq_len=8, width=16, batch_size=4):
    return torch.randn(seq_len, batch_size, width)
"""


def test_a_model_file_looping_its_own_cell_says_so_and_grows_through_it(tmp_path: Path) -> None:
    """The same tutorial loop as a model file: the blocks line names the rule, and the growth is the
    exact one, 1.3 per token between the first and the last call whose h reaches the loss (its
    orthogonal matrix drawn in float32: within 1e-6)."""
    path = tmp_path / "charrnn.py"
    path.write_text(MODEL_FILE)
    m = probe(Config.of(f"{path}:build", seq_len=12, dtype="float64"))
    assert "rnn (called again on their own output: a block per call)" in m.blocks_note
    assert m.growth == pytest.approx(1.3**10, rel=1e-6)


class Reader(nn.Module):
    """Two tutorial cells in one container, `enc.fwd` (g = 1.3) over the tokens, then `enc.bwd`
    (g = 0.8) back over them; each direction's last h summed into the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.ModuleDict({"fwd": TutorialCell(1.3, 8), "bwd": TutorialCell(0.8, 8)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hf = hb = torch.zeros(x.shape[0], 16, dtype=x.dtype)
        for t in range(x.shape[1]):
            _, hf = self.enc["fwd"](x[:, t], hf)
        for t in reversed(range(x.shape[1])):
            _, hb = self.enc["bwd"](x[:, t], hb)
        return hf.sum(1) + hb.sum(1)


def test_two_cells_of_one_container_each_called_in_a_run_are_read_on_their_hidden_state() -> None:
    """Two (y, h) cells held in one container are one stack: the switch to h was off for both, every
    gain NaN and the growth 1 (a reviewer's case). A block whose calls follow each other switches.
    Oracle, exact: the gains through h are 1.3 then 0.8, 5 of each, and no gain is taken between."""
    torch.manual_seed(0)
    m = probe_module(Reader(), torch.randn(3, 6, 8, dtype=torch.float64), lambda o, _: o.sum())
    assert m.layer_names == ("enc.fwd", "enc.bwd")
    assert m.gains[:5] == pytest.approx([1.3] * 5, rel=1e-12)
    assert m.gains[6:] == pytest.approx([0.8] * 5, rel=1e-12)


class Branching(nn.Module):
    """Loops `cell` in training and an averaged copy `ema` in eval mode, and counts its forwards."""

    def __init__(self) -> None:
        super().__init__()
        self.cell, self.ema = LeafRNN(1.2), LeafRNN(1.1)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.cell(x) if self.training else self.ema(x)


def test_the_looped_blocks_are_the_ones_the_probed_mode_runs_and_the_model_is_left_as_it_was() -> None:
    """The finding forward ran in eval mode: a model looping another module there had that one as its
    block, which the probe's forward never called (an error; a reviewer's case). It runs on a copy,
    in the model's own mode: the training path's `cell.w`, the model's own counter untouched."""
    torch.manual_seed(0)
    model = Branching()
    x = torch.randn(3, 7, 5, dtype=torch.float64)
    assert looped_blocks(model, x, *find_blocks(model)) == (
        (("cell.w", model.cell.w),),
        LOOPED_NOTE.format(names="cell.w"),
    )
    assert model.calls == 0
    m = probe_module(model, x, lambda o, _: o.sum())
    assert m.layer_names == ("cell.w",) and model.calls == 1
    assert m.gains == pytest.approx([1.2] * (len(m.activation_names) - 1), rel=1e-12)


class _Supervised(nn.Module):
    """A deep-supervision model: pre-norm residual layers and a head per layer (LayerNorm, Linear), a
    Sequential, so both lists are stacks of composite blocks, as an encoder's and a decoder's are;
    each head reads its layer's output, none feeds the next layer. `heads_first`: defined first."""

    def __init__(self, heads_first: bool) -> None:
        super().__init__()

        def heads() -> nn.ModuleList:
            return nn.ModuleList(
                nn.Sequential(nn.LayerNorm(8, dtype=torch.float64), nn.Linear(8, 3, dtype=torch.float64))
                for _ in range(4)
            )

        if heads_first:
            self.heads = heads()
        self.layers = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(8, dtype=torch.float64), nn.Linear(8, 8, dtype=torch.float64))
            for _ in range(4)
        )
        if not heads_first:
            self.heads = heads()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for layer, head in zip(self.layers, self.heads, strict=True):
            x = layer(x)
            outs.append(head(x))
        return outs


@pytest.mark.parametrize("heads_first", [False, True])
def test_per_layer_heads_called_between_the_layers_are_not_taken_with_them(heads_first: bool) -> None:
    """Two stacks of composite blocks are taken together as an encoder's and a decoder's; a
    deep-supervision model's heads, called between its layers, were read as blocks of the chain
    (layers.0, heads.0, layers.1, ...): each later layer's gain across the head before it, the heads'
    about 3, growth 1.24 for 1.55 (found by an audit). A forward shows the calls interleave: the
    layers, whose calls chain, are taken alone. Oracle: torch's gradients of each layer's output."""
    torch.manual_seed(0)
    model, x = _Supervised(heads_first), torch.randn(4, 8, dtype=torch.float64)

    def loss(outs: list[torch.Tensor], _: torch.Tensor) -> torch.Tensor:
        return outs[-1].square().sum() + 0.3 * sum(o.square().sum() for o in outs[:-1])

    m = probe_module(model, x, loss)
    assert m.layer_names == tuple(f"layers.{i}" for i in range(4))
    assert m.blocks_note == "blocks: layers (4; heads run between their calls, off the chain: not taken)"
    outs: list[torch.Tensor] = []
    handles = [layer.register_forward_hook(lambda mod, i, o: outs.append(o)) for layer in model.layers]
    given = x.clone().requires_grad_()
    total = loss(model(given), x)
    for handle in handles:
        handle.remove()
    norms = [g.norm().item() for g in torch.autograd.grad(total, [given, *outs])]
    assert m.activation_grad_norms == pytest.approx(norms, rel=1e-9)
    assert m.growth == pytest.approx(norms[0] / norms[-1], rel=1e-9)


def test_an_encoders_and_a_decoders_stacks_called_one_after_the_other_are_both_kept() -> None:
    """The same two stacks of composite blocks, called one after the other (an encoder's layers, then
    a decoder's on their output): find_blocks' choice of both stands."""

    class EncoderDecoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3))
            self.decoder = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in [*self.encoder, *self.decoder]:
                x = layer(x)
            return x

    model = EncoderDecoder()
    blocks, note = looped_blocks(model, torch.randn(2, 8), *find_blocks(model))
    assert note == "blocks: encoder (3) + decoder (2)"
    assert [n for n, _ in blocks] == ["encoder.0", "encoder.1", "encoder.2", "decoder.0", "decoder.1"]


def test_two_stacks_whose_calls_interleave_and_both_chain_are_both_kept() -> None:
    """A ladder: decoder layer i takes encoder layer i's output and the decoder layer before it, so
    the calls interleave (enc.0, dec.0, enc.1, ...) and both stacks chain; taking the first alone
    dropped the decoder from a model whose loss is on it (found in review). find_blocks' choice of
    both stands."""

    class Ladder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3))
            self.dec = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.zeros_like(x)
            for enc, dec in zip(self.enc, self.dec, strict=True):
                x = enc(x)
                y = dec(x + y)
            return y

    model = Ladder()
    blocks, note = looped_blocks(model, torch.randn(2, 8), *find_blocks(model))
    assert note == "blocks: enc (3) + dec (3)" and len(blocks) == 6


def test_a_sequential_block_looped_on_its_own_output_is_read_a_call_at_a_time() -> None:
    """Sequential(Linear, Tanh) called 8 times on its own output (a Universal-Transformer-style loop of
    one weight-tied block): read as `block (2, mixed module types)`, each call's Linear and Tanh were
    separate entries, half-block gains (median 1.61 where torch's per-call median is 1.39). Oracle:
    torch's gradient of each call's output (retain_grad), float64. (found by a third-party audit)"""
    torch.manual_seed(0)

    class UT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.Sequential(nn.Linear(16, 16, dtype=torch.float64), nn.Tanh())
            nn.init.normal_(self.block[0].weight, std=3.0 / 4.0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for _ in range(8):
                x = self.block(x)
            return x

    model = UT()
    x, z = torch.randn(4, 16, dtype=torch.float64), torch.randn(4, 16, dtype=torch.float64)
    m = probe_module(model, x, lambda o, _: (o * z).sum())
    outs: list[torch.Tensor] = []
    handle = model.block.register_forward_hook(lambda mod, i, out: outs.append(out))
    xi = x.clone().requires_grad_()
    grads = torch.autograd.grad((model(xi) * z).sum(), [xi, *outs])
    handle.remove()
    norms = [float(g.norm()) for g in grads]
    assert len(m.gains) == 8
    assert m.gains == pytest.approx([norms[i] / norms[i + 1] for i in range(8)], rel=1e-9)


class Truncated(nn.Module):
    """A tanh cell stepped per token with `h = h.detach()` every `k` tokens (truncated
    backpropagation through time inside the forward), a head on every step; the steps' states are
    kept (`states`) for the oracle's own gradients."""

    def __init__(self, k: int, carried: bool) -> None:
        super().__init__()
        kind = nn.LSTMCell if carried else nn.RNNCell
        self.cell = kind(6, 6, dtype=torch.float64)
        self.head = nn.Linear(6, 1, dtype=torch.float64)
        self.k, self.carried = k, carried
        self.states: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = c = x.new_zeros(x.shape[0], 6)
        self.states = []
        outs = []
        for t, x_t in enumerate(x.unbind(1)):
            if t and t % self.k == 0:
                h, c = h.detach(), c.detach()
            if self.carried:
                h, c = self.cell(x_t, (h, c))
            else:
                h = self.cell(x_t, h)
            h.retain_grad()
            self.states.append(h)
            outs.append(self.head(h))
        return torch.stack(outs, 1)


@pytest.mark.parametrize("carried", [False, True], ids=["rnn", "lstm"])
@pytest.mark.parametrize("last", [True, False], ids=["last-token", "per-token"])
def test_a_truncated_bptt_window_is_a_chain_of_its_own(carried: bool, last: bool) -> None:
    """Each window between two `h.detach()` is a chain of its own: no gain across the cut (it is no
    Jacobian's: the gradient does not cross it), and the growth is the largest window's. Under a loss
    on the last token the windows before it get an exactly-zero gradient and are read as unreached:
    before, the gain across the cut was 0 / |dL/dh| and the model read growth 0, a dead layer.
    Oracle (the RNN, whose state is h alone): torch's gradients of each step's h, first over last
    of each window, the largest."""
    torch.manual_seed(3)
    k, steps = 5, 20
    model = Truncated(k, carried)
    x = torch.randn(4, steps, 6, dtype=torch.float64)

    def loss_fn(out: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        return out[:, -1].pow(2).mean() if last else out.pow(2).mean()

    m = probe_module(model, x, loss_fn, blocks=[("cell", model.cell)])
    assert m.chain_starts == (5, 10, 15)
    assert all(math.isnan(m.gains[s - 1]) for s in m.chain_starts)  # no gain across a cut
    assert m.growth > 0 and math.isfinite(m.growth)
    if carried:
        return
    loss_fn(model(x), x).backward()
    grads = [float(h.grad.norm()) for h in model.states]
    windows = [grads[a : a + k] for a in range(0, steps, k)]
    growths = [w[0] / w[-1] for w in windows if any(w)]
    assert len(growths) == (1 if last else 4)
    assert m.growth == pytest.approx(max(growths), rel=1e-9)


def test_the_cut_check_reads_a_detached_alias_and_nothing_else() -> None:
    """blockcalls.cut by hand: the last output detached is a cut, as it came or a copy is not; a
    sparse output, which has no data pointer to compare, is none (the check raised on it)."""
    from stabilitycheck.blockcalls import cut as _cut

    x = torch.randn(2, 3)
    h = torch.randn(2, 3, requires_grad=True) * 1.0
    assert _cut((x, h.detach()), {}, h) and _cut((x, (h.detach(), x)), {}, h)
    assert not _cut((x, h), {}, h) and not _cut((x, h.detach().clone()), {}, h)
    assert not _cut((h.detach(), h), {}, h)  # the chain goes on through h as it came
    sparse = torch.randn(2, 3).to_sparse().requires_grad_()
    assert not _cut((x, x), {}, sparse)


class _EncoderThenHeads(nn.Module):
    """Three chained encoder blocks, then three heads each reading the encoder's output (the calls of
    the two stacks follow each other, never interleave)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(3))
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(4, 4)) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.enc:
            x = block(x)
        return torch.stack([head(x) for head in self.heads]).sum(0)


def test_stacks_called_one_after_the_other_keep_find_blocks_choice() -> None:
    """looped_blocks drops a stack whose calls do not chain only where another's calls fall between
    them; an encoder's calls, then its heads' (no call between two of another stack's), keep both."""
    from stabilitycheck.blocks import find_blocks
    from stabilitycheck.loops import looped_blocks

    model = _EncoderThenHeads()
    blocks, note = find_blocks(model)
    assert [name for name, _ in blocks] == [f"enc.{i}" for i in range(3)] + [f"heads.{i}" for i in range(3)]
    assert looped_blocks(model, torch.randn(2, 4), blocks, note) == (blocks, note)


F64 = torch.float64


class _DrawsPython(nn.Module):
    """One Linear looped over depth (find_blocks' last resort: its leaf modules), whose forward draws
    from Python's `random` (a stochastic depth written with it) without changing its output."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Linear(8, 8, dtype=F64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(3):
            keep = random.random() >= 0.0  # always True: a draw that changes nothing
            x = torch.tanh(self.block(x)) if keep else x
        return x


def test_the_forward_that_finds_looped_blocks_puts_pythons_random_state_back() -> None:
    """looped_blocks' docstring: the finding forward runs with the random states of torch, Python and
    numpy put back. Oracle: random.getstate() before and after (the draw moves it)."""
    model = _DrawsPython()
    x = torch.randn(2, 8, dtype=F64)
    random.seed(7)
    before = random.getstate()
    blocks, _ = looped_blocks(model, x, *find_blocks(model))
    assert [name for name, _ in blocks] == ["block"]
    assert random.getstate() == before


class _SpareStackDeclaredFirst(nn.Module):
    """Two stacks of composite blocks, the first declared never called (a spare tower the forward
    skips), the second the chain."""

    def __init__(self) -> None:
        super().__init__()
        self.spare = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3))
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def test_a_stack_the_forward_never_calls_comes_after_the_ones_it_calls() -> None:
    """looped_blocks takes the stacks in the order the forward first calls them, 'a stack never called
    comes last' (loops._apart), with the order note. Oracle: the documented rule."""
    model = _SpareStackDeclaredFirst()
    assert [name for name, _ in find_blocks(model)[0]][:1] == ["spare.0"]  # declared order
    blocks, note = looped_blocks(model, torch.randn(2, 8), *find_blocks(model))
    want = [*(f"layers.{i}" for i in range(3)), *(f"spare.{i}" for i in range(3))]
    assert [name for name, _ in blocks] == want
    assert note == "blocks: layers (3) + spare (3) (in the order the forward calls them)"


def _composite(n: int) -> nn.ModuleList:
    return nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(n))


class _Sandwich(nn.Module):
    """Two stacks of composite blocks: `outer` opens and closes the forward around `inner`."""

    def __init__(self) -> None:
        super().__init__()
        self.outer, self.inner = _composite(2), _composite(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.outer[0](x)
        for layer in self.inner:
            x = layer(x)
        return self.outer[1](x)  # type: ignore[no-any-return]


def test_stacks_are_ordered_by_their_first_call_not_their_last() -> None:
    """looped_blocks: 'the stacks in the order the forward first calls them' (block 0's input is the
    chain's `(input)`): outer's first call comes before inner's, so the declared order stands, its
    note unchanged. Oracle: the documented rule."""
    model = _Sandwich()
    chosen = find_blocks(model)
    assert chosen[1] == "blocks: outer (2) + inner (3)"
    assert looped_blocks(model, torch.randn(2, 8), *chosen) == chosen


class _DeclaresItsBlocks(_Sandwich):
    """The sandwich declaring inner's blocks first (its own choice, whatever the forward does)."""

    def stability_blocks(self) -> list[tuple[str, nn.Module]]:
        return [*((f"inner.{i}", b) for i, b in enumerate(self.inner)), ("outer.0", self.outer[0])]


def test_declared_blocks_are_taken_as_declared() -> None:
    """README: stability_blocks() 'returns its repeated blocks'; only blocks find_blocks chose itself are
    reordered or dropped by what a forward shows. Oracle: the documented rule."""
    model = _DeclaresItsBlocks()
    chosen = find_blocks(model)
    assert [name for name, _ in chosen[0]] == ["inner.0", "inner.1", "inner.2", "outer.0"]
    assert looped_blocks(model, torch.randn(2, 8), *chosen) == chosen


class _EncoderHeadsDecoder(nn.Module):
    """Three stacks of composite blocks, declared decoder, encoder, heads; the forward runs the
    encoder with a head after each of its layers (deep supervision, off the chain), then the decoder
    on the encoder's output."""

    def __init__(self) -> None:
        super().__init__()
        self.decoder, self.encoder, self.heads = _composite(2), _composite(3), _composite(3)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for layer, head in zip(self.encoder, self.heads, strict=True):
            x = layer(x)
            outs.append(head(x))
        for layer in self.decoder:
            x = layer(x)
        return [*outs, x]


def test_stacks_kept_apart_from_heads_are_in_the_order_the_forward_calls_them() -> None:
    """The heads run between the encoder's calls, off the chain, and are left out; the two stacks kept
    are 'in the order the forward first calls them' (loops._apart), the encoder's first, and the note
    names them in that order. Oracle: the documented rule."""
    model = _EncoderHeadsDecoder()
    blocks, note = looped_blocks(model, torch.randn(2, 8), *find_blocks(model))
    assert [name for name, _ in blocks] == ["encoder.0", "encoder.1", "encoder.2", "decoder.0", "decoder.1"]
    assert note == "blocks: encoder + decoder (5; heads run between their calls, off the chain: not taken)"


def test_a_module_looped_twice_and_modules_named_alike_are_found() -> None:
    """loops._looped by construction: a cell called exactly twice on its own output is looped (two
    calls are the least that make a loop); modules `f` and `ff` both looped are both found (`ff` is
    no submodule of `f`, whose name it starts with)."""
    from torch import nn

    from stabilitycheck.loops import _looped

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cell = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for _ in range(2):
                x = torch.tanh(self.cell(x))
            return x

    class Alike(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.f, self.ff = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in (self.f, self.ff):
                for _ in range(3):
                    x = torch.tanh(layer(x))
            return x

    x = torch.randn(2, 4)
    assert _looped(Two(), (x,)) == ["cell"]
    assert _looped(Alike(), (x,)) == ["f", "ff"]


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


class _OwnCell(nn.Module):
    """h' = W h + U x_t, W = g x orthogonal: a cell of the user's own (no torch cell, no list)."""

    def __init__(self, g: float) -> None:
        super().__init__()
        self.w = nn.Linear(16, 16, bias=False, dtype=torch.float64)
        self.u = nn.Linear(16, 16, bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.w.weight.copy_(orthogonal(g, 16))

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.w(h) + self.u(x)  # type: ignore[no-any-return]


class _Windowed(nn.Module):
    """_OwnCell over the tokens, its state detached (or started afresh) every `k` tokens, a head on the
    last state."""

    def __init__(self, k: int, fresh: bool) -> None:
        super().__init__()
        self.cell, self.head = _OwnCell(2.0), nn.Linear(16, 3, dtype=torch.float64)
        self.k, self.fresh = k, fresh

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], 16)
        for t in range(x.shape[1]):
            if t and t % self.k == 0:
                h = x.new_zeros(x.shape[0], 16) if self.fresh else h.detach()
            h = self.cell(x[:, t], h)
        return self.head(h)  # type: ignore[no-any-return]


@pytest.mark.parametrize("fresh", [False, True], ids=["detached", "fresh"])
def test_a_cell_of_truncated_backpropagation_is_found_though_some_calls_start_afresh(fresh: bool) -> None:
    """Every later call had to take the previous output for a module to be looped: a cell whose state
    is detached (or made afresh) every 5 tokens was no loop, its W and U were read as leaves, each
    call a chain of its own, growth 1 (found by an audit). Oracle: the last window's exact growth,
    g^(k-1) = 16 at g = 2, the same as with the cell declared."""
    torch.manual_seed(0)
    model, x = _Windowed(5, fresh), torch.randn(4, 20, 16, dtype=torch.float64)
    z = torch.randn(4, 3, dtype=torch.float64)
    m = probe_module(model, x, lambda out, _: (out * z).sum())
    assert m.layer_names == ("cell",) and m.chain_starts == (5, 10, 15)
    assert m.growth == pytest.approx(2.0**4, rel=1e-12)


class _TrunkAndLeafHeads(nn.Module):
    """A trunk of 12 Sequential(Linear, Tanh) blocks at sigma_w 4, then 16 leaf heads (nn.Linear(32, 2)
    each) side by side on its output, or the `task`'s alone: the heads' list is the longest stack."""

    def __init__(self, heads: int = 16, depth: int = 12, width: int = 32, task: int | None = None) -> None:
        super().__init__()
        self.task = task
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(depth))
        for layer in self.layers:
            nn.init.normal_(layer[0].weight, std=4.0 / width**0.5)
        self.heads = nn.ModuleList(nn.Linear(width, 2) for _ in range(heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        if self.task is not None:
            return self.heads[self.task](x)  # type: ignore[no-any-return]
        return torch.stack([head(x) for head in self.heads], 1)


@pytest.mark.parametrize(("seed", "task"), [(0, None), (1, None), (0, 3)])
def test_leaf_heads_side_by_side_on_a_trunk_are_no_chain_the_trunk_is(seed: int, task: int | None) -> None:
    """16 Linear heads on a trunk of 12 composite blocks outnumber it: find_blocks took the heads, each
    a chain of one, growth 1 whatever the trunk did (75 and 195 here; found by an audit). A forward
    shows none of the heads takes another's output while the trunk's blocks chain: the trunk is
    taken; so too where the forward calls one task's head alone (growth 1 after the first fix: a
    review). Oracle: torch's |dL/d input| / |dL/d trunk output|."""
    torch.manual_seed(seed)
    model, x = _TrunkAndLeafHeads(task=task).double(), torch.randn(16, 32, dtype=torch.float64)
    z = (
        torch.randn(16, 2, dtype=torch.float64)
        if task is not None
        else torch.randn(16, 16, 2, dtype=torch.float64)
    )
    loss = lambda out, _: (out * z).sum()  # noqa: E731
    assert find_blocks(model)[1] == "blocks: heads (16)"
    m = probe_module(model, x, loss)
    assert m.layer_names == tuple(f"layers.{i}" for i in range(12))
    assert (
        m.blocks_note
        == "blocks: layers (12) (heads: side by side, no call taking another's output: not taken)"
    )
    given = x.clone().requires_grad_()
    outs: list[torch.Tensor] = []
    hook = model.layers[-1].register_forward_hook(lambda _m, _a, o: outs.append(o))
    first, last = torch.autograd.grad(loss(model(given), x), [given, *outs])
    hook.remove()
    assert m.growth == pytest.approx((first.norm() / last.norm()).item(), rel=1e-9) and m.growth > 20


class _SiameseLeafHeads(_TrunkAndLeafHeads):
    """_TrunkAndLeafHeads run on two inputs in turn (a Siamese pair), the 16 heads on each pass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([super().forward(x), super().forward(0.5 * x.flip(0))], 1)


def test_leaf_heads_on_each_pass_of_a_siamese_trunk_give_way_to_the_trunk() -> None:
    """The trunk's second pass starts on another input, so not every call of it took the one before's
    output and it read as no chain: the heads stayed the blocks, growth 1 (a review). Two thirds of
    its calls chain. Oracle: torch's |dL/d input| / |dL/d trunk output| of the first pass (its input
    made a leaf of its own), the first chain's growth."""
    torch.manual_seed(0)
    model, x = _SiameseLeafHeads().double(), torch.randn(16, 32, dtype=torch.float64)
    z = torch.randn(16, 32, 2, dtype=torch.float64)
    loss = lambda out, _: (out * z).sum()  # noqa: E731
    m = probe_module(model, x, loss)
    assert m.layer_names == tuple(f"layers.{i}" for i in range(12))
    ins: list[torch.Tensor] = []  # each pass's input to layers.0, as a leaf: x reaches both passes
    outs: list[torch.Tensor] = []

    def leaf(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
        ins.append(args[0].detach().requires_grad_())
        return (ins[-1],)

    hooks = [
        model.layers[0].register_forward_pre_hook(leaf),
        model.layers[-1].register_forward_hook(lambda _m, _a, o: outs.append(o)),
    ]
    first, last = torch.autograd.grad(loss(model(x), x), [ins[0], outs[0]])
    for hook in hooks:
        hook.remove()
    assert m.chain_growths[0] == pytest.approx((first.norm() / last.norm()).item(), rel=1e-9)


def test_a_leaf_trunk_that_chains_keeps_find_blocks_choice_beside_composite_heads() -> None:
    """The opposite case: 16 Linear layers that chain beside 4 composite heads side by side on their
    output stay the blocks (`_outweighs`); only a leaf stack none of whose calls takes another's
    output gives way."""
    torch.manual_seed(0)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(16))
            self.heads = nn.ModuleList(nn.Sequential(nn.Linear(16, 8), nn.Tanh()) for _ in range(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = torch.tanh(layer(x))
            return torch.stack([head(x) for head in self.heads], 1)

    model = Model()
    blocks, note = find_blocks(model)
    assert (
        looped_blocks(model, torch.randn(4, 16), blocks, note) == (blocks, note)
        and note == "blocks: layers (16)"
    )


class _SharedProjection(nn.Module):
    """A cell of its own over 10 tokens, one Linear `proj` called per token on x_t (its input) and on
    h_t (the readout): proj's later calls take the one before's output one in two."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16, dtype=torch.float64)
        self.w = nn.Linear(16, 16, dtype=torch.float64)
        self.u = nn.Linear(16, 16, bias=False, dtype=torch.float64)

    def cell(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.w(x) + self.u(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], 16)
        out = h
        for t in range(x.shape[1]):
            h = self.cell(self.proj(x[:, t]), h)
            out = self.proj(h)
        return out


def test_a_projection_called_per_token_on_input_and_state_is_no_loop() -> None:
    """Taken as looped where most later calls are fed, a projection called on x_t and on h_t (fed one
    in two) joined the cell's loop (a review); two thirds or more are needed. Oracle, by construction:
    proj's later calls alternate x_t (fresh) and h_t (made from its call before)."""
    torch.manual_seed(0)
    model, x = _SharedProjection(), torch.randn(4, 10, 16, dtype=torch.float64)
    chosen = find_blocks(model)
    found = looped_blocks(model, x, *chosen)
    assert "proj" not in [name for name, _ in found[0]]
