"""What the model is given and what its blocks return: in-place changes and the re-runs of a step,
inputs requiring grad or non-leaf, namedtuples, and block outputs of other types."""

from __future__ import annotations

import copy
import math
from collections import namedtuple
from typing import Any

import pytest
import torch
from chain_models import _grads_of
from probe_models import F64, _loss, _square_mean, _Tanhs
from torch import nn

from stabilitycheck.probing import probe_module
from stabilitycheck.rng import SALT_FORWARD, derived


class _WithSum(nn.Module):
    """A linear block returning (h, h.sum()): the chain is read on h."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.linear(x)
        return h, h.sum()


class ChangedAfter(nn.Module):
    """Three blocks whose output the model changes after the block returns, in place (`inplace`) or
    not, the same function either way: x 3 (`mul`), a ReLU (`relu`), or a tanh of h where each block
    returns (h, h.sum()) (`tuple`)."""

    def __init__(self, mode: str, inplace: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        block = _WithSum if mode == "tuple" else lambda: nn.Linear(8, 8, dtype=torch.float64)
        self.layers = nn.ModuleList(block() for _ in range(3))
        self.mode, self.inplace = mode, inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            if self.mode == "tuple":
                x = layer(x)[0]
                x = x.tanh_() if self.inplace else x.tanh()
            elif self.mode == "mul":
                x = layer(x)
                x = x.mul_(3.0) if self.inplace else x * 3.0
            else:
                x = nn.functional.relu(layer(x), inplace=self.inplace)
        return x


@pytest.mark.parametrize("mode", ["mul", "relu", "tuple"])
def test_a_block_output_changed_in_place_after_it_returned_is_measured_as_returned(mode: str) -> None:
    """Oracle: torch.autograd.grad on the block outputs of the same model computing out of place
    (the same function): ||dL/d output|| and ||output|| of each block as it returned. The probe read
    the changed tensor instead (the gradient of the changed values, the norm after the change): x3
    off per block and growth 5.0 for 1.67 under mul_(3), where dL/dh = 3 dL/d(3h)."""
    x = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(4)

    def loss_fn(out: torch.Tensor, _: object) -> torch.Tensor:
        return nn.functional.cross_entropy(out, labels)

    changed, twin = ChangedAfter(mode, inplace=True), ChangedAfter(mode, inplace=False)
    m = probe_module(changed, x, loss_fn, blocks=[(f"layers.{i}", b) for i, b in enumerate(changed.layers)])
    outs: list[torch.Tensor] = []

    def keep(mod: nn.Module, args: object, out: Any) -> None:
        outs.append(out[0] if isinstance(out, tuple) else out)

    hooks = [b.register_forward_hook(keep) for b in twin.layers]
    entry = x.clone().requires_grad_()
    loss = loss_fn(twin(entry), None)
    for h in hooks:
        h.remove()
    expect = [float(g.norm()) for g in torch.autograd.grad(loss, [entry, *outs])]
    assert m.loss[0] == pytest.approx(float(loss.detach()), rel=1e-12)
    assert m.activation_grad_norms == pytest.approx(expect, rel=1e-12)
    assert m.activation_norms == pytest.approx([float(t.detach().norm()) for t in [x, *outs]], rel=1e-12)
    assert m.growth == pytest.approx(expect[0] / expect[-1], rel=1e-12)
    with torch.no_grad():  # the model as it was
        assert float(loss_fn(changed(x), None)) == pytest.approx(float(loss.detach()), rel=1e-12)


class _Reshape(nn.Module):
    """A block returning a view of its input (shares its memory)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], -1)


