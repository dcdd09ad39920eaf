"""The probe's hooks and the blocks it accepts: no hook, graph or reference left behind, other hooks,
checkpointing, torch.compile and torch.jit, and block lists refused as usage errors."""

from __future__ import annotations

import copy
import gc
import inspect
import io
import math
import os
import re
import subprocess
import sys
import warnings
import weakref
from typing import Any, ClassVar

import pytest
import torch
from probe_models import _square_mean, _Tanh, _Tanhs, build, scripted_tanh, zoo
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from stabilitycheck import chaining
from stabilitycheck.blocks import find_blocks
from stabilitycheck.config import Config
from stabilitycheck.errors import UsageError
from stabilitycheck.probing import probe_module
from stabilitycheck.subjects import resolve


@pytest.mark.parametrize("fails", [False, True])
def test_the_probe_leaves_no_hook_on_the_model(fails: bool) -> None:
    """The recorder's hooks (forward hooks on every block, block 0's input pre-hook) are gone after a
    probe, also one whose model raises before block 0 runs; a recurrent cell keeps its input side off
    (two same-shape arguments) and its 8 calls are all recorded. Oracle: the modules' own hook dicts."""
    rnn = resolve("rnn").build(Config.of("rnn", width=4, seq_len=8, batch_size=2))
    modules = [m for _, m in rnn.blocks]
    if fails:

        def refuse(module: nn.Module, args: object) -> None:
            raise ValueError("the user's model failed")

        handle = rnn.model.register_forward_pre_hook(refuse)
        with pytest.raises(ValueError, match="model failed"):
            probe_module(rnn.model, rnn.inputs, rnn.loss_fn, blocks=rnn.blocks)
        handle.remove()
    else:
        m = probe_module(rnn.model, rnn.inputs, rnn.loss_fn, blocks=rnn.blocks)
        assert m.activation_names == tuple(f"cell[{t}]" for t in range(8))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in modules)


@pytest.mark.parametrize(
    "config",
    [
        Config.of("mlp", depth=2, width=4, batch_size=2),
        Config.of("rnn", width=4, seq_len=4, batch_size=2),
        Config.of("transformer", depth=2, width=8, seq_len=4, batch_size=2),
    ],
    ids=["mlp", "rnn", "transformer"],
)
def test_a_probe_leaves_no_reference_cycle_for_the_collector(config: Config) -> None:
    """A probe's objects are freed as its call returns, none left in a reference cycle: each probe
    left 272 (the recorder and its hooks' closures) for the garbage collector, 0.1 ms of collections
    a call on a 16x256 MLP. Oracle: gc.DEBUG_SAVEALL, which keeps what a collection finds
    unreachable."""
    built = resolve(config.subject).build(config)
    probe_module(built.model, built.inputs, built.loss_fn, blocks=built.blocks)  # lazy imports, caches
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        probe_module(built.model, built.inputs, built.loss_fn, blocks=built.blocks)
        gc.collect()
        left = sorted({type(o).__qualname__ for o in gc.garbage if _ours(o)})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert left == []


def _ours(o: object) -> bool:
    """Whether a collected object is this package's: an instance of one of its classes, a function or
    frame of its code (a cycle another thread of the test process made, an xdist worker's, once showed
    up here)."""
    code = getattr(o, "__code__", None) or getattr(o, "f_code", None)
    where = getattr(code, "co_filename", "") if code is not None else ""
    return type(o).__module__.startswith("stabilitycheck") or f"{os.sep}stabilitycheck{os.sep}" in where


def test_steps_after_the_first_run_with_no_probe_hook_on_the_model() -> None:
    """Per-block numbers come from step 0 alone, so the later steps' forwards carry no hook of the
    probe (each cost ~10 us a block call). Oracle: the blocks' own hook dicts, read by the loss."""
    torch.manual_seed(0)
    model = nn.Sequential(_Tanh(), _Tanh())
    seen: list[int] = []

    def loss(out: torch.Tensor, _: object) -> torch.Tensor:
        seen.append(sum(len(b._forward_hooks) + len(b._forward_pre_hooks) for b in model))
        return out.square().mean()

    probe_module(model, torch.randn(3, 4), loss, steps=2)
    assert len(seen) == 3 and seen[0] > 0 and seen[1:] == [0, 0]


class _Keep(torch.autograd.Function):
    """The identity, whose backward node keeps a marker object alive as long as the node lives."""

    marks: ClassVar[list[weakref.ref[object]]] = []

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.mark = _Mark()
        _Keep.marks.append(weakref.ref(ctx.mark))
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


class _Mark:
    pass


class _Kept(_Tanh):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = _Keep.apply(super().forward(x))
        return out


