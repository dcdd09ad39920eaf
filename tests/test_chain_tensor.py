"""Which tensor of a block's output its chain goes on from, where the block returns several: the one the
next call takes, or for the last call the one the loss is made from. Oracle: torch.autograd.grad of
the loss with respect to that tensor at every call, the chain's input first."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from stabilitycheck import probe_module


class AttnFirst(nn.Module):
    """A layer returning (attention weights, h): the chain is h, the second tensor."""

    def __init__(self, width: int = 16, gain: float = 2.0) -> None:
        super().__init__()
        self.lin, self.gain = nn.Linear(width, width), gain

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.tanh(self.lin(h) * self.gain)
        return torch.softmax(y[:, :4], -1), y


class Stack(nn.Module):
    """Layers returning (attn, h), each taking the last h; the output h, or with `aux`, h plus aux x
    the sum of the squared attention weights (their path in the graph even at aux 0)."""

    def __init__(self, layers: nn.ModuleList, aux: float | None = None) -> None:
        super().__init__()
        self.layers, self.aux = layers, aux

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(())
        for layer in self.layers:
            a, h = layer(h)
            total = total + (a * a).sum()
        return h if self.aux is None else h + self.aux * total


class DictOut(nn.Module):
    """A layer handing on {"mask": mask as it came, "h": h}: the chain is h, made by the call."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"mask": state["mask"], "h": torch.tanh(2.0 * self.lin(state["h"]) * state["mask"])}


def chain_grads(
    model: nn.Module,
    x: Any,
    loss_fn: Callable[[Any], torch.Tensor],
    layers: list[nn.Module],
    pick: Callable[[Any], torch.Tensor],
) -> list[float]:
    """||dL/d input|| and ||dL/d chain tensor|| of every layer call, in call order (torch's)."""
    seen: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda _m, _a, out: seen.append(pick(out))) for layer in layers]
    try:
        loss = loss_fn(model(*x) if isinstance(x, tuple) else model(x))
    finally:
        for h in hooks:
            h.remove()
    grads = torch.autograd.grad(loss, [x, *seen] if isinstance(x, torch.Tensor) else seen)
    return [g.norm().item() for g in grads]


@pytest.mark.parametrize("aux", [0.0, 1e-3])  # the attention weights in the loss too, or 0 x them
def test_a_stack_returning_attention_then_h_is_read_on_h(aux: float) -> None:
    """Six layers each returning (attn, h), the next taking h, the loss on h (and aux x sum attn^2).
    Read on attn, every gradient read 0 and the growth NaN (an exploding stack read stable), or 1.03
    where torch's is 0.51 with the attention in the loss."""
    torch.manual_seed(0)
    layers = nn.ModuleList(AttnFirst() for _ in range(6))
    model, x, z = Stack(layers, aux), torch.randn(8, 16), torch.randn(8, 16)
    m = probe_module(
        model, x, lambda out, _: (out * z).sum(), blocks=[(f"layers.{i}", b) for i, b in enumerate(layers)]
    )
    want = chain_grads(
        model, x.clone().requires_grad_(), lambda out: (out * z).sum(), list(layers), lambda o: o[1]
    )
    assert m.activation_names[0] == "(input)"
    assert list(m.activation_grad_norms) == pytest.approx(want, rel=1e-5)
    assert m.growth == pytest.approx(want[0] / want[-1], rel=1e-5)


@pytest.mark.parametrize("pattern", ["aaab", "abab"])
def test_reused_layers_returning_attention_then_h_are_read_on_h(pattern: str) -> None:
    """A layer looped three times then another (aaab: the last read 0 and left out of the growth), or
    two taking turns (abab: a junction judged on the attention split one chain in two, growth 1.0 for
    torch's 0.083)."""
    torch.manual_seed(1)
    a, b = AttnFirst(gain=1.0), AttnFirst(gain=1.0)
    order = [a if c == "a" else b for c in pattern]

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = a, b

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            for layer in order:
                _, h = layer(h)
            return h

    model, x, z = Model(), torch.randn(8, 16), torch.randn(8, 16)
    m = probe_module(model, x, lambda out, _: (out * z).sum(), blocks=[("a", a), ("b", b)])
    want = chain_grads(model, x.clone().requires_grad_(), lambda out: (out * z).sum(), [a, b], lambda o: o[1])
    assert m.chain_starts == ()
    assert list(m.activation_grad_norms) == pytest.approx(want, rel=1e-5)
    assert m.growth == pytest.approx(want[0] / want[-1], rel=1e-5)