class _Twice(_WithSum):
    """A linear block returning (h, h): the chain is read on the first, the model uses the second."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.linear(x)
        return h, h


class ChangedThroughAlias(nn.Module):
    """Models changing a block's output in place other than through the object the hook returns,
    in place (`inplace`) or not, the same function either way: `layers` is a flat Sequential of mixed
    modules (its blocks are Layers, whose hook runs in a hook of another module) whose output the
    model multiplies by 3; `view`: a block returns a view of the last output and the model applies a
    ReLU to that output (the view sees it); `twice`: blocks return (h, h) and the model multiplies
    the second by 3."""

    def __init__(self, mode: str, inplace: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        if mode == "layers":
            self.net = nn.Sequential(
                *(m for _ in range(2) for m in (nn.Linear(8, 8, dtype=torch.float64), nn.Tanh())),
                nn.Linear(8, 8, dtype=torch.float64),
            )
        elif mode == "view":
            self.l0, self.view, self.l1 = (
                nn.Linear(8, 8, dtype=torch.float64),
                _Reshape(),
                nn.Linear(8, 8, dtype=torch.float64),
            )
        else:
            self.layers = nn.ModuleList(_Twice() for _ in range(2))
        self.mode, self.inplace = mode, inplace

    def blocks(self) -> list[tuple[str, nn.Module]]:
        if self.mode == "layers":
            return []  # found: net's three layers
        if self.mode == "view":
            return [("l0", self.l0), ("view", self.view), ("l1", self.l1)]
        return [(f"layers.{i}", b) for i, b in enumerate(self.layers)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "layers":
            y = self.net(x)
            return y.mul_(3.0) if self.inplace else y * 3.0
        if self.mode == "view":
            h = self.l0(x)
            v = self.view(h)
            if self.inplace:
                h.relu_()
                return self.l1(v)
            return self.l1(v.relu())
        for layer in self.layers:
            h = layer(x)[1]
            x = h.mul_(3.0) if self.inplace else h * 3.0
        return x


@pytest.mark.parametrize("mode", ["layers", "view", "twice"])
def test_a_block_output_changed_in_place_through_an_alias_is_measured_as_returned(mode: str) -> None:
    """Oracle: torch.autograd.grad on the block outputs of the same model computing out of place (the
    same function), and the model's own loss. The re-run handed the model a copy of the output: a
    Layer block's hook (run by another module's hook) dropped it, x3 off on the last entry (0.49 for
    1.48); the copy of a view no longer saw its base's ReLU, another function (loss 2.10786 for the
    model's 2.10796, the view's gradient 0); the second of (h, h) kept the change, x3 off."""
    x = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(4)

    def loss_fn(out: torch.Tensor, _: object) -> torch.Tensor:
        return nn.functional.cross_entropy(out, labels)

    changed, twin = ChangedThroughAlias(mode, inplace=True), ChangedThroughAlias(mode, inplace=False)
    m = probe_module(changed, x, loss_fn, blocks=changed.blocks() or None)
    outs: list[torch.Tensor] = []
    if mode == "layers":  # a Layer's output: the next Linear's input; the last, the Sequential's output
        hooks = [twin.net[i].register_forward_pre_hook(lambda mod, a: outs.append(a[0])) for i in (2, 4)]
        hooks.append(twin.net.register_forward_hook(lambda mod, a, out: outs.append(out)))
    else:
        hooks = [
            b.register_forward_hook(
                lambda mod, a, out: outs.append(out[0] if isinstance(out, tuple) else out)
            )
            for _, b in twin.blocks()
        ]
    entry = x.clone().requires_grad_()
    loss = loss_fn(twin(entry), None)
    for h in hooks:
        h.remove()
    expect = [float(g.norm()) for g in torch.autograd.grad(loss, [entry, *outs])]
    with torch.no_grad():  # the model as it is
        assert float(loss_fn(changed(x), None)) == pytest.approx(float(loss.detach()), rel=1e-12)
    assert m.loss[0] == pytest.approx(float(loss.detach()), rel=1e-12)
    assert m.activation_grad_norms == pytest.approx(expect, rel=1e-12)
    assert m.activation_norms == pytest.approx([float(t.detach().norm()) for t in [x, *outs]], rel=1e-12)


class NormedChangedAfter(nn.Module):
    """Blocks of a spectral-normed Linear and a BatchNorm, whose forward updates buffers (the power
    iteration's vectors, the running statistics), each output then put through a leaky ReLU in place
    (`inplace`) or not (the same function)."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(
            nn.Sequential(
                nn.utils.parametrizations.spectral_norm(nn.Linear(8, 8, dtype=torch.float64)),
                nn.BatchNorm1d(8, dtype=torch.float64),
            )
            for _ in range(3)
        )
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = nn.functional.leaky_relu(layer(x), 0.2, inplace=self.inplace)
        return x


def test_the_re_run_of_a_step_starts_from_the_buffers_the_step_started_from() -> None:
    """Oracle: plain torch training of the out-of-place twin (SGD, a backward per step), its losses,
    dL/d(block output) at step 0 and its buffers after as many forwards. The re-run for an output
    changed in place ran the power iteration and the running statistics a second time: step 0's loss
    2.80785917 for 2.80785910, step 2's 2.099637 for 2.099642, ||dL/d input|| 0.1606679 for
    0.1606682, the running statistics updated 4 times in 3 steps."""
    x = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(4)

    def loss_fn(out: torch.Tensor, _: object) -> torch.Tensor:
        return nn.functional.cross_entropy(out, labels)

    changed, twin = NormedChangedAfter(inplace=True), NormedChangedAfter(inplace=False)
    blocks = [(f"layers.{i}", b) for i, b in enumerate(changed.layers)]
    m = probe_module(changed, x, loss_fn, blocks=blocks, steps=2, lr=0.1)
    outs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda mod, a, out: outs.append(out)) for b in twin.layers]
    opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    losses, expect = [], []
    for step in range(3):
        entry = x.clone().requires_grad_()
        loss = loss_fn(twin(entry), None)
        losses.append(float(loss.detach()))
        if step == 0:
            for h in hooks:
                h.remove()
            expect = [float(g.norm()) for g in torch.autograd.grad(loss, [entry, *outs], retain_graph=True)]
        opt.zero_grad()
        loss.backward()
        if step < 2:
            opt.step()
    assert m.loss == pytest.approx(losses, rel=1e-12)
    assert m.activation_grad_norms == pytest.approx(expect, rel=1e-12)
    for (name, mine), (_, theirs) in zip(changed.named_buffers(), twin.named_buffers(), strict=True):
        assert torch.equal(mine, theirs), name


