"""Gains and growth by the model's chains against autograd and theory: towers, heads, merges,
recurrent cells, call order, outputs no gradient reaches, and the gain of functions between blocks."""

from __future__ import annotations

import itertools
import math
import statistics
from typing import Any

import pytest
import torch
from chain_models import OrthogonalTowers, run_tower
from probe_models import F64, _blocks, _Chain, _loss, _square_mean, culprit
from torch import nn
from torch.nn import functional as F

from stabilitycheck.culprit import culprit_of
from stabilitycheck.probing import Measurement, probe_module
from stabilitycheck.verdicts import Limits, values, verdict


class Recurrence(nn.Module):
    """nn.RNN with recurrent matrix gain x orthogonal, reading floats or (`tokens`) an embedding of
    integer tokens inside the block, so that the block's input has no gradient."""

    def __init__(self, gain: float, tokens: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8) if tokens else nn.Identity()
        self.rnn = nn.RNN(8, 8, batch_first=True, bias=False)
        with torch.no_grad():
            q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(0)))
            self.rnn.weight_hh_l0.copy_(gain * q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(self.embed(x))[0]  # type: ignore[no-any-return]


class RecurrentHead(nn.Module):
    """A Recurrence and a linear readout: two blocks, and the growth through time (3^t) happens
    inside the first."""

    def __init__(self, tokens: bool) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.rnn = Recurrence(3.0, tokens)
            self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x))  # type: ignore[no-any-return]


def probe_recurrent_head(tokens: bool) -> Measurement:
    model = RecurrentHead(tokens)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 16, (2, 64), generator=gen) if tokens else torch.randn(2, 64, 8, generator=gen)
    return probe_module(model, x, lambda out, _: out.sum(), blocks=[("rnn", model.rnn), ("head", model.head)])


def test_growth_inside_block_0_shows_as_its_gain_from_the_input() -> None:
    m = probe_recurrent_head(tokens=False)
    assert m.activation_names == ("(input)", "rnn", "head")
    assert m.gains[0] > 10.0  # ||dL/dx|| / ||dL/d(rnn output)||: 3^t through time, summed over t
    assert culprit(m) == "rnn"


def test_culprit_of_a_growth_inside_a_block_is_the_block_with_the_largest_weight_gradient() -> None:
    m = probe_recurrent_head(tokens=True)
    assert m.activation_names == ("rnn", "head")  # integer tokens: no input side
    assert m.gains[0] < 1.0  # between the blocks the backward signal shrinks...
    assert m.layer_grad_norms[0] > 10 * m.layer_grad_norms[1]  # ...while W_hh's gradient exploded
    assert verdict(m).names == ("grad_norm",)
    assert culprit(m) == "rnn"  # was "head", the block of the largest (sub-unit) gain


class Logged(nn.Module):
    """Blocks 0-2 feed the loss; block 3 runs on block 2's output for a logged number only."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(4))
        self.logged = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers[:3]:
            x = block(x)
        self.logged = float(self.layers[3](x).detach().norm())
        return x


def test_an_output_the_loss_does_not_depend_on_has_no_gain_and_no_growth() -> None:
    """Oracle: torch.autograd.grad on the block outputs. Block 3's output gets no gradient (None,
    not 0): it has no gain (NaN, not x/0 = inf), and the growth is over the blocks the loss depends
    on, input over block 2's output gradient (it read inf, an explosion)."""
    torch.manual_seed(0)
    model, x = Logged(16), torch.randn(8, 16)
    m = probe_module(model, x, lambda out, _: out.square().mean())
    outs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda mod, a, o: outs.append(o)) for b in model.layers]
    entry = x.clone().requires_grad_()
    loss = model(entry).square().mean()
    for h in hooks:
        h.remove()
    grads = torch.autograd.grad(loss, [entry, *outs], allow_unused=True)
    assert grads[-1] is None
    norms = [float(g.norm()) for g in grads[:-1] if g is not None]
    assert m.activation_names == ("(input)", "layers.0", "layers.1", "layers.2", "layers.3")
    assert m.gains[:3] == pytest.approx([a / b for a, b in itertools.pairwise(norms)], rel=1e-5)
    assert math.isnan(m.gains[3])
    assert m.growth == pytest.approx(norms[0] / norms[-1], rel=1e-5)
    assert verdict(m).names == ()


def test_chains_side_by_side_grow_by_the_larger_and_vanish_by_the_smaller() -> None:
    """Two towers of 3 layers at gains 0.5 and 0.8 on the same input (both chains vanish): no gradient
    runs through both, so the growth is the larger chain's, 0.8^2 (from the second tower's first
    output), and the vanishing criterion reads the smaller, 0.5^3 (from the input); their product
    read before understated the growth. Oracle, exact: ||W^T v|| = g ||v|| for W = g x orthogonal
    (float32 init, so 1e-6)."""
    torch.manual_seed(0)
    model = OrthogonalTowers(3, (0.5, 0.8)).double()
    m = probe_module(model, torch.randn(4, 8, dtype=torch.float64), lambda o, _: o.square().sum())
    assert m.chain_growths == pytest.approx([0.5**3, 0.8**2], rel=1e-6)
    assert m.chain_feeds == ((), ())
    assert m.growth == pytest.approx(0.8**2, rel=1e-6)
    assert values(m)["vanishing"] == pytest.approx(0.5**3, rel=1e-6)


class _Cell(nn.Module):
    """h' = W h + U x_t, W = g x orthogonal: dL/dh_t = W^T dL/dh_t+1, each step's gain exactly g."""

    def __init__(self, g: float) -> None:
        super().__init__()
        self.w, self.u = nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False)
        nn.init.orthogonal_(self.w.weight, gain=g)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.w(h) + self.u(x)


