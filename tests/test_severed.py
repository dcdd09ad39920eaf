"""A chain cut by a value taken with no gradient (detach(), .data, torch.no_grad()): the blocks before
the cut get none from the loss, and the measurement names the call that takes the cut value
(`cut_before`), so the report can say so (a 12-block stack cut at block 5 read growth 0.705, stable,
with no word of it); the growth is read as before, from the cut on: a frozen backbone under a trained
head is meant so, and an online probe on detached features is no cut of the main chain."""

from __future__ import annotations

import contextlib
import math
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from stabilitycheck.probing import probe_module
from stabilitycheck.rng import SALT_FORWARD, derived


class Block(nn.Module):
    """tanh(W x), its output detached in its own forward where `cut`."""

    def __init__(self, cut: bool) -> None:
        super().__init__()
        self.lin, self.cut = nn.Linear(16, 16, bias=False), cut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(self.lin(x))
        return y.detach() if self.cut else y


class Cut(nn.Module):
    """A stack of `depth` blocks; `how` cuts the chain at block `k`: its output detached in its own
    forward ("inside"), detached or .data as block k + 1 takes it ("detach", "data"), or block k run
    under torch.no_grad() ("no_grad")."""

    def __init__(self, depth: int, k: int, how: str) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(how == "inside" and i == k) for i in range(depth))
        self.k, self.how = k, how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            if i == self.k and self.how == "no_grad":
                with torch.no_grad():
                    x = layer(x)
            else:
                x = layer(x)
            if i == self.k and self.how == "detach":
                x = x.detach()
            if i == self.k and self.how == "data":
                x = x.data
        return x


def _loss(out: torch.Tensor, _: object) -> torch.Tensor:
    return (out * torch.linspace(-1, 1, out.shape[-1])).sum()


def _torchs(model: nn.Module, x: torch.Tensor, blocks: list[nn.Module]) -> list[float]:
    """|dL/d input| then |dL/d output| of each block, by torch.autograd.grad: 0 where the loss's
    gradient does not reach (None)."""
    outs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, a, o: outs.append(o)) for b in blocks]
    entry = x.clone().requires_grad_()
    loss = _loss(model(entry), None)
    for h in hooks:
        h.remove()
    wanted = [t for t in [entry, *outs] if t.requires_grad]
    got = dict(zip(map(id, wanted), torch.autograd.grad(loss, wanted, allow_unused=True), strict=True))
    return [float(got[id(t)].norm()) if got.get(id(t)) is not None else 0.0 for t in [entry, *outs]]


@pytest.mark.parametrize("how", ["inside", "detach", "data", "no_grad"])
@pytest.mark.parametrize("k", [0, 5])
def test_a_cut_chain_names_the_call_after_the_cut_and_reads_torchs_norms(how: str, k: int) -> None:
    """Oracle: torch.autograd.grad of the loss with respect to the input and each block output: None
    (read 0) up to the cut, torch's norms after it; the growth is the reached part's, first over last,
    and the cut is named at the call taking block k's output."""
    torch.manual_seed(k)
    model = Cut(8, k, how)
    blocks = list(model.layers)
    x = torch.randn(4, 16)
    want = _torchs(model, x, blocks)
    if how == "no_grad" and k == 0:  # block 0 ran with autograd off: its input is not taken
        want = want[1:]
    m = probe_module(model, x, _loss, blocks=[(f"layers.{i}", b) for i, b in enumerate(blocks)])
    assert m.activation_grad_norms == pytest.approx(want, rel=1e-5)
    assert want[0] == 0.0 and want[-1] > 0  # the oracle: the input gets nothing, the output end does
    reached = [w for w in want if w > 0]
    assert m.growth == pytest.approx(reached[0] / reached[-1], rel=1e-5)
    assert [m.activation_names[c] for c in m.cut_before] == [f"layers.{k + 1}"]


class _Head(nn.Module):
    """A backbone of 4 blocks run under torch.no_grad() (its parameters still require grad: a linear
    probe) or whose output a head on detached features reads beside the main loss (an online probe)."""

    def __init__(self, online: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(False) for _ in range(4))
        self.head = nn.ModuleList(Block(False) for _ in range(2))
        self.online = online

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        with torch.no_grad() if not self.online else contextlib.nullcontext():
            for layer in self.layers:
                x = layer(x)
        h = x.detach() if self.online else x
        for layer in self.head:
            h = layer(h)
        return (x, h) if self.online else h