def test_a_probe_keeps_no_autograd_graph_of_its_pass() -> None:
    """No autograd node of a probed pass outlives the probe (the junction test's nodes hold the pass's
    saved tensors), also where the loss raised with every block output recorded; a second probe gives
    the same numbers. Oracle: a marker held by each block output's node, dead once the probe
    returns; the first probe's measurement."""
    torch.manual_seed(0)
    model = nn.Sequential(_Kept(), _Kept(), _Kept())
    x = torch.randn(5, 4)

    def loss(out: torch.Tensor, _: object) -> torch.Tensor:
        return out.square().mean()

    def failing(out: torch.Tensor, _: object) -> torch.Tensor:
        raise ValueError("the loss failed")

    _Keep.marks.clear()
    first = probe_module(model, x, loss)
    assert probe_module(model, x, loss) == first
    with pytest.raises(ValueError, match="loss failed"):
        probe_module(model, x, failing)
    gc.collect()
    assert len(_Keep.marks) == 9 and all(mark() is None for mark in _Keep.marks)


@pytest.mark.parametrize("leaf", [True, False], ids=["model-is-its-block", "flat-sequential-layers"])
def test_a_probed_model_is_not_kept_alive_by_the_probe(leaf: bool) -> None:
    """The per-model layout cache holds its blocks weakly: a leaf model is its own block, and a flat
    Sequential's Layer blocks hold the Sequential, so a strong hold kept the model alive for good
    (found by review). Oracle: a weak reference to the model, dead after gc."""
    model = (
        nn.LSTM(8, 8, batch_first=True)
        if leaf
        else nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    )
    x = torch.randn(2, 3, 8) if leaf else torch.randn(2, 8)

    def loss(out: Any, _: object) -> torch.Tensor:
        out = out[0] if isinstance(out, tuple) else out
        return out.pow(2).mean()

    probe_module(model, x, loss)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_a_block_torch_cannot_hook_is_refused_in_one_line_and_leaves_no_hook() -> None:
    """A block that is a torch.jit.script module takes no forward hook: torch's RuntimeError left the
    hooks already put on the blocks before it on the user's model. Oracle: the modules' hook dicts,
    and the model still computes what it did."""
    torch.manual_seed(0)
    model = nn.Sequential(_Tanh(), _Tanh(), scripted_tanh())
    x = torch.randn(3, 4)
    before = model(x)
    with pytest.raises(UsageError, match=r"block '2' cannot be hooked .*TorchScript") as caught:
        probe_module(model, x, lambda o, _: o.square().mean())
    assert "\n" not in str(caught.value)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model[:2])
    assert torch.equal(model(x), before)


class _Checkpointed(nn.Module):
    """Three _Tanh blocks, each run under torch.utils.checkpoint (non-reentrant) when `saving`."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Tanh() for _ in range(3))
        self.saving = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = checkpoint(block, x, use_reentrant=False) if self.saving else block(x)
        return x


@pytest.mark.parametrize("steps", [0, 2])
def test_blocks_under_gradient_checkpointing_read_as_without_it(steps: int) -> None:
    """Block 0 under torch.utils.checkpoint taking the model's own input: the probe gave it a copy that
    requires grad, its recomputation in the backward got the input itself and saved fewer tensors
    (CheckpointError). Oracle: the same model and weights without checkpointing, and dL/d input
    from torch's own backward."""
    torch.manual_seed(0)
    model, x = _Checkpointed(), torch.randn(5, 4)
    before = copy.deepcopy(model.state_dict())

    def loss(o: torch.Tensor, _: object) -> torch.Tensor:
        return o.square().mean()

    saved = probe_module(model, x, loss, steps=steps)
    model.load_state_dict(before)
    model.saving = False
    plain = probe_module(model, x, loss, steps=steps)
    assert saved.activation_names == plain.activation_names == ("(input)", "layers.0", "layers.1", "layers.2")
    for field in ("activation_grad_norms", "gains", "layer_grad_norms", "grad_norm", "loss"):
        assert getattr(saved, field) == pytest.approx(getattr(plain, field), rel=1e-6), field
    model.load_state_dict(before)
    leaf = x.clone().requires_grad_()
    loss(model(leaf), None).backward()
    assert saved.activation_grad_norms[0] == pytest.approx(float(leaf.grad.norm()), rel=1e-6)
    assert all(not m._forward_pre_hooks for m in model.layers)


def test_reentrant_checkpointing_is_refused_in_one_line() -> None:
    """torch.utils.checkpoint with use_reentrant=True (Hugging Face's default for
    gradient_checkpointing_enable) raised torch's RuntimeError from the probe's backward; the user
    is told what to pass instead, and keeps the gradients the model held. Its blocks run under
    no_grad: nothing to measure there."""
    torch.manual_seed(0)
    layers = nn.ModuleList(_Tanh() for _ in range(2))
    emb = nn.Embedding(10, 4)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.layers = emb, layers

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.emb(x)
            for block in self.layers:
                h = checkpoint(block, h, use_reentrant=True)
            return h

    model = Model()
    for p in model.parameters():  # the caller's gradients, which a refused probe leaves as they were
        p.grad = torch.full_like(p, 3.0)
    with pytest.raises(UsageError, match=r"use_reentrant=True.*pass use_reentrant=False") as caught:
        probe_module(model, torch.randint(0, 10, (3, 5)), lambda o, _: o.square().mean())
    assert "\n" not in str(caught.value)
    assert all(torch.equal(p.grad, torch.full_like(p, 3.0)) for p in model.parameters() if p.grad is not None)
    assert all(p.grad is not None for p in model.parameters())