def test_a_bidirectional_reader_grows_as_one_direction_not_both() -> None:
    """A hand-written bidirectional reader: one linear cell runs forwards over 10 tokens, another
    backwards, their last states concatenated. Each direction's gradient grows g^9 through time and
    none runs through both; the product of the two chains read g^18 (1.3^18 = 112, an explosion past
    the default limit where the reader grows 10.6). Oracle, exact: every gain g (W = g x orthogonal)."""
    torch.manual_seed(0)

    class Reader(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fwd, self.bwd = _Cell(1.3), _Cell(1.3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = b = torch.zeros(x.shape[0], 8, dtype=x.dtype)
            for t in range(x.shape[1]):
                a = self.fwd(x[:, t], a)
            for t in reversed(range(x.shape[1])):
                b = self.bwd(x[:, t], b)
            return torch.cat((a, b), 1)

    m = probe_module(
        Reader().double(), torch.randn(4, 10, 8, dtype=torch.float64), lambda o, _: o.square().sum()
    )
    assert m.chain_starts == (10,) and m.chain_feeds == ((), ())
    assert m.chain_growths == pytest.approx([1.3**9] * 2, rel=1e-6)
    assert m.growth == pytest.approx(1.3**9, rel=1e-6)


def test_a_head_on_two_towers_grows_by_the_larger_tower_times_the_head() -> None:
    """A Siamese model: one tower of 3 layers (gain 1.3 each) run on each of two inputs, then a head of
    2 layers (gain 2) on both outputs. The head took the second pass's chain on, and the first pass's
    chain stood beside it: the growth read max(tower, tower' x head). Now the head's call, taking both
    towers' outputs, starts a chain of its own that takes both, and the growth is the worst path:
    1.3^3 (the first pass, from its input) x 2 (the head, from its first output). Oracle, exact:
    ||W^T v|| = g ||v|| for W = g x orthogonal (rows orthonormal for the head's 16 -> 8 layer)."""
    torch.manual_seed(0)

    class Siamese(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tower = nn.ModuleList(nn.Linear(8, 8, bias=False) for _ in range(3))
            self.head = nn.ModuleList(nn.Linear(16 if i == 0 else 8, 8, bias=False) for i in range(2))
            for layer in self.tower:
                nn.init.orthogonal_(layer.weight, gain=1.3)
            for layer in self.head:
                nn.init.orthogonal_(layer.weight, gain=2.0)

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            y = torch.cat(run_tower(self.tower, a, b), 1)
            for layer in self.head:
                y = layer(y)
            return y

    model = Siamese().double()
    blocks = [
        *((f"tower.{i}", t) for i, t in enumerate(model.tower)),
        *((f"head.{i}", h) for i, h in enumerate(model.head)),
    ]
    a, b = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    m = probe_module(model, (a, b), lambda o, _: o.square().sum(), blocks=blocks)
    assert m.chain_starts == (4, 7) and m.chain_feeds == ((), (), (0, 1))
    assert m.chain_growths == pytest.approx([1.3**3, 1.3**2, 2.0], rel=1e-6)
    assert m.growth == pytest.approx(1.3**3 * 2.0, rel=1e-6)
    assert values(m)["vanishing"] == pytest.approx(
        1.3**2, rel=1e-6
    )  # the smallest path: 1.3^2 x 2 and each chain


@pytest.mark.parametrize("stages", [1, 2])
def test_a_head_after_a_decoder_runs_on_its_chain_not_beside_it(stages: int) -> None:
    """An encoder (2 layers, gain 2), a decoder whose layers each take their own state and the
    encoder's output (4 layers, gain 1/2 along the state; one stack, or two stacks of 2) and a head (2
    layers, gain 3) on the decoder's output: two chains in series, the encoder's 2^2 (from the input)
    and the decoder's run on through the head, 1/2^3 x 3^2, growth 4.5. The head's input is made from
    the encoder's output too, but through the decoder's: it takes the decoder's chain alone (read as
    taking both, the head started a chain of its own and a path encoder -> head skipped the decoder:
    18); the second decoder stack takes the memory as every decoder layer does, in another argument
    than its state, which is no merge (read as one, the growth was 18 too). Oracle, exact:
    ||W^T v|| = g ||v|| for W = g x orthogonal."""
    torch.manual_seed(0)

    class Step(nn.Module):
        def __init__(self, g: float) -> None:
            super().__init__()
            self.w, self.v = nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False)
            nn.init.orthogonal_(self.w.weight, gain=g)

        def forward(self, y: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
            return self.w(y) + self.v(memory)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.ModuleList(nn.Linear(8, 8, bias=False) for _ in range(2))
            self.decoder = nn.ModuleList(
                nn.ModuleList(Step(0.5) for _ in range(4 // stages)) for _ in range(stages)
            )
            self.head = nn.ModuleList(nn.Linear(8, 8, bias=False) for _ in range(2))
            for layer, g in [*((e, 2.0) for e in self.encoder), *((h, 3.0) for h in self.head)]:
                nn.init.orthogonal_(layer.weight, gain=g)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            for layer in self.encoder:
                x = layer(x)
            for stage in self.decoder:
                for step in stage:
                    y = step(y, x)
            for layer in self.head:
                y = layer(y)
            return y

    model = Model().double()
    blocks = [
        *((f"encoder.{i}", m) for i, m in enumerate(model.encoder)),
        *((f"decoder.{i}.{j}", m) for i, stage in enumerate(model.decoder) for j, m in enumerate(stage)),
        *((f"head.{i}", m) for i, m in enumerate(model.head)),
    ]
    x, y = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    m = probe_module(model, (x, y), lambda o, _: o.square().sum(), blocks=blocks)
    assert m.chain_starts == (3,) and m.chain_feeds == ((), (0,))
    assert m.chain_growths == pytest.approx([4.0, 0.5**3 * 3.0**2], rel=1e-6)
    assert m.growth == pytest.approx(4.5, rel=1e-6)


def test_towers_on_a_stems_output_run_side_by_side() -> None:
    """Two towers on the output of a stem layer (block 0's input requires grad already): the second
    tower takes it too, which read as taking the first tower's chain, in series (growth 8.16 for towers
    at 1.5^3 and 1.3^2), and block 0's input was read over all its uses, the second tower's too (chain
    0 read 4.83). Block 0 gets a copy of it in its graph, as a plain input gets one: the gradient
    through block 0 alone, and the input is before chain 0, not an output of it; side by side, the
    growth is the larger chain's. Oracle, exact: W = g x orthogonal, every gain g."""
    torch.manual_seed(0)

    class Stemmed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Linear(8, 8, bias=False)
            self.towers = OrthogonalTowers(3, (1.5, 1.3)).towers

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.stem(x)
            return sum(run_tower(tower, h)[0] for tower in self.towers)  # type: ignore[return-value]

    model = Stemmed().double()
    blocks = [
        (f"towers.{i}.{j}", layer) for i, tower in enumerate(model.towers) for j, layer in enumerate(tower)
    ]
    m = probe_module(
        model, torch.randn(4, 8, dtype=torch.float64), lambda o, _: o.square().sum(), blocks=blocks
    )
    assert m.chain_starts == (4,) and m.chain_feeds == ((), ())
    assert m.chain_growths == pytest.approx([1.5**3, 1.3**2], rel=1e-6)
    assert m.growth == pytest.approx(1.5**3, rel=1e-6)
    assert model.stem.weight.grad is not None and model.stem.weight.grad.norm() > 0  # the stem still learns


def test_three_chains_show_the_one_that_grows() -> None:
    """Three towers of 2 layers at gains 3, 1/4 and 1/4: chains 3^2 (from the input), 1/4 and 1/4 (from
    each later tower's first output), two junctions; their product 9/16 would hide the first chain's
    growth 9, which is the growth. Oracle, exact: ||W^T v|| = g ||v|| for W = g x orthogonal."""
    torch.manual_seed(0)
    model = OrthogonalTowers(2, (3.0, 0.25, 0.25)).double()
    m = probe_module(model, torch.randn(4, 8, dtype=torch.float64), lambda o, _: o.square().sum())
    assert m.chain_starts == (3, 5)
    assert m.chain_growths == pytest.approx([9.0, 0.25, 0.25], rel=1e-6)
    assert m.gains[1] == pytest.approx(3.0, rel=1e-6) and math.isnan(m.gains[2]) and math.isnan(m.gains[4])
    assert m.growth == pytest.approx(9.0, rel=1e-6)


class _LoggedOnly(nn.Module):
    """Two linear blocks whose outputs are only logged; the loss reads a head on the input alone."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        self.head = nn.Linear(8, 8)
        self.logged: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for layer in self.layers:
            h = layer(h)
        self.logged = [h.detach()]
        return self.head(x)


def test_blocks_no_gradient_reaches_have_nan_growth_not_1() -> None:
    """Oracle: torch.autograd.grad of the loss with respect to the block outputs (forward hooks) is
    None for every one: no gradient reaches any block, so there is no growth (NaN), not a flat 1,
    and every gain is NaN."""
    torch.manual_seed(0)
    model, x = _LoggedOnly(), torch.randn(4, 8)
    outs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda mod, a, o: outs.append(o)) for b in model.layers]
    loss = model(x).square().sum()
    for h in hooks:
        h.remove()
    assert torch.autograd.grad(loss, outs, allow_unused=True) == (None, None)
    m = probe_module(model, x, lambda o, _: o.square().sum(), blocks=list(model.layers.named_children()))
    assert m.activation_grad_norms[-2:] == (0.0, 0.0)
    assert math.isnan(m.growth) and all(math.isnan(g) for g in m.gains)


class _Detached(nn.Module):
    """A linear block reading its input detached: no gradient reaches the block before it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x.detach()))


def test_no_gain_is_taken_next_to_an_output_no_gradient_reaches() -> None:
    """Oracle: torch.autograd.grad on the block outputs (forward hooks). Block 1 detaches its input, so
    no gradient reaches the input or block 0's output (None), while the chain takes each last output
    (no junction): the gains beside those entries are NaN, not 0/x = 0, and the one gain between
    reached outputs is the ratio of their gradient norms."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), _Detached(), nn.Linear(8, 8)).double()
    x = torch.randn(4, 8, dtype=torch.float64)
    outs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda mod, a, o: outs.append(o)) for b in model]
    loss = model(x).square().sum()
    for h in hooks:
        h.remove()
    grads = torch.autograd.grad(loss, outs, allow_unused=True)
    assert grads[0] is None and grads[1] is not None and grads[2] is not None
    m = probe_module(model, x, lambda o, _: o.square().sum(), blocks=list(model.named_children()))
    assert m.activation_names == ("(input)", "0", "1", "2") and not m.chain_starts
    assert m.activation_grad_norms[:2] == (0.0, 0.0)
    assert math.isnan(m.gains[0]) and math.isnan(m.gains[1])
    assert m.gains[2] == pytest.approx(float(grads[1].norm() / grads[2].norm()), rel=1e-12)


def test_one_reached_output_of_a_chain_of_several_is_no_growth_of_1() -> None:
    """Blocks whose recorded outputs the loss does not depend on but for the last: no gain between two
    of them can be read, and the growth read 1 (flat, a bounded-growth check passing) whatever the
    stack does. It is unknown now: NaN, and assert_bounded_growth fails saying it was not measured.
    A chain of one call alone still grows by 1 (the empty product: a one-token RNN)."""
    from stabilitycheck.errors import StabilityError
    from stabilitycheck.invariants import assert_bounded_growth

    torch.manual_seed(0)

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.router = nn.Linear(8, 8), nn.Linear(8, 4)

        def forward(self, x: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = torch.tanh(self.lin(x) + context)
            return self.router(h), h

    class Routed(nn.Module):
        """Each layer also takes the model's input as context, of x's shape: no input entry."""

        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(Layer() for _ in range(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = x
            for layer in self.layers:
                logits, h = layer(h, x)
            return h.sum() + logits.sum()

    m = probe_module(Routed(), torch.randn(3, 8), lambda o, _: o, blocks=None)
    assert m.activation_names[0] == "layers.0"  # no input entry
    assert [v > 0 for v in m.activation_grad_norms] == [False, False, False, True] and math.isnan(m.growth)
    with pytest.raises(StabilityError, match="could not be measured"):
        assert_bounded_growth(m, 100.0)
    one = probe_module(nn.GRUCell(4, 4), (torch.randn(2, 4),), lambda o, _: o.sum())
    assert len(one.activation_names) == 1 and one.growth == 1.0


class _ShiftedLM(nn.Module):
    """A tanh RNN language model stepped token by token, sigma_max(W_hh) = 0.5 (Pascanu et al. 2013:
    its gradient through time cannot grow), a head on every step's state; float64."""

    def __init__(self, vocab: int = 12, hidden: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden, dtype=torch.float64)
        self.u = nn.Linear(hidden, hidden, bias=False, dtype=torch.float64)
        self.w = nn.Parameter(nn.init.orthogonal_(torch.empty(hidden, hidden, dtype=torch.float64), gain=0.5))
        self.cell = _ShiftedCell(self.u, self.w)
        self.head = nn.Linear(hidden, vocab, dtype=torch.float64)
        self.states: list[torch.Tensor] = []

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens)
        h = x.new_zeros(tokens.shape[0], self.w.shape[0])
        self.states = []
        for t in range(tokens.shape[1]):
            h = self.cell(x[:, t], h)
            self.states.append(h)
        return self.head(torch.stack(self.states, 1))


class _ShiftedCell(nn.Module):
    def __init__(self, u: nn.Linear, w: nn.Parameter) -> None:
        super().__init__()
        self.u, self.w = u, w

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.u(x) + h @ self.w.T)


def test_an_rnn_under_a_shifted_next_token_loss_reads_its_growth_without_the_unscored_last_step() -> None:
    """The shifted LM loss (logits[:, :-1] against tokens[:, 1:]) takes nothing from the last step:
    dL/dh_T is exactly 0, and read as the chain's last norm it made growth ||dL/dh_1|| / 0 = inf,
    exploding, for a contracting RNN (found in an audit against Pascanu et al.). Oracle: torch's
    gradients of every h_t in float64; the growth is the first over the last nonzero one, the last
    step's gain is none (NaN), and no criterion fires."""
    torch.manual_seed(0)
    model, tokens = _ShiftedLM(), torch.randint(0, 12, (4, 10))

    def shifted(logits: torch.Tensor, toks: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 12), toks[:, 1:].reshape(-1))

    m = probe_module(model, tokens, shifted, blocks=[("cell", model.cell)])
    logits = model(tokens)
    for h in model.states:
        h.retain_grad()
    shifted(logits, tokens).backward()
    norms = [float(h.grad.norm()) for h in model.states]
    assert norms[-1] == 0.0 and all(n > 0 for n in norms[:-1])
    assert m.activation_grad_norms == pytest.approx(norms, rel=1e-9)
    assert m.growth == pytest.approx(norms[0] / norms[-2], rel=1e-9)
    assert math.isnan(m.gains[-1]) and all(math.isfinite(g) for g in m.gains[:-1])
    assert verdict(m).names == ()