def test_a_mask_handed_on_as_it_came_is_no_chain() -> None:
    """Eight layers passing {"mask": m, "h": h}: the mask is the first tensor but each call returns it
    as it came; read on it, every gradient read 0 and the growth NaN (torch's, over the layers: 3.36)."""
    torch.manual_seed(2)
    layers = nn.ModuleList(DictOut() for _ in range(8))

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = layers

        def forward(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
            for layer in self.layers:
                state = layer(state)
            return state["h"]

    x = ({"mask": (torch.rand(8, 16) > 0.2).float(), "h": torch.randn(8, 16)},)  # one dict argument
    z = torch.randn(8, 16)
    model = Model()
    m = probe_module(
        model, x, lambda out, _: (out * z).sum(), blocks=[(f"layers.{i}", b) for i, b in enumerate(layers)]
    )
    want = chain_grads(model, x, lambda out: (out * z).sum(), list(layers), lambda o: o["h"])
    assert list(m.activation_grad_norms) == pytest.approx(want, rel=1e-5)
    assert math.isfinite(m.growth) and m.growth == pytest.approx(want[0] / want[-1], rel=1e-5)


def test_a_last_block_whose_loss_takes_another_of_its_tensors_is_read_on_that_one() -> None:
    """A single block returning (attn, h), the loss on h alone: no next call shows which tensor goes
    on; the loss does. Read on attn, its gradient read 0."""
    torch.manual_seed(3)
    block = AttnFirst()

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = block

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return self.block(h)[1]

    model, x = Model(), torch.randn(8, 16)
    m = probe_module(model, x, lambda out, _: out.square().sum(), blocks=[("block", block)])
    want = chain_grads(
        model, x.clone().requires_grad_(), lambda out: out.square().sum(), [block], lambda o: o[1]
    )
    assert list(m.activation_grad_norms) == pytest.approx(want, rel=1e-5)
    assert m.activation_grad_norms[-1] > 0


@dataclasses.dataclass
class Out:
    """A block's output as a plain dataclass."""

    h: torch.Tensor


class DataclassOut(nn.Module):
    """A layer returning its h in a plain dataclass."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, h: torch.Tensor) -> Out:
        return Out(torch.tanh(2.0 * self.lin(h)))


def test_a_block_returning_a_dataclass_is_read_on_its_tensor() -> None:
    """Three plain layers and a last one returning Out(h): it was dropped from the chain unsaid, the
    growth read over three blocks (0.151 for torch's 0.084 over four)."""
    torch.manual_seed(4)
    layers = nn.ModuleList([*(AttnFirst(gain=1.0) for _ in range(3)), DataclassOut()])

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = layers

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            for layer in self.layers[:3]:
                _, h = layer(h)
            return self.layers[3](h).h

    model, x, z = Model(), torch.randn(8, 16), torch.randn(8, 16)
    m = probe_module(
        model, x, lambda out, _: (out * z).sum(), blocks=[(f"layers.{i}", b) for i, b in enumerate(layers)]
    )
    want = chain_grads(
        model,
        x.clone().requires_grad_(),
        lambda out: (out * z).sum(),
        list(layers),
        lambda o: o.h if isinstance(o, Out) else o[1],
    )
    assert m.activation_names[-1] == "layers.3"
    assert list(m.activation_grad_norms) == pytest.approx(want, rel=1e-5)


def test_blocks_returning_nothing_are_said_to_return_nothing() -> None:
    """Blocks that run through __call__ and return None (their output in a state dict): the error said
    that no block ran through __call__, that the forward bypassed the hooks."""
    from stabilitycheck.errors import UserCodeError

    class Writes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, state: dict[str, torch.Tensor]) -> None:
            state["h"] = torch.tanh(self.lin(state["h"]))

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(Writes() for _ in range(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            state = {"h": x}
            for layer in self.layers:
                layer(state)
            return state["h"]

    model = Model()
    blocks = [(f"layers.{i}", b) for i, b in enumerate(model.layers)]
    with pytest.raises(
        UserCodeError,
        match=r"ran but returned no floating-point tensor \(layers.0, layers.1, layers.2: 3 of 3",
    ):
        probe_module(model, torch.randn(4, 8), lambda out, _: out.sum(), blocks=blocks)


@pytest.mark.parametrize("steps", [1, 2])
def test_watch_reads_a_block_returning_attention_then_h_on_h(steps: int) -> None:
    """watch read every block on its first tensor, the attention weights: their norms (at most the
    row count) and gradients said nothing of h, where a spike grows. The next block taking h as it
    came shows h is the chain, at the first step already; the last block follows its stack. Oracle:
    torch's norms of each h and of dL/dh on the same weights (lr 0) and batch."""
    from stabilitycheck import watch

    torch.manual_seed(5)
    layers = nn.ModuleList(AttnFirst() for _ in range(4))
    model, x, z = Stack(layers), torch.randn(8, 16), torch.randn(8, 16)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    blocks = [(f"layers.{i}", b) for i, b in enumerate(layers)]
    with watch(model, opt, blocks=blocks, flush_every=1, report=None) as w:
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = (model(x) * z).sum()
            w.loss(loss)
            loss.backward()
            opt.step()
        values = dict(zip(w.out.names, w.out.last_values, strict=True))
    seen: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda _m, _a, out: seen.append(out[1])) for layer in layers]
    loss = (model(x) * z).sum()
    for h in hooks:
        h.remove()
    grads = torch.autograd.grad(loss, seen)
    for i, (h, g) in enumerate(zip(seen, grads, strict=True)):
        assert values[("activation", f"layers.{i}")] == pytest.approx(h.norm().item(), rel=1e-6)
        assert values[("activation_grad", f"layers.{i}")] == pytest.approx(g.norm().item(), rel=1e-6)
