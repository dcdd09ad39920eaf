"""One Subject path: the same search, verdict and report on a zoo family, a model file and a Hugging Face
model type; the model's real block chain (a 1-entry stack, both stacks of an encoder-decoder); the
reproduction line reproducing a verdict judged on non-default limits.
Also find_blocks on parametrized models: the lists computing a weight are no stack."""

from __future__ import annotations

import itertools
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from chain_models import OrthogonalTowers, TutorialLoop, run_tower
from torch import nn

from stabilitycheck.blocks import LEAVES_NOTE, find_blocks
from stabilitycheck.config import Config
from stabilitycheck.configprobe import probe
from stabilitycheck.culprit import culprit_of
from stabilitycheck.errors import UsageError
from stabilitycheck.probing import probe_module
from stabilitycheck.report import reproduction, text
from stabilitycheck.searching import search
from stabilitycheck.seeds import assess
from stabilitycheck.space import Axis, Space
from stabilitycheck.subjects import resolve
from stabilitycheck.verdicts import Limits

MODEL = """
from torch import nn

def build(depth=2, init_scale=1.0):
    layers = [nn.Linear(16, 16, bias=False) for _ in range(depth)]
    for layer in layers:
        nn.init.normal_(layer.weight, std=init_scale / 4)
    return nn.Sequential(*[nn.Sequential(l, nn.Tanh()) for l in layers])
"""


def _spaces(tmp_path: Path) -> dict[str, Space]:
    (tmp_path / "model.py").write_text(MODEL)
    file = resolve(str(tmp_path / "model.py"))
    out = {
        "zoo": Space(
            "mlp",
            Config.of("mlp", width=16, batch_size=4, init_scale=3.0, seeds=3),
            (Axis.range("depth", 1, 40),),
        ),
        "file": Space("model.py", file.config(init_scale=3.0, seeds=3), (Axis.range("depth", 1, 40),)),
    }
    if _has_transformers():
        hf = resolve("hf:gpt2")
        out["hf"] = Space(
            "hf:gpt2", hf.config(initializer_range=1.0, seeds=3), (Axis.range("n_layer", 1, 24),)
        )
    return out


def _has_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("kind", ["zoo", "file", "hf"])
def test_the_same_search_verdict_and_report_on_every_kind_of_subject(kind: str, tmp_path: Path) -> None:
    """Oracle: the reported point explodes over seeds and the one below it does not (brute force)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spaces = _spaces(tmp_path)
    if kind not in spaces:
        pytest.skip("hf:gpt2 needs the optional extra: pip install 'stabilitycheck[hf]'")
    space = spaces[kind]
    result = search(space, max_examples=10)
    cx = result.counterexample
    assert cx is not None, kind
    (axis,) = space.axes
    depth = cx.config.knob(axis.name)
    assert assess(cx.config).exploded
    assert depth == axis.values[0] or not assess(cx.config.with_knobs(**{axis.name: int(depth) - 1})).exploded
    assert f"{axis.name}={depth}" in text([result])
    assert cx.remedies and any(r.name == "critical-init" and r.config is not None for r in cx.remedies)


def test_a_one_entry_stack_is_the_block_list_not_its_leaves() -> None:
    model = nn.Sequential(
        nn.Linear(8, 8), nn.ModuleList([nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)])
    )
    blocks, note = find_blocks(model)
    assert [name for name, _ in blocks] == ["1.0"] and "(1)" in note


class OneLayer(nn.Module):
    """Token embedding, a 1-entry stack of one Transformer encoder layer, a readout."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.layers = nn.ModuleList([nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)])
        self.head = nn.Linear(16, 32)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)  # type: ignore[no-any-return]


def test_a_one_block_stack_is_measured_across_its_block_from_the_embedding() -> None:
    """Oracle: dL/d(embedding output) and dL/d(block output) from retain_grad and a plain backward."""
    torch.manual_seed(0)
    model = OneLayer()
    tokens = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(1))
    loss_fn = lambda out, _: out.square().mean()  # noqa: E731
    m = probe_module(model, tokens, loss_fn)
    assert m.activation_names == ("(input)", "layers.0") and len(m.gains) == 1
    seen: list[torch.Tensor] = []
    handle = model.layers[0].register_forward_hook(lambda mod, args, out: seen.extend([args[0], out]))
    loss_fn(model(tokens), tokens)
    handle.remove()
    for t in seen:
        t.retain_grad()
    loss_fn(model.head(seen[1]), tokens).backward()
    expected = float(seen[0].grad.norm() / seen[1].grad.norm())  # type: ignore[union-attr]
    assert m.growth == pytest.approx(expected, rel=1e-5) and m.gains[0] == m.growth


def test_an_encoder_decoder_has_both_stacks_named() -> None:
    model = nn.Transformer(
        d_model=8, nhead=2, num_encoder_layers=2, num_decoder_layers=3, dim_feedforward=16, batch_first=True
    )
    blocks, note = find_blocks(model)
    names = [name for name, _ in blocks]
    assert names == [f"encoder.layers.{i}" for i in range(2)] + [f"decoder.layers.{i}" for i in range(3)]
    assert "encoder.layers (2) + decoder.layers (3)" in note
    gen = torch.Generator().manual_seed(0)
    src, tgt = torch.randn(2, 5, 8, generator=gen), torch.randn(2, 4, 8, generator=gen)
    m = probe_module(model.eval(), (src, tgt), lambda out, _: out.square().mean())
    assert m.activation_names == ("(input)", *names)  # from src, through both stacks
    assert len(m.gains) == 5 and math.isnan(m.gains[2])  # decoder.layers.0 takes tgt: no gain across
    assert all(g > 0 for i, g in enumerate(m.gains) if i != 2)


class _Staged(nn.Module):
    """Stages of tanh blocks as a ModuleList of ModuleLists (stage-based models, Funnel's encoder):
    the outer list is the stack, but neither list is ever called."""

    def __init__(self, stages: int, per_stage: int, scale: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stages = nn.ModuleList(
            nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(per_stage))
            for _ in range(stages)
        )
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=scale / 16**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            for block in stage:
                x = block(x)
        return x


def test_stages_in_a_list_of_lists_are_measured_block_by_block() -> None:
    """The blocks were the stages (ModuleLists, never called): no output recorded, growth 1 and
    'stable' whatever the model did. Oracle: dL/d input over dL/d(last block's output) from
    torch's own backward, and every gain the ratio of consecutive output-gradient norms."""
    model, x = _Staged(3, 4, 3.0), torch.randn(8, 16)
    blocks, note = find_blocks(model)
    assert [n for n, _ in blocks] == [f"stages.{i}.{j}" for i in range(3) for j in range(4)]
    assert note == "blocks: stages (12)"

    def loss(out: torch.Tensor, _: object) -> torch.Tensor:
        return out.square().mean()

    m = probe_module(model, x, loss, blocks=blocks)
    leaf = x.clone().requires_grad_()
    outs: list[torch.Tensor] = []
    handle = model.stages[2][3].register_forward_hook(lambda mod, a, out: outs.append(out))
    out = model(leaf)
    handle.remove()
    grad_in, grad_last = torch.autograd.grad(loss(out, None), [leaf, outs[0]])
    assert len(m.gains) == 12
    assert m.growth == pytest.approx(float(grad_in.norm() / grad_last.norm()), rel=1e-5)
    assert m.growth > 2