def _named(model: _Head) -> list[tuple[str, nn.Module]]:
    return [
        *((f"layers.{i}", b) for i, b in enumerate(model.layers)),
        *((f"head.{i}", b) for i, b in enumerate(model.head)),
    ]


def test_a_linear_probe_on_a_frozen_backbone_reads_the_heads_growth() -> None:
    """The backbone under torch.no_grad(): the head's chain is what the loss trains, read as before
    (a review found the cut read as growth 0 where torch's head growth is 2187), and the cut named.
    Oracle: torch's gradients at the head's input and output."""
    torch.manual_seed(0)
    model, x = _Head(online=False), torch.randn(4, 16)
    for block in model.head:
        nn.init.normal_(block.lin.weight, std=3.0 / 16**0.5)
    blocks = _named(model)
    m = probe_module(model, x, _loss, blocks=blocks)
    want = _torchs(model, x, [b for _, b in blocks])
    assert m.growth == pytest.approx(want[-2] / want[-1], rel=1e-5)
    assert [m.activation_names[c] for c in m.cut_before] == ["head.0"]


def test_an_online_probe_on_detached_features_is_no_cut_of_the_main_chain() -> None:
    """A head on the backbone's detached output, its loss weighted 1e-4 beside the main loss: the
    backbone is reached by the main loss, so nothing is cut, and the probe's small gradient is not the
    main chain's output end (a review read growth 487 for a chain of growth ~0.05)."""
    torch.manual_seed(0)
    model, x = _Head(online=True), torch.randn(4, 16)

    def loss(out: tuple[torch.Tensor, torch.Tensor], inputs: object) -> torch.Tensor:
        return _loss(out[0], inputs) + 1e-4 * _loss(out[1], inputs)

    blocks = _named(model)
    m = probe_module(model, x, loss, blocks=blocks)
    assert m.cut_before == () and m.growth < 10


def test_a_frozen_first_block_is_no_cut() -> None:
    """A frozen embedding on token ids: its output carries no gradient by design, nothing before it
    learns, and the chain is read from the blocks after it (its growth, not 0). Oracle: torch's
    gradients of the loss at each later block's output."""

    class Frozen(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 16).requires_grad_(False)
            self.layers = nn.ModuleList(Block(False) for _ in range(4))

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            x = self.emb(ids)
            for layer in self.layers:
                x = layer(x)
            return x

    torch.manual_seed(0)
    model, ids = Frozen(), torch.randint(0, 10, (4, 5))
    blocks = [("emb", model.emb), *((f"layers.{i}", b) for i, b in enumerate(model.layers))]
    m = probe_module(model, ids, _loss, blocks=blocks)
    outs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda mod, a, o: outs.append(o)) for b in model.layers]
    grads = torch.autograd.grad(_loss(model(ids), None), outs)
    for h in hooks:
        h.remove()
    assert m.growth == pytest.approx(float(grads[0].norm()) / float(grads[-1].norm()), rel=1e-5)
    assert m.growth > 0


def test_a_block_logged_after_the_chain_is_still_unreached_not_0() -> None:
    """A block run on the last output for a logged number only is the output end, not a cut: it has
    no gradient (no gain, NaN), and the growth is over the blocks the loss depends on."""

    class Logged(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(4))
            self.logged = 0.0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers[:3]:
                x = torch.tanh(layer(x))
            with torch.no_grad():
                self.logged = float(self.layers[3](x).norm())
            return x

    torch.manual_seed(0)
    model, x = Logged(), torch.randn(4, 16)
    m = probe_module(model, x, _loss)
    want = _torchs(model, x, list(model.layers[:3]))
    assert m.growth == pytest.approx(want[0] / want[-1], rel=1e-5)
    assert math.isnan(m.gains[-1])