def test_a_gradient_that_dies_on_its_way_back_still_reads_growth_0() -> None:
    """The zeros at a chain's input end are a vanishing gradient, not an unscored output: a tanh MLP
    whose third layer is zero passes no gradient to the layers before it. Oracle: torch's gradient
    of block 1's output is exactly 0 and the last block's is not, so growth is 0."""
    torch.manual_seed(0)
    layers = nn.Sequential(
        *(nn.Sequential(nn.Linear(8, 8, dtype=torch.float64), nn.Tanh()) for _ in range(4))
    )
    with torch.no_grad():
        layers[2][0].weight.zero_()
    x = torch.randn(5, 8, dtype=torch.float64)
    m = probe_module(layers, x, lambda out, _: out.square().sum(), blocks=list(layers.named_children()))
    assert m.activation_grad_norms[-1] > 0 and m.activation_grad_norms[1] == 0.0
    assert m.growth == 0.0
    assert verdict(m, Limits(vanishing=1e-3)).names == ("vanishing",)


class _Towers(nn.Module):
    """A LayerScale skip around block a0 on a plain input (the chain starts at a0's output), then a
    second tower b0 on that input beside a1: a new chain at b0."""

    def __init__(self) -> None:
        super().__init__()
        self.a0, self.a1, self.b0 = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor, kept: list[torch.Tensor] | None = None) -> torch.Tensor:
        u = self.a0(x)
        v = self.a1(x + 0.1 * torch.tanh(u))
        g = self.b0(x)
        if kept is not None:
            kept += [u, v, g]
        return self.head(torch.tanh(v) + g)  # type: ignore[no-any-return]