class _Positional(nn.Module):
    """tanh(W x + pos): two arguments of one shape, so which one is the chain is not read from the call."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x) + pos)


def test_one_stack_of_stages_has_no_junction_between_its_stages() -> None:
    """Each inner list of a list of lists was read as a stack of its own, so the start of every stage
    was checked as a junction, and a block taking (x, pos) of one shape read as starting a new chain
    there: a NaN gain, the growth a product of the stages' own. Oracle: dL/d(block 0's output) over
    dL/d(last block's output) from torch's backward, and each gain the ratio of consecutive norms."""
    torch.manual_seed(0)

    class Staged(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stages = nn.ModuleList(nn.ModuleList(_Positional() for _ in range(3)) for _ in range(3))
            self.pos = torch.randn(8, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for stage in self.stages:
                for block in stage:
                    x = block(x, self.pos)
            return x

    model, x = Staged(), torch.randn(8, 16)
    m = probe_module(model, x, lambda o, _: o.square().mean())
    outs: list[torch.Tensor] = []
    blocks = [b for stage in model.stages for b in stage]
    handles = [b.register_forward_hook(lambda mod, a, out: outs.append(out)) for b in blocks]
    out = model(x)
    for h in handles:
        h.remove()
    grads = torch.autograd.grad(out.square().mean(), outs)
    norms = [float(g.norm()) for g in grads]
    assert m.gains == pytest.approx([a / b for a, b in itertools.pairwise(norms)], rel=1e-5)
    assert m.growth == pytest.approx(norms[0] / norms[-1], rel=1e-5)


def test_junctions_between_named_stacks_and_parallel_towers_have_no_gain() -> None:
    """An encoder-decoder of named blocks (Sequential(OrderedDict)) and two towers each run on the
    model's input start a new chain at their junction: a block name without a trailing index had no
    stack, and one list of lists was one stack, so the gain across read two unrelated gradients
    (4.43 where there is none). Oracle: a NaN gain there and the growth the product of each chain's
    own (or the larger chain's) in series, the larger side by side, from torch's output-gradient norms."""
    from collections import OrderedDict

    torch.manual_seed(0)

    class EncDec(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Sequential(OrderedDict(enc0=_Positional(), enc1=_Positional()))
            self.decoder = nn.Sequential(OrderedDict(dec0=_Positional(), dec1=_Positional()))

        def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
            for block in self.encoder:
                src = block(src, tgt)
            for block in self.decoder:
                tgt = block(tgt, src)
            return tgt

    class Towers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.towers = nn.ModuleList(nn.ModuleList(_Positional() for _ in range(2)) for _ in range(2))

        def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
            outs = []
            for tower in self.towers:
                h = x
                for block in tower:
                    h = block(h, pos)
                outs.append(h)
            return outs[0] + outs[1]

    a, b = torch.randn(8, 16), torch.randn(8, 16)
    for model in (EncDec(), Towers()):
        blocks, _ = find_blocks(model)
        m = probe_module(model, (a, b), lambda o, _: o.square().mean(), blocks=blocks)
        outs: list[torch.Tensor] = []
        handles = [blk.register_forward_hook(lambda mod, i, out, o=outs: o.append(out)) for _, blk in blocks]
        out = model(a, b)
        for h in handles:
            h.remove()
        norms = [float(g.norm()) for g in torch.autograd.grad(out.square().mean(), outs)]
        assert len(m.gains) == 3 and math.isnan(m.gains[1]), type(model).__name__
        assert [m.gains[0], m.gains[2]] == pytest.approx([norms[0] / norms[1], norms[2] / norms[3]], rel=1e-5)
        chains = [norms[0] / norms[1], norms[2] / norms[3]]
        if isinstance(model, EncDec):  # in series, the decoder taking the encoder's output
            assert m.chain_feeds == ((), (0,))
            grows = max(chains) if max(chains) > max(math.prod(chains), 1.0) else math.prod(chains)
        else:  # side by side: no gradient crosses both towers
            assert m.chain_feeds == ((), ())
            grows = max(chains)
        assert m.growth == pytest.approx(grows, rel=1e-5)


def test_blocks_in_a_module_dict_are_named_by_their_keys() -> None:
    """Blocks of a ModuleList of ModuleDicts were named by position (stages.0.0), a path get_submodule
    does not find; with digit keys out of order, one naming another module. Oracle: get_submodule."""
    stages = nn.ModuleList(nn.ModuleDict({"1": nn.Linear(4, 4), "0": nn.Linear(4, 4)}) for _ in range(2))
    model = nn.Module()
    model.stages = stages
    blocks, _ = find_blocks(model)
    assert [n for n, _ in blocks] == ["stages.0.1", "stages.0.0", "stages.1.1", "stages.1.0"]
    assert all(model.get_submodule(n) is b for n, b in blocks)


class _Held(nn.Module):
    """12 Sequential(Linear, Tanh) layers at sigma_w 4, held as numbered attributes (l0 ... l11), in
    a ModuleDict, or as attributes named otherwise (`way`)."""

    def __init__(self, way: str) -> None:
        super().__init__()
        layers = [nn.Sequential(nn.Linear(32, 32, bias=False), nn.Tanh()) for _ in range(12)]
        for layer in layers:
            nn.init.normal_(layer[0].weight, std=4.0 / 32**0.5)
        names = [f"l{i}" for i in range(12)] if way != "named" else [f"l{chr(97 + i)}" for i in range(12)]
        if way == "dict":
            self.layers = nn.ModuleDict(dict(zip(names, layers, strict=True)))
        else:
            for name, layer in zip(names, layers, strict=True):
                self.add_module(name, layer)
        self.order = names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        held = self.layers if hasattr(self, "layers") else self
        for name in self.order:
            x = held.get_submodule(name)(x)
        return x


@pytest.mark.parametrize("way", ["numbered", "dict", "named"])
def test_layers_held_as_attributes_or_in_a_module_dict_are_read_on_all_their_layers(way: str) -> None:
    """Layers no ModuleList holds, each a Sequential(Linear, Tanh), were read on the first one's own
    modules alone, the longest list found: growth 0.74 (attributes) and 1.56 (a ModuleDict) where the
    stack's is 78 and 80 (found by an audit). One of several lists laid out alike is no chain of its
    own: the leaf modules are read, all 12 Linears. Oracle: torch's |dL/d input| / |dL/d output of
    the last Linear|."""
    torch.manual_seed(0)
    model, x, z = _Held(way), torch.randn(8, 32), torch.randn(8, 32)
    loss = lambda out, _: (out * z).sum()  # noqa: E731
    m = probe_module(model, x, loss)
    prefix = "layers." if way == "dict" else ""
    assert m.layer_names == tuple(f"{prefix}{name}.0" for name in model.order)
    given = x.clone().requires_grad_()
    outs: list[torch.Tensor] = []
    last = model.get_submodule(f"{prefix}{model.order[-1]}.0")
    hook = last.register_forward_hook(lambda _m, _a, o: outs.append(o))
    g_in, g_out = torch.autograd.grad(loss(model(given), x), [given, *outs])
    hook.remove()
    assert m.growth == pytest.approx((g_in.norm() / g_out.norm()).item(), rel=1e-5)


def test_a_list_beside_lists_laid_out_otherwise_is_still_the_models() -> None:
    """Only lists laid out alike side by side are passed over: a Sequential of three tanh layers
    beside two heads of another layout (one Linear and a Tanh each) is the chain, as before."""
    model = nn.Module()
    model.features = nn.Sequential(*(m for _ in range(3) for m in (nn.Linear(8, 8), nn.Tanh())))
    model.head_a, model.head_b = (
        nn.Sequential(nn.Linear(8, 2), nn.Tanh()),
        nn.Sequential(nn.Linear(8, 2), nn.Tanh()),
    )
    blocks, note = find_blocks(model)
    assert [n for n, _ in blocks] == ["features.0", "features.2", "features.4"] and "features" in note


def test_a_module_list_of_mixed_layers_has_every_module_recorded() -> None:
    """Mixed layers in a ModuleList run by the model's own loop: layers were hooked on the list itself,
    never called, so the last layer was never recorded and its pass counter never reset (the float64
    re-run after a NaN had no profile at all). Each module is a block there. Oracle: the modules the
    loop calls, and a planted NaN named at its block in the re-run."""
    torch.manual_seed(0)

    class Looped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh()])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = layer(x)
            return x

    model, x = Looped(), torch.randn(3, 4)
    blocks, note = find_blocks(model)
    assert [n for n, _ in blocks] == ["layers.0", "layers.1", "layers.2", "layers.3"]
    assert note == "blocks: layers (4, mixed module types)"
    m = probe_module(model, x, lambda o, _: o.square().mean())
    assert m.activation_names == ("(input)", "layers.0", "layers.1", "layers.2", "layers.3")
    with torch.no_grad():
        model.layers[2].bias[0] = math.nan
    m = probe_module(model, x, lambda o, _: o.square().mean())
    assert m.activation_names[-1] == "layers.3"
    assert m.first_nonfinite is not None and m.first_nonfinite.layer == "layers.2"


def test_a_sequential_the_model_loops_over_has_every_layer_recorded_every_pass() -> None:
    """Layers of a flat Sequential hooked the Sequential for the last layer's output and each pass's
    start; a model looping over it (for m in self.net) never calls it: the last layer was never
    recorded and, the count never reset, a second probe recorded nothing. Oracle: the layers
    recorded when the model calls the Sequential itself, and torch's output-gradient norms."""
    torch.manual_seed(0)

    class Looped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(*(m for _ in range(3) for m in (nn.Linear(8, 8), nn.Tanh())))
            self.looping = True

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.looping:
                return self.net(x)
            for layer in self.net:
                x = layer(x)
            return x

    model, x = Looped(), torch.randn(4, 8)
    looped = [probe_module(model, x, lambda o, _: o.square().mean()) for _ in range(2)]
    model.looping = False
    called = probe_module(model, x, lambda o, _: o.square().mean())
    assert called.activation_names == ("(input)", "net.0", "net.2", "net.4")
    for m in looped:
        assert m.activation_names == called.activation_names
        assert m.activation_grad_norms == pytest.approx(called.activation_grad_norms, rel=1e-6)
    outs: list[torch.Tensor] = []
    handles = [model.net[i].register_forward_hook(lambda mod, a, out: outs.append(out)) for i in (1, 3, 5)]
    out = model(x)
    for h in handles:
        h.remove()
    norms = [float(g.norm()) for g in torch.autograd.grad(out.square().mean(), outs)]
    assert called.activation_grad_norms[1:] == pytest.approx(norms, rel=1e-5)


def test_the_reproduction_line_reproduces_a_verdict_on_non_default_limits() -> None:
    limits = Limits(growth=2.0, grad_norm=None)
    config = Config.of("mlp", depth=12, width=16, init_scale=2.0, batch_size=4, seeds=3)
    judged = assess(config, limits=limits)
    assert judged.exploded and not assess(config).exploded  # the limit matters here
    line = reproduction(config, limits)
    code = line.removeprefix('python -c "').removesuffix('"')
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(judged.verdict)


@pytest.mark.slow
def test_the_linear_rnn_seq_len_boundary_matches_the_20_seed_median() -> None:
    """Brute force: the smallest seq_len whose median through-time growth (the loss on the last step,
    what a recurrent subject is judged on) over 20 seeds passes the limit, which theory puts at the
    smallest T with 1.25^(T-1) > 100, 22 (W_hh = 1.25 x orthogonal: every seed alike); the search
    (seeds budget 5) reports exactly it, from --seed 0..2 alike. The per-token growth passed 100 at 19."""
    base = Config.of("rnn", width=16, init_scale=1.25, activation="linear", batch_size=4)
    limits = Limits(growth=100.0, grad_norm=None, divergence=None)
    truth = next(
        t
        for t in range(2, 128)
        if statistics.median(
            probe(base.with_knobs(seq_len=t, seed=s), last_step=True).growth for s in range(500, 520)
        )
        > 100
    )
    assert truth == next(t for t in range(2, 128) if (t - 1) * math.log(1.25) > math.log(100)) == 22
    for seed in range(3):
        space = Space("rnn", base.with_run(seed=seed), (Axis.range("seq_len", 1, 96),))
        cx = search(space, limits=limits, max_examples=10, seed=seed).counterexample
        assert cx is not None and int(cx.config.knob("seq_len")) == truth, (truth, cx.config.knob("seq_len"))


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_a_flat_sequential_has_its_weighted_layers_as_blocks_with_the_theorys_gains(scale: float) -> None:
    """Linear, ReLU, Linear, ReLU, ...: a block per Linear, with the ReLU after it, so every gain is a
    whole layer's. Oracle, mean field: weights N(0, 2 s^2 / fan_in) and ReLU give a per-layer
    backward gain of s (chi_1 = sigma_w^2 / 2 = s^2), at width 512 within 10%."""
    torch.manual_seed(0)
    layers = [nn.Linear(512, 512, bias=False) for _ in range(8)]
    for layer in layers:
        nn.init.normal_(layer.weight, std=scale * (2.0 / 512) ** 0.5)
    model = nn.Sequential(*[m for layer in layers for m in (layer, nn.ReLU())])
    blocks, note = find_blocks(model)
    assert [m.weighted for _, m in blocks] == layers and "8 layers of 16 mixed modules" in note  # type: ignore[union-attr]
    readout = torch.randn(64, 512)  # a loss whose gradient is independent of the forward signal
    m = probe_module(model, torch.randn(64, 512), lambda out, _: (out * readout).sum())
    inner = m.gains[1:]  # gain i + 1: across Linear i + 1 and the ReLU after it
    assert statistics.median(inner) == pytest.approx(scale, rel=0.1)


def test_a_flat_sequential_layer_ends_after_its_activation_even_a_shared_one() -> None:
    """Oracle, autograd in float64: in Linear, Tanh, Linear, Tanh, ... (one Tanh instance shared by
    every layer), each block's output is the activation's, so the growth is |dL/dx| / |dL/d(model
    output)| and every gain the ratio of post-activation gradients, exactly (taken at the Linears'
    outputs, the growth was ~2x off and the last activation outside the chain)."""
    torch.manual_seed(0)
    width, depth = 64, 6
    act, linears = nn.Tanh(), [nn.Linear(width, width) for _ in range(depth)]
    for linear in linears:
        nn.init.normal_(linear.weight, std=3.0 / width**0.5)
    model = nn.Sequential(*[m for linear in linears for m in (linear, act)]).double()
    x = torch.randn(16, width, dtype=torch.float64)
    m = probe_module(model, x, lambda out, _: out.pow(2).sum())
    xr, outs = x.clone().requires_grad_(), []
    h = xr
    for linear in linears:
        h = act(linear(h))
        h.retain_grad()
        outs.append(h)
    h.pow(2).sum().backward()
    assert xr.grad is not None
    g = [o.grad.norm().item() for o in outs if o.grad is not None]
    assert m.growth == pytest.approx(xr.grad.norm().item() / g[-1], rel=1e-12)
    assert list(m.gains[1:]) == pytest.approx([g[i] / g[i + 1] for i in range(depth - 1)], rel=1e-12)


class _TwoStages(nn.Module):
    """Two stacks, the second fed by the first (a ResNet's stages): one chain."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3)])
        self.b = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in [*self.a, *self.b]:
            x = layer(x)
        return x


class _Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x)


class _Stages(nn.Module):
    """A ModuleList of plain Sequential stages of residual blocks, between a stem and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.head = nn.Linear(8, 8), nn.Linear(8, 2)
        self.stages = nn.ModuleList([nn.Sequential(*[_Residual(8) for _ in range(3)]) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(x)


def test_a_list_of_sequential_stages_reads_as_its_residual_blocks_with_exact_gains() -> None:
    """Read as its 2 stages, each residual block's gain was hidden in its stage's. Oracle: autograd in
    float64, |dL/d out| of every residual block (retain_grad), one chain across the stages."""
    torch.manual_seed(0)
    model = _Stages().double()
    blocks, note = find_blocks(model)
    assert [n for n, _ in blocks] == [f"stages.{s}.{b}" for s in range(2) for b in range(3)]
    assert note == "blocks: stages (6)"
    x = torch.randn(4, 8, dtype=torch.float64)
    m = probe_module(model, x, lambda out, _: out.pow(2).sum())
    outs, h = [], model.stem(x)
    for stage in model.stages:
        for block in stage:
            h = block(h)
            h.retain_grad()
            outs.append(h)
    model.head(h).pow(2).sum().backward()
    g = [o.grad.norm().item() for o in outs if o.grad is not None]
    assert len(g) == 6 and list(m.gains[1:]) == pytest.approx([g[i] / g[i + 1] for i in range(5)], rel=1e-12)


class _Transition(nn.Module):
    """Between stages: a composite of another type than the residual blocks, x3 its input."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm, self.proj = nn.LayerNorm(width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x)) * 3.0


class _MixedStages(_Stages):
    """Stage 0 residual blocks alone, stages 1..3 opening with a transition: the stages are the stack."""

    def __init__(self) -> None:
        super().__init__()
        later = [nn.Sequential(_Transition(8), _Residual(8), _Residual(8)) for _ in range(3)]
        self.stages = nn.ModuleList([nn.Sequential(_Residual(8), _Residual(8)), *later])


def test_stages_some_of_which_open_with_a_transition_are_read_as_the_whole_chain() -> None:
    """Descending into stage 0 alone mixed types, lost the stack, and measured stage 0's two blocks
    (growth 1.27 for 1.41; found by review). Oracle: float64 autograd, |dL/d stage 0's input| over
    |dL/d the last stage's output| (retain_grad)."""
    torch.manual_seed(0)
    model = _MixedStages().double()
    blocks, note = find_blocks(model)
    assert [n for n, _ in blocks] == [f"stages.{i}" for i in range(4)] and note == "blocks: stages (4)"
    x = torch.randn(4, 8, dtype=torch.float64)
    m = probe_module(model, x, lambda out, _: out.pow(2).sum())
    first = model.stem(x)
    first.retain_grad()
    h = first
    for stage in model.stages:
        h = stage(h)
    h.retain_grad()
    model.head(h).pow(2).sum().backward()
    assert first.grad is not None and h.grad is not None
    assert m.growth == pytest.approx((first.grad.norm() / h.grad.norm()).item(), rel=1e-12)


class _EncoderDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.t = nn.Transformer(
            d_model=16,
            nhead=2,
            num_encoder_layers=2,
            num_decoder_layers=2,
            dim_feedforward=32,
            dropout=0.0,
            batch_first=True,
        )

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        return self.t(src, tgt)


def test_a_gain_is_measured_across_two_stacks_only_where_the_second_takes_the_firsts_output() -> None:
    """Oracle, autograd in float64: chained stages give the exact gain across the junction (|dL/d out
    of a.2| / |dL/d out of b.0|); an encoder-decoder's decoder.layers.0 takes the target, not the
    encoder's output, so there is no gain across that junction (NaN, never a ratio of two chains)."""
    torch.manual_seed(0)
    model = _TwoStages().double()
    x = torch.randn(4, 8, dtype=torch.float64)
    m = probe_module(model, x, lambda out, _: out.pow(2).sum())
    outs, h = [], x
    for layer in [*model.a, *model.b]:
        h = layer(h)
        h.retain_grad()
        outs.append(h)
    h.pow(2).sum().backward()
    g = [o.grad.norm().item() for o in outs if o.grad is not None]
    assert m.gains[3] == pytest.approx(g[2] / g[3], rel=1e-12)  # a.2 -> b.0
    ed = _EncoderDecoder().double()
    src, tgt = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 4, 16, dtype=torch.float64)
    m = probe_module(ed, (src, tgt), lambda out, _: out.pow(2).sum())
    junction = m.activation_names.index("t.decoder.layers.0") - 1
    assert math.isnan(m.gains[junction])
    assert all(math.isfinite(g) for i, g in enumerate(m.gains) if i != junction)


def test_an_encoder_decoders_growth_is_the_product_of_its_chains_growths() -> None:
    """Oracle: the product of the measured gains, the junction's left out; and from the norms, each chain's
    first over last (neither grows: the decoder's vanishing shows). The ratio across (the encoder's dL/d
    input over the decoder's last output) read BART at its own init as 0.0084, 'vanishes', with every
    gain in 0.975-1.008. The kind is fitted across the junction too (it was n/a for every encoder-
    decoder)."""
    from stabilitycheck.growthkind import fit_growth

    torch.manual_seed(0)
    ed = _EncoderDecoder().double()
    src, tgt = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 4, 16, dtype=torch.float64)
    m = probe_module(ed, (src, tgt), lambda out, _: out.pow(2).sum())
    start = m.activation_names.index("t.decoder.layers.0")
    act = m.activation_grad_norms
    chains = [act[0] / act[start - 1], act[start] / act[-1]]
    assert max(chains) < 1
    assert m.growth == pytest.approx(math.prod(g for g in m.gains if not math.isnan(g)), rel=1e-12)
    assert m.growth == pytest.approx(math.prod(chains), rel=1e-12)
    assert m.growth != pytest.approx(act[0] / act[-1], rel=1e-3)  # the ratio across differs here
    rate, r2 = fit_growth(m.gains)[:2]  # fitted, not NaN (n/a); -inf r2 where the rate is no growth
    assert math.isfinite(rate) and not math.isnan(r2)


def test_a_module_used_at_several_places_of_a_flat_sequential_is_one_layer_per_place() -> None:
    """Oracle, autograd in float64: Linear, Tanh, then one Linear used three times (each with a Tanh),
    then a head. Each use is its own layer, its output the input of the next weighted module's call
    at the next place. The shared module's hook fired at every call, for every layer after it: 11
    recorded outputs for 5 layers, six gains exactly 1."""
    torch.manual_seed(0)
    shared = nn.Linear(16, 16, bias=False)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.Tanh(), shared, nn.Tanh(), shared, nn.Tanh(), shared, nn.Tanh(), nn.Linear(16, 4)
    ).double()
    x = torch.randn(8, 8, dtype=torch.float64)
    m = probe_module(model, x, lambda out, _: out.pow(2).sum())
    assert m.activation_names == ("(input)", "0", "2", "4", "6", "8")
    h = x.clone().requires_grad_()
    outs = [h]
    for k in range(0, 9, 2):  # a layer: the weighted module and the activation after it
        h = model[k](h) if k == 8 else model[k + 1](model[k](h))
        outs.append(h)
    grads = torch.autograd.grad(h.pow(2).sum(), outs)
    norms = [float(g.norm()) for g in grads]
    assert m.activation_grad_norms == pytest.approx(norms, rel=1e-12)
    assert m.gains == pytest.approx([a / b for a, b in itertools.pairwise(norms)], rel=1e-12)


class _Log(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)


def _convs(last: nn.Module) -> nn.Sequential:
    """A flat Sequential of mixed modules, DenseNet's `features` style: layers 0 (conv), 1 (norm and
    its ReLU and pool), 4 (conv), 5 (norm, `last`, flatten) and 8 (the head)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        last,
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )


def test_a_nan_made_inside_a_layer_of_a_flat_sequential_is_that_layers() -> None:
    """Layer 5 (a norm, then a log of its negative values) makes the NaN from a finite input: the
    documented order names `activation of 5`. The layer's hooks were given the next module's input
    as the layer's, its output, so the NaN read as made before it by the model's own code between
    the blocks, `(outside blocks, before 5)` (found by a third-party audit, on DenseNet's features)."""
    m = probe_module(_convs(_Log()), torch.randn(2, 3, 8, 8), lambda out, _: out.sum())
    at = m.activation_names.index("5")
    assert all(math.isfinite(v) for v in m.activation_norms[:at]) and math.isnan(m.activation_norms[at])
    assert m.first_nonfinite is not None
    assert (m.first_nonfinite.tensor, m.first_nonfinite.layer) == ("activation", "5")


@pytest.mark.parametrize("k", [0, 1, 4])
def test_a_nan_planted_in_a_layers_module_of_a_flat_sequential_is_that_layers(k: int) -> None:
    """A NaN planted in the output of layer k's module with parameters is in layer k's output, made
    from its finite input: `activation of k` (it read `(outside blocks, before k)`)."""
    model = _convs(nn.ReLU())

    def plant(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out.view(-1)[5] = math.nan
        return out

    model[k].register_forward_hook(plant)
    m = probe_module(model, torch.randn(2, 3, 8, 8), lambda out, _: out.sum())
    assert m.first_nonfinite is not None
    assert (m.first_nonfinite.tensor, m.first_nonfinite.layer) == ("activation", str(k))


class _TowersCalledOutOfOrder(nn.Module):
    """Two towers of 3 bias-free linear blocks, declared text then vision (as CLIP declares them) and
    run vision first; weights 1.5 and 2 x orthogonal, so each gain is exactly the tower's."""

    def __init__(self) -> None:
        super().__init__()
        self.text = nn.ModuleList(nn.Sequential(nn.Linear(8, 8, bias=False)) for _ in range(3))
        self.vision = nn.ModuleList(nn.Sequential(nn.Linear(8, 8, bias=False)) for _ in range(3))
        for tower, gain in ((self.text, 1.5), (self.vision, 2.0)):
            for block in tower:
                nn.init.orthogonal_(block[0].weight, gain=gain)

    def forward(self, words: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        for block in self.vision:
            pixels = block(pixels)
        for block in self.text:
            words = block(words)
        return words + pixels


def test_found_stacks_are_taken_in_the_order_the_forward_calls_them() -> None:
    """The `(input)` is block 0's: found in declaration order, the text tower first, and run vision
    first, neither tower's input was read and the vision chain grew 2^2 = 4 from its block 0's output
    (found by a third-party audit on CLIP: growth 2 where the towers in call order read 10). In the
    order the forward calls them: the vision chain from its input, 2^3 = 8, beside the text chain's
    1.5^2 (exact: orthogonal weights)."""
    torch.manual_seed(0)
    x = (torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64))
    m = probe_module(_TowersCalledOutOfOrder().double(), x, lambda out, _: out.square().sum())
    assert m.activation_names == ("(input)", "vision.0", "vision.1", "vision.2", "text.0", "text.1", "text.2")
    assert m.blocks_note == "blocks: vision (3) + text (3) (in the order the forward calls them)"
    assert m.chain_growths == pytest.approx((2.0**3, 1.5**2), rel=1e-6)
    assert m.growth == pytest.approx(2.0**3, rel=1e-6)


def torch_output_grads(
    model: nn.Module, args: tuple[torch.Tensor, ...], modules: list[nn.Module], pick: Any = lambda out: out
) -> list[float]:
    """Oracle: ||dL/d output|| of every call of `modules` (the tensor `pick` takes from its output), in
    call order, by torch.autograd.grad, for the loss the tests probe with (a sum of squares); 0 where
    the loss does not depend on it."""
    outs: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda mod, i, out: outs.append(pick(out))) for m in modules]
    loss = model(*args).square().sum()
    for handle in handles:
        handle.remove()
    return [0.0 if g is None else float(g.norm()) for g in torch.autograd.grad(loss, outs, allow_unused=True)]


def test_a_stack_of_grus_passing_a_packed_sequence_is_probed() -> None:
    """nn.GRU layers passing a PackedSequence along (the variable-length recipe): reading the tensors
    of a block's arguments rebuilt the PackedSequence of Nones, which raised inside the model's forward
    (the CLI blamed the user's code). Each block is read on its output's packed data. Oracle: torch's
    gradients of the same tensors, float64."""
    torch.manual_seed(0)

    class Packed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.grus = nn.ModuleList(nn.GRU(8, 8, batch_first=True, dtype=torch.float64) for _ in range(3))

        def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            p = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            for gru in self.grus:
                p, _ = gru(p)
            return nn.utils.rnn.pad_packed_sequence(p, batch_first=True)[0]

    model = Packed()
    args = (torch.randn(3, 5, 8, dtype=torch.float64), torch.tensor([5, 3, 2]))
    m = probe_module(model, args, lambda o, _: o.square().sum())
    norms = torch_output_grads(model, args, list(model.grus), pick=lambda out: out[0].data)
    assert m.activation_grad_norms[-3:] == pytest.approx(norms, rel=1e-9)
    assert m.activation_names[0] == "(input)"  # the packed data block 0 takes: see the test below
    assert m.gains[-2:] == pytest.approx([norms[0] / norms[1], norms[1] / norms[2]], rel=1e-9)


def test_a_packed_sequence_made_from_a_blocks_output_continues_its_chain() -> None:
    """Linear -> pack_padded_sequence -> nn.RNN -> pad_packed_sequence -> Linear, read on its leaf
    modules: the RNN takes a PackedSequence whose data is the Linear's output, gathered, and the
    junction check, given the PackedSequence rather than a tensor, started a chain at the RNN: its gain
    (the recurrence's) was in no chain, growth 0.49 where the same model unpacked read 7814 (found by a
    third-party audit). Oracle: torch's |dL/dx| / |dL/d head output|, float64, the same for the
    packed and the unpacked forward (no padding: every length is the sequence's)."""
    torch.manual_seed(0)

    class Packed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(4, 8, dtype=torch.float64)
            self.rnn = nn.RNN(8, 8, batch_first=True, dtype=torch.float64)
            self.head = nn.Linear(8, 3, dtype=torch.float64)
            with torch.no_grad():
                self.rnn.weight_hh_l0.mul_(4.0)

        def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            p = nn.utils.rnn.pack_padded_sequence(self.inp(x), lengths, batch_first=True)
            y = nn.utils.rnn.pad_packed_sequence(self.rnn(p)[0], batch_first=True)[0]
            return self.head(y)

    model = Packed()
    x, lengths = torch.randn(3, 12, 4, dtype=torch.float64), torch.tensor([12, 12, 12])
    z = torch.randn(3, 12, 3, dtype=torch.float64)
    m = probe_module(model, (x, lengths), lambda o, _: (o * z).sum())
    xi = x.clone().requires_grad_()
    out = model.head(model.rnn(model.inp(xi))[0])
    out.retain_grad()
    (out * z).sum().backward()
    assert out.grad is not None and xi.grad is not None
    assert m.activation_names == ("(input)", "inp", "rnn", "head")
    assert m.chain_starts == ()
    assert m.growth == pytest.approx(float(xi.grad.norm() / out.grad.norm()), rel=1e-9)


def test_a_stack_taking_a_tuple_from_another_stack_continues_its_chain() -> None:
    """Two stacks of composite blocks each called on one (h, mask) tuple and returning one: the second
    stack's first call takes the first stack's last output, but the junction check, given the tuple
    rather than a tensor, started a chain there, so the second stack's first gain was in no chain
    (growth 1.44 where torch's, first block output to last, is 2.03; found by a third-party audit).
    Oracle: torch's gradients of each block's h, float64."""
    torch.manual_seed(0)

    class A(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8, dtype=torch.float64)

        def forward(self, hm: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.tanh(self.lin(hm[0])) * hm[1], hm[1]

    class B(A):
        def forward(self, hm: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            return hm[0] + torch.tanh(self.lin(hm[0])) * hm[1], hm[1]

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.ModuleList(A() for _ in range(3))
            self.b = nn.ModuleList(B() for _ in range(3))
            with torch.no_grad():
                for block in [*self.a, *self.b]:
                    block.lin.weight.mul_(3.0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            hm = (x, torch.ones(x.shape[0], 1, dtype=torch.float64))
            for block in [*self.a, *self.b]:
                hm = block(hm)
            return hm[0]

    model = Net()
    x, z = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    m = probe_module(model, x, lambda o, _: (o * z).sum())
    outs: list[torch.Tensor] = []
    blocks = [*model.a, *model.b]
    handles = [b.register_forward_hook(lambda mod, i, out: outs.append(out[0])) for b in blocks]
    grads = torch.autograd.grad((model(x) * z).sum(), outs)
    for handle in handles:
        handle.remove()
    assert m.activation_names == ("a.0", "a.1", "a.2", "b.0", "b.1", "b.2")
    assert m.chain_starts == ()
    assert m.growth == pytest.approx(float(grads[0].norm() / grads[-1].norm()), rel=1e-9)


def test_a_stack_whose_first_block_takes_a_packed_sequence_reads_its_input() -> None:
    """A stem's output packed, then a ModuleList of nn.RNN passing the PackedSequence along: block 0's
    input was no tensor, so no `(input)` was taken and the first recurrent layer's gain was read
    nowhere (growth 7.64 where torch's, stack input to last output, is 9.74; found by a third-party
    audit). Its entry is now the packed data, the copy put back into the PackedSequence. Oracle:
    torch's gradients of the packed data going into layer 0 and coming out of the last, float64,
    unequal lengths."""
    torch.manual_seed(0)

    class Stack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(4, 8, dtype=torch.float64)
            self.layers = nn.ModuleList(nn.RNN(8, 8, batch_first=True, dtype=torch.float64) for _ in range(3))
            with torch.no_grad():
                for layer in self.layers:
                    layer.weight_hh_l0.mul_(4.0)

        def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            packed = nn.utils.rnn.pack_padded_sequence
            h = packed(self.inp(x), lengths, batch_first=True, enforce_sorted=False)
            for layer in self.layers:
                h, _ = layer(h)
            return nn.utils.rnn.pad_packed_sequence(h, batch_first=True, total_length=x.shape[1])[0]

    model = Stack()
    args = (torch.randn(3, 10, 4, dtype=torch.float64), torch.tensor([10, 7, 4]))
    z = torch.randn(3, 10, 8, dtype=torch.float64)
    m = probe_module(model, args, lambda o, _: (o * z).sum())
    seen: list[torch.Tensor] = []
    first = model.layers[0].register_forward_pre_hook(lambda mod, a: seen.append(a[0].data))
    last = model.layers[-1].register_forward_hook(lambda mod, a, out: seen.append(out[0].data))
    grads = torch.autograd.grad((model(*args) * z).sum(), seen)
    first.remove()
    last.remove()
    assert m.activation_names == ("(input)", "layers.0", "layers.1", "layers.2")
    assert m.growth == pytest.approx(float(grads[0].norm() / grads[1].norm()), rel=1e-9)


def test_one_chains_vanishing_does_not_hide_anothers_explosion() -> None:
    """Two towers of orthogonal linear layers, one at gain 3 and one at 1/3: their product (3) hid the
    first's growth 27 (a trial's prophetnet: encoder 2558, decoder 1.4e-16, growth read 3.5e-13, no
    explosion). Oracle, exact: ||W^T v|| = g ||v|| for W = g x orthogonal, float64."""
    torch.manual_seed(0)

    model = OrthogonalTowers(3, (3.0, 1 / 3)).double()
    m = probe_module(model, torch.randn(4, 8, dtype=torch.float64), lambda o, _: o.square().sum())
    assert m.activation_names[0] == "(input)" and len(m.activation_names) == 7
    assert m.growth == pytest.approx(3.0**3, rel=1e-6)  # tower 0 from the input: 3 gains of 3


def test_a_shared_tower_run_on_two_inputs_starts_a_new_chain_and_stacked_cells_do_not() -> None:
    """A Siamese model runs one tower on each input: the second pass's first gain was read against the
    first pass's last output, two unrelated gradients (growth 1.025 where the chains give 1.315; found
    by a trial). A stack entered again now continues only where the call takes one of the stack's own
    outputs, as stacked recurrent cells do with their hidden states. Oracle: torch's output-gradient
    norms, a NaN gain at the junction."""
    torch.manual_seed(0)

    class Siamese(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tower = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3))

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            first, second = run_tower(self.tower, a, b)
            return first - second

    class Stacked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cells = nn.ModuleList(nn.GRUCell(8, 8) for _ in range(2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            hs = [torch.zeros(x.shape[0], 8), torch.zeros(x.shape[0], 8)]
            for t in range(x.shape[1]):
                hs[0] = self.cells[0](x[:, t], hs[0])
                hs[1] = self.cells[1](hs[0], hs[1])
            return hs[1]

    model = Siamese()
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    m = probe_module(model, (a, b), lambda o, _: o.square().sum())
    outs: list[torch.Tensor] = []
    handles = [blk.register_forward_hook(lambda mod, i, out, o=outs: o.append(out)) for blk in model.tower]
    x = a.clone().requires_grad_()
    loss = model(x, b).square().sum()
    for h in handles:
        h.remove()
    norms = [float(g.norm()) for g in torch.autograd.grad(loss, [x, *outs])]
    assert m.activation_names == ("(input)", *(f"tower.{i}[{k}]" for k in range(2) for i in range(3)))
    assert math.isnan(m.gains[3]) and sum(math.isnan(g) for g in m.gains) == 1
    chains = [norms[0] / norms[3], norms[4] / norms[6]]  # side by side: no gradient crosses both
    assert m.growth == pytest.approx(max(chains), rel=1e-5)
    assert m.chain_growths == pytest.approx(chains, rel=1e-5) and m.chain_feeds == ((), ())
    cells = probe_module(Stacked(), torch.randn(4, 5, 8), lambda o, _: o.square().sum())
    assert len(cells.gains) == 9 and all(math.isfinite(g) for g in cells.gains)


def test_a_recurrent_cell_outside_any_list_is_the_block() -> None:
    """A GRUCell loop with an input projection and a head, no stack: the blocks fell back to the leaf
    modules, whose calls interleave (inp[0], cell[0], inp[1], ...), so gains were read across the
    projection of the next token (4.67; found by a trial). The cell alone is the block now. Oracle:
    torch's gradients of the hidden states, the chain's growth their first over last."""
    torch.manual_seed(0)

    class Loop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.cell, self.head = nn.Linear(4, 8), nn.GRUCell(8, 8), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.zeros(x.shape[0], 8)
            for t in range(x.shape[1]):
                h = self.cell(self.inp(x[:, t]), h)
            return self.head(h)

    model = Loop()
    blocks, note = find_blocks(model)
    assert [n for n, _ in blocks] == ["cell"] and "recurrent cells" in note
    x = torch.randn(3, 6, 4)
    m = probe_module(model, x, lambda o, _: o.square().sum(), blocks=blocks)
    hs: list[torch.Tensor] = []
    handle = model.cell.register_forward_hook(lambda mod, i, out: hs.append(out))
    loss = model(x).square().sum()
    handle.remove()
    norms = [float(g.norm()) for g in torch.autograd.grad(loss, hs)]
    assert m.activation_names == tuple(f"cell[{t}]" for t in range(6))
    assert m.activation_grad_norms == pytest.approx(norms, rel=1e-5)
    assert m.growth == pytest.approx(norms[0] / norms[-1], rel=1e-5)


def test_a_nan_made_in_the_backward_of_a_decoders_use_of_the_encoder_is_not_blamed_on_decoder_0() -> None:
    """A NaN made in the backward of dec1's cross-use of the encoder's output shows first in
    dL/d(enc1's output); the culprit rule 'call i + 1 made it' named dec0, whose own output gradient is
    finite (found by a trial on blenderbot). Past a junction the culprit is the blocks taking that
    output. Oracle: the planted fault, and dec0's finite output gradient."""
    from probe_models import NanBackward

    from stabilitycheck.culprit import culprit_of

    class Cross(nn.Module):
        def __init__(self, poison: bool) -> None:
            super().__init__()
            self.linear, self.poison = nn.Linear(16, 16), poison

        def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
            memory = NanBackward.apply(memory) if self.poison else memory
            return torch.tanh(self.linear(x) + memory)

    class EncDec(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.ModuleList(_Positional() for _ in range(2))
            self.decoder = nn.ModuleList([Cross(False), Cross(True)])

        def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
            for block in self.encoder:
                src = block(src, tgt)
            for block in self.decoder:
                tgt = block(tgt, src)
            return tgt

    torch.manual_seed(0)
    m = probe_module(EncDec(), (torch.randn(4, 16), torch.randn(4, 16)), lambda o, _: o.square().sum())
    nf = m.first_nonfinite
    assert nf is not None and (nf.tensor, nf.layer) == ("activation_grad", "encoder.1")
    assert m.chain_starts == (m.activation_names.index("decoder.0"),)
    assert math.isfinite(m.activation_grad_norms[m.activation_names.index("decoder.0")])
    assert culprit_of([m]) == "(a block taking encoder.1's output)"


def test_chains_re_entered_through_a_mask_or_a_long_transition_continue() -> None:
    """Two regressions a reviewer found in the re-entry check: stacked cells whose hidden state is
    masked (h = m * new + (1 - m) * h) took a new tensor, not the cell's own output, so every token
    started a chain (growth 1.07 for 0.076); a shared stack looped with a 6-layer transition between
    loops was past the 32-node search, a junction (2.12 for 5.24). Oracle: torch's gradients of the
    block outputs, the growth their first over last."""
    torch.manual_seed(0)

    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cells = nn.ModuleList(nn.GRUCell(8, 8) for _ in range(2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            hs = [torch.zeros(x.shape[0], 8), torch.zeros(x.shape[0], 8)]
            mask = torch.ones(x.shape[0], 1)
            for t in range(x.shape[1]):
                inp = x[:, t]
                for i, cell in enumerate(self.cells):
                    hs[i] = mask * cell(inp, hs[i]) + (1 - mask) * hs[i]
                    inp = hs[i]
            return hs[1]

    class Looped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(2))
            self.transition = nn.Sequential(
                *(nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.GELU()) for _ in range(6))
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for loop in range(2):
                x = self.transition(x) if loop else x
                for block in self.blocks:
                    x = block(x)
            return x

    for model, x in ((Masked(), torch.randn(3, 5, 8)), (Looped(), torch.randn(3, 8))):
        blocks, _ = find_blocks(model)
        m = probe_module(model, x, lambda o, _: o.square().sum(), blocks=blocks)
        norms = torch_output_grads(model, (x,), [b for _, b in blocks])
        assert m.chain_starts == () and all(math.isfinite(g) for g in m.gains), type(model).__name__
        assert m.growth == pytest.approx(m.activation_grad_norms[0] / norms[-1], rel=1e-5)
        assert m.activation_grad_norms[-len(norms) :] == pytest.approx(norms, rel=1e-5)


def test_the_vanishing_criterion_reads_the_smallest_chain() -> None:
    """Towers at gains 1.02 and 0.01: the growth shows the growing chain (1.06), and the vanishing
    criterion, which read the growth, no longer fired for the other chain's 1e-4 (a reviewer's case).
    Oracle, exact: ||W^T v|| = g ||v|| for W = g x orthogonal."""
    from stabilitycheck.verdicts import Limits, verdict

    torch.manual_seed(0)

    model = OrthogonalTowers(2, (1.02, 0.01)).double()
    m = probe_module(model, torch.randn(4, 8, dtype=torch.float64), lambda o, _: o.square().sum())
    assert m.chain_growths == pytest.approx([1.02**2, 0.01], rel=1e-6)
    assert m.growth == pytest.approx(1.02**2, rel=1e-6)
    assert "vanishing" in verdict(m, Limits(vanishing=100)).names


def test_a_recurrent_cell_of_another_input_width_has_no_input_entry() -> None:
    """An LSTMCell(16, 12) looped over tokens took token 0's input as its chain's entry, so the growth
    ran from dL/du_0 (0.127 for 1.03; a reviewer's case). Its chain is its state (h_t, c_t), which
    the next call takes. Oracle: torch's gradients of h_t and of an alias of c_t the next call takes
    (its gradient through the next step alone), their joint norm."""
    torch.manual_seed(0)

    class Loop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cell, self.head = nn.LSTMCell(16, 12), nn.Linear(12, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = c = torch.zeros(x.shape[0], 12)
            for t in range(x.shape[1]):
                h, c = self.cell(x[:, t], (h, c))
            return self.head(h)

    model, x = Loop(), torch.randn(3, 6, 16)
    m = probe_module(model, x, lambda o, _: o.square().sum())
    states: list[torch.Tensor] = []

    def alias(module: nn.Module, args: Any, out: tuple[torch.Tensor, torch.Tensor]) -> Any:
        states.extend((out[0], out[1].view_as(out[1])))
        return states[-2:]

    handle = model.cell.register_forward_hook(alias)
    loss = model(x).square().sum()
    handle.remove()
    grads = [
        0.0 if g is None else g.norm().item() for g in torch.autograd.grad(loss, states, allow_unused=True)
    ]
    norms = [math.hypot(a, b) for a, b in zip(grads[::2], grads[1::2], strict=True)]
    assert m.activation_names[0] == "cell[0]"
    assert m.growth == pytest.approx(norms[0] / norms[-1], rel=1e-5)


class LinearCell(nn.Module):
    """A hand-written linear recurrent cell h' = W h + U x (not an nn.RNNCellBase), W = g x orthogonal,
    float64; `first` puts the hidden state first in its calls. Its through-time gains are exactly g."""

    def __init__(self, g: float, hidden: int, width: int, first: bool) -> None:
        super().__init__()
        self.w = nn.Parameter(g * torch.linalg.qr(torch.randn(hidden, hidden, dtype=torch.float64))[0])
        self.u = nn.Parameter(torch.randn(hidden, width, dtype=torch.float64) / width**0.5)
        self.first = first

    def forward(self, a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor:
        h, x = (a, b) if self.first else (b, a)
        assert x is not None
        h = torch.zeros(x.shape[0], self.w.shape[0], dtype=x.dtype) if h is None else h
        return h @ self.w.T + x @ self.u.T


class LinearLoop(nn.Module):
    """The cell looped over the tokens, the loss on the last hidden state: calls cell(x_t, h), with h_0
    zeros or None, h by keyword where `keyword`, or with `hidden_first` cell(h, x_t)."""

    def __init__(
        self, g: float, h0: str = "zeros", hidden_first: bool = False, keyword: bool = False
    ) -> None:
        super().__init__()
        self.cell, self.h0, self.keyword = LinearCell(g, 16, 5, hidden_first), h0, keyword

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(x.shape[0], 16, dtype=x.dtype) if self.h0 == "zeros" else None
        for t in range(x.shape[1]):
            if self.cell.first:
                h = self.cell(h, x[:, t])
            else:
                h = self.cell(x[:, t], b=h) if self.keyword else self.cell(x[:, t], h)
        assert h is not None
        return h


@pytest.mark.parametrize(("h0", "keyword"), [("zeros", False), ("None", False), ("zeros", True)])
def test_a_hand_written_cell_called_as_cell_x_h_grows_through_its_hidden_state(
    h0: str, keyword: bool
) -> None:
    """A hand-written cell(x_t, h) of another input width took token 0's input as its chain's entry, as
    LSTMCell once did: growth 15.5 for a linear cell at g = 1.3 over 12 tokens, whose through-time
    growth is 1.3^11 = 17.9. Oracle, exact: ||W^T v|| = g ||v|| for W = g x orthogonal, so every gain
    is g and the growth over the 12 calls is g^11."""
    torch.manual_seed(0)
    g, tokens = 1.3, 12
    model = LinearLoop(g, h0, keyword=keyword)
    m = probe_module(model, torch.randn(4, tokens, 5, dtype=torch.float64), lambda o, _: o.sum())
    assert m.activation_names[:2] == ("cell[0]", "cell[1]") and len(m.activation_names) == tokens
    assert m.gains == pytest.approx([g] * (tokens - 1), rel=1e-12)
    assert m.growth == pytest.approx(g ** (tokens - 1), rel=1e-12)


def test_a_hand_written_cell_called_as_cell_h_x_keeps_h0_as_its_entry() -> None:
    """Called as cell(h, x_t), the cell's first argument is its chain: h_0 is the entry (a copy that
    requires grad), and the growth runs from dL/dh_0 over all 12 calls. Oracle, exact: g^12."""
    torch.manual_seed(0)
    g, tokens = 1.3, 12
    model = LinearLoop(g, hidden_first=True)
    m = probe_module(model, torch.randn(4, tokens, 5, dtype=torch.float64), lambda o, _: o.sum())
    assert m.activation_names[:2] == ("(input)", "cell[0]") and len(m.activation_names) == tokens + 1
    assert m.growth == pytest.approx(g**tokens, rel=1e-12)


@pytest.mark.parametrize(("width", "scale"), [(16, 1.0), (5, 1.0), (16, 0.5)])
def test_a_step_returning_its_output_then_its_hidden_state_is_read_on_the_hidden_state(
    width: int, scale: float
) -> None:
    """A cell returning (y, h), y first, was read on y, which no later call takes: every gain NaN but
    the last call's, growth 1, stable, where h grows 1.3 per step (the tutorial's char-RNN, found by
    an audit). Its chain is the tensor its next call takes. Oracle, exact: ||W^T v|| = g ||v||, so
    each gain through h is g (g x scale where the loop scales h in place after the cell returned it:
    h as returned, its first call's too, whose change came before the switch to h; a reviewer's
    case); the last call's h reaches no loss (the output is read from h_t-1), so the chain is
    h_1 .. h_11 and the growth (g x scale)^10. Of another input width, token 0's input is its entry
    until the second call shows the chain runs through h."""
    torch.manual_seed(0)
    g, tokens = 1.3, 12
    model = TutorialLoop(g, width, scale)
    m = probe_module(
        model,
        torch.randn(4, tokens, width, dtype=torch.float64),
        lambda o, _: o.sum(),
        blocks=[("rnn", model.rnn)],
    )
    assert m.activation_names[0] == "rnn[0]" and len(m.activation_names) == tokens
    assert m.gains[:-1] == pytest.approx([g * scale] * (tokens - 2), rel=1e-12)
    assert math.isnan(m.gains[-1])  # h_12 reaches no loss
    assert m.growth == pytest.approx((g * scale) ** (tokens - 2), rel=1e-12)


def test_a_step_is_never_read_on_an_argument_it_returns_as_it_came() -> None:
    """A decoder step returning (y, memory, h), memory the encoder's output passed to every call and
    returned as is: the switch took memory, the first tensor its next call takes, and read gains of
    exactly 1 (growth 1) where h grows 1.3 per step (a reviewer's case). Oracle, exact: each gain
    through h is g, the growth g^7 over the 8 calls."""
    torch.manual_seed(0)
    g = 1.3

    class Step(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wh = nn.Linear(16, 16, bias=False, dtype=torch.float64)
            self.wm = nn.Linear(16, 16, bias=False, dtype=torch.float64)
            self.wo = nn.Linear(16, 7, bias=False, dtype=torch.float64)
            with torch.no_grad():
                self.wh.weight.copy_(g * torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))[0])

        def forward(self, h: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, ...]:
            h = self.wh(h) + self.wm(memory)
            return self.wo(h), memory, h

    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc, self.step = nn.Linear(16, 16, dtype=torch.float64), Step()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            memory = self.enc(x)
            h = torch.zeros_like(memory)
            for _ in range(8):
                y, memory, h = self.step(h, memory)
            return y

    model = Decoder()
    m = probe_module(
        model, torch.randn(4, 16, dtype=torch.float64), lambda o, _: o.sum(), blocks=[("step", model.step)]
    )
    assert m.gains == pytest.approx([g] * 7, rel=1e-12)
    assert m.growth == pytest.approx(g**7, rel=1e-12)


def test_stacked_steps_returning_output_then_hidden_state_keep_their_first_tensor() -> None:
    """Two tutorial cells in a list, the second taking the first's output y, each its own h: read on
    h, the two cells' chains were read as one, gains alternating 0.3 and 5.4 across unrelated
    gradients (a reviewer's case). A block in a stack of two or more is read on its first tensor,
    the chain the next block takes, as before. Oracle: torch's gradient of each call's y."""
    torch.manual_seed(0)
    from chain_models import TutorialCell

    class Stacked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cells = nn.ModuleList([TutorialCell(1.3, 16), TutorialCell(1.3, 10)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            hs = [torch.zeros(x.shape[0], 16, dtype=x.dtype) for _ in self.cells]
            out = x[:, 0]
            for t in range(x.shape[1]):
                out = x[:, t]
                for i, cell in enumerate(self.cells):
                    out, hs[i] = cell(out, hs[i])
            return out

    model, x = Stacked(), torch.randn(3, 4, 16, dtype=torch.float64)
    m = probe_module(
        model,
        x,
        lambda o, _: o.square().sum(),
        blocks=[("cells.0", model.cells[0]), ("cells.1", model.cells[1])],
    )
    norms = torch_output_grads(model, (x,), list(model.cells), pick=lambda out: out[0])
    reached = [v for v in m.activation_grad_norms if v > 0]
    assert reached == pytest.approx([v for v in norms if v > 0], rel=1e-9)


def test_two_recurrent_cells_of_a_bidirectional_reader_are_two_chains() -> None:
    """A forward and a backward GRUCell held as attributes were one stack: the gain across from the
    forward cell's last call to the backward cell's first read 41, a ratio of two unrelated gradients
    (a reviewer's case). Each attribute is a stack of its own now. Oracle: torch's gradients of the
    hidden states, the growth from each chain's own first over last."""
    torch.manual_seed(0)

    class Reader(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fwd, self.bwd = nn.GRUCell(8, 8), nn.GRUCell(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = b = torch.zeros(x.shape[0], 8)
            for t in range(x.shape[1]):
                f = self.fwd(x[:, t], f)
            for t in reversed(range(x.shape[1])):
                b = self.bwd(x[:, t], b)
            return f * b

    model, x = Reader(), torch.randn(3, 5, 8)
    blocks, _ = find_blocks(model)
    m = probe_module(model, x, lambda o, _: o.square().sum(), blocks=blocks)
    norms = torch_output_grads(model, (x,), [b for _, b in blocks])
    assert m.chain_starts == (5,) and math.isnan(m.gains[4])
    chains = [norms[0] / norms[4], norms[5] / norms[9]]
    assert m.chain_growths == pytest.approx(chains, rel=1e-5)


def test_one_layer_placed_several_times_in_a_list_is_one_block_called_per_place() -> None:
    """ALBERT-style nn.ModuleList([layer] * 4): four blocks of one module, so each call was recorded
    four times, with three gains of exactly 1 between the copies (a reviewer's case). Oracle: torch's
    gradients of the four calls' outputs."""
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(8, 8), nn.Tanh())

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([layer] * 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.layers:
                x = block(x)
            return x

    model, x = Shared(), torch.randn(3, 8)
    blocks, _ = find_blocks(model)
    assert [n for n, _ in blocks] == ["layers.0"]
    m = probe_module(model, x, lambda o, _: o.square().sum(), blocks=blocks)
    outs: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda mod, i, out: outs.append(out))
    loss = model(x).square().sum()
    handle.remove()
    norms = [float(g.norm()) for g in torch.autograd.grad(loss, outs)]
    assert m.activation_names[1:] == tuple(f"layers.0[{k}]" for k in range(4))
    assert m.activation_grad_norms[1:] == pytest.approx(norms, rel=1e-5)


def test_a_stack_re_entered_after_another_stack_starts_a_new_chain() -> None:
    """A tower run, then another stack, then the tower again on its own first output: the tower's
    second pass takes one of its own outputs, but the call before it was the other stack's, whose
    gradient is unrelated; the gain across is a junction. Oracle: torch's gradients of every block
    output, NaN at both junctions and every other gain their ratio."""
    torch.manual_seed(0)

    class Interleaved(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tower = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3))
            self.other = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(2))

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            h = a
            for layer in self.tower:
                h = layer(h)
            for layer in self.other:
                b = layer(b)
            for layer in self.tower:
                h = layer(h)
            return h * b

    model, a, b = Interleaved(), torch.randn(4, 8), torch.randn(4, 8)
    blocks, _ = find_blocks(model)
    assert [n for n, _ in blocks] == [*(f"tower.{i}" for i in range(3)), "other.0", "other.1"]
    m = probe_module(model, (a, b), lambda o, _: o.square().sum(), blocks=blocks)
    outs: list[torch.Tensor] = []
    handles = [blk.register_forward_hook(lambda mod, i, out, o=outs: o.append(out)) for _, blk in blocks]
    x = a.clone().requires_grad_()
    loss = model(x, b).square().sum()
    for h in handles:
        h.remove()
    norms = [float(g.norm()) for g in torch.autograd.grad(loss, [x, *outs])]
    # calls: input, tower 0-2, other 0-1, tower 0-2 again
    assert m.chain_starts == (4, 6)
    assert [i for i, g in enumerate(m.gains) if math.isnan(g)] == [3, 5]
    expected = [norms[i] / norms[i + 1] for i in range(len(norms) - 1)]
    for i in (0, 1, 2, 4, 6, 7):
        assert m.gains[i] == pytest.approx(expected[i], rel=1e-5)


def test_stacked_cells_taking_their_hidden_state_by_keyword_are_one_chain() -> None:
    """Stacked GRUCells called as cell(x_t, hx=h): the re-entry of the stack each token continues the
    chain through the hidden state given by keyword, as it does given positionally. Oracle: torch's
    gradients of every cell call's output, no junction and each gain their ratio."""
    torch.manual_seed(0)

    class Stacked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cells = nn.ModuleList(nn.GRUCell(8, 8) for _ in range(2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            hs = [torch.zeros(x.shape[0], 8), torch.zeros(x.shape[0], 8)]
            for t in range(x.shape[1]):
                hs[0] = self.cells[0](x[:, t], hx=hs[0])
                hs[1] = self.cells[1](hs[0], hx=hs[1])
            return hs[1]

    model, x = Stacked(), torch.randn(4, 5, 8)
    m = probe_module(model, x, lambda o, _: o.square().sum())
    norms = torch_output_grads(model, (x,), list(model.cells))
    assert m.chain_starts == () and len(m.gains) == 9
    assert m.gains == pytest.approx([norms[i] / norms[i + 1] for i in range(9)], rel=1e-5)


def test_the_longest_stack_is_chosen_and_a_list_of_leaf_layers_is_not_set_beside_it() -> None:
    """Two input projections in a ModuleList, registered first, then four composite blocks: the chain
    is the longest stack, the blocks, and a stack of leaf layers is not a stack of composite blocks
    to set beside it (find_blocks' rule). Oracle: the rule, and torch's output-gradient norms of the
    chosen blocks as the probe's."""
    torch.manual_seed(0)

    class Projected(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
            self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(4))

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            x = self.proj[0](a) + self.proj[1](b)
            for layer in self.layers:
                x = layer(x)
            return x

    model, a, b = Projected(), torch.randn(3, 8), torch.randn(3, 8)
    blocks, note = find_blocks(model)
    assert [n for n, _ in blocks] == [f"layers.{i}" for i in range(4)] and note == "blocks: layers (4)"
    m = probe_module(model, (a, b), lambda o, _: o.square().sum(), blocks=blocks)
    norms = torch_output_grads(model, (a, b), list(model.layers))
    assert m.activation_grad_norms[-4:] == pytest.approx(norms, rel=1e-5)


def test_stages_of_composite_blocks_holding_more_blocks_outrank_a_longer_list_of_leaf_layers() -> None:
    """12 tanh blocks in 6 stages of 2 beside a stem's 3 Linears run side by side on thirds of the
    features (CoaT's shape): the stem's list, the longest, was the chain, growth 0.60 read stable for
    the blocks' 623 (found in an audit). Oracle: torch's gradients, dL/d(stage1.0 input) over
    dL/d(stage6.1 output)."""
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(48, 48, bias=False)
            nn.init.normal_(self.lin.weight, std=5 / 48**0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.lin(x))

    class Split(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.parts = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([p(c) for p, c in zip(self.parts, x.chunk(3, dim=-1), strict=True)], dim=-1)

    class Staged(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = Split()
            self.stages = [nn.ModuleList(Block() for _ in range(2)) for _ in range(6)]
            for k, stage in enumerate(self.stages):
                self.add_module(f"stage{k}", stage)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.stem(x)
            for stage in self.stages:
                for block in stage:
                    x = block(x)
            return x

    model, x = Staged(), torch.randn(16, 48)
    blocks, note = find_blocks(model)
    assert [n for n, _ in blocks] == [f"stage{k}.{i}" for k in range(6) for i in range(2)], note
    m = probe_module(model, x, lambda o, _: o.square().sum())
    h = model.stem(x).detach().requires_grad_()
    out = h
    for _, block in blocks:
        out = block(out)
    g_in, g_out = torch.autograd.grad(out.square().sum(), [h, out])
    assert m.growth == pytest.approx(float(g_in.norm() / g_out.norm()), rel=1e-5)
    assert m.growth > 100


def test_small_composite_heads_in_lists_do_not_outrank_a_trunk_of_leaf_layers() -> None:
    """16 Linear layers with tanh between them, and 17 small probe heads in two lists, one read on each
    state: the heads hold more blocks, the trunk more parameters, and the trunk is the chain (the
    heads were taken in review: growth 1 for 399). Oracle: torch's gradients, dL/dx through layers.0
    alone over dL/d(layers.15 output)."""
    torch.manual_seed(0)

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(32, 8), nn.Linear(8, 1)

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(h)))

    class Trunk(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(32, 32, bias=False) for _ in range(16))
            for layer in self.layers:
                nn.init.normal_(layer.weight, std=3.5 / math.sqrt(32))
            self.even = nn.ModuleList(Probe() for _ in range(9))
            self.odd = nn.ModuleList(Probe() for _ in range(8))
            self.states: list[torch.Tensor] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h, aux, self.states = x, torch.zeros(()), []
            for i, layer in enumerate(self.layers):
                aux = aux + (self.even if i % 2 == 0 else self.odd)[i // 2](h).sum()
                self.states.append(layer(h))  # a block's output: the tanh runs outside it
                h = torch.tanh(self.states[-1])
            return h.sum() + 0.01 * (aux + self.even[8](h).sum())

    model = Trunk().double()
    x = torch.randn(8, 32, dtype=torch.float64)
    assert find_blocks(model)[1] == "blocks: layers (16)"
    m = probe_module(model, x, lambda o, _: o)
    grads = torch.autograd.grad(model(x), model.states)
    entry = x.clone().requires_grad_()
    (through,) = torch.autograd.grad(model.layers[0](entry), entry, grad_outputs=grads[0])
    assert m.growth == pytest.approx(float(through.norm() / grads[-1].norm()), rel=1e-9)


def test_of_two_stacks_of_one_length_the_layers_rank_above_the_norms() -> None:
    """`x = x + layer(norm(x))` with the norms in a ModuleList defined before the layers: the first
    defined of two equally long stacks was the chain, read on the norms' outputs (gradients at each
    branch's input, no gain of the residual stream). Of equal lengths, the blocks with more parameters
    are the chain, so blocks 1.. read the stream. Oracle: the rule, and torch's gradients of the
    residual stream (each sum), float64, their ratios."""
    torch.manual_seed(0)

    class PreNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norms = nn.ModuleList(nn.LayerNorm(8, dtype=torch.float64) for _ in range(4))
            self.layers = nn.ModuleList(nn.Linear(8, 8, dtype=torch.float64) for _ in range(4))

        def stream(self, x: torch.Tensor) -> list[torch.Tensor]:
            out = [x]
            for norm, layer in zip(self.norms, self.layers, strict=True):
                out.append(out[-1] + layer(norm(out[-1])))
            return out

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.stream(x)[-1]

    model, x = PreNorm(), torch.randn(4, 8, dtype=torch.float64)
    blocks, note = find_blocks(model)
    assert [n for n, _ in blocks] == [f"layers.{i}" for i in range(4)] and note == "blocks: layers (4)"
    m = probe_module(model, x, lambda o, _: o.square().sum())
    stream = model.stream(x)
    grads = [g.norm().item() for g in torch.autograd.grad(stream[-1].square().sum(), stream[1:])]
    assert m.gains[1:] == pytest.approx([grads[i] / grads[i + 1] for i in range(3)], rel=1e-9)


def test_of_two_stacks_of_one_length_per_layer_heads_do_not_outrank_the_layers() -> None:
    """A deep-supervision model: layers (8 -> 8) and a head per layer (8 -> 100) read by the loss,
    no head feeding the next. Ranked by parameters, the heads were the chain (growth 1.94 where the
    layers' is 0.12, found in review); only normalisation layers rank below another stack of their
    length, other ties going to the first defined."""

    class DeepSupervision(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
            self.heads = nn.ModuleList(nn.Linear(8, 100) for _ in range(4))

    blocks, note = find_blocks(DeepSupervision())
    assert [n for n, _ in blocks] == [f"layers.{i}" for i in range(4)] and note == "blocks: layers (4)"


class _Inverted(nn.Module):
    """An inverted-residual block (MobileNet's): a conv layer with its activation, a conv and a norm."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU()), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def test_a_sequential_mostly_of_one_composite_block_is_its_stack() -> None:
    """torchvision's MobileNetV3 `features`: a stem, the blocks and a head in one Sequential. Not of
    one type, it was no stack, and the stacks inside the blocks were taken, their sub-layers
    (growth 0.12 where the blocks' is 2.5e-8, found by an audit). Its blocks are the stack; of a
    stem, stages and a head (EfficientNet's, ConvNeXt's) the blocks inside the stages are; of leaf
    layers and their activations, the layers, each with the activation after it."""

    class MobileNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 4, 1), *(_Inverted() for _ in range(5)), nn.Conv2d(4, 8, 1)
            )

    blocks, note = find_blocks(MobileNet())
    assert [n for n, _ in blocks] == [f"features.{i}" for i in range(1, 6)] and note == "blocks: features (5)"

    class Staged(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            stages = (nn.Sequential(*(_Inverted() for _ in range(k))) for k in (2, 3, 2))
            self.features = nn.Sequential(nn.Conv2d(3, 4, 1), *stages, nn.Conv2d(4, 8, 1))

    blocks, note = find_blocks(Staged())
    assert [n for n, _ in blocks] == [
        "features.1.0",
        "features.1.1",
        *(f"features.2.{i}" for i in range(3)),
        "features.3.0",
        "features.3.1",
    ]

    class Stage(nn.Module):  # a stage of a class of its own (timm's TinyVitStage), its blocks inside
        def __init__(self, k: int) -> None:
            super().__init__()
            self.blocks = nn.Sequential(*(_Inverted() for _ in range(k)))

    class TinyVit(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stages = nn.Sequential(nn.Conv2d(3, 4, 1), *(Stage(k) for k in (2, 3, 2)))

    blocks, note = find_blocks(TinyVit())
    assert len(blocks) == 7 and all(".blocks." in n for n, _ in blocks), note  # was the 3 stages

    class Sublayer(nn.Module):  # the Annotated Transformer's SublayerConnection: a norm alone
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(4)

    class Annotated(nn.Module):  # two Sublayer clones in a list, the weights beside them
        def __init__(self) -> None:
            super().__init__()
            self.attn, self.ff = nn.Linear(4, 4), nn.Linear(4, 4)
            self.sublayer = nn.ModuleList(Sublayer() for _ in range(2))

    blocks, note = find_blocks(
        nn.Sequential(nn.Linear(3, 4), *(Annotated() for _ in range(4)), nn.Linear(4, 2))
    )
    assert [n for n, _ in blocks] == ["1", "2", "3", "4"], note  # not the 8 sublayers, no stages

    layers = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    blocks, note = find_blocks(layers)
    assert [n for n, _ in blocks] == ["0", "2", "4"] and "layers of 5 mixed modules" in note


def test_two_stacks_whose_names_share_a_prefix_are_both_chosen() -> None:
    """`layers` and `layers_dec`, two stacks of composite blocks (an encoder-decoder's): the second
    is not inside the first (`layers.` is its prefix, not `layers`), so both are the chain."""

    class Named(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3))
            self.layers_dec = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(2))

    blocks, note = find_blocks(Named())
    assert [n for n, _ in blocks] == [*(f"layers.{i}" for i in range(3)), "layers_dec.0", "layers_dec.1"]
    assert note == "blocks: layers (3) + layers_dec (2)"


def test_without_a_list_the_blocks_are_the_leaf_modules_owning_parameters() -> None:
    """A model with a parameter of its own (a positional table) and two different leaf layers, no
    list, no recurrent cell: the blocks are its leaves owning parameters, not the model itself."""

    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pos = nn.Parameter(torch.zeros(8))
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.tanh(self.fc1(x + self.pos)))

    blocks, note = find_blocks(Flat())
    assert [n for n, _ in blocks] == ["fc1", "fc2"] and note.startswith(LEAVES_NOTE)


def test_a_bare_recurrent_module_as_the_model_is_named_as_a_block() -> None:
    """A bare nn.RNN as the model is its own only block; its name in named_modules is '', so the
    culprit column and the JSON's culprit were blank and the profile had no last label (found by an
    audit). It is named '(model)', as the report's notes name the model."""
    model = nn.RNN(4, 8, num_layers=2, batch_first=True)
    blocks, note = find_blocks(model)
    assert blocks == (("(model)", model),) and note.startswith(LEAVES_NOTE)
    m = probe_module(model, torch.randn(2, 5, 4), lambda o, _: o[0].square().sum())
    assert m.layer_names == ("(model)",) and culprit_of([m]) == "(model)"


def test_a_longest_stack_of_leaf_layers_stands_alone_beside_composite_stacks() -> None:
    """find_blocks' rule: composite stacks are set beside the longest stack only where its own blocks
    are composite; six leaf Linear layers, the longest stack, stand alone beside two stacks of two
    composite blocks. Oracle: the documented rule, by name."""

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = nn.ModuleList(nn.Linear(8, 8) for _ in range(6))
            self.enc = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(2))
            self.dec = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(2))

    blocks, note = find_blocks(Mixed())
    assert [n for n, _ in blocks] == [f"trunk.{i}" for i in range(6)] and note == "blocks: trunk (6)"


class _TanhStack(nn.Module):
    """Four tanh layers in a ModuleList, then a head, each layer's weight reparametrized by `param`
    (weight_norm, spectral_norm)."""

    def __init__(self, param: Any) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(16, 16, dtype=torch.float64) for _ in range(4))
        for layer in self.layers:
            nn.init.normal_(layer.weight, std=2.0 / 16**0.5)
            param(layer)
        self.head = nn.Linear(16, 4, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)  # type: ignore[no-any-return]


@pytest.mark.parametrize("param", ["weight_norm", "spectral_norm"])
def test_parametrized_layers_are_the_stack_with_torchs_gradients(param: str) -> None:
    """torch gives each parametrized layer a class of its own (ParametrizedLinear, one per
    instance): the stack read as four types, and the list computing layers.0's weight inside it was
    taken as the stack, its growth the weight's reparametrization's (a weight-normed tanh stack at
    depth 16, growth 180, read 0.031; found by a third-party audit, HF Encodec). Oracle: torch's
    gradients of each layer's output."""
    torch.manual_seed(0)
    model = _TanhStack(getattr(nn.utils.parametrizations, param)).eval()  # spectral_norm's u held
    x = torch.randn(8, 16, dtype=torch.float64)
    m = probe_module(model, x, lambda out, _: out.square().sum())
    assert m.layer_names == ("layers.0", "layers.1", "layers.2", "layers.3")
    grads = torch_output_grads(model, (x,), list(model.layers))
    assert m.activation_grad_norms[1:] == pytest.approx(grads, rel=1e-9)


class _Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.lin(hidden_states))


class _StagesAndHeads(nn.Module):
    """Segformer's decode head, an FPN's laterals: three stages, then a head per stage on that stage's
    output, the heads side by side, not a chain; each head called positionally or by keyword, as
    Hugging Face calls its layers."""

    def __init__(self, keyword: bool = False) -> None:
        super().__init__()
        self.stages = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(3))
        self.heads = nn.ModuleList(_Head() for _ in range(3))
        self.fuse = nn.Linear(48, 4)
        self.keyword = keyword

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        outs = [h(hidden_states=f) if self.keyword else h(f) for h, f in zip(self.heads, feats, strict=True)]
        return self.fuse(torch.cat(outs, -1))  # type: ignore[no-any-return]


@pytest.mark.parametrize("keyword", [False, True])
def test_heads_side_by_side_are_no_chain_in_series(keyword: bool) -> None:
    """heads.1 takes stages.1's output, not heads.0's, yet only a stack's first block was checked for
    a junction, so the heads read as one chain and |dL/d heads.0| / |dL/d heads.2| multiplied into the
    growth: 5128 where the stages' growth is 45 (found by a third-party audit; called by keyword, the
    heads were again not checked: a mutation round). Every head starts a chain of its own. Oracle:
    torch's |dL/d input| / |dL/d last stage|, the worst path here."""
    torch.manual_seed(1)
    x, z = torch.randn(8, 16), torch.randn(8, 4)
    torch.manual_seed(0)
    model = _StagesAndHeads(keyword)
    with torch.no_grad():
        model.fuse.weight[:, :16].mul_(100.0)
    loss = lambda out, _: (out * z).sum()  # noqa: E731
    m = probe_module(model, x, loss)
    assert m.chain_starts == (4, 5, 6)
    given = x.clone().requires_grad_()
    outs: list[torch.Tensor] = []
    hook = model.stages[-1].register_forward_hook(lambda _m, _a, o: outs.append(o))
    first, last = torch.autograd.grad(loss(model(given), x), [given, *outs])
    hook.remove()
    assert m.chain_growths[0] == pytest.approx((first.norm() / last.norm()).item(), rel=1e-5)
    assert m.growth == pytest.approx(max(m.chain_growths), rel=1e-9)


class _TrunkAndHeads(nn.Module):
    """A tanh trunk, then task heads side by side on its last features (multi-task heads, a policy
    and a value head)."""

    def __init__(self, heads: int, depth: int = 12, width: int = 32) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width, bias=False), nn.Tanh()) for _ in range(depth)
        )
        for layer in self.layers:
            nn.init.normal_(layer[0].weight, std=1.5 / width**0.5)
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 3)) for _ in range(heads)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return torch.stack([head(x) for head in self.heads], 1)


@pytest.mark.parametrize("heads", [2, 4])
@pytest.mark.parametrize("first_weight", [1.0, 0.005])
def test_heads_on_one_trunk_s_features_are_branches_not_its_chain(heads: int, first_weight: float) -> None:
    """The first head is read as the trunk's next block and the others as chains of their own: its
    gain divides dL/d(trunk output), every head's gradient, by its own alone, so a head lightly
    weighted in the loss reads as an explosion (trunk growth 1.28, read 160 > 100; found by a review).
    Oracle: torch's |dL/d input| / |dL/d trunk output|. Expected to fail until the rule is found."""
    torch.manual_seed(0)
    model, x = _TrunkAndHeads(heads), torch.randn(16, 32)
    z = torch.randn(16, heads, 3)
    z[:, 0] *= first_weight
    loss = lambda out, _: (out * z).sum()  # noqa: E731
    m = probe_module(model, x, loss)
    assert m.chain_starts == tuple(range(13, 13 + heads))  # (input), 12 layers, then each head
    given = x.clone().requires_grad_()
    outs: list[torch.Tensor] = []
    hook = model.layers[-1].register_forward_hook(lambda _m, _a, o: outs.append(o))
    first, last = torch.autograd.grad(loss(model(given), x), [given, *outs])
    hook.remove()
    assert m.growth == pytest.approx((first.norm() / last.norm()).item(), rel=1e-5) and m.growth < 10


class _TablesThenStack(nn.Module):
    """`tables` embedding tables side by side, one per input feature, summed (MarkupLM's xpath tables, a
    tabular model's features), then 16 tanh blocks at sigma_w 3."""

    def __init__(self, tables: int, width: int = 32) -> None:
        super().__init__()
        self.embs = nn.ModuleList(nn.Embedding(20, width) for _ in range(tables))
        for e in self.embs:
            nn.init.normal_(e.weight, std=tables**-0.5)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width, bias=False), nn.Tanh()) for _ in range(16)
        )
        for layer in self.layers:
            nn.init.normal_(layer[0].weight, std=3.0 / width**0.5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = sum(e(ids[..., k]) for k, e in enumerate(self.embs))
        for layer in self.layers:
            h = layer(h)
        return h  # type: ignore[return-value]


@pytest.mark.parametrize("tables", [4, 24])
def test_a_list_of_embedding_tables_is_no_stack(tables: int) -> None:
    """24 tables outnumbered the 16 blocks and were taken as the stack: each takes ids, never another
    block's output, so every one started a chain, the growth read 1 on every seed and the blocks went
    unread (hf:markuplm's 50 xpath tables; found by a review). Oracle: torch's |dL/d input of
    layers.0| / |dL/d output of layers.15|."""
    torch.manual_seed(0)
    model, ids, z = _TablesThenStack(tables), torch.randint(0, 20, (4, 8, tables)), torch.randn(4, 8, 32)
    loss = lambda out, _: (out * z).sum()  # noqa: E731
    m = probe_module(model, ids, loss)
    assert m.layer_names == tuple(f"layers.{i}" for i in range(16))
    outs: list[torch.Tensor] = []
    hooks = [model.layers[i].register_forward_hook(lambda _m, a, o: outs.extend([a[0], o])) for i in (0, 15)]
    first, _, _, last = torch.autograd.grad(loss(model(ids), ids), outs)
    for hook in hooks:
        hook.remove()
    assert m.growth == pytest.approx((first.norm() / last.norm()).item(), rel=1e-5) and m.growth > 50


@pytest.mark.parametrize("keyword", [False, True])
def test_a_decoder_whose_first_layer_was_dropped_starts_its_own_chain(keyword: bool) -> None:
    """LayerDrop drew decoder layer 0: layer 1 takes its own embeddings and the memory, not the
    encoder's last output, yet only a stack's first block was checked, so the decoder read as going
    on with the encoder's chain (Hugging Face's TimeSeriesTransformer in training: growth 0.00216 for
    0.874; found by a third-party audit). Its chain takes the encoder's, the memory, in series: the
    growth is their product, with the memory passed by keyword too (`encoder_hidden_states=` in
    Hugging Face; read beside the encoder, 0.496 for 0.0431: a mutation round)."""

    class Dec(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.own, self.mem = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, y: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.own(y) + self.mem(memory).mean(1, keepdim=True))

    class EncDec(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(3))
            self.dec = nn.ModuleList(Dec() for _ in range(3))
            self.head = nn.Linear(16, 4)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            for layer in self.enc:
                x = layer(x)
            for layer in list(self.dec)[1:]:  # layer 0 dropped
                y = layer(y, memory=x) if keyword else layer(y, x)
            return self.head(y)  # type: ignore[no-any-return]

    torch.manual_seed(0)
    m = probe_module(EncDec(), (torch.randn(2, 5, 16), torch.randn(2, 3, 16)), lambda out, _: out.sum())
    assert m.activation_names[4] == "dec.1"
    assert m.chain_starts == (4,)
    assert m.chain_feeds == ((), (0,))
    assert m.growth == pytest.approx(m.chain_growths[0] * m.chain_growths[1], rel=1e-9)


def test_parametrized_layers_outside_any_list_are_the_leaf_blocks() -> None:
    """Two weight-normed Linears as plain attributes: each has children (its `parametrizations`), so
    the last resort, leaf modules with parameters, found none and the probe refused the model for an
    empty blocks= it was never given (found by a mutation round). They are the blocks, as their plain
    twins are, and never the modules computing their weights. Oracle: torch's gradients of each
    layer's output, and of the input."""

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.utils.parametrizations.weight_norm(nn.Linear(8, 8))
            self.b = nn.utils.parametrizations.weight_norm(nn.Linear(8, 8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.tanh(self.a(x)))  # type: ignore[no-any-return]

    torch.manual_seed(0)
    model, x = Two(), torch.randn(4, 8)
    m = probe_module(model, x, lambda out, _: out.square().sum())
    assert m.activation_names == ("(input)", "a", "b")
    given = x.clone().requires_grad_()
    (entry,) = torch.autograd.grad(model(given).square().sum(), [given])
    assert m.activation_grad_norms[0] == pytest.approx(float(entry.norm()), rel=1e-6)
    assert m.activation_grad_norms[1:] == pytest.approx(
        torch_output_grads(model, (x,), [model.a, model.b]), rel=1e-6
    )


class _Halved(nn.Module):
    """A parametrization of a weight: w / 2 (torch.nn.utils.parametrize)."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w / 2


class _StackAndReparametrizedHead(nn.Module):
    """A two-layer stack and a head whose weight three parametrizations compute: the head's
    `parametrizations.weight` list holds three modules of one type, longer than the stack."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        self.head = nn.Linear(8, 4)
        for _ in range(3):
            nn.utils.parametrize.register_parametrization(self.head, "weight", _Halved())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)  # type: ignore[no-any-return]


def test_the_lists_computing_a_weight_are_no_stack_even_where_longest() -> None:
    """README: 'the lists computing its weight are no stack'; the blocks are the stack of layers.
    Oracle: the documented rule."""
    blocks, note = find_blocks(_StackAndReparametrizedHead())
    assert [name for name, _ in blocks] == ["layers.0", "layers.1"]
    assert note == "blocks: layers (2)"


class _ListNamedParametrizations(nn.Module):
    """A model of its own whose stack of three layers happens to be called `parametrizations` (no
    torch.nn.utils.parametrize anywhere), and a shorter stack of two beside it."""

    def __init__(self) -> None:
        super().__init__()
        self.parametrizations = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.extra = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in [*self.parametrizations, *self.extra]:
            x = torch.tanh(layer(x))
        return x


def test_a_stack_called_parametrizations_of_an_unparametrized_model_is_its_stack() -> None:
    """Only a parametrized module's `parametrizations` lists compute a weight (blocks._reparametrizing);
    a list of that name elsewhere is a stack like any other, here the longest. Oracle: the documented
    rule (the longest stack of same-type modules)."""
    blocks, note = find_blocks(_ListNamedParametrizations())
    assert [name for name, _ in blocks] == [f"parametrizations.{i}" for i in range(3)]
    assert note == "blocks: parametrizations (3)"


class _NormedStackBesideShorter(nn.Module):
    """Four weight-normed layers in a list, and a plain two-layer list beside them."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.utils.parametrizations.weight_norm(nn.Linear(8, 8)) for _ in range(4))
        self.heads = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in [*self.layers, *self.heads]:
            x = torch.tanh(layer(x))
        return x


def test_a_stack_of_parametrized_layers_is_a_stack_of_their_class() -> None:
    """README: a layer reparametrized by weight_norm, which torch gives a class of its own (one per
    instance), 'counts as its module's class': the four weight-normed Linears are one stack of four,
    the longest, not four types. Oracle: the documented rule."""
    blocks, note = find_blocks(_NormedStackBesideShorter())
    assert [name for name, _ in blocks] == [f"layers.{i}" for i in range(4)]
    assert note == "blocks: layers (4)"


class _TwoLayersOneTwiceReparametrized(nn.Module):
    """No stack: two Linear attributes, the second's weight computed by two parametrizations (its
    `parametrizations.weight` list has two modules, the only list of two or more in the model)."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(8, 8), nn.Linear(8, 8)
        for _ in range(2):
            nn.utils.parametrize.register_parametrization(self.second, "weight", _Halved())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x)))  # type: ignore[no-any-return]