FILE = """
import torch
from torch import nn

SPACE = {"depth": (6, 10)}


def build(depth=6, width=16):
    layers = nn.ModuleList(
        nn.Sequential(nn.Linear(width, width, bias=False), nn.Tanh()) for _ in range(depth)
    )
    return Net(layers)


class Net(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = layers

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i == 3:
                x = x.detach()
        return x
"""


def test_the_cli_says_where_the_cut_chain_gives_no_gradient(tmp_path: Path) -> None:
    """`stabilitycheck model.py` on a stack detached after layers.3: the `!` line names the cut."""
    path = tmp_path / "cut.py"
    path.write_text(textwrap.dedent(FILE))
    args = [sys.executable, "-m", "stabilitycheck", str(path), "--database", "none"]
    run = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    want = "layers.4 takes layers.3's output with no gradient (detach(), .data or torch.no_grad()): no "
    want += "gradient reaches that output or those before it from this loss"
    assert want in run.stdout, run.stdout


SKIP = """
import torch
from torch import nn

SPACE = {"depth": (4, 4)}


def build(depth=4):
    return Net()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(4))

    def forward(self, x):
        skip = self.layers[0](x)
        x = self.layers[1](skip).detach()
        x = self.layers[3](self.layers[2](x))
        return x + skip
"""


def test_the_cut_line_says_only_the_output_cut_where_a_skip_reaches_those_before(tmp_path: Path) -> None:
    """A skip from layers.0's output around the cut after layers.1: layers.0 gets a gradient, so the
    line must not say that none reaches the outputs before the cut (a second review: 'they do not
    learn' was false there). Oracle: the construction (layers.0's output feeds the loss directly)."""
    path = tmp_path / "skip.py"
    path.write_text(textwrap.dedent(SKIP))
    args = [sys.executable, "-m", "stabilitycheck", str(path), "--database", "none"]
    run = subprocess.run(args, capture_output=True, text=True, timeout=300)
    (line,) = [x for x in run.stdout.splitlines() if "takes layers.1's output with no gradient" in x]
    assert "no gradient reaches that output from this loss" in line and "those before it" not in line


