"""Blocks held as attributes, not in a list (GoogLeNet's inception3a..5b, a DLA's levels): found as the
chain where every list inside the model lies inside them, against torch's own gradients end to end."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stabilitycheck.probing import probe_module
from stabilitycheck.subject import find_blocks

W = 32


class Unit(nn.Module):
    """tanh(W x + b) at sigma_w `scale`."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.lin = nn.Linear(W, W)
        nn.init.normal_(self.lin.weight, std=scale / W**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x))


class Inception(nn.Module):
    """Two parallel branches of two units, summed: what an inception module does with its own."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.branch1 = nn.Sequential(Unit(scale), Unit(scale))
        self.branch2 = nn.Sequential(Unit(scale), Unit(scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.branch1(x) + self.branch2(x)


class GoogLeNetLike(nn.Module):
    """A stem, then `n` inception modules held as attributes inc1..incn, then a head."""

    def __init__(self, n: int, scale: float) -> None:
        super().__init__()
        self.stem = nn.Linear(W, W)
        self.n = n
        for i in range(1, n + 1):
            setattr(self, f"inc{i}", Inception(scale))
        self.head = nn.Linear(W, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for i in range(1, self.n + 1):
            h = getattr(self, f"inc{i}")(h)
        return self.head(h)  # type: ignore[no-any-return]


class Levels(nn.Module):
    """A stem Sequential of mixed layers, then 6 blocks held as attributes level1..level6 (a DLA's)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(W, W), nn.LayerNorm(W), nn.ReLU())
        for i in range(1, 7):
            setattr(self, f"level{i}", Unit(2.2))
        self.head = nn.Linear(W, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for i in range(1, 7):
            h = getattr(self, f"level{i}")(h)
        return self.head(h)  # type: ignore[no-any-return]


def _loss(out: torch.Tensor, _: object) -> torch.Tensor:
    return nn.functional.cross_entropy(out, torch.arange(out.shape[0]) % 10)


def _end_to_end(model: nn.Module, x: torch.Tensor, first: nn.Module, last: nn.Module) -> float:
    """torch's |dL/d input of `first`| / |dL/d output of `last`|."""
    got: dict[str, torch.Tensor] = {}

    def enter(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
        got["in"] = args[0].detach().requires_grad_()
        return (got["in"],)

    hooks = [first.register_forward_pre_hook(enter)]
    hooks.append(last.register_forward_hook(lambda _m, _a, o: got.__setitem__("out", o)))
    loss = _loss(model(x), None)
    for h in hooks:
        h.remove()
    into, out = torch.autograd.grad(loss, [got["in"], got["out"]])
    return float(into.norm() / out.norm())


@pytest.mark.parametrize(("n", "scale"), [(4, 0.5), (4, 2.0), (6, 1.5)])
def test_inception_modules_held_as_attributes_are_the_chain_not_their_branches(n: int, scale: float) -> None:
    """The branches inside each module were the blocks, each a chain of its own, and the growth
    multiplied their own ratios, leaving out each module's merge (here 2.67 for torch's 7.97 at sigma_w
    2, 0.061 for 0.0113 at 0.5): the modules are the blocks.
    Oracle: torch's gradient ratio from the first module's input to the last one's output."""
    torch.manual_seed(0)
    model, x = GoogLeNetLike(n, scale), torch.randn(16, W)
    blocks, note = find_blocks(model)
    assert [name for name, _ in blocks] == [f"inc{i}" for i in range(1, n + 1)]
    assert note == f"blocks: inc1..inc{n} ({n})"
    m = probe_module(model, x, _loss)
    assert m.chain_starts == ()
    assert m.growth == pytest.approx(_end_to_end(model, x, model.inc1, getattr(model, f"inc{n}")), rel=1e-5)


def test_levels_held_as_attributes_beside_a_stem_sequential_are_the_chain() -> None:
    """The stem, the one list, was the chain (growth 0.623 for torch's 2.59): the levels are."""
    torch.manual_seed(0)
    model, x = Levels(), torch.randn(16, W)
    m = probe_module(model, x, _loss)
    assert m.activation_names == ("(input)", *(f"level{i}" for i in range(1, 7)))
    assert m.growth == pytest.approx(_end_to_end(model, x, model.level1, model.level6), rel=1e-5)


class TrunkAndHeads(nn.Module):
    """A trunk of 6 units in a ModuleList and 3 heads of one class held as attributes beside it."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Unit(1.5) for _ in range(6))
        self.head_a, self.head_b, self.head_c = Inception(1.0), Inception(1.0), Inception(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return torch.cat([self.head_a(x), self.head_b(x), self.head_c(x)], dim=1)[:, :10]


class Stages(nn.Module):
    """Three stages of one class held as attributes, each a ModuleList of 3 units: a stage's units are
    the chain, not the stages."""

    def __init__(self) -> None:
        super().__init__()
        self.stage1, self.stage2, self.stage3 = Stage(), Stage(), Stage()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage3(self.stage2(self.stage1(x)))[:, :10]  # type: ignore[no-any-return]


class Stage(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Unit(1.5) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def test_attribute_groups_leave_a_listed_trunk_and_stages_as_they_were() -> None:
    """Heads of one class beside a trunk in a list are not taken as the stack (the lists are read as
    before: the trunk, and the heads' branches beside it, a known misreading of heads), and stages of
    one class each holding a list of blocks are read on their blocks."""
    trunk, _ = find_blocks(TrunkAndHeads())
    names = [name for name, _ in trunk]
    assert names[:6] == [f"layers.{i}" for i in range(6)]
    assert not {"head_a", "head_b", "head_c"} & set(names)
    staged, _ = find_blocks(Stages())
    assert [name for name, _ in staged] == [f"stage{s}.blocks.{i}" for s in (1, 2, 3) for i in range(3)]


class Dual(nn.Module):
    """A block of four units held as attributes, in series (a DPN block's convs)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = Unit(1.0), Unit(1.0), Unit(1.0), Unit(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.d(self.c(self.b(self.a(x))))  # type: ignore[no-any-return]


def test_units_held_as_attributes_inside_a_listed_block_are_no_stack() -> None:
    """A Sequential of blocks of several classes (a DPN's features) is read as it was, its layers; the
    four units inside its first block were taken for the stack (growth 1.41 for torch's 83.9)."""
    model = nn.Sequential(Dual(), nn.Linear(W, W), Dual(), nn.LayerNorm(W), Dual())
    blocks, _ = find_blocks(model)
    assert [name for name, _ in blocks] == ["0", "1", "2", "3", "4"]