def test_without_a_stack_no_block_is_a_module_computing_a_weight() -> None:
    """The parametrizations computing `second.weight` are no list of blocks either (they run inside
    the weight's getter, never on the chain). Oracle: the documented rule ('the lists computing its
    weight are no stack')."""
    blocks, _ = find_blocks(_TwoLayersOneTwiceReparametrized())
    assert not any("parametrizations" in name for name, _ in blocks)
    assert not any(isinstance(m, _Halved) for _, m in blocks)


def test_stability_blocks_given_as_a_list_is_a_one_line_error_not_passed_over() -> None:
    """A list in place of the method was passed over for the blocks found (probe_module, watch); a
    model file's check says the same in its own words (one function serves both)."""
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model.stability_blocks = [("0", model[0])]  # type: ignore[assignment]
    with pytest.raises(UsageError, match=r"^the model's stability_blocks is a list, not a method") as exc:
        find_blocks(model)
    assert "\n" not in str(exc.value)


class _SiameseTrunkAndHeads(_TrunkAndHeads):
    """_TrunkAndHeads run on two inputs per step, the heads on each pass's last features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([super(_SiameseTrunkAndHeads, self).forward(h) for h in (x, 0.5 * x.flip(0))], 1)


def test_heads_on_a_trunk_run_twice_per_step_are_branches_of_each_pass() -> None:
    """A trunk called twice per step (a Siamese pair), heads on each pass's features: the first head of
    each pass is split off at the next call that takes none of the heads' outputs (the second pass's
    first block), not at the end of the pass, which missed the first pass (4.8e4 in review; 796 here
    unsplit). Oracle: torch's |dL/d the first pass's input through layers.0| / |dL/d its last output|,
    and the second pass's |dL/d layers.0[1] output| / |dL/d layers.11[1] output|."""
    torch.manual_seed(0)
    model, x = _SiameseTrunkAndHeads(2), torch.randn(16, 32)
    for layer in model.layers:
        nn.init.normal_(layer[0].weight, std=2.5 / 32**0.5)
    z = torch.randn(16, 4, 3)
    z[:, 0] *= 0.005
    loss = lambda out, _: (out * z).sum()  # noqa: E731
    m = probe_module(model, x, loss)
    assert m.chain_starts == (13, 14, 15, 27, 28)
    ins: list[torch.Tensor] = []
    firsts: list[torch.Tensor] = []
    lasts: list[torch.Tensor] = []

    def swap(_m: nn.Module, a: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor] | None:
        if ins:
            return None
        ins.append(a[0].clone().requires_grad_())
        return (ins[0],)

    hooks = [
        model.layers[0].register_forward_pre_hook(swap),
        model.layers[0].register_forward_hook(lambda _m, _a, o: firsts.append(o)),
        model.layers[-1].register_forward_hook(lambda _m, _a, o: lasts.append(o)),
    ]
    g = torch.autograd.grad(loss(model(x), x), [ins[0], firsts[1], *lasts])
    for hook in hooks:
        hook.remove()
    chains = [(g[0].norm() / g[2].norm()).item(), (g[1].norm() / g[3].norm()).item()]
    assert [m.chain_growths[0], m.chain_growths[3]] == pytest.approx(chains, rel=1e-5)
    assert m.growth == pytest.approx(max(chains), rel=1e-5)