def test_a_lazy_module_is_probed_before_its_first_forward() -> None:
    """Oracle: the same model (built again) run by torch, its loss and total gradient norm. Copying
    the buffers before step 0's forward (for a re-run) raised on a lazy BatchNorm's uninitialized
    ones."""

    def lazy() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Linear(8, 8, dtype=torch.float64),
            nn.LazyBatchNorm1d(dtype=torch.float64),
            nn.Linear(8, 4, dtype=torch.float64),
        )

    model, twin = lazy(), lazy()
    x = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(4)

    def loss_fn(out: torch.Tensor, _: object) -> torch.Tensor:
        return nn.functional.cross_entropy(out, labels)

    m = probe_module(model, x, loss_fn)
    loss = loss_fn(twin(x), None)
    loss.backward()
    total = math.sqrt(sum(float(p.grad.norm()) ** 2 for p in twin.parameters() if p.grad is not None))
    assert m.loss[0] == pytest.approx(float(loss.detach()), rel=1e-12)
    assert m.grad_norm[0] == pytest.approx(total, rel=1e-12)


def test_block_0_modifying_its_input_in_place_runs_and_has_no_input_side() -> None:
    """An in-place op on block 0's input must not raise (it would on a leaf that requires grad), and
    dL/d of a tensor changed in place is not dL/d input: no (input) entry then."""
    torch.manual_seed(0)
    relu_in_place = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(4, 4))
    model = nn.Sequential(relu_in_place, nn.Sequential(nn.ReLU(), nn.Linear(4, 4)))
    blocks = [("a", model[0]), ("b", model[1])]
    m = probe_module(model, torch.randn(3, 4), lambda o, _: o.square().mean(), blocks=blocks)
    assert m.activation_names == ("a", "b") and len(m.gains) == 1
    relu_in_place[0] = nn.ReLU()
    m = probe_module(model, torch.randn(3, 4), lambda o, _: o.square().mean(), blocks=blocks)
    assert m.activation_names == ("(input)", "a", "b") and len(m.gains) == 2


class Returns(nn.Module):
    """tanh(W x) returned inside a dict (an MoE layer's {"hidden": h, "aux": loss}) or as (None, h)."""

    def __init__(self, packing: str) -> None:
        super().__init__()
        self.lin, self.packing = nn.Linear(6, 6), packing

    def forward(self, x: torch.Tensor) -> object:
        h = torch.tanh(self.lin(x))
        if self.packing == "dict":  # a scalar listed first: not the output (a reviewer's case)
            return {"aux": self.lin.weight.pow(2).sum(), "hidden": h}
        return (None, h)


class Unpacks(nn.Module):
    def __init__(self, packing: str) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Returns(packing) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            out = block(x)
            x = out["hidden"] if isinstance(out, dict) else out[1]
        return x


@pytest.mark.parametrize("packing", ["dict", "tuple"])
def test_blocks_returning_a_dict_or_none_first_are_measured(packing: str) -> None:
    """Only element 0 of a tuple was taken as a block's output: a block returning a dict or (None, h)
    recorded nothing, its numbers read 0 and a fault in it was named elsewhere (found by a trial).
    Oracle: torch's gradients of the same outputs (retain_grad)."""
    torch.manual_seed(0)
    model, x = Unpacks(packing), torch.randn(4, 6)
    m = probe_module(model, x, lambda out, _: out.pow(2).sum())
    kept: list[torch.Tensor] = []

    def keep(module: nn.Module, args: object, out: object) -> None:
        h = out["hidden"] if isinstance(out, dict) else out[1]  # type: ignore[index,call-overload]
        h.retain_grad()
        kept.append(h)

    handles = [b.register_forward_hook(keep) for b in model.blocks]
    model(x).pow(2).sum().backward()
    for h in handles:
        h.remove()
    assert m.activation_names == ("(input)", "blocks.0", "blocks.1", "blocks.2")
    assert m.activation_grad_norms[1:] == pytest.approx([float(h.grad.norm()) for h in kept], rel=1e-6)
    assert m.activation_norms[1:] == pytest.approx([float(h.detach().norm()) for h in kept], rel=1e-6)


def test_a_block_returning_integer_codes_is_not_measured_and_does_not_crash() -> None:
    """A block returning a bare integer tensor (a quantiser's codes) raised torch's RuntimeError from
    the fused norm (a reviewer's case): an integer output has no gradient, so it is no chain output."""

    class Codes(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x > 0).long()

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
            self.codes = Codes()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                x = torch.tanh(block(x))
            return x * (1 + self.codes(x).sum())

    model = Model()
    blocks = [("blocks.0", model.blocks[0]), ("codes", model.codes), ("blocks.1", model.blocks[1])]
    m = probe_module(model, torch.randn(3, 4), lambda out, _: out.sum(), blocks=blocks)
    assert "codes" not in m.activation_names and m.first_nonfinite is None


