"""Parallel residual branches (GPT-J / PaLM style, x = x + attn(ln1(x)) + mlp(ln2(x))) held in separate
ModuleLists: the chain is the residual stream, read as torch's gradients of it are."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from stabilitycheck.probing import Measurement, probe_module

D = 16


def _branch(activation: nn.Module, dtype: torch.dtype) -> nn.Sequential:
    first = nn.Linear(D, D)
    nn.init.normal_(first.weight, std=1.5 / D**0.5)
    return nn.Sequential(first, activation, nn.Linear(D, D)).to(dtype)


class _Parallel(nn.Module):
    """`layers` layers of `k` parallel branches, each kind of branch (and its norm) a ModuleList of its
    own: x = x + br0(ln0(x)) + br1(ln1(x)) + ... (`grouped`: x + (br0 + br1 + ...); `averaged`: x + the
    branches' mean; `norms=False`: each branch takes x itself; `keyword`: each called by keyword, as
    GPT-J's and Phi's attention, attn(hidden_states=...))."""

    def __init__(
        self,
        layers: int = 6,
        k: int = 2,
        norms: bool = True,
        grouped: bool = False,
        averaged: bool = False,
        dtype: torch.dtype = torch.float64,
        keyword: bool = False,
    ) -> None:
        super().__init__()
        self.k, self.norms, self.grouped, self.averaged = k, norms, grouped, averaged
        self.keyword = keyword
        for j in range(k):
            setattr(self, f"ln{j}", nn.ModuleList(nn.LayerNorm(D, dtype=dtype) for _ in range(layers)))
            kind = nn.GELU() if j % 2 == 0 else nn.Tanh()
            setattr(self, f"br{j}", nn.ModuleList(_branch(kind, dtype) for _ in range(layers)))
        self.layers = layers

    def blocks(self, kinds: int | None = None) -> list[tuple[str, nn.Module]]:
        """Every branch call in call order (of the first `kinds` kinds of branch alone where given)."""
        kinds = self.k if kinds is None else kinds
        return [(f"br{j}.{i}", getattr(self, f"br{j}")[i]) for i in range(self.layers) for j in range(kinds)]

    def forward(self, x: torch.Tensor, keep: list[torch.Tensor] | None = None) -> torch.Tensor:
        for i in range(self.layers):
            given = [getattr(self, f"ln{j}")[i](x) if self.norms else x for j in range(self.k)]
            branches = [getattr(self, f"br{j}")[i] for j in range(self.k)]
            outs = [br(input=h) if self.keyword else br(h) for br, h in zip(branches, given, strict=True)]
            if self.averaged:
                x = x + sum(outs[1:], outs[0]) / self.k
            elif self.grouped:
                x = x + sum(outs[1:], outs[0])
            else:
                for out in outs:
                    x = x + out
            if keep is not None:
                x.retain_grad()
                keep.append(x)
        return x


def _loss(out: torch.Tensor, _: object = None) -> torch.Tensor:
    return out.square().mean()


def _stream(model: _Parallel, x: torch.Tensor) -> list[float]:
    """Torch's ||dL/d x_i|| of the residual stream, x_0 the model's input: the oracle."""
    given, keep = x.clone().requires_grad_(), []
    _loss(model(given, keep)).backward()
    assert given.grad is not None
    return [float(given.grad.norm()), *(float(h.grad.norm()) for h in keep if h.grad is not None)]


def _layer_gains(m: Measurement, k: int) -> list[float]:
    """The gains of each layer's first branch, the others' checked to be 1 (one gradient, the sum's)."""
    gains = list(m.gains)
    assert len(gains) % k == 0
    assert all(g == pytest.approx(1.0, rel=1e-12) for i, g in enumerate(gains) if i % k), gains
    return gains[::k]


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("norms", [True, False])
@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize(("layers", "keyword"), [(6, False), (2, False), (6, True)])
def test_parallel_branches_in_separate_lists_read_the_residual_streams_growth(
    k: int, norms: bool, grouped: bool, layers: int, keyword: bool
) -> None:
    """find_blocks takes every branch's list; the calls alternate br0.0, br1.0, br0.1, ... and each
    started a chain of its own (no call takes the one before's output): growth 1 where torch's is
    2.69 (2 branches, norms; 5.48 without), a silent "stable". Every branch's output gets dL/d x_i+1:
    the chain is the stream, each layer's first branch carrying the layer's gain, the others 1.
    Two layers, whose stream's going on from the residual add is read on the model's output (0.565
    for 1.49), and branches called by keyword (1.07 for 2.70) read block 0 through its branch alone:
    a review. Oracle: torch's ||dL/d x_i|| of the stream."""
    torch.manual_seed(0)
    model = _Parallel(layers=layers, k=k, norms=norms, grouped=grouped, keyword=keyword)
    x = torch.randn(8, D, dtype=torch.float64)
    m = probe_module(model, x, _loss)
    stream = _stream(model, x)
    assert m.activation_names == ("(input)", *(name for name, _ in model.blocks()))
    assert m.chain_starts == ()
    assert m.growth == pytest.approx(stream[0] / stream[-1], rel=1e-9)
    assert _layer_gains(m, k) == pytest.approx([a / b for a, b in itertools.pairwise(stream)], rel=1e-9)


def test_the_gpt_j_reproducer_reads_torchs_growth_in_float32() -> None:
    """The audit's par6: attn and mlp each a list of composite Sequential blocks, their own norms, x + attn
    + mlp; growth 1.0 for torch's 3.019 with chain starts at every call (here 1.0 for 2.416). Oracle:
    torch's |dL/dx| / |dL/d out| in float32."""
    torch.manual_seed(0)
    model = _Parallel(dtype=torch.float32)
    x = torch.randn(16, D)
    m = probe_module(model, x, _loss)
    stream = _stream(model, x)
    assert m.chain_starts == ()
    assert m.growth == pytest.approx(stream[0] / stream[-1], rel=1e-5)


@pytest.mark.parametrize("norms", [True, False])
def test_block_0s_input_takes_every_parallel_branchs_gradient(norms: bool) -> None:
    """Blocks on one branch alone (br0), the other a function the model calls beside it on the same x:
    block 0's input gradient took the residual add's and its own branch's, not the other branch's
    (growth 2.47 for torch's 2.69 with norms, 5.40 for 5.48 without). Oracle: torch's stream."""
    torch.manual_seed(0)
    model = _Parallel(norms=norms)
    x = torch.randn(8, D, dtype=torch.float64)
    m = probe_module(model, x, _loss, blocks=model.blocks(kinds=1))
    stream = _stream(model, x)
    assert m.activation_names[0] == "(input)" and m.chain_starts == ()
    assert m.growth == pytest.approx(stream[0] / stream[-1], rel=1e-9)
    assert list(m.gains) == pytest.approx([a / b for a, b in itertools.pairwise(stream)], rel=1e-9)


@pytest.mark.parametrize("norms", [True, False])
def test_one_layer_of_parallel_branches_reads_its_gain_on_the_models_output(norms: bool) -> None:
    """Depth 1: no call after the branches, the residual add around them is read on the model's output
    (each call a chain of its own: growth 1 for torch's 1.64). Oracle: torch's stream."""
    torch.manual_seed(0)
    model = _Parallel(layers=1, norms=norms)
    x = torch.randn(8, D, dtype=torch.float64)
    m = probe_module(model, x, _loss)
    stream = _stream(model, x)
    assert m.activation_names == ("(input)", "br0.0", "br1.0") and m.chain_starts == ()
    assert m.growth == pytest.approx(stream[0] / stream[-1], rel=1e-9)


def test_averaged_branches_read_the_stream_from_block_0s_output() -> None:
    """x + (attn + mlp) / 2: no add of alpha 1 takes the branches and x, as x + 0.5 * block(x) has none,
    so block 0's input is no entry (`skips`) and the chain starts at its output: growth ||dL/d x_1|| /
    ||dL/d x_L|| (the last output's gradient is half the stream's, as is the first's), layer 0's gain
    unread (1.43 for torch's 1.61 from x_0), one chain, not one per call (growth 1 before). Oracle:
    torch's stream."""
    torch.manual_seed(0)
    model = _Parallel(averaged=True)
    x = torch.randn(8, D, dtype=torch.float64)
    m = probe_module(model, x, _loss)
    stream = _stream(model, x)
    assert m.activation_names[0] == "br0.0" and m.chain_starts == ()
    assert m.growth == pytest.approx(stream[1] / stream[-1], rel=1e-9)


class _HeadsOnTheStream(nn.Module):
    """A residual stack, then two heads on two norms of its last stream value (a sum, no block output)."""

    def __init__(self) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(D) for _ in range(4))
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(D, D), nn.Tanh()) for _ in range(4))
        self.na, self.nb = nn.LayerNorm(D), nn.LayerNorm(D)
        self.heads = nn.ModuleList(nn.Linear(D, 3) for _ in range(2))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for norm, layer in zip(self.norms, self.layers, strict=True):
            x = x + layer(norm(x))
        return self.heads[0](self.na(x)), self.heads[1](self.nb(x))