class _Injected(_Checkpointed):
    """Block 0 called on the model's input twice within one checkpointed function (input injection)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def blocks(t: torch.Tensor) -> torch.Tensor:
            h = self.layers[0](t)
            h = self.layers[1](h) + self.layers[0](t)
            return self.layers[2](h)

        return checkpoint(blocks, x, use_reentrant=False) if self.saving else blocks(x)


def test_block_0_injected_twice_under_checkpointing_reads_as_without_it() -> None:
    """The forward gave block 0's first call a copy of the input and its second the input itself, the
    recomputation both a copy: torch's CheckpointError. Oracle: the same model run plainly."""
    torch.manual_seed(0)
    model, x = _Injected(), torch.randn(5, 4)
    saved = probe_module(model, x, lambda o, _: o.square().mean())
    model.saving = False
    plain = probe_module(model, x, lambda o, _: o.square().mean())
    assert saved.activation_names == plain.activation_names
    assert saved.activation_grad_norms == pytest.approx(plain.activation_grad_norms, rel=1e-6)


def test_a_traced_block_is_refused_not_read_as_flat() -> None:
    """A torch.jit.trace module takes hooks and never calls them: the probe read growth 1 with no
    blocks measured. Oracle: the activation count a traced model can give, none."""
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = nn.Sequential(_Tanh(), torch.jit.trace(_Tanh(), x))
    with pytest.raises(UsageError, match=r"block '1' cannot be hooked .*TorchScript"):
        probe_module(model, x, lambda o, _: o.square().mean())
    assert not model[0]._forward_hooks


