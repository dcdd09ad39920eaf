"""A chain cut by a value taken with no gradient (detach(), .data, torch.no_grad()): the blocks before
the cut get none, exactly 0, and the growth is 0 (the gradient dies on its way back), not the growth of
the half behind the cut (a 12-block stack cut at block 5 read 0.705, stable, with no word of it)."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from stabilitycheck.probing import probe_module


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
def test_a_cut_chain_reads_0_before_the_cut_and_growth_0(how: str, k: int) -> None:
    """Oracle: torch.autograd.grad of the loss with respect to the input and each block output: None
    (0) up to the cut, torch's norms after it. The growth, first over last, is then 0."""
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
    assert m.growth == 0.0
    assert not math.isnan(m.growth) and m.chain_starts == ()


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
    """`stabilitycheck model.py` on a stack detached after layers.3: vanishing (growth 0) under
    --vanishing-limit, and the `!` line names the block after the cut and the detach among its causes."""
    path = tmp_path / "cut.py"
    path.write_text(textwrap.dedent(FILE))
    args = [sys.executable, "-m", "stabilitycheck", str(path), "--database", "none"]
    run = subprocess.run([*args, "--vanishing-limit", "100"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "growth 0: the backward of layers.4 passes no gradient" in run.stdout
    assert "layers.3's output taken with no gradient (detach()" in run.stdout
    plain = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0 and "growth 0: the backward of layers.4" in plain.stdout, plain.stdout