def test_heads_on_one_stream_value_are_no_parallel_branches() -> None:
    """Two heads reading one stream value whose outputs no add takes stay chains of their own, the
    stack's growth its own. Oracle: torch's |dL/dx| / |dL/d layers.3 output|."""
    torch.manual_seed(0)
    model = _HeadsOnTheStream().double()
    x = torch.randn(8, D, dtype=torch.float64)

    def loss(out: tuple[torch.Tensor, torch.Tensor], _: object = None) -> torch.Tensor:
        return out[0].square().mean() + 3 * out[1].square().mean()

    blocks = [(f"layers.{i}", b) for i, b in enumerate(model.layers)]
    blocks += [(f"heads.{i}", h) for i, h in enumerate(model.heads)]
    m = probe_module(model, x, loss, blocks=blocks)
    given, last = x.clone().requires_grad_(), []
    handle = model.layers[3].register_forward_hook(lambda *a: last.append(a[2]))
    first, end = torch.autograd.grad(loss(model(given)), [given, *last])
    handle.remove()
    assert m.chain_starts == (5, 6)
    assert m.chain_growths[0] == pytest.approx(float(first.norm() / end.norm()), rel=1e-9)


class _Inception(nn.Module):
    """Stages of three branches on one value, concatenated and projected: no stream adds them."""

    def __init__(self) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.ModuleList(nn.Sequential(nn.Linear(D, D), nn.Tanh()) for _ in range(3)) for _ in range(3)
        )
        self.proj = nn.ModuleList(nn.Linear(3 * D, D) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage, proj in zip(self.branches, self.proj, strict=True):
            x = proj(torch.cat([branch(x) for branch in stage], -1))
        return x


def test_concatenated_branches_keep_their_junctions() -> None:
    """Branches concatenated (Inception) have gradients of their own slices, no one stream's: each
    stays a chain of its own, as read before parallel residual branches were."""
    torch.manual_seed(0)
    model = _Inception().double()
    blocks = [(f"branches.{i}.{j}", b) for i, stage in enumerate(model.branches) for j, b in enumerate(stage)]
    m = probe_module(model, torch.randn(8, D, dtype=torch.float64), _loss, blocks=blocks)
    assert m.chain_starts == tuple(range(1, 9))


class _Ensemble(nn.Module):
    """Branches on one input summed, with no residual add: b0(x) + b1(x) + b2(x)."""

    def __init__(self) -> None:
        super().__init__()
        self.branches = nn.ModuleList(_branch(nn.Tanh(), torch.float64) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [branch(x) for branch in self.branches]
        return outs[0] + outs[1] + outs[2]


def test_summed_branches_with_no_residual_add_are_not_read_through_block_0s_branch_alone() -> None:
    """An ensemble's branches are siblings summed, each output's gradient the sum's (gains of exactly
    1, torch's); with no residual add, block 0's input gradient is its branch's alone, which read
    growth 0.47 for torch's 0.83 (a review): the entry is dropped instead. Oracle: torch's gradients
    of the three outputs are one."""
    torch.manual_seed(0)
    model = _Ensemble()
    x = torch.randn(8, D, dtype=torch.float64)
    m = probe_module(model, x, _loss)
    outs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda _m, _a, out: outs.append(out)) for b in model.branches]
    grads = torch.autograd.grad(_loss(model(x)), outs)
    for hook in hooks:
        hook.remove()
    assert all(torch.equal(g, grads[0]) for g in grads)
    assert m.activation_names == ("branches.0", "branches.1", "branches.2") and m.chain_starts == ()
    assert m.gains == pytest.approx((1.0, 1.0), rel=1e-12)
