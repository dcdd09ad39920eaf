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


# ------------------------------------------------------------------ a review's cases: what the first
# version of the rule above read wrong (a tensor the call got, taken for one it did not make), each
# against torch.autograd.grad of the chain tensor


def probed_and_torch(
    model: nn.Module,
    x: Any,
    loss: Callable[[Any], torch.Tensor],
    layers: list[nn.Module],
    pick: Callable[[Any], torch.Tensor],
) -> tuple[list[float], list[float]]:
    """The probe's activation-gradient norms and torch's (the chain's input first, where a tensor)."""
    m = probe_module(
        model, x, lambda out, _: loss(out), blocks=[(f"layers.{i}", b) for i, b in enumerate(layers)]
    )
    leaf = x.clone().requires_grad_() if isinstance(x, torch.Tensor) else x
    return list(m.activation_grad_norms), chain_grads(model, leaf, loss, layers, pick)


def test_a_layer_handing_on_h_as_it_came_called_by_keyword_is_read_on_h() -> None:
    """Layers returning (h, attn), the odd ones skipped (h returned as it came), called as
    layer(h=h, mask=m), the attention in the loss: read on attn, growth 1419 for torch's 0.595."""
    torch.manual_seed(0)
    mask = (torch.rand(8, 16) > 0.1).float()

    class Layer(nn.Module):
        def __init__(self, i: int) -> None:
            super().__init__()
            self.lin, self.i = nn.Linear(16, 16), i

        def forward(self, h: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = h if self.i % 2 else torch.tanh(3 * self.lin(h) * mask)
            return y, torch.softmax(y[:, :4], -1)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(Layer(i) for i in range(8))

        def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            aux = torch.zeros(())
            for layer in self.layers:
                h, a = layer(h=h, mask=mask)
                aux = aux + (a * a.clamp_min(1e-6).log()).sum()
            return h, aux

    model, z = Model(), torch.randn(8, 16)
    got, want = probed_and_torch(
        model,
        torch.randn(8, 16),
        lambda o: (o[0] * z).sum() + 1e-3 * o[1],
        list(model.layers),
        lambda o: o[0],
    )
    assert got == pytest.approx(want[-len(got) :], rel=1e-5)


def test_a_residual_added_in_place_is_read_on_h() -> None:
    """h.add_(update); return h, attn: h is the argument the call got, changed in place."""
    torch.manual_seed(0)

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv, self.o = nn.Linear(16, 48), nn.Linear(16, 16)

        def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            q, k, v = self.qkv(h * 1.0).chunk(3, -1)  # a copy: h is changed in place below
            a = torch.softmax(q @ k.transpose(-1, -2) / 4, -1)
            h.add_(1.5 * self.o(a @ v))
            return h, a

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(Attn() for _ in range(6))

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                h, _ = layer(h * 1.0)
            return h

    model, z = Model(), torch.randn(2, 5, 16)
    got, want = probed_and_torch(
        model, torch.randn(2, 5, 16), lambda o: (o * z).sum(), list(model.layers), lambda o: o[0]
    )
    assert got[-len(want) + 1 :] == pytest.approx(want[1:], rel=1e-5)


def test_a_dataclass_state_handing_on_its_mask_is_read_on_h() -> None:
    """State(mask, h) passed from block to block, the mask as it came: every gradient read 0 and
    every block a chain of its own (growth 1.0 for torch's 54)."""

    @dataclasses.dataclass
    class State:
        mask: torch.Tensor
        h: torch.Tensor

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(16, 16)

        def forward(self, state: State) -> State:
            return State(state.mask, torch.tanh(2.5 * self.lin(state.h)) * state.mask)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(Layer() for _ in range(6))

        def forward(self, state: State) -> torch.Tensor:
            for layer in self.layers:
                state = layer(state)
            return state.h

    torch.manual_seed(6)
    model, z = Model(), torch.randn(8, 16)
    x = (State((torch.rand(8, 16) > 0.2).float(), torch.randn(8, 16)),)
    got, want = probed_and_torch(model, x, lambda o: (o * z).sum(), list(model.layers), lambda o: o.h)
    assert got == pytest.approx(want, rel=1e-5)


def test_an_attribute_dict_batch_reaches_the_loss_as_itself() -> None:
    """A loss reading batch.y of a dict subclass: the inputs as the forward left them were rebuilt as
    a plain dict, AttributeError."""

    class AttrDict(dict[str, torch.Tensor]):
        __getattr__ = dict.__getitem__

    torch.manual_seed(7)
    layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = layers

        def forward(self, batch: AttrDict) -> torch.Tensor:
            h = batch["x"]
            for layer in self.layers:
                h = torch.tanh(layer(h))
            return h

    batch, model = AttrDict(x=torch.randn(4, 8), y=torch.randn(4, 8)), Model()
    blocks = [(f"layers.{i}", b) for i, b in enumerate(layers)]
    m = probe_module(model, (batch,), lambda out, inp: ((out - inp[0].y) ** 2).mean(), blocks=blocks)
    assert m.loss[0] == pytest.approx(((model(batch) - batch.y) ** 2).mean().item(), rel=1e-6)


class Attention(nn.Module):
    """Self-attention returning (attention weights, h), h = x + o(attn @ v): h is made from the
    attention weights, as in every real layer (a graph walk from h finds them)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.o = nn.Linear(16, 48), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = self.qkv(x).chunk(3, -1)
        a = torch.softmax(q @ k.transpose(-1, -2) / 4, -1)
        return a, x + 1.5 * self.o(a @ v)


def test_real_attention_returning_its_weights_first_is_read_on_h() -> None:
    """h made from the attention weights: the next layer's input comes from both, and the weights,
    the tensor recorded, kept it (growth 1.008 for torch's 1.088). The next layer takes h as it came."""
    torch.manual_seed(8)
    layers = nn.ModuleList(Attention() for _ in range(4))
    model, z = Stack(layers), torch.randn(2, 5, 16)
    got, want = probed_and_torch(
        model, torch.randn(2, 5, 16), lambda o: (o * z).sum(), list(layers), lambda o: o[1]
    )
    assert got == pytest.approx(want, rel=1e-5)


def test_watch_of_a_model_returning_its_attentions_reads_the_last_layer_on_h() -> None:
    """The model returns (head(h), attentions), the last layer's weights in it as they came: watch
    read the last layer on them (|h| 17.2, watched 1.48). Oracle: torch's |h| per layer."""
    from stabilitycheck import watch

    torch.manual_seed(9)
    layers = nn.ModuleList(Attention() for _ in range(3))

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers, self.head = layers, nn.Linear(16, 16)

        def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
            attentions = []
            for layer in self.layers:
                a, h = layer(h)
                attentions.append(a)
            return self.head(h), attentions

    model, x, z = Model(), torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with watch(
        model, opt, blocks=[(f"layers.{i}", b) for i, b in enumerate(layers)], flush_every=1, report=None
    ) as w:
        opt.zero_grad()
        loss = (model(x)[0] * z).sum()
        w.loss(loss)
        loss.backward()
        opt.step()
        values = dict(zip(w.out.names, w.out.last_values, strict=True))
    seen: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda _m, _a, o: seen.append(o[1])) for layer in layers]
    model(x)
    for hook in hooks:
        hook.remove()
    assert [values[("activation", f"layers.{i}")] for i in range(3)] == pytest.approx(
        [h.norm().item() for h in seen], rel=1e-6
    )