def test_a_block_returning_h_and_attention_of_the_inputs_shape_is_read_on_h() -> None:
    """A block widening 8 -> 16 returns (h, attention) with the attention (B, T, T) at T = 8, the
    input's shape: a rule preferring the input's shape read the attention (a reviewer's case). The
    first non-scalar floating tensor is the output. Oracle: torch's gradient of h."""

    class Widen(nn.Module):
        def __init__(self, d_in: int) -> None:
            super().__init__()
            self.lin = nn.Linear(d_in, 16)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = torch.tanh(self.lin(x))
            return h, torch.softmax(h @ h.transpose(1, 2), -1)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([Widen(8), Widen(16)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                x = block(x)[0]
            return x

    torch.manual_seed(0)
    model, x = Model(), torch.randn(2, 8, 8)
    m = probe_module(model, x, lambda o, _: o.square().sum())
    hs: list[torch.Tensor] = []
    handles = [b.register_forward_hook(lambda mod, i, out: hs.append(out[0])) for b in model.blocks]
    loss = model(x).square().sum()
    for h in handles:
        h.remove()
    norms = [float(g.norm()) for g in torch.autograd.grad(loss, hs)]
    assert m.activation_grad_norms[1:] == pytest.approx(norms, rel=1e-5)


class _MarksItsInput(nn.Module):
    """As Hugging Face's wav2vec2 feature encoder in training: sets requires_grad on a view of its
    raw input (torch allows it on a leaf alone), then a conv and a stack of tanh layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 8, 5, stride=2, dtype=torch.float64)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(8, 8, dtype=torch.float64), nn.Tanh()) for _ in range(3)
        )
        self.head = nn.Linear(8, 4, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x[:, None]
        h.requires_grad = True
        h = self.conv(h).transpose(1, 2)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)  # type: ignore[no-any-return]


def test_a_model_setting_requires_grad_on_its_input_is_probed_on_the_input_as_given() -> None:
    """The probe's copy of a float input (in a graph, not a leaf) made `h.requires_grad = True` on a
    view of it raise (found by a third-party audit: Hugging Face's wav2vec2, HuBERT and WavLM in
    training could not be probed); the step runs again on the input as given. Oracle: torch's
    gradients of each layer's output."""
    torch.manual_seed(0)
    model = _MarksItsInput()
    x = torch.randn(2, 64, dtype=torch.float64)
    loss = lambda o, _: o.square().sum()  # noqa: E731
    m = probe_module(model, x, loss)
    outs: list[torch.Tensor] = []
    handles = [layer.register_forward_hook(lambda _m, _a, o: outs.append(o)) for layer in model.layers]
    grads = torch.autograd.grad(loss(model(x), x), outs)
    for handle in handles:
        handle.remove()
    assert m.activation_names == ("(input)", "layers.0", "layers.1", "layers.2")
    assert m.activation_grad_norms[1:] == pytest.approx([g.norm().item() for g in grads], rel=1e-12)


class _InPlaceFirst(nn.Module):
    """A block changing its input in place before its layer (x.mul_(3)), or returning it as it came."""

    def __init__(self, identity: bool) -> None:
        super().__init__()
        self.identity, self.lin = identity, nn.Linear(8, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.identity else self.lin(x.mul_(3.0))


@pytest.mark.parametrize(("stem", "identity"), [(True, False), (False, False), (True, True)])
def test_block_0_changing_its_input_in_place_computes_what_the_model_does(stem: bool, identity: bool) -> None:
    """Block 0 gets a copy of its input; a model that then changes that copy in place (block 0's
    x.mul_(3), or y.mul_(3) on block 0's output returned as it came) and reads its input again (a skip
    y + h) computed another model under the probe: loss 10.5 for 66.6 (the skip read h unchanged).
    Such a step is run again without the copy, as the model runs it, with no `(input)`. Oracle: a plain
    torch forward and backward on a copy of the model, float64."""
    torch.manual_seed(0)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Linear(8, 8, bias=False)
            self.blocks = nn.ModuleList(
                [_InPlaceFirst(identity), nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False)]
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.stem(x) if stem else x
            y = self.blocks[0](h)
            if identity:
                y.mul_(3.0)
            for block in self.blocks[1:]:
                y = block(y)
            return y + h

    model = Model().double()
    x = torch.randn(4, 8, dtype=torch.float64)
    plain = copy.deepcopy(model)
    loss = plain(x.clone()).square().sum()
    loss.backward()
    norm = float(
        torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for p in plain.parameters() if p.grad is not None])
        )
    )
    blocks = [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)]
    m = probe_module(model, x, lambda o, _: o.square().sum(), blocks=blocks)
    assert m.loss[0] == pytest.approx(float(loss.detach()), rel=1e-12)
    assert m.grad_norm[0] == pytest.approx(norm, rel=1e-12)
    assert m.activation_names[0] == "blocks.0"