class _Reshaping(_Checkpointed):
    """Its blocks checkpointed as one function that reshapes its input: a new tensor object each run."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def blocks(t: torch.Tensor) -> torch.Tensor:
            t = t.reshape(-1, 4)
            for block in self.layers:
                t = block(t)
            return t

        return checkpoint(blocks, x, use_reentrant=False) if self.saving else blocks(x)


def test_a_checkpointed_function_reshaping_block_0s_input_reads_as_without_checkpointing() -> None:
    """The recomputation gives block 0 a new view of the same data: matched by identity, it got no
    copy and torch raised CheckpointError. Oracle: the same model and weights run plainly."""
    torch.manual_seed(0)
    model, x = _Reshaping(), torch.randn(5, 2, 4)
    saved = probe_module(model, x, lambda o, _: o.square().mean())
    model.saving = False
    plain = probe_module(model, x, lambda o, _: o.square().mean())
    assert saved.activation_names == plain.activation_names and len(saved.gains) == 3
    assert saved.activation_grad_norms == pytest.approx(plain.activation_grad_norms, rel=1e-6)


class _Doubled(nn.Module):
    """A block whose forward is patched on the instance (as accelerate's hooks do) to double its output."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        inner = self.linear.forward
        self.linear.forward = lambda x: 2 * inner(x)  # type: ignore[method-assign,assignment]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x))


def test_the_recorder_sees_what_the_next_block_gets_under_other_hooks_and_patches() -> None:
    """The output recorded for a block is the one the model passes on: a hook of the user's that
    rescales it is applied first, and a forward patched on the instance (as accelerate's hooks do) is
    the one that runs; both stay after the probe, and inspect.signature(block.forward) reads the
    block's own during it. Oracle: the norms of the outputs computed by hand with the same weights.
    (Wrapping each block's forward instead of a hook, tried for its lower cost per call, recorded
    before such hooks and broke copies made during a probe.)"""
    torch.manual_seed(0)
    plain, hooked, patched = nn.Linear(4, 4), nn.Linear(4, 4), _Doubled()
    model = nn.Sequential(plain, hooked, patched)
    handle = hooked.register_forward_hook(lambda m, a, out: 3 * out)
    signatures = []
    model.register_forward_pre_hook(lambda m, a: signatures.append(str(inspect.signature(plain.forward))))
    x = torch.randn(5, 4)
    blocks = [("plain", plain), ("hooked", hooked), ("patched", patched.linear)]
    m = probe_module(model, x, lambda o, _: o.square().mean(), blocks=blocks)
    with torch.no_grad():
        a = plain(x)
        b = 3 * (a @ hooked.weight.T + hooked.bias)  # what the model passed on, its hook applied
        c = 2 * (patched.linear.weight @ b.T).T + 2 * patched.linear.bias
    assert m.activation_names == ("(input)", "plain", "hooked", "patched")
    assert m.activation_norms[1:] == pytest.approx([float(t.norm()) for t in (a, b, c)], rel=1e-6)
    assert signatures == [str(inspect.signature(nn.Linear(1, 1).forward))]
    assert "forward" in patched.linear.__dict__
    assert list(hooked._forward_hooks) == [handle.id]


def test_blocks_that_are_not_the_models_own_are_a_usage_error() -> None:
    """Blocks of a copy of the model are never called: the probe read growth 1.0 (flat, stable) from
    zero gradient norms whatever the model did."""
    built = build(zoo("mlp", depth=3, init_scale=4.0))
    other = copy.deepcopy(built.model)
    foreign = [(f"layers.{i}", m) for i, m in enumerate(other.layers)]
    with pytest.raises(UsageError, match=r"probe_module: blocks must be .* the model.s own submodules") as e:
        probe_module(built.model, built.inputs, built.loss_fn, blocks=foreign)
    assert "got ('layers.0', a " in str(e.value) and "that is not a submodule of this model" in str(e.value)
    own = [(f"layers.{i}", m) for i, m in enumerate(built.model.layers)]
    m = probe_module(built.model, built.inputs, built.loss_fn, blocks=own)
    assert m.growth > 1.0 and all(g > 0 for g in m.layer_grad_norms)


def test_a_block_listed_twice_is_a_usage_error() -> None:
    """The same module listed twice was hooked twice: each call read as two blocks, a fictional one
    with gain exactly 1 and weight-gradient norm 0 (found by a user's trial)."""
    built = build(zoo("mlp", depth=3, init_scale=4.0))
    layers = built.model.layers
    twice = [("a", layers[0]), ("b", layers[0]), ("c", layers[1])]
    with pytest.raises(UsageError, match=r"probe_module: blocks 'a' and 'b' are the same module"):
        probe_module(built.model, built.inputs, built.loss_fn, blocks=twice)


def test_a_block_run_inside_another_is_a_usage_error() -> None:
    """A block and its own submodule (GPT-2's h.0 with h.0.attn) were reordered and read as one chain,
    growth 0.0064 where the stack's is 1.23 (an audit on Hugging Face models): refused in one line,
    whichever comes first; blocks side by side still probe, and no hook is left. Oracle: the module
    tree."""
    model = nn.Sequential(
        nn.Sequential(nn.Linear(4, 4), nn.Tanh()), nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    )
    x = torch.randn(2, 4)
    for blocks in (
        [("0", model[0]), ("0.0", model[0][0]), ("1", model[1])],
        [("0.0", model[0][0]), ("0", model[0])],
    ):
        with pytest.raises(
            UsageError, match=r"probe_module: block '0.0' runs inside block '0', which holds it"
        ):
            probe_module(model, x, lambda out, _: out.pow(2).mean(), blocks=blocks)
    assert not model[0]._forward_pre_hooks and not model[0][0]._forward_hooks
    side = probe_module(model, x, lambda out, _: out.pow(2).mean(), blocks=[("0", model[0]), ("1", model[1])])
    assert len(side.gains) == 2


class TiedEnc(nn.Module):
    """An encoder layer of a tied autoencoder."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x))


class TiedDec(nn.Module):
    """Its decoder layer: holds the encoder layer for its weight, never runs it; with `fails_once`, its
    first call raises (a fused path the model then falls back from)."""

    def __init__(self, enc: TiedEnc, fails_once: bool = False) -> None:
        super().__init__()
        self.enc, self.fails = enc, fails_once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fails:
            self.fails = False
            raise RuntimeError("fused kernel unavailable")
        return torch.tanh(F.linear(x, self.enc.lin.weight.t()))


def test_a_block_held_but_not_run_by_another_probes() -> None:
    """A tied autoencoder's decoder layer holds its encoder layer (for its weight) and never runs it,
    and a layer's child holds that layer back (a loop in the module tree): both probe as blocks (the
    first was refused, the second hung, a review found). Oracle: torch.autograd.grad."""

    enc = [TiedEnc() for _ in range(3)]
    model = nn.Sequential(*enc, *(TiedDec(e) for e in reversed(enc)))
    model[0].lin.back = model[0]  # a registered child holding its parent
    blocks = [(str(i), m) for i, m in enumerate(model)]
    x = torch.randn(4, 8)
    m = probe_module(model, x, lambda out, _: out.pow(2).mean(), blocks=blocks)
    outs, h = [], x.detach().requires_grad_()
    for layer in model:
        h = layer(h)
        outs.append(h)
    grads = torch.autograd.grad(h.pow(2).mean(), outs)
    assert m.activation_grad_norms[1:] == pytest.approx([float(g.norm()) for g in grads], rel=1e-5)


@pytest.mark.parametrize("where", ["inputs", "model", "frozen", "buffer"])
@pytest.mark.parametrize("found", [True, False])
def test_a_model_or_inputs_on_the_meta_device_is_a_usage_error(where: str, found: bool) -> None:
    """Meta tensors hold no values: an embedding lookup of meta ids in CPU weights read memory never
    written (growth 1.02, 1.30, NaN from one call to the next, an audit found); refused in one line,
    before the forward that finding blocks runs, of a frozen table and a buffer too."""
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 8))
    ids = torch.randint(0, 10, (2, 3))
    if where == "model":
        model = model.to("meta")
    elif where == "frozen":
        model[0] = nn.Embedding(10, 8, device="meta").requires_grad_(False)
    elif where == "buffer":
        model[1].register_buffer("scale", torch.ones(8, device="meta"))
    else:
        ids = ids.to("meta")
    blocks = None if found else [("1", model[1]), ("2", model[2])]
    with pytest.raises(UsageError, match=r"probe_module: the model or its inputs are on the meta device"):
        probe_module(model, ids, lambda out, _: out.pow(2).mean(), blocks=blocks)


# torch's own warning while tracing the hooks, turned into an error by the test settings
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
def test_a_model_compiled_with_fullgraph_is_refused_in_one_line_and_one_without_is_measured() -> None:
    """model.compile(fullgraph=True) refuses the graph break the probe's hooks need: torch's 20-line
    Unsupported error ('returning intermediate with requires_grad_()') came out of probe_module.
    Without fullgraph the compiled model is measured; oracle: the same model probed uncompiled."""
    built = build(zoo("mlp", depth=3))
    eager = probe_module(built.model, built.inputs, built.loss_fn)
    torch._dynamo.reset()  # compiled code is cached per function, whichever module compiled it
    built.model.compile(backend="eager", fullgraph=True)
    with pytest.raises(UsageError, match="compiled with fullgraph=True") as caught:
        probe_module(built.model, built.inputs, built.loss_fn)
    assert "\n" not in str(caught.value)
    torch._dynamo.reset()
    built.model.compile(backend="eager")
    compiled = probe_module(built.model, built.inputs, built.loss_fn)
    assert compiled.activation_grad_norms == pytest.approx(eager.activation_grad_norms, rel=1e-6)


# torch's dynamo warns that it reads .grad of a non-leaf tensor while it traces a forward hook's
# arguments under torch.compile's wrapper: torch's own warning, not this package's
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
def test_a_model_wrapped_by_torch_compile_has_its_blocks_named_as_uncompiled() -> None:
    """torch.compile(model) wraps the model (its modules under `_orig_mod`): the blocks found are the
    same modules, named as in the model (`layers.0`, not `_orig_mod.layers.0`); oracle: the same model
    probed uncompiled, names and numbers."""
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3)))
    x = torch.randn(4, 8)
    eager = probe_module(model, x, _square_mean)
    torch._dynamo.reset()
    compiled = probe_module(torch.compile(model, backend="eager"), x, _square_mean)
    assert compiled.activation_names == eager.activation_names == ("(input)", "0", "1", "2")
    assert compiled.activation_grad_norms == pytest.approx(eager.activation_grad_norms, rel=1e-6)


def test_no_hook_of_the_probe_is_left_on_a_graph_the_model_keeps_when_the_loss_raises(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The residual add's node hook was taken off after the step's backward alone: where the loss
    function raised, a graph the model kept (its last output) ran the probe's hook in the user's own
    backward (found in review). Oracle: the hook runs once in a probe that works, never in the
    user's backward after one that raised."""

    class Keeps(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
            self.kept = torch.zeros(())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = x + layer(x)
            self.kept = x
            return x

    def fails(out: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        raise ValueError("the loss fails")

    ran: list[int] = []
    through = chaining.Chaining._through
    monkeypatch.setattr(
        chaining.Chaining, "_through", lambda rec, grads: (ran.append(1), through(rec, grads))[1]
    )
    model, x = Keeps(), torch.randn(4, 8)
    probe_module(model, x, lambda o, _: o.square().sum())
    assert ran == [1]
    with pytest.raises(Exception, match="the loss fails"):
        probe_module(model, x, fails)
    model.kept.square().sum().backward()
    assert ran == [1]


class _Halved(nn.Module):
    """Four tanh(linear) steps; the forward hooks each linear block's output, halving its gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            y = layer(x)
            y.register_hook(lambda g: g * 0.5)
            x = torch.tanh(y)
        return x


def test_an_output_gradient_is_read_before_the_models_own_hook_on_it() -> None:
    """Oracle: tensor hooks run in the order registered, so a hook registered as each block returns (a
    forward hook, before the model's own) sees the gradient autograd hands the output, and
    retain_grad the hooked one. The probe reads the first (each retained value is half of it): the
    model's x0.5 shows in the gain of the block whose output it hooks, and the growth is the input's
    gradient (after every hook) over the last output's, as autograd handed it."""
    torch.manual_seed(0)
    model, x = _Halved().double(), torch.randn(4, 8, dtype=torch.float64)
    blocks = list(model.layers.named_children())
    m = probe_module(model, x, lambda o, _: o.square().sum(), blocks=blocks)
    handed: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []

    def keep(mod: nn.Module, args: Any, out: torch.Tensor) -> None:
        out.register_hook(handed.append)
        out.retain_grad()
        outs.append(out)

    hooks = [b.register_forward_hook(keep) for _, b in blocks]
    model.zero_grad()
    xx = x.clone().requires_grad_()
    model(xx).square().sum().backward()
    for h in hooks:
        h.remove()
    before = [float(g.norm()) for g in reversed(handed)]  # the backward hands them last block first
    assert m.activation_grad_norms == pytest.approx([float(xx.grad.norm()), *before], rel=1e-12)
    assert [float(o.grad.norm()) for o in outs] == pytest.approx([b / 2 for b in before], rel=1e-12)
    assert m.growth == pytest.approx(float(xx.grad.norm()) / before[-1], rel=1e-12)


def test_the_probe_runs_no_post_accumulate_grad_hook_of_the_model() -> None:
    """A model that steps its optimizer inside the backward (register_post_accumulate_grad_hook, as
    torch's tutorial on fusing the optimizer step into the backward does): the probe at steps=0 leaves
    its weights as they were and measures the gradient, not the zeros the hook leaves. Oracle:
    torch.autograd.grad."""
    torch.manual_seed(0)
    model = _Tanhs()
    optimizers = {p: torch.optim.SGD([p], lr=0.1) for p in model.parameters()}

    def step_in_backward(p: torch.Tensor) -> None:
        optimizers[p].step()
        optimizers[p].zero_grad()

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(step_in_backward)
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(4, 8)
    m = probe_module(model, x, _square_mean)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    grads = torch.autograd.grad(_square_mean(model(x), None), list(model.parameters()))
    assert m.grad_norm[0] == pytest.approx(math.sqrt(sum(float(g.square().sum()) for g in grads)), rel=1e-6)


def test_the_probe_runs_no_hook_on_a_parameters_accumulation_node() -> None:
    """DDP's reducer, FSDP and an optimizer stepped inside the backward hook each parameter's gradient
    accumulation node, where no check can see them: the probe's backward returns the gradients without
    running those nodes (torch.autograd.grad), so no hook of theirs acts on a probe. Oracle: a hook of
    that kind, which a plain backward() does run."""
    torch.manual_seed(0)
    model, ran = _Tanhs(), []
    nodes = [p.view_as(p).grad_fn.next_functions[0][0] for p in model.parameters()]  # kept alive
    for node in nodes:
        node.register_hook(lambda *_: ran.append(1))
    x = torch.randn(4, 8)
    probe_module(model, x, _square_mean)
    assert not ran
    _square_mean(model(x), None).backward()
    assert len(ran) == len(nodes)


class _ForwardCalled(nn.Module):
    """A tanh stack at sigma_w 4 whose forward calls each layer's `.forward(x)` (no module hooks run)
    or, `hooked`, the layer itself."""

    def __init__(self, depth: int, hooked: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(16, 16, bias=False) for _ in range(depth)])
        for layer in self.layers:
            nn.init.normal_(layer.weight, std=4.0 / 16**0.5)
        self.head = nn.Linear(16, 3)
        self.hooked = hooked

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x) if self.hooked else layer.forward(x))
        return self.head(x)