class Teacher(nn.Module):
    """12 tanh blocks at sigma_w 2.5, also run without grad beside the trained pass: a target pass of
    the same blocks under torch.no_grad before it ("before") or after it ("after"), or one block
    called alone under torch.no_grad first ("one")."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(False) for _ in range(12))
        for layer in self.layers:
            nn.init.normal_(layer.lin.weight, std=2.5 / 16**0.5)
        self.how = how

    def run(self, h: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            h = layer(h)
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "one":
            with torch.no_grad():
                self.layers[3](x)
            return self.run(x)
        with torch.no_grad() if self.how == "before" else contextlib.nullcontext():
            first = self.run(0.5 * x)
        with torch.no_grad() if self.how == "after" else contextlib.nullcontext():
            second = self.run(0.5 * x)
        return (second - first) if self.how == "before" else (first - second)


@pytest.mark.parametrize("how", ["before", "after", "one"])
def test_blocks_also_run_without_grad_are_read_on_their_calls_with_it(how: str) -> None:
    """Calls of the blocks under torch.no_grad beside the trained pass (a target or teacher pass of the
    same blocks) carry no gradient and are no part of the chain: run before it, they took the entry's
    place and started the call order (growth 3.43 for torch's 4.78; one block called first read
    13.50 for 14.61; after it, its calls were listed as 12 more, unreached). Oracle: torch's
    |dL/d input| and |dL/d output| of each call of the trained pass."""
    torch.manual_seed(0)
    model, x = Teacher(how), torch.randn(8, 16)
    m = probe_module(model, x, _loss)
    with torch.no_grad():  # the trained pass's input: 0.5 * x where a pass of the stack is the target
        given = x if how == "one" else 0.5 * x
    want = _torchs_on(model, x, given)
    assert m.activation_names == ("(input)", *(f"layers.{i}" for i in range(12)))
    assert m.activation_grad_norms == pytest.approx(want, rel=1e-5)
    assert m.growth == pytest.approx(want[0] / want[-1], rel=1e-5)


def _torchs_on(model: Teacher, x: torch.Tensor, given: torch.Tensor) -> list[float]:
    """|dL/d input| of the trained pass, `given`, then |dL/d output| of each of its block calls, by
    torch.autograd.grad (calls under torch.no_grad are left alone: their outputs carry no grad)."""
    outs: list[torch.Tensor] = []
    taken: list[torch.Tensor] = []

    def enter(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor] | None:
        if not torch.is_grad_enabled():
            return None
        taken.append(args[0].detach().requires_grad_())
        return (taken[-1],)

    def keep(_m: nn.Module, _a: object, out: torch.Tensor) -> None:
        if torch.is_grad_enabled():
            outs.append(out)

    hooks = [model.layers[0].register_forward_pre_hook(enter)]
    hooks += [b.register_forward_hook(keep) for b in model.layers]
    loss = _loss(model(x), None)
    for h in hooks:
        h.remove()
    assert len(taken) == 1 and torch.equal(taken[0], given)
    grads = torch.autograd.grad(loss, [taken[0], *outs])
    return [float(g.norm()) for g in grads]


class _Dropping(nn.Module):
    """8 tanh layers at sigma_w 2.5: a target pass of all of them under torch.no_grad, then the
    trained pass dropping each with probability 0.3 drawn from Python's `random` (a LayerDrop)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(16, 16, bias=False) for _ in range(8))
        for layer in self.layers:
            nn.init.normal_(layer.weight, std=2.5 / 16**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t = 0.5 * x
            for layer in self.layers:
                t = torch.tanh(layer(t))
        h = x
        for layer in self.layers:
            if random.random() >= 0.3:
                h = torch.tanh(layer(h))
        return h - t


def test_a_target_pass_beside_a_layerdrop_on_pythons_random_is_read_on_the_seeded_draw() -> None:
    """The run again without the target pass's calls draws what the first forward drew, from torch and
    from Python's `random` (it drew other layers: losses[0] 2.999 for the seeded forward's 3.491,
    growth 6.47 for torch's 12.07). Oracle: one forward seeded as probe_module seeds it, its calls'
    gradients by torch.autograd.grad."""
    torch.manual_seed(0)
    model, x = _Dropping(), torch.randn(8, 16)
    m = probe_module(model, x, _loss)
    forward = derived(0, SALT_FORWARD)
    torch.manual_seed(forward)
    random.seed(forward)
    calls: list[tuple[str, torch.Tensor]] = []
    hooks = [
        layer.register_forward_hook(
            lambda _m, _a, o, i=i: calls.append((f"layers.{i}", o)) if torch.is_grad_enabled() else None
        )
        for i, layer in enumerate(model.layers)
    ]
    given = x.clone().requires_grad_()
    loss = _loss(model(given), None)
    for h in hooks:
        h.remove()
    assert m.loss[0] == pytest.approx(float(loss.detach()), rel=1e-6)
    grads = torch.autograd.grad(loss, [given, *(o for _, o in calls)])
    assert m.activation_names[1:] == tuple(name for name, _ in calls)
    assert m.activation_grad_norms == pytest.approx([float(g.norm()) for g in grads], rel=1e-5)


class _Exp(nn.Module):
    """exp(W x) / 3 at sigma_w 0.3."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16, bias=False)
        nn.init.normal_(self.lin.weight, std=0.3 / 16**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.lin(x)) / 3


class _Overflowing(nn.Module):
    """8 _Exp blocks: finite on x, while a target pass on 200 x under torch.no_grad overflows in its
    first block."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Exp() for _ in range(8))

    def run(self, h: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            h = layer(h)
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t = self.run(200.0 * x)
        return self.run(x) - t


def test_a_non_finite_value_made_in_a_target_pass_is_located_in_its_block() -> None:
    """The exact re-run that locates a non-finite value records the calls without grad too: with them
    unrecorded the Inf the target pass made in its first block read as the loss's own, after the last
    block. Oracle: the construction (the target pass's layers.0 output is the first non-finite one,
    the trained pass is finite)."""
    torch.manual_seed(0)
    model, x = _Overflowing(), torch.randn(8, 16)
    with torch.no_grad():
        assert not model.layers[0](200.0 * x).isfinite().all()
        assert model.run(x).isfinite().all()
    m = probe_module(model, x, _loss)
    assert m.first_nonfinite is not None
    assert m.first_nonfinite.describe() == "step 0: activation of layers.0[0], L2 norm inf"


class _PairStep(nn.Module):
    """y, h = o(cell(x, h)), cell(x, h): a step returning (y, h), its recurrent matrix x3."""

    def __init__(self) -> None:
        super().__init__()
        self.cell, self.out = nn.RNNCell(16, 16), nn.Linear(16, 16)
        with torch.no_grad():
            self.cell.weight_hh.mul_(3)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.cell(x, h)
        return self.out(h), h


class _Stepped(nn.Module):
    """The step over 10 tokens, a target step under torch.no_grad before each trained one where
    `targets`; each trained step's h kept in `states` for the oracle."""

    def __init__(self, targets: bool) -> None:
        super().__init__()
        self.step, self.targets = _PairStep(), targets
        self.states: list[torch.Tensor] = []

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        h = t = xs.new_zeros(xs.shape[1], 16)
        self.states, y = [], xs[0]
        for x in xs:
            if self.targets:
                with torch.no_grad():
                    _, t = self.step(0.5 * x, t)
            y, h = self.step(x, h)
            self.states.append(h)
        return y


def test_a_step_with_a_target_step_beside_each_token_is_read_as_without_it() -> None:
    """Which tensor of a step's (y, h) its chain is, is seen at its next call; with a target step
    between, the first forward saw it on that call, and the run again kept what it saw: every
    call's gradient read 0 but the last's, growth NaN. Now the run again starts from what the
    first learned of the quiet calls alone. Oracle: torch's |dL/d h_t|, and the model without the
    target steps."""
    torch.manual_seed(0)
    model, xs = _Stepped(targets=True), torch.randn(10, 4, 16)
    m = probe_module(model, xs, _loss, blocks=[("step", model.step)])
    loss = _loss(model(xs), None)
    want = [float(g.norm()) for g in torch.autograd.grad(loss, model.states)]
    assert m.activation_grad_norms == pytest.approx(want, rel=1e-5)
    model.targets = False
    alone = probe_module(model, xs, _loss, blocks=[("step", model.step)])
    assert m.activation_grad_norms == pytest.approx(alone.activation_grad_norms, rel=1e-12)
    assert m.growth == pytest.approx(want[0] / want[-1], rel=1e-5)


class _TwoStacks(nn.Module):
    """An encoder and a decoder stack of 4 tanh layers at sigma_w 2.5; the decoder also run under
    torch.no_grad on the encoder's output (a target), before its trained pass."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.ModuleList(Block(False) for _ in range(4))
        self.dec = nn.ModuleList(Block(False) for _ in range(4))
        for layer in [*self.enc, *self.dec]:
            nn.init.normal_(layer.lin.weight, std=2.5 / 16**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.enc:
            x = layer(x)
        with torch.no_grad():
            t = 0.5 * x
            for layer in self.dec:
                t = layer(t)
        for layer in self.dec:
            x = layer(x)
        return x - t


def test_a_target_pass_of_the_second_stack_makes_no_junction() -> None:
    """The decoder's calls under torch.no_grad are not checked as junctions either: checked, the
    decoder's first call with grad read as a branch off the target's (growth 3.47 for 6.78).
    Oracle: torch's |dL/d input| and |dL/d output| of each call with grad."""
    torch.manual_seed(0)
    model, x = _TwoStacks(), torch.randn(8, 16)
    blocks = [(f"enc.{i}", b) for i, b in enumerate(model.enc)] + [
        (f"dec.{i}", b) for i, b in enumerate(model.dec)
    ]
    m = probe_module(model, x, _loss, blocks=blocks)
    outs: list[torch.Tensor] = []
    hooks = [
        b.register_forward_hook(lambda _m, _a, o: outs.append(o) if torch.is_grad_enabled() else None)
        for _, b in blocks
    ]
    given = x.clone().requires_grad_()
    loss = _loss(model(given), None)
    for h in hooks:
        h.remove()
    want = [float(g.norm()) for g in torch.autograd.grad(loss, [given, *outs])]
    assert m.chain_starts == ()
    assert m.activation_grad_norms == pytest.approx(want, rel=1e-5)
    assert m.growth == pytest.approx(want[0] / want[-1], rel=1e-5)