class _PassThrough(nn.Module):
    """Returns its input itself: the same tensor is the previous block's output and its own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_an_input_requiring_grad_keeps_its_grad_and_a_block_returning_its_input_has_gain_one() -> None:
    """A user's input that already requires grad (and holds a .grad) is a recorded output of its own:
    it keeps its .grad, and dL/dx is read afresh, not added to it. A block returning its input
    records the same tensor twice, each with its whole gradient: gain exactly 1 (the identity's
    Jacobian). Oracle: torch.autograd.grad on the same model and input."""
    torch.manual_seed(0)
    model = _Tanhs()
    layers = model.layers
    layers.insert(1, _PassThrough())
    x = torch.randn(4, 8, requires_grad=True)
    x.grad = torch.full_like(x, 7.0)
    m = probe_module(model, x, _square_mean)
    assert torch.equal(x.grad, torch.full_like(x, 7.0))
    h0 = layers[0](x)
    out = layers[2](h0)
    dx, dh0, dout = torch.autograd.grad(_square_mean(out, None), [x, h0, out])
    norms = [float(g.norm()) for g in (dx, dh0, dh0, dout)]
    assert m.activation_names == ("(input)", "layers.0", "layers.1", "layers.2")
    assert m.activation_grad_norms == pytest.approx(norms, rel=1e-6)
    assert m.gains[1] == 1.0


def test_a_non_leaf_input_requiring_grad_leaves_the_graph_it_came_from_as_it_was() -> None:
    """An input that is another module's output (an encoder's, probing the decoder) is a recorded
    output the probe differentiates to, not through: the graph behind it is not the probe's. It can
    be probed again (another seed, another decoder), the caller can still backpropagate through it
    afterwards, and it is left without retain_grad. Oracle: torch.autograd.grad."""
    torch.manual_seed(0)
    encoder = nn.Linear(8, 8)
    x = encoder(torch.randn(4, 8))
    decoder = _Tanhs()
    first = probe_module(decoder, x, _square_mean)
    again = probe_module(decoder, x, _square_mean, seed=1)
    assert not x.retains_grad
    (dx,) = torch.autograd.grad(_square_mean(decoder(x), None), [x], retain_graph=True)
    assert first.activation_grad_norms[0] == pytest.approx(float(dx.norm()), rel=1e-6)
    assert again.activation_grad_norms == first.activation_grad_norms
    _square_mean(decoder(x), None).backward()  # the caller's own backward, through the encoder
    assert encoder.weight.grad is not None


def test_a_non_leaf_input_holding_a_retained_grad_reads_dl_dx_afresh() -> None:
    """A non-leaf input the caller made retain its gradient, holding one from an earlier backward:
    dL/dx is this loss's, not added to what the input held."""
    torch.manual_seed(0)
    x = torch.randn(4, 8, requires_grad=True) * 1.0
    x.retain_grad()
    (x * 5.0).sum().backward(retain_graph=True)  # x.grad is 5 everywhere
    model = _Tanhs()
    m = probe_module(model, x, _square_mean)
    (dx,) = torch.autograd.grad(_square_mean(model(x), None), [x])
    assert m.activation_grad_norms[0] == pytest.approx(float(dx.norm()), rel=1e-6)


def test_a_nan_step_is_located_when_the_input_is_a_non_leaf_requiring_grad() -> None:
    """The float64 re-run that names a NaN's block backpropagates the step a second time: the graph
    behind a non-leaf input must have survived the first pass."""

    class Poison(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x) * math.inf

    torch.manual_seed(0)
    x = nn.Linear(8, 8)(torch.randn(4, 8))
    model = nn.Sequential(nn.Sequential(nn.Linear(8, 8), nn.Tanh()), Poison(), nn.Linear(8, 8))
    blocks = [(str(i), block) for i, block in enumerate(model)]
    m = probe_module(model, x, _square_mean, blocks=blocks)
    assert m.first_nonfinite is not None
    assert (m.first_nonfinite.layer, m.first_nonfinite.tensor) == ("1", "activation")


_Pair = namedtuple("_Pair", "x shift")


class _Shifted(nn.Module):
    """_Tanhs on x, then + shift: called with a namedtuple's fields as its arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _Tanhs()

    def forward(self, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return self.body(x) + shift


def test_a_namedtuple_of_inputs_is_probed() -> None:
    """Inputs given as a namedtuple (a tuple: its fields are the model's arguments) are probed as
    a plain tuple of the same tensors is, also where a NaN in them is located by the float64 re-run
    (which walks the inputs: rebuilding the namedtuple from one iterable raised TypeError)."""
    torch.manual_seed(0)
    model = _Shifted()
    x, shift = torch.randn(4, 8), torch.randn(4, 8)
    named = probe_module(model, _Pair(x, shift), _square_mean)
    plain = probe_module(model, (x, shift), _square_mean)
    assert named.grad_norm == plain.grad_norm
    assert named.activation_grad_norms == plain.activation_grad_norms
    shift[0, 0] = math.nan
    named = probe_module(model, _Pair(x, shift), _square_mean)
    plain = probe_module(model, (x, shift), _square_mean)
    assert named.first_nonfinite is not None and plain.first_nonfinite is not None
    assert named.first_nonfinite.describe() == plain.first_nonfinite.describe()


class _HeldInput(nn.Module):
    """Its blocks run on a tensor it holds (set by the caller, e.g. an encoder's output), scaled by
    its input."""

    def __init__(self, held: torch.Tensor) -> None:
        super().__init__()
        self.held = held
        self.body = _Tanhs()

    def forward(self, scale: torch.Tensor) -> torch.Tensor:
        return self.body(self.held) * scale


def test_a_block_input_requiring_grad_held_by_the_model_leaves_the_graph_it_came_from_as_it_was() -> None:
    """Block 0's input is not among the inputs given but a non-leaf requiring grad that the model
    holds: it is the chain's entry all the same, and the graph behind it is the caller's, so the
    caller can backpropagate through it after the probe. Oracle: torch.autograd.grad."""
    torch.manual_seed(0)
    encoder = nn.Linear(8, 8)
    held = encoder(torch.randn(4, 8))
    model = _HeldInput(held)
    scale = torch.ones(4, 1)
    m = probe_module(model, scale, _square_mean, blocks=[("body.layers.0", model.body.layers[0])])
    (dx,) = torch.autograd.grad(_square_mean(model(scale), None), [held], retain_graph=True)
    assert m.activation_grad_norms[0] == pytest.approx(float(dx.norm()), rel=1e-6)
    held.sum().backward()  # the caller's own backward, through the encoder
    assert encoder.weight.grad is not None


def test_a_non_leaf_input_made_in_another_thread_leaves_the_graph_it_came_from_as_it_was() -> None:
    """A caller's non-leaf made in one thread and probed in another (autograd counts its nodes per
    thread) is left as it was: the probe differentiates to it, not through it. Oracle: the caller's
    own backward through it afterwards."""
    import threading

    torch.manual_seed(0)
    w = torch.randn(8, requires_grad=True)
    for _ in range(100):
        w * 1.0  # nodes made by this thread before the caller's tensor
    encoder = nn.Linear(8, 8)
    x = encoder(torch.randn(4, 8))
    errors: list[BaseException] = []

    def probe() -> None:
        try:
            probe_module(_Tanhs(), x, _square_mean)
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    assert not errors
    x.sum().backward()  # the caller's own backward, through the encoder
    assert encoder.weight.grad is not None


class _Remembering(nn.Module):
    """A block (nn.Identity, a norm left out) on its second input, a memory the caller computed."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.norm = nn.Identity()

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.a(x)) + self.norm(memory)