def test_blocks_no_hook_sees_are_an_error_not_a_growth_of_1() -> None:
    """A forward calling `layer.forward(x)` runs no module hook: no block call was recorded and the
    growth read 1 ('flat', stable; the CLI said 'stable (tried up to depth=40)') for a stack whose
    gradient grows. Oracle: torch.autograd.grad on the same model with the layers called, the
    input's gradient over the last layer's output's; an empty blocks= is refused too."""
    torch.manual_seed(0)
    model, x = _ForwardCalled(12, hooked=False), torch.randn(8, 16)
    labels = torch.arange(8) % 3

    def loss_fn(out: torch.Tensor, _: Any) -> torch.Tensor:
        return nn.functional.cross_entropy(out, labels)

    with pytest.raises(UsageError, match=r"no block ran through its __call__ .*layers\.0, layers\.1"):
        probe_module(model, x, loss_fn)
    with pytest.raises(UsageError, match="no blocks to measure"):
        probe_module(model, x, loss_fn, blocks=[])
    assert not model.layers[0]._forward_hooks and not model.layers[0]._forward_pre_hooks
    hooked = copy.deepcopy(model)
    hooked.hooked = True
    outs: list[torch.Tensor] = []
    handle = hooked.layers[-1].register_forward_hook(lambda _m, _a, out: outs.append(out))
    xr = x.clone().requires_grad_()
    dx, dlast = torch.autograd.grad(loss_fn(hooked(xr), None), [xr, *outs])
    handle.remove()
    expected = float(dx.norm() / dlast.norm())
    assert expected > 10  # the gradient grows through the stack
    assert probe_module(hooked, x, loss_fn).growth == pytest.approx(expected, rel=1e-5)