def test_a_chain_start_counts_from_block_0s_output_where_the_entry_is_dropped() -> None:
    """Where no (input) is taken (the skip around a0), every recorded position shifts by one, the
    start of b0's chain too: left unshifted, b0 read as taking a1's output, gain 0.73 and growth 0.022
    (a mutant passed every test, found by mutation testing). Oracle: torch's gradients of each
    block's output; two towers side by side grow as the larger of their chains."""
    torch.manual_seed(0)
    model, x = _Towers(), torch.randn(4, 8)
    loss = lambda o, _: o.square().sum()  # noqa: E731
    m = probe_module(model, x, loss, blocks=[("a0", model.a0), ("a1", model.a1), ("b0", model.b0)])
    kept: list[torch.Tensor] = []
    grads = [g.norm().item() for g in torch.autograd.grad(loss(model(x, kept), x), kept)]
    assert m.activation_names == ("a0", "a1", "b0") and m.chain_starts == (2,)
    assert m.gains[0] == pytest.approx(grads[0] / grads[1], rel=1e-6) and math.isnan(m.gains[1])
    assert m.growth == pytest.approx(max(grads[0] / grads[1], 1.0), rel=1e-6)


class _MergedTowers(_Towers):
    """_Towers, then a block m0 on the sum of both towers' outputs: a merge of two chains."""

    def __init__(self) -> None:
        super().__init__()
        self.m0 = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, kept: list[torch.Tensor] | None = None) -> torch.Tensor:
        v = self.a1(x + 0.1 * torch.tanh(self.a0(x)))
        return self.head(self.m0(torch.tanh(v) + self.b0(x)))  # type: ignore[no-any-return]


def test_a_merge_after_a_dropped_entry_is_fed_by_both_towers() -> None:
    """The merge m0 takes the chain starting at a0 (position 0 once the entry is dropped) and b0's:
    its feeds shift with the positions, the entry's chain onto a0's (a mutant shifting the keys
    alone read m0 fed by one tower, found by mutation testing). Oracle: the model's own structure."""
    torch.manual_seed(0)
    model = _MergedTowers()
    blocks = [("a0", model.a0), ("a1", model.a1), ("b0", model.b0), ("m0", model.m0)]
    m = probe_module(model, torch.randn(4, 8), lambda o, _: o.square().sum(), blocks=blocks)
    assert m.activation_names == ("a0", "a1", "b0", "m0") and m.chain_starts == (2, 3)
    assert m.chain_feeds == ((), (), (0, 1))


class _Backwards(nn.Module):
    """A pre-norm stack on a small embedding, its blocks run last to first (or declared so)."""

    def __init__(self, run_reversed: bool, declare_reversed: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        nn.init.normal_(self.emb.weight, std=0.01)
        self.layers = nn.ModuleList(nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 32)) for _ in range(6))
        self.run_reversed, self.declare_reversed = run_reversed, declare_reversed

    def order(self) -> list[int]:
        return list(range(6))[:: -1 if self.run_reversed else 1]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        for i in self.order():
            h = h + self.layers[i](h)
        return h

    def stability_blocks(self) -> list[tuple[str, nn.Module]]:
        order = self.order()[::-1] if self.declare_reversed else self.order()
        return [(f"layers.{i}", self.layers[i]) for i in order]


@pytest.mark.parametrize(("run_reversed", "declare_reversed"), [(True, False), (False, True), (True, True)])
def test_blocks_called_in_another_order_than_given_are_read_in_call_order(
    run_reversed: bool, declare_reversed: bool
) -> None:
    """The entry's hook went on the first block given, not the first called: a stack run in reverse,
    or blocks declared output side first, lost the (input) entry and the first-called block's gain
    (growth 2.31 for 127; found by two reviews). The blocks are read in the order the forward calls
    them. Oracle: torch's dL/d(embedding output) and dL/d(each block's output), in call order."""
    torch.manual_seed(0)
    model, ids = _Backwards(run_reversed, declare_reversed), torch.randint(0, 50, (4, 7))
    z = torch.randn(4, 7, 32)
    m = probe_module(model, ids, lambda out, _: (out * z).sum())
    called = [f"layers.{i}" for i in model.order()]
    assert m.layer_names == tuple(called) and m.activation_names == ("(input)", *called)
    h0 = model.emb(ids).detach().requires_grad_()
    h, outs = h0, []
    for i in model.order():
        h = h + model.layers[i](h)
        outs.append(h)
    grads = torch.autograd.grad((h * z).sum(), [h0, *outs])
    assert m.activation_grad_norms == pytest.approx([float(g.norm()) for g in grads], rel=1e-5)
    assert m.growth == pytest.approx(float(grads[0].norm() / grads[-1].norm()), rel=1e-5) and m.growth > 100