def test_a_block_returning_a_non_leaf_input_leaves_the_graph_it_came_from_as_it_was() -> None:
    """A block's output can be the caller's non-leaf itself (nn.Identity on an input that is not
    block 0's): it is a recorded output, which the probe differentiates to, not through. Oracle: the
    caller's own backward, and torch.autograd.grad."""
    torch.manual_seed(0)
    encoder = nn.Linear(8, 8)
    memory = encoder(torch.randn(4, 8))
    model, x = _Remembering(), torch.randn(4, 8)
    m = probe_module(model, (x, memory), _square_mean, blocks=[("a", model.a), ("norm", model.norm)])
    (dm,) = torch.autograd.grad(_square_mean(model(x, memory), None), [memory], retain_graph=True)
    assert m.activation_grad_norms[-1] == pytest.approx(float(dm.norm()), rel=1e-6)
    memory.sum().backward()  # the caller's own backward, through the encoder
    assert encoder.weight.grad is not None


def test_a_loss_reads_the_inputs_as_the_model_left_them() -> None:
    """A model normalising its input in place (x.sub_(mean).div_(std)) and a loss reading the inputs
    (an autoencoder's): a plain step's loss reads them normalised. The probe's step 0 gave the model a
    copy and the loss the inputs as they came: loss 4010 for torch's 119, every gradient off."""
    torch.manual_seed(0)
    layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(4))

    class Normalising(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = layers

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x.sub_(x.mean()).div_(x.std())
            for layer in self.layers:
                x = layer(x)
            return x

    def loss_fn(out: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        return ((out - inputs) ** 2).sum()

    model, x = Normalising(), 5.0 + 3.0 * torch.randn(16, 8)
    mine = x.clone()
    seen: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda _m, _a, out: seen.append(out)) for layer in layers]
    loss = loss_fn(model(mine), mine)
    for h in hooks:
        h.remove()
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, [*seen, *params])
    m = probe_module(model, x.clone(), loss_fn, blocks=[(f"layers.{i}", b) for i, b in enumerate(layers)])
    assert m.loss[0] == pytest.approx(loss.item(), rel=1e-5)
    assert m.grad_norm[0] == pytest.approx(torch.stack([g.norm() for g in grads[4:]]).norm().item(), rel=1e-5)
    assert list(m.activation_grad_norms[1:]) == pytest.approx([g.norm().item() for g in grads[:4]], rel=1e-5)


class _InPlaceAfter(nn.Module):
    """Linear blocks; the output of block `k` is multiplied by 3 in place after the block returns it."""

    def __init__(self, k: int, depth: int = 3, width: int = 6) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.layers = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(depth))
        for layer in self.layers:
            with torch.no_grad():
                layer.weight.copy_(torch.randn(width, width, generator=g) / math.sqrt(width))
        self.k = k

    def forward(self, x: torch.Tensor, keep: list | None = None) -> torch.Tensor:
        h = x
        for i, layer in enumerate(self.layers):
            z = layer(h)
            if keep is not None:  # the oracle: out of place, dL/d(output as returned)
                z.retain_grad()
                keep.append(z)
                h = torch.tanh(z * 3 if i == self.k else z)
            else:
                if i == self.k:
                    z.mul_(3)
                h = torch.tanh(z)
        return h