def _sum_loss(out: torch.Tensor, _: Any) -> torch.Tensor:
    return out.sum()


class _OneForwardCalled(_ForwardCalled):
    """The stack with one layer, `bypassed`, called as `.forward(x)` (HRNet's downsampling blocks)."""

    def __init__(self, depth: int, bypassed: int) -> None:
        super().__init__(depth, hooked=True)
        self.bypassed = bypassed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = torch.tanh(layer.forward(x) if i == self.bypassed else layer(x))
        return self.head(x)


def test_blocks_no_hook_sees_beside_others_are_named_in_the_blocks_note() -> None:
    """Where some blocks ran and others were called as `.forward(x)`, those went unmeasured and
    unsaid (3 of HRNet's 15 blocks: an audit); the note names them. Oracle: the construction; and
    every block called through __call__ gives no such note."""
    torch.manual_seed(0)
    x = torch.randn(8, 16)
    m = probe_module(_OneForwardCalled(6, bypassed=2), x, _sum_loss)
    assert "layers.2" not in m.activation_names
    assert "1 of 6 blocks not called through __call__ in the measured step (layers.2)" in m.blocks_note
    assert "not called" not in probe_module(_ForwardCalled(6, hooked=True), x, _sum_loss).blocks_note


def test_a_holders_call_that_raises_does_not_leave_its_blocks_inside_it() -> None:
    """A decoder layer holding its encoder layer (never running it) raises once and the model falls
    back: the holder's call is over all the same, and the next pass's encoder calls are not read as
    inside it (they were refused, a review found). Oracle: the probe runs, no hook is left."""

    class AE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.ModuleList(TiedEnc() for _ in range(3))
            self.dec = nn.ModuleList(TiedDec(e, fails_once=True) for e in reversed(self.enc))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for e in self.enc:
                x = e(x)
            for d in self.dec:
                try:
                    x = d(x)
                except RuntimeError:
                    x = d(x)
            return x

    model = AE()
    blocks = [(f"enc.{i}", e) for i, e in enumerate(model.enc)] + [
        (f"dec.{i}", d) for i, d in enumerate(model.dec)
    ]
    m = probe_module(model, torch.randn(4, 8), lambda out, _: out.pow(2).mean(), blocks=blocks, steps=2)
    assert m.steps_run == 2 and not any(b._forward_hooks or b._forward_pre_hooks for _, b in blocks)