class _LayerDropZeroHead(nn.Module):
    """Tanh layers each skipped with probability 0.3 in training (Hugging Face's LayerDrop), under a
    zero-initialised head: step 0 reaches no block, so the hooks stay on at step 1."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(6))
        self.head = nn.Linear(16, 4)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        for layer in self.layers:
            if self.training and torch.rand([]) < 0.3:
                continue
            x = layer(x)
        return self.head(x)


def test_a_call_order_seen_after_step_0_restarts_nothing() -> None:
    """The order check ran at every hooked forward: a LayerDrop draw at step 1 (the head silent at step
    0) restarted the probe on weights one update had changed, losses[0] no longer the initial loss, the
    model trained an extra step and the blocks permuted (6 seeds of 30; found in review). It runs at
    step 0's first forward alone, and a block LayerDrop skipped is no order. Oracle: the zero head's
    initial output is 0, so losses[0] is mean(z ** 2) whatever the draws; 3 forwards for steps=2."""
    x, z = torch.randn(8, 16), torch.randn(8, 4)
    initial = float(z.square().mean())
    for seed in range(30):
        torch.manual_seed(1)
        model = _LayerDropZeroHead()
        m = probe_module(model, x, lambda out, _: (out - z).square().mean(), steps=2, lr=0.1, seed=seed)
        assert m.loss[0] == pytest.approx(initial, rel=1e-6) and model.calls == 3, seed
        assert m.layer_names == tuple(f"layers.{i}" for i in range(6)), seed


class _Mixer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Linear(16, 16)
        nn.init.normal_(self.f.weight, std=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.f(x))


class _Expert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 16)
        nn.init.normal_(self.a.weight, std=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))  # type: ignore[no-any-return]


class _MixersAndExperts(nn.Module):
    """Mixer layers, each followed by two experts on the mixer's output itself, averaged and added to
    it (x = h + mean(expert(h))): a mixture of experts between the layers of a stack."""

    def __init__(self, layers: int = 12) -> None:
        super().__init__()
        self.mixers = nn.ModuleList(_Mixer() for _ in range(layers))
        self.experts = nn.ModuleList(nn.ModuleList(_Expert() for _ in range(2)) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for mixer, pair in zip(self.mixers, self.experts, strict=True):
            h = mixer(x)
            x = h + sum(expert(h) for expert in pair) / 2
        return x


def test_experts_between_a_stack_s_layers_are_no_heads() -> None:
    """Given as blocks, each layer's experts take the mixer's output itself; a rule splitting the first
    expert off as a branch made every mixer a chain of one block too: growth 1.87 where torch's is
    616, an explosion read as stable (found in review; the rule is withdrawn). Oracle: torch's
    |dL/d input| / |dL/d output| passes the limit, and so does the growth read (over-read: the
    experts' junctions are no chain of one stack)."""
    torch.manual_seed(0)
    model, x, z = _MixersAndExperts(), torch.randn(8, 16), torch.randn(8, 16)
    blocks = [
        block
        for i in range(12)
        for block in [
            (f"mixers.{i}", model.mixers[i]),
            *((f"experts.{i}.{j}", e) for j, e in enumerate(model.experts[i])),
        ]
    ]
    m = probe_module(model, x, lambda out, _: (out * z).sum(), blocks=blocks)
    given = x.clone().requires_grad_()
    out = model(given)
    first, last = torch.autograd.grad((out * z).sum(), [given, out])
    assert float(first.norm() / last.norm()) > 100 and m.growth > 100


class _SkipsBlock0Backwards(nn.Module):
    """Four tanh blocks given in order; the forward runs 3, 2, 1 and never 0."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(4))
        for layer in self.layers:
            nn.init.normal_(layer[0].weight, std=2.0 / 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in (3, 2, 1):
            x = self.layers[i](x)
        return x


def test_a_block_never_called_goes_after_those_called() -> None:
    """Blocks run out of order with block 0 never called: putting it first again kept the entry's hook on
    a block that never runs, no (input), the restart's forward for nothing (found in review). Oracle:
    torch's |dL/d input| / |dL/d output of layers.1|, and the blocks in call order, layers.0 last."""
    torch.manual_seed(0)
    model, x, z = _SkipsBlock0Backwards(), torch.randn(8, 16), torch.randn(8, 16)
    m = probe_module(model, x, lambda out, _: (out * z).sum())
    assert m.layer_names == ("layers.3", "layers.2", "layers.1", "layers.0")
    given = x.clone().requires_grad_()
    out = model(given)
    first, last = torch.autograd.grad((out * z).sum(), [given, out])
    assert m.activation_names[0] == "(input)"
    assert m.growth == pytest.approx(float(first.norm() / last.norm()), rel=1e-5)


def _autograd_gradient_norms(model: _Chain, x: torch.Tensor) -> tuple[float, list[float]]:
    x = x.clone().requires_grad_()
    keep: list[torch.Tensor] = []
    _loss(model(x, keep), None).backward()
    return x.grad.double().norm().item(), [h.grad.double().norm().item() for h in keep]


def test_probe_growth_is_input_over_last_output_gradient_by_autograd() -> None:
    model, x = _Chain(), torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    gx, gh = _autograd_gradient_norms(model, x)
    m = probe_module(model, x, _loss, blocks=_blocks(model))
    assert m.growth == pytest.approx(gx / gh[-1], rel=1e-5, abs=0)
    assert list(m.activation_grad_norms) == pytest.approx([gx, *gh], rel=1e-5, abs=0)


def test_a_last_output_reached_with_a_zero_gradient_is_not_the_chains_end() -> None:
    model, x = _Chain(dead_last=True), torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    gx, gh = _autograd_gradient_norms(model, x)
    assert gh[-1] == 0.0 and gh[-2] > 0
    m = probe_module(model, x, _loss, blocks=_blocks(model))
    assert m.growth == pytest.approx(gx / gh[-2], rel=1e-5, abs=0)


def _call_grads_of(
    model: torch.nn.Module, blocks: list[tuple[str, torch.nn.Module]], run: Any
) -> list[float]:
    """Torch's ||dL/d out|| of each block call, in call order: the oracle (retain_grad on each output)."""
    outs: list[torch.Tensor] = []

    def keep(_: Any, __: Any, out: Any) -> None:
        first = out[0] if isinstance(out, tuple) else out
        first.retain_grad()
        outs.append(first)

    handles = [m.register_forward_hook(keep) for _, m in blocks]
    try:
        run().backward()
    finally:
        for handle in handles:
            handle.remove()
    return [float(o.grad.norm()) if o.grad is not None else 0.0 for o in outs]


def test_a_head_on_two_towers_one_of_one_cell_call_is_a_merge() -> None:
    """Tower A is an RNN cell called once (block 0, whose input is no `(input)` entry), tower B two
    Linear layers, a head on both: the head's call starts a chain that takes both towers (by
    construction), and tower B's growth is torch's |dL/d b0| / |dL/d b1|."""
    from torch import nn

    from stabilitycheck.probing import probe_module

    class Towers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.RNNCell(4, 4)
            self.b = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
            self.head = nn.Linear(8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.cat([self.a(x), self.b(x)], -1))

    torch.manual_seed(0)
    x, model = torch.randn(2, 4), Towers()
    blocks = [("a", model.a), ("b.0", model.b[0]), ("b.1", model.b[1]), ("head", model.head)]
    m = probe_module(model, (x,), lambda out, _: out.pow(2).sum(), blocks=blocks)
    assert m.chain_starts == (1, 3) and m.chain_feeds[-1] == (0, 1)
    g = _call_grads_of(model, blocks, lambda: model(x).pow(2).sum())
    assert m.chain_growths[1] == pytest.approx(g[1] / g[2], rel=1e-6)


def test_an_lstm_cell_called_once_is_read_on_h() -> None:
    """An nn.LSTMCell called once (a one-token step between two layers): no next call takes its c, so
    its state is h alone: its norms are torch's ||h|| and ||dL/dh||."""
    from torch import nn

    from stabilitycheck.probing import probe_module

    class Once(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.cell, self.out = nn.Linear(4, 4), nn.LSTMCell(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h, _ = self.cell(torch.tanh(self.inp(x)))
            return self.out(h)  # type: ignore[no-any-return]

    torch.manual_seed(0)
    x, model = torch.randn(2, 4), Once()
    blocks = [("inp", model.inp), ("cell", model.cell), ("out", model.out)]
    m = probe_module(model, (x,), lambda out, _: out.pow(2).sum(), blocks=blocks)
    h, _ = model.cell(torch.tanh(model.inp(x)))
    at = m.activation_names.index("cell")
    assert m.activation_norms[at] == pytest.approx(float(h.detach().norm()), rel=1e-6)
    g = _call_grads_of(model, blocks, lambda: model(x).pow(2).sum())
    assert m.activation_grad_norms[at] == pytest.approx(g[1], rel=1e-6)


def test_a_loss_on_the_last_cell_state_reaches_the_last_call() -> None:
    """An nn.LSTMCell over 5 tokens, the loss on c_T alone (an encoder handing its state on): the last
    call's gradient comes through c alone, ||dL/dc_T|| = ||2 c_T||, and the call is reached (its gain
    is read, not NaN)."""
    from torch import nn

    from stabilitycheck.probing import probe_module

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cell = nn.LSTMCell(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = c = torch.zeros(2, 4)
            for t in range(x.shape[1]):
                h, c = self.cell(x[:, t], (h, c))
            return c

    torch.manual_seed(0)
    x, model = torch.randn(2, 5, 4), Encoder()
    m = probe_module(model, (x,), lambda out, _: out.pow(2).sum(), blocks=[("cell", model.cell)])
    c_last = model(x)
    assert m.activation_grad_norms[-1] == pytest.approx(float((2 * c_last).detach().norm()), rel=1e-6)
    assert not any(math.isnan(g) for g in m.gains) and math.isfinite(m.growth)


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
    """probestep._together: a carried c whose gradient norm is inf in a finite step is left out of that
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


class ActBetween(nn.Module):
    """Bare Linear blocks, `act` applied between them by the model (examples/mlp.py's shape, tanh);
    `hot` scales one block's weights x`hot_by`; act 'view' reshapes the output between blocks (gain 1),
    'residual' adds each block's output to a stream the next block takes (x = x + block(x))."""

    def __init__(
        self, depth: int, sigma: float, act: str = "tanh", hot: int = -1, hot_by: float = 8.0
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(64, 64, bias=False) for _ in range(depth))
        for i, layer in enumerate(self.layers):
            nn.init.normal_(layer.weight, std=sigma * (hot_by if i == hot else 1.0) / 8.0)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            if self.act == "residual":
                x = x + layer(F.layer_norm(x, (64,)))
            elif self.act == "view":
                x = layer(x).view(16, 64)
            else:
                x = ACTS[self.act](layer(x))
        return x


ACTS = {  # what the model applies between blocks: one node, several (out used twice), in place
    "tanh": torch.tanh,
    "relu": F.relu,
    "softsign": F.softsign,
    "rmsnorm": lambda h: h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6),
    "tanh_": torch.Tensor.tanh_,
}


def _between_seeds(depth: int = 9, **kw: Any) -> tuple[str, list[Measurement]]:
    ms = []
    for s in range(5):
        torch.manual_seed(s)
        model = ActBetween(depth, **kw)
        blocks = [(f"layers.{i}", m) for i, m in enumerate(model.layers)]
        ms.append(probe_module(model, torch.randn(16, 64), lambda out, _: out.pow(2).mean(), blocks=blocks))
    return culprit_of(ms), ms


@pytest.mark.parametrize(
    ("kw", "named"),
    [
        ({"sigma": 4.0}, "uniform"),
        ({"sigma": 1.0, "hot": 4}, "layers.4"),
        ({"sigma": 1.0, "hot": 0}, "layers.0"),
        ({"sigma": 2.12, "act": "relu", "hot": 0, "hot_by": 10.0, "depth": 12}, "layers.0"),
        ({"sigma": 2.0, "act": "residual", "depth": 12}, "layers.0"),
    ],
)
def test_the_culprit_of_bare_linear_blocks_with_a_function_between(kw: dict[str, Any], named: str) -> None:
    """Every layer alike at sigma_w 4 with tanh between: block 0's gain from the input is sigma_w with
    no tanh' in it (2.5x the rest) and read 'layers.0' (examples/mlp.py's search said so); it is a
    uniform stack. A block planted at x8 on a critical stack is named, block 0 too; so is block 0 at x10
    with ReLU between in a He x1.5 stack 12 deep, and the first branch of a pre-norm residual stream,
    which takes the unit-scale input to a larger stream (3.3x, the rest ~1.1; a rule that left block 0
    out where it stood apart named neither). Oracle: the construction."""
    got, _ = _between_seeds(**kw)
    assert got.startswith(named), got


def test_the_between_gain_is_dL_d_output_over_dL_d_the_next_blocks_input() -> None:
    """Measurement.between_gain: the median over the later blocks of ||dL/d out_i-1|| / ||dL/d
    tanh(out_i-1)||; 1 where the blocks take a reshape of the output or a residual stream the add hands
    the same gradient. Oracle: torch.autograd.grad on the same model, input and loss."""
    torch.manual_seed(0)
    model, x = ActBetween(9, 4.0), torch.randn(16, 64)
    m = probe_module(model, x, lambda out, _: out.pow(2).mean(), blocks=list(model.layers.named_children()))
    outs, ins = [], []
    h = x
    for layer in model.layers:
        if outs:
            ins.append(torch.tanh(outs[-1]))
            h = ins[-1]
        outs.append(layer(h))
    grads = torch.autograd.grad(torch.tanh(outs[-1]).pow(2).mean(), outs[:-1] + ins)
    ratios = [float(a.norm() / b.norm()) for a, b in zip(grads[:8], grads[8:], strict=True)]
    assert m.between_gain == pytest.approx(statistics.median(ratios), rel=1e-5)
    for act in ("view", "residual"):
        _, ms = _between_seeds(sigma=1.0, act=act)
        assert [m.between_gain for m in ms] == [1.0] * 5


def test_the_between_gain_under_float16_autocast_is_the_unscaled_ones() -> None:
    """Under float16 autocast the GradScaler's loss scale (2^16) multiplies every gradient, the ones
    the between gain reads too: each is unscaled (left scaled, a mutant no test killed, the gain was
    off by the scale, and the culprit's input correction with it). Oracle: the same model and input
    without autocast, within float16's rounding."""
    torch.manual_seed(0)
    model, x = ActBetween(9, 4.0), torch.randn(16, 64)
    blocks = list(model.layers.named_children())
    wide = probe_module(model, x, lambda out, _: out.pow(2).mean(), blocks=blocks)
    half = probe_module(model, x, lambda out, _: out.float().pow(2).mean(), blocks=blocks, amp="float16")
    assert wide.between_gain != 1.0 and half.between_gain == pytest.approx(wide.between_gain, rel=0.02)


class _SkipThenActs(ActBetween):
    """ActBetween whose block 0 sits in x + 0.5 * tanh(block(x)), a skip the graph shows (the chain
    starts at block 0's output), then tanh between the later blocks."""

    def forward(self, x: torch.Tensor, seen: list[torch.Tensor] | None = None) -> torch.Tensor:
        """`seen` gets each block's output and, after blocks 1 on, the tanh of it, in turn."""
        kept = seen if seen is not None else []
        kept.append(self.layers[0](x))
        x = x + 0.5 * torch.tanh(kept[-1])
        for layer in self.layers[1:]:
            kept.append(layer(x))
            x = torch.tanh(kept[-1])
            kept.append(x)
        return x


def test_the_between_gain_where_the_chain_starts_at_block_0s_output() -> None:
    """Where no (input) is taken, the places of the functions between blocks count from block 0's
    output too (left as they were, a mutant no test killed, each was divided by the next output's
    gradient). Oracle: torch.autograd.grad of each output and of tanh of it, blocks 1 to 7."""
    torch.manual_seed(0)
    model, x = _SkipThenActs(9, 4.0), torch.randn(16, 64)
    loss = lambda out, _: out.pow(2).mean()  # noqa: E731
    m = probe_module(model, x, loss, blocks=list(model.layers.named_children()))
    assert m.activation_names[0] == "0"
    seen: list[torch.Tensor] = []
    final = model(x, seen)
    outs, acts = seen[1:-2:2], seen[2:-2:2]  # blocks 1 to 7 and the tanh after each
    grads = torch.autograd.grad(loss(final, x), outs + acts)
    ratios = [float(a.norm() / b.norm()) for a, b in zip(grads[:7], grads[7:], strict=True)]
    assert m.between_gain == pytest.approx(statistics.median(ratios), rel=1e-5)


@pytest.mark.parametrize("act", ["softsign", "rmsnorm", "tanh_"])
def test_the_between_gain_of_a_function_of_several_nodes_or_in_place(act: str) -> None:
    """softsign and an RMSNorm written by hand use the output twice (several autograd nodes); tanh_
    changes it in place (the probe records a copy the model writes back). Each between gain is the
    out-of-place function's, and the stack, every layer alike at sigma_w 4, reads uniform (it read
    between gain 1 and 'layers.0', a review found). Oracle: torch.autograd.grad on the same seed's
    model, tanh out of place for tanh_."""
    got, ms = _between_seeds(sigma=4.0, act=act)
    assert got.startswith("uniform"), got
    torch.manual_seed(0)
    model, x = ActBetween(9, 4.0, act=act), torch.randn(16, 64)
    f = torch.tanh if act == "tanh_" else ACTS[act]
    outs, ins, h = [], [], x
    for layer in model.layers:
        if outs:
            ins.append(f(outs[-1]))
            h = ins[-1]
        outs.append(layer(h))
    grads = torch.autograd.grad(f(outs[-1]).pow(2).mean(), outs[:-1] + ins)
    ratios = [float(a.norm() / b.norm()) for a, b in zip(grads[:8], grads[8:], strict=True)]
    assert ms[0].between_gain == pytest.approx(statistics.median(ratios), rel=1e-5)


def test_the_between_gain_is_block_0s_chains_alone() -> None:
    """An encoder taking each output as returned, a decoder with tanh between its blocks: the decoder's
    between gain is none of the encoder's block 0, which a x6 plant makes the culprit (one median over
    both chains read 'uniform', a review found). Oracle: the construction."""

    class Dec(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.mem = nn.Linear(64, 64, bias=False), nn.Linear(64, 64, bias=False)
            nn.init.normal_(self.lin.weight, std=0.5)

        def forward(self, y: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
            return self.lin(y) + 0.1 * self.mem(memory)

    class EncDec(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.ModuleList(nn.Linear(64, 64, bias=False) for _ in range(4))
            for i, layer in enumerate(self.enc):
                nn.init.orthogonal_(layer.weight, gain=6.0 if i == 0 else 1.2)
            self.dec = nn.ModuleList(Dec() for _ in range(8))
            self.tgt = nn.Parameter(torch.randn(16, 64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.enc:
                x = layer(x)
            y = self.tgt
            for i, layer in enumerate(self.dec):
                y = layer(torch.tanh(y) if i else y, memory=x)
            return y

    ms = []
    for s in range(5):
        torch.manual_seed(s)
        model = EncDec()
        blocks = [("enc." + n, m) for n, m in model.enc.named_children()]
        blocks += [("dec." + n, m) for n, m in model.dec.named_children()]
        ms.append(probe_module(model, torch.randn(16, 64), lambda out, _: out.pow(2).mean(), blocks=blocks))
    assert [m.between_gain for m in ms] == [1.0] * 5 and all(m.chain_starts for m in ms)
    assert culprit_of(ms) == "enc.0"


def test_a_block_that_makes_its_weight_at_its_first_call_is_measured_out_of_order_too() -> None:
    """A layer creating its weight at its first call, blocks given out of call order: the probe's
    second run, in call order, reads the weights made by then (it read 0 for both, a review found)."""

    class Lazy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w: nn.Parameter | None = None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.w is None:
                self.w = nn.Parameter(torch.randn(x.shape[-1], 8) / 3)
            return torch.tanh(x @ self.w)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), Lazy(), nn.Linear(8, 8), Lazy(), nn.Linear(8, 8))
    blocks = [("3", model[3]), ("1", model[1]), ("4", model[4])]  # called 1, 3, 4
    m = probe_module(model, torch.randn(4, 8), lambda out, _: out.pow(2).mean(), blocks=blocks, steps=3)
    assert m.layer_names == ("1", "3", "4") and all(w > 0 for w in m.weight_norms), m.weight_norms


class _LinearUNet(nn.Module):
    """Three tanh Linear blocks down, three up, each up block taking the matching down block's output
    (a skip) beside the last output, in that order where `skip_first` (a U-Net's up(skip, x))."""

    def __init__(self, skip_first: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.downs = nn.ModuleList(_Down() for _ in range(3))
        self.ups = nn.ModuleList(_Up(skip_first) for _ in range(3))
        self.skip_first = skip_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for down in self.downs:
            x = down(x)
            skips.append(x)
        skips.pop()
        skips.insert(0, x)  # the bottleneck's own output, once more, for the first up block's skip
        for up in self.ups:
            skip = skips.pop()
            x = up(skip, x) if self.skip_first else up(x, skip)
        return x


class _Down(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(2.0 * self.lin(x))


class _Up(nn.Module):
    def __init__(self, skip_first: bool) -> None:
        super().__init__()
        self.lin, self.skip_first = nn.Linear(16, 8, dtype=torch.float64), skip_first

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        x, skip = (b, a) if self.skip_first else (a, b)
        return torch.tanh(2.0 * self.lin(torch.cat([x, skip], -1)))


def test_an_up_block_taking_its_skip_first_continues_the_chain_as_taking_it_second() -> None:
    """up(skip, x) read its first argument, a skip from an earlier output, as its chain's input, and
    started a chain there where up(x, skip) continued it (growth 4.16 for 3.5e-4 on a U-Net: an
    audit). Oracle: the two models compute the same function with the same weights, and torch's
    |dL/d input| / |dL/d output| over the whole chain."""
    x = torch.randn(4, 8, dtype=torch.float64)
    readings = []
    for skip_first in (False, True):
        model = _LinearUNet(skip_first)
        readings.append(probe_module(model, x, _square_mean))
    second, first = readings
    assert first.chain_starts == second.chain_starts == ()
    assert first.growth == pytest.approx(second.growth, rel=1e-12)
    given = x.clone().requires_grad_()
    outs: list[torch.Tensor] = []
    model = _LinearUNet(True)
    hook = model.ups[-1].register_forward_hook(lambda _m, _a, o: outs.append(o))
    loss = _square_mean(model(given), given)
    hook.remove()
    g_in, g_out = torch.autograd.grad(loss, [given, outs[0]])
    assert first.growth == pytest.approx((g_in.norm() / g_out.norm()).item(), rel=1e-9)


class _TwoBranches(nn.Module):
    """Two embeddings of the input, then blocks each taking the list [x0, x1] and returning [y0, y1]
    with a little of the other branch mixed in (CrossViT's and HRNet's stages): the first embedding
    is an earlier block output, the second the last one, when blocks.0 is called."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.ModuleList(nn.Linear(8, 8, dtype=torch.float64) for _ in range(2))
        self.blocks = nn.ModuleList(_Mix() for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = [self.embed[0](x), 5.0 * self.embed[1](x)]  # branch 1's gradient 5x smaller than 0's
        for block in self.blocks:
            xs = block(xs)
        return xs[0] + xs[1]


class _Mix(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.own = nn.ModuleList(nn.Linear(8, 8, dtype=torch.float64) for _ in range(2))
        self.cross = nn.ModuleList(nn.Linear(8, 8, dtype=torch.float64) for _ in range(2))

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        x0, x1 = xs
        return [
            torch.tanh(2.0 * self.own[0](x0) + 0.1 * self.cross[0](x1)),
            torch.tanh(2.0 * self.own[1](x1) + 0.1 * self.cross[1](x0)),
        ]


def test_a_block_taking_a_list_of_branches_is_chained_on_the_branch_it_is_read_on() -> None:
    """A block output is read on its first tensor, so its chain must come in on its first argument's
    branch too: blocks.0 of a list [x0, x1] was chained on x1, from the last block output, and its
    gain divided branch 1's gradient by branch 0's (HRNet read growth 467 for torch's 32, CrossViT 1
    for 0.03: an audit). Oracle: torch's gradients of each block's outputs; every gain the probe
    reads is a ratio on one branch, branch 0."""
    model = _TwoBranches()
    x = torch.randn(4, 8, dtype=torch.float64)
    given = [(f"embed.{i}", model.embed[i]) for i in range(2)] + [
        (f"blocks.{i}", model.blocks[i]) for i in range(3)
    ]
    m = probe_module(model, x, _square_mean, blocks=given)  # as CrossViT's found: patch_embed + blocks
    names = m.activation_names
    assert names[-5:] == ("embed.0", "embed.1", "blocks.0", "blocks.1", "blocks.2"), names
    outs: dict[str, list[torch.Tensor]] = {}
    for name in names[-5:]:
        model.get_submodule(name).register_forward_hook(
            lambda _m, _a, o, name=name: outs.__setitem__(name, o if isinstance(o, list) else [o])
        )
    loss = _square_mean(model(x), x)
    order = list(outs)
    grads = torch.autograd.grad(loss, [outs[n][0] for n in order])
    branch0 = {n: g.norm().item() for n, g in zip(order, grads, strict=True)}
    for i, name in enumerate(names[1:]):
        if name == "blocks.0" and i + 1 in m.chain_starts:
            continue  # its input is no output before it in the chain
        before = "embed.0" if name == "blocks.0" else names[i]
        if name.startswith("blocks"):
            assert m.gains[i] == pytest.approx(branch0[before] / branch0[name], rel=1e-9), (name, m.gains)