@pytest.mark.parametrize("k", [0, 1])
def test_a_block_output_changed_in_place_after_its_block_reads_the_gradient_as_returned(k: int) -> None:
    model = _InPlaceAfter(k)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    keep: list[torch.Tensor] = []
    xr = x.clone().requires_grad_()
    _loss(model(xr, keep), None).backward()
    want = [xr.grad.double().norm().item(), *(z.grad.double().norm().item() for z in keep)]
    m = probe_module(model, x, _loss, blocks=[(f"layers.{i}", layer) for i, layer in enumerate(model.layers)])
    assert list(m.activation_grad_norms) == pytest.approx(want, rel=1e-5, abs=0)


def _square(out: torch.Tensor, _: object) -> torch.Tensor:
    return out.square().sum()


class _MarksItsInputAfterDrawing(nn.Module):
    """As Hugging Face's wav2vec2 feature encoder in training (it sets requires_grad on a view of its
    raw input, which torch allows on a leaf alone, so the probe's in-graph copy makes it raise), but
    before that line it draws noise from torch's generator and updates two buffers, one in place and
    one re-assigned: the failed forward has drawn and counted once already."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(1, 8, 5, stride=2, dtype=F64)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8, dtype=F64), nn.Tanh()) for _ in range(3))
        self.register_buffer("seen", torch.zeros((), dtype=F64))
        self.register_buffer("kept", torch.zeros((), dtype=F64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise = torch.randn_like(x)
        self.seen.add_(1.0)
        self.kept = self.kept + 1.0
        h = x[:, None]
        h.requires_grad = True
        h = self.conv(h * (1 + 0.5 * noise[:, None]) * self.seen * self.kept).transpose(1, 2)
        for layer in self.layers:
            h = layer(h)
        return h


def test_the_rerun_on_the_inputs_as_given_draws_and_counts_as_the_failed_forward_would_have() -> None:
    """The step runs again on the inputs as given 'random state and buffers restored' (the commit and
    probestep.run_step): the re-run must be the model's one forward. Oracle: a twin built the same way,
    run once by torch from the probe's seed, its loss and dL/d each layer's output; and the buffers
    after the probe, one forward's worth (1, not 2)."""
    x = torch.randn(2, 16, dtype=F64, generator=torch.Generator().manual_seed(1))
    model, twin = _MarksItsInputAfterDrawing(), _MarksItsInputAfterDrawing()
    blocks = [(f"layers.{i}", b) for i, b in enumerate(model.layers)]
    m = probe_module(model, x, _square, blocks=blocks, seed=3)
    torch.manual_seed(derived(3, SALT_FORWARD))  # the forward's own stream (rng.derived)
    loss: list[torch.Tensor] = []

    def run() -> torch.Tensor:
        loss.append(_square(twin(x), None))
        return loss[0]

    expect = _grads_of(list(twin.layers), run)
    assert m.activation_names == ("(input)", "layers.0", "layers.1", "layers.2")
    assert m.loss[0] == pytest.approx(float(loss[0].detach()), rel=1e-12)
    assert m.activation_grad_norms[1:] == pytest.approx(expect, rel=1e-12)
    assert float(model.seen) == 1.0
    assert float(model.kept) == 1.0