def test_a_block_run_inside_another_under_watch_is_a_usage_error() -> None:
    """watch() refuses a block run inside a block that holds it, as the probe does (the check moved
    from the blocks' list to their calls, and watch had lost it, a review found)."""
    import stabilitycheck

    model = nn.Sequential(
        nn.Sequential(nn.Linear(4, 4), nn.Tanh()), nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    blocks = [("0", model[0]), ("0.0", model[0][0]), ("1", model[1])]
    said = r"watch: block '0.0' runs inside block '0', which holds it"
    with (
        pytest.raises(UsageError, match=said),
        stabilitycheck.watch(model, opt, blocks=blocks, report=io.StringIO()),
    ):
        model(torch.randn(8, 4)).pow(2).mean().backward()


def test_a_holders_pre_hook_that_raises_does_not_turn_the_nesting_check_off() -> None:
    """The model's own pre-hook on a holder raises once and the model calls it again: the holder's call
    is counted from before that hook, so the count never goes below 0 and the nesting is still
    refused (it went to -1 and was read as one chain, a review found)."""

    class Retry(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blk, self.o = nn.Sequential(nn.Linear(4, 4), nn.Tanh()), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            try:
                x = self.blk(x)
            except RuntimeError:
                x = self.blk(x)
            return self.o(x)

    calls = [0]

    def busy_once(module: nn.Module, args: Any) -> None:
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("busy")

    model = Retry()
    model.blk.register_forward_pre_hook(busy_once)
    blocks = [("blk", model.blk), ("blk.0", model.blk[0]), ("o", model.o)]
    with pytest.raises(UsageError, match=r"block 'blk.0' runs inside block 'blk'"):
        probe_module(model, torch.randn(8, 4), lambda out, _: out.pow(2).mean(), blocks=blocks)


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0)])
def test_a_block_run_inside_two_holders_names_the_innermost(order: tuple[int, ...]) -> None:
    """A ⊃ A.0 ⊃ A.0.0: the refusal names the block A.0.0 runs inside directly, whichever order the
    blocks are listed in (it named A listed outer-first, A.0 inner-first, a review found)."""
    model = nn.Sequential(nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.Tanh())), nn.Linear(4, 4))
    pairs = [("A", model[0]), ("A.0", model[0][0]), ("A.0.0", model[0][0][0])]
    with pytest.raises(UsageError, match=r"block 'A.0.0' runs inside block 'A.0', "):
        probe_module(
            model, torch.randn(2, 4), lambda out, _: out.pow(2).mean(), blocks=[pairs[i] for i in order]
        )


class _Declaring(nn.Module):
    """Four Linear + tanh layers whose stability_blocks() returns what `declared` makes of them."""

    def __init__(self, declared: Any) -> None:
        super().__init__()
        self.declared = declared
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def stability_blocks(self) -> Any:
        return self.declared(self)


@pytest.mark.parametrize(
    ("declared", "said"),
    [
        (lambda m: None, "stability_blocks() returned None; it must return a non-empty list"),
        (lambda m: [], "stability_blocks() returned an empty list"),
        (lambda m: list(m.layers), "stability_blocks() item 0 is a Sequential, not a (name, module) pair"),
        (lambda m: [("x", nn.Linear(8, 8))], "item 0 ('x') is not a submodule of the model"),
        (lambda m: [("a", m.layers[0]), ("b", m.layers[0])], "blocks 'a' and 'b' are the same module"),
        (lambda m: [("a", m.layers[0]), ("a", m.layers[1])], "two blocks are named 'a'"),
    ],
)
def test_a_malformed_stability_blocks_is_a_usage_error_of_the_api_too(declared: Any, said: str) -> None:
    """The model-file CLI refused each in one line; probe_module raised TypeError on None and
    AttributeError on bare modules, dropped a module that is no submodule in silence and read one
    listed twice as two blocks with a gain of exactly 1 (found by an audit)."""
    with pytest.raises(UsageError, match=re.escape(said)):
        probe_module(_Declaring(declared), torch.randn(4, 8), lambda o, _: o.square().mean())