def test_a_merge_after_a_switch_starts_a_chain() -> None:
    """Two towers of (attn, h) layers, the second of one, into one head: the switch to h skipped the
    merge check, a gain read across it. Oracle: the head a chain start, as where the towers return h alone."""
    torch.manual_seed(0)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.ModuleList(AttnFirst() for _ in range(3))
            self.b = nn.ModuleList([AttnFirst()])
            self.head = nn.ModuleList([nn.Linear(32, 16), nn.Linear(16, 16)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            ha, hb = x[:, :16], x[:, 16:]
            for layer in self.a:
                _, ha = layer(ha)
            for layer in self.b:
                _, hb = layer(hb)
            return self.head[1](torch.tanh(self.head[0](torch.cat([ha, hb], -1))))

    model = Model()
    blocks = [
        *[(f"a.{i}", b) for i, b in enumerate(model.a)],
        *[(f"b.{i}", b) for i, b in enumerate(model.b)],
        *[(f"head.{i}", b) for i, b in enumerate(model.head)],
    ]
    z = torch.randn(8, 16)
    m = probe_module(model, torch.randn(8, 32), lambda out, _: (out * z).sum(), blocks=blocks)
    assert "head.0" in [m.activation_names[i] for i in m.chain_starts]


def test_watch_of_a_loop_calling_forward_reads_each_step_alone() -> None:
    """A loop calling model.forward(x) runs none of the model's hooks: the last layer's first call
    waited to be shown its chain tensor into the next step (step 0 read 0, every later step x1.41).
    Oracle: torch's |h| and |dL/dh| of the last layer, per step, lr 0."""
    from stabilitycheck import watch

    torch.manual_seed(0)
    layers = nn.ModuleList(AttnFirst() for _ in range(3))
    model, z = Stack(layers), torch.randn(8, 16)
    xs = [torch.randn(8, 16) * (1 + 3 * i) for i in range(3)]
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    got = []
    with watch(
        model, opt, blocks=[(f"layers.{i}", b) for i, b in enumerate(layers)], flush_every=1, report=None
    ) as w:
        for x in xs:
            opt.zero_grad()
            loss = (model.forward(x) * z).sum()
            w.loss(loss)
            loss.backward()
            opt.step()
            v = dict(zip(w.out.names, w.out.last_values, strict=True))
            got.append(v[("activation", "layers.2")])
    seen: list[torch.Tensor] = []
    hook = layers[2].register_forward_hook(lambda _m, _a, o: seen.append(o[1]))
    for x in xs:
        model.forward(x)
    hook.remove()
    want = [h.norm().item() for h in seen]
    assert got == pytest.approx(want, rel=1e-6)