class _TanhLayers(nn.Module):
    """Three tanh layers, float64."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(8, 8, dtype=F64) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def test_an_input_that_requires_grad_is_given_to_the_model_as_it_is() -> None:
    """probestep._in_graph copies each floating input 'that does not require grad'; one that does is the
    caller's own, which a loss may differentiate against (a gradient penalty on the inputs, as WGAN-GP
    writes it): given a copy, the model's output was no function of it and torch.autograd.grad
    raised. Oracle: torch's loss and dL/d each layer's output for the same penalty."""
    model = _TanhLayers()
    x = torch.randn(4, 8, dtype=F64, generator=torch.Generator().manual_seed(2)).requires_grad_()

    def penalised(out: torch.Tensor, given: torch.Tensor) -> torch.Tensor:
        (slope,) = torch.autograd.grad(out.sum(), given, create_graph=True)
        return out.square().sum() + slope.square().sum()

    blocks = [(f"layers.{i}", b) for i, b in enumerate(model.layers)]
    m = probe_module(model, x, penalised, blocks=blocks)
    loss: list[torch.Tensor] = []

    def run() -> torch.Tensor:
        loss.append(penalised(model(x), x))
        return loss[0]

    expect = _grads_of(list(model.layers), run)
    assert m.loss[0] == pytest.approx(float(loss[0].detach()), rel=1e-12)
    assert m.activation_grad_norms[1:] == pytest.approx(expect, rel=1e-12)


class _MarksItsInputAndChangesOutputs(nn.Module):
    """Sets requires_grad on a view of its raw input (as wav2vec2 in training), and puts each layer's
    output through an in-place leaky ReLU after the layer returned it: the step runs again on the
    inputs as given, then again for the outputs changed in place."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(1, 8, 5, stride=2, dtype=F64)
        self.layers = nn.ModuleList(nn.Linear(8, 8, dtype=F64) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x[:, None]
        h.requires_grad = True
        h = self.conv(h).transpose(1, 2)
        for layer in self.layers:
            h = nn.functional.leaky_relu(layer(h), 0.2, inplace=True)
        return h


def test_outputs_changed_in_place_by_a_model_marking_its_input_are_read_as_returned() -> None:
    """Both re-runs of run_step at once: the one on the inputs as given (the model refuses the probe's
    copy) and the one for outputs changed in place, which must stay on the inputs as given. Oracle:
    torch's dL/d each layer's output as the layer returned it (retain_grad before the in-place ReLU)."""
    x = torch.randn(2, 16, dtype=F64, generator=torch.Generator().manual_seed(1))
    model = _MarksItsInputAndChangesOutputs()
    blocks = [(f"layers.{i}", b) for i, b in enumerate(model.layers)]
    m = probe_module(model, x, _square, blocks=blocks)
    outs: list[torch.Tensor] = []

    def kept(_m: nn.Module, _a: object, out: torch.Tensor) -> torch.Tensor:
        outs.append(out)  # as the layer returned it; the model changes the copy in place after
        return out * 1.0

    handles = [b.register_forward_hook(kept) for b in model.layers]
    loss = _square(model(x), None)
    for handle in handles:
        handle.remove()
    expect = [float(g.norm()) for g in torch.autograd.grad(loss, outs)]
    assert m.activation_names == ("(input)", "layers.0", "layers.1", "layers.2")
    assert m.activation_grad_norms[1:] == pytest.approx(expect, rel=1e-12)


class _DoublesWhenAsked(nn.Module):
    """A block that, asked to, doubles its input in place before its layer."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8, dtype=F64)

    def forward(self, x: torch.Tensor, double: bool) -> torch.Tensor:
        if double:
            x.mul_(2.0)
        return torch.tanh(self.lin(x))


class _CalledAgainOnAnotherInput(nn.Module):
    """Block 0 called a second time, on another tensor (z), which it doubles in place; the model
    reads z afterwards, doubled."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block, self.other = _DoublesWhenAsked(), _DoublesWhenAsked()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.block(x, False) + 1.0
        return self.other(self.block(z, True), False) + z  # type: ignore[no-any-return]


def test_only_calls_of_block_0_on_its_first_input_get_a_copy() -> None:
    """Recorder: until release, 'every call of block 0 on that same input' gets a copy; a call on
    another tensor gets that tensor, so what the block does to it in place the model sees, as without
    the probe. Oracle: the model's own loss, computed by torch."""
    x = torch.randn(4, 8, dtype=F64, generator=torch.Generator().manual_seed(3))
    model = _CalledAgainOnAnotherInput()
    m = probe_module(model, x, _square, blocks=[("block", model.block), ("other", model.other)])
    assert m.activation_names == ("(input)", "block[0]", "block[1]", "other")
    assert m.loss[0] == pytest.approx(float(_square(model(x.clone()), None).detach()), rel=1e-12)


class _DoubledInPlace(nn.Module):
    """Three float64 Linears, each output doubled in place after its block returned (the probe then
    runs the forward again, its buffers restored), plus a buffer made in inference mode or not."""

    def __init__(self, inference: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Linear(8, 8, dtype=torch.float64) for _ in range(3))
        with torch.inference_mode(inference):
            shift = torch.full((8,), 0.1, dtype=torch.float64)
        self.register_buffer("shift", shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            h = block(x)
            h.mul_(2.0)
            x = torch.tanh(h + self.shift)
        return x


def test_an_inference_tensor_buffer_is_left_alone_when_the_probe_runs_the_forward_again() -> None:
    """probestep._buffers: an inference tensor, which no forward outside inference mode can update, is
    not kept for `_restore` (copying into it there raises). Oracle: the same model with the buffer an
    ordinary tensor, the same values, reads the same gains and growth."""
    x = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    read = []
    for inference in (True, False):
        model = _DoubledInPlace(inference)
        assert model.shift.is_inference() is inference
        blocks = [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)]
        m = probe_module(model, x, lambda out, _: out.square().sum(), blocks=blocks)
        read.append((m.gains, m.growth))
    assert read[0] == read[1]


class _PackedLSTMs(nn.Module):
    """Three nn.LSTMs over a PackedSequence, then a head on the padded output."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.LSTM(8, 8, dtype=F64) for _ in range(3))
        self.head = nn.Linear(8, 5, dtype=F64)

    def forward(self, packed: nn.utils.rnn.PackedSequence) -> torch.Tensor:
        for layer in self.layers:
            packed, _ = layer(packed)
        return self.head(nn.utils.rnn.pad_packed_sequence(packed)[0])  # type: ignore[no-any-return]


def test_a_packed_sequence_given_as_the_inputs_is_one_argument() -> None:
    """A PackedSequence is a namedtuple: given as `inputs`, it was spread into the model's positional
    arguments (4 of them: TypeError), as another namedtuple's fields are (found by an audit). Oracle:
    torch's gradients of the same loss through the model called on it."""
    torch.manual_seed(0)
    model = _PackedLSTMs()
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(9, 3, 8, dtype=F64), torch.tensor([9, 6, 3]))
    loss = lambda out, _: out.square().sum()  # noqa: E731
    m = probe_module(model, packed, loss)
    model.zero_grad()
    loss(model(packed), packed).backward()
    want = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    assert m.grad_norm[0] == pytest.approx(want.item(), rel=1e-12)
    assert m.layer_names == ("layers.0", "layers.1", "layers.2")