SMALL_STACK = """
import sys
import threading

import torch  # imported on the main thread's own stack
import stabilitycheck.probing

threading.stack_size(1 << 19)  # 512 KiB: a chain of a few thousand nodes freed at once overflows it
body, sys.argv = sys.argv[1], sys.argv[1:]
run = threading.Thread(target=exec, args=(compile(body, "<deep>", "exec"), {"__name__": "__main__"}))
run.start()
run.join()
"""


def _on_a_small_stack(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`script` run with `args` in a process of its own, on a thread with a 512 KiB stack: a C
    recursion a level per node overflows it within a few thousand block calls, not ~25,000."""
    return subprocess.run(
        [sys.executable, "-c", SMALL_STACK, script, *args], capture_output=True, text=True, timeout=300
    )


DEEP = """
import torch
from torch import nn
from stabilitycheck.probing import probe_module

stack = nn.Sequential(*[nn.Sequential(nn.Linear(4, 4, bias=False), nn.Tanh()) for _ in range(4000)])
m = probe_module(stack, torch.randn(2, 4), lambda out, _: out.sum(), blocks=list(stack.named_children()))
cell = nn.LSTMCell(4, 4)

class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = cell

    def forward(self, x):
        h = c = torch.zeros(2, 4)
        for t in range(x.shape[0]):
            h, c = self.cell(x[t], (h, c))
        return h

r = probe_module(Tokens(), torch.randn(4000, 2, 4), lambda out, _: out.sum(), blocks=[("cell", cell)])
print(len(m.activation_names), len(r.activation_names))
"""

DEEPER = """
import sys
import torch
from torch import nn
from stabilitycheck.probing import probe_module

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4, bias=False)

    def forward(self, x):
        return self.lin(torch.tanh(x))

class Raises(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise ValueError("the model's backward failed")

class Stack(nn.Module):
    def __init__(self, path):
        super().__init__()
        self.path, self.blocks = path, nn.ModuleList(Block() for _ in range(8000))

    def forward(self, x):
        for i, block in enumerate(self.blocks):
            x = block(x)
            if self.path == "changed in place" and i == 4000:
                x.mul_(3)
        return Raises.apply(x) if self.path == "backward raises" else x

path = sys.argv[1]
stack = Stack(path)
blocks = list(stack.blocks.named_children())
try:
    given = blocks[::-1] if path == "out of order" else blocks
    m = probe_module(stack, torch.randn(2, 4), lambda out, _: out.sum(), blocks=given)
    print(len(m.activation_names))
except ValueError as exc:
    print(exc)
"""


def test_a_deep_graph_is_let_go_of_without_overflowing_the_stack() -> None:
    """The probe reads every block output's grad_fn (the junction checks), which gives each node a
    Python wrapper, and torch frees such a chain of nodes in a C recursion, one level per node: the
    loss let go of last took the whole graph at once, a segmentation fault past ~25,000 block calls
    (a 30,000-block stack, an LSTMCell over 30,000 tokens; fewer under a small stack, used here to
    keep the test short). Oracle: the process's exit status and its output."""
    done = _on_a_small_stack(DEEP)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["4001", "4000"]  # (input) and 4,000 blocks; 4,000 calls of the cell


@pytest.mark.parametrize(
    ("path", "out"),
    [
        ("out of order", "8001"),
        ("changed in place", "8001"),
        ("backward raises", "the model's backward failed"),
    ],
)
def test_a_deep_graph_is_let_go_of_a_call_at_a_time_on_every_path(path: str, out: str) -> None:
    """The forward run again (blocks declared output side first, an output changed in place after
    its block) and a backward that raises let go of the graph a call at a time too: the recorder's
    node sets, cleared in hash order after the outputs, or the frames the exception passed through,
    held the graph last (found by a review). Oracle: exit status and output, under a small stack."""
    done = _on_a_small_stack(DEEPER, path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == out


class _ShortcutProjection(nn.Module):
    """A trunk of wide layers held as attributes beside a 1x1 projection on a shortcut, the only
    list (timm's DLA-34: `level2.project`, Conv + BatchNorm)."""

    def __init__(self) -> None:
        super().__init__()
        self.level0, self.level1 = nn.Linear(8, 256), nn.Linear(256, 256)
        self.level2 = nn.Linear(256, 8)
        self.project = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.level2(torch.tanh(self.level1(torch.tanh(self.level0(x)))))
        return h + self.project(x)


def test_a_list_holding_a_small_share_of_the_parameters_is_said_to() -> None:
    """find_blocks falls back on the longest list; where it holds under 1% of the model's parameters
    (DLA-34's shortcut projection: 0.01%, growth 1.45 where its levels' was 5.35e4: an audit) the note
    says so. Oracle: the parameter counts (88 of 70,240); a Sequential MLP, the whole model, has no
    such note."""
    model = _ShortcutProjection()
    held = sum(p.numel() for p in model.project.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert held < 0.01 * total
    blocks, note = find_blocks(model)
    assert [name for name, _ in blocks] == ["project.0", "project.1"]
    assert f"it holds {held / total:.2%} of the model's parameters" in note, note
    mlp = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
    assert "of the model's parameters" not in find_blocks(mlp)[1]
