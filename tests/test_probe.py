"""The probe's bookkeeping: determinism, non-finite localisation, norms against torch's own."""

from __future__ import annotations

import copy
import dataclasses
import gc
import inspect
import io
import itertools
import json
import math
import re
import statistics
import warnings
import weakref
from collections import namedtuple
from typing import Any, ClassVar

import pytest
import torch
from chain_models import OrthogonalTowers, _grads_of, run_tower
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from stabilitycheck import norms, recording
from stabilitycheck.config import FAMILIES, RUN_FIELDS, Config
from stabilitycheck.configprobe import probe
from stabilitycheck.culprit import culprit_of
from stabilitycheck.errors import UsageError
from stabilitycheck.families import knob_specs
from stabilitycheck.measurement import NonFinite
from stabilitycheck.probing import Measurement, probe_module
from stabilitycheck.rng import SALT_FORWARD, derived
from stabilitycheck.subject import Built
from stabilitycheck.subjects import resolve
from stabilitycheck.verdicts import Limits, values, verdict


def zoo(family: str, **values: object) -> Config:
    """A zoo Config from flat keywords, dropping the knobs `family` does not have (an mlp has no
    norm or seq_len, an rnn no depth)."""
    names = {spec.name for spec in knob_specs(family)} | set(RUN_FIELDS)
    return Config.of(family, **{k: v for k, v in values.items() if k in names})


def build(config: Config) -> Built:
    return resolve(config.subject).build(config)


def culprit(m: Measurement) -> str:
    """The culprit of one measurement (a verdict over one seed)."""
    return culprit_of([m])


@pytest.mark.parametrize("family", FAMILIES)
def test_same_config_gives_bit_identical_measurements(family: str) -> None:
    c = zoo(family, norm="pre", depth=3, width=16, seq_len=6, batch_size=4, steps=3, optimizer="adam")
    assert probe(c) == probe(c)


@pytest.mark.parametrize("family", FAMILIES)
def test_measurement_json_round_trip(family: str) -> None:
    m = probe(zoo(family, depth=2, width=8, seq_len=3, batch_size=2, steps=1))
    assert Measurement.from_dict(json.loads(json.dumps(m.to_dict()))) == m


class Poisoned(nn.Module):
    """A stack of linear layers whose block `k` returns NaN (or Inf) in the forward pass."""

    def __init__(self, depth: int, k: int, poison: float) -> None:
        super().__init__()
        self.layers = nn.Sequential(*(nn.Linear(8, 8) for _ in range(depth)))
        self.k, self.poison = k, poison
        self.layers[k].register_forward_hook(lambda mod, args, out: out * self.poison)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)  # type: ignore[no-any-return]


@pytest.mark.parametrize(("k", "poison"), [(0, math.nan), (3, math.nan), (5, math.inf)])
def test_forward_nan_or_inf_is_located_at_its_block(k: int, poison: float) -> None:
    model = Poisoned(6, k, poison)
    m = probe_module(model, torch.randn(4, 8), lambda out, _: out.pow(2).mean())
    assert m.first_nonfinite is not None
    assert (m.first_nonfinite.step, m.first_nonfinite.layer) == (0, f"layers.{k}")
    assert m.first_nonfinite.tensor == "activation"
    assert verdict(m).names[0] == "nonfinite"


class OnceNaN(nn.Module):
    """Linear blocks; block `k` returns NaN on its `call`-th call alone (a call counter: what the
    probe's re-run of a step does not restore, as Python's random or numpy's would not be)."""

    def __init__(self, depth: int, k: int, call: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*(nn.Linear(8, 8) for _ in range(depth)))
        self.calls, self.call = 0, call
        self.layers[k].register_forward_hook(self._count)

    def _count(self, mod: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return out * math.nan if self.calls == self.call + 1 else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)  # type: ignore[no-any-return]


def test_a_nan_the_re_run_does_not_reproduce_is_kept() -> None:
    """A NaN at step 2 whose float64 re-run came out finite was dropped: the re-run's reading replaced
    the step's, and the probe trained on with every loss finite (found in an audit). Oracle: the same
    model in a plain torch loop, whose loss at step 2 is NaN."""
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    plain = OnceNaN(4, 2, call=2)
    opt = torch.optim.Adam(plain.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = plain(x).pow(2).mean()
        losses.append(loss.item())
        loss.backward()
        opt.step()
    assert [math.isfinite(v) for v in losses] == [True, True, False]
    torch.manual_seed(0)
    m = probe_module(OnceNaN(4, 2, call=2), x, lambda out, _: out.pow(2).mean(), steps=5)
    assert m.first_nonfinite is not None
    at_init = probe_module(OnceNaN(4, 2, call=0), x, lambda out, _: out.pow(2).mean(), steps=5)
    assert at_init.first_nonfinite is not None  # at step 0 the hooks are on: the block is named
    assert dataclasses.replace(at_init.first_nonfinite, value=0.0) == NonFinite(
        0, "layers.2", "activation", 0.0, reproduced=False
    )
    nf = m.first_nonfinite
    assert (nf.step, nf.tensor, nf.reproduced) == (2, "loss", False)  # no hooks past step 0's profile
    assert "re-run of the step stayed finite" in nf.describe()
    assert m.steps_run == 2 and math.isnan(m.loss[-1])
    assert verdict(m).names[0] == "nonfinite"


class Between(nn.Module):
    """Linear blocks; the model's own forward, not a block, poisons the signal before block `k`."""

    def __init__(self, depth: int, k: int, poison: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(depth))
        self.k, self.poison = k, poison

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x * self.poison if i == self.k else x)
        return x


@pytest.mark.parametrize(("k", "poison"), [(0, math.nan), (2, math.nan), (4, math.inf)])
def test_a_nan_made_between_blocks_is_not_blamed_on_the_next_block(k: int, poison: float) -> None:
    """Oracle: the construction. Every block output before block k is finite and block k's input is
    not: the model's code between the blocks made it (it was blamed on block k, which only received
    it); a NaN made inside block k (Poisoned) is still block k's."""
    m = probe_module(Between(6, k, poison), torch.randn(4, 8), lambda out, _: out.pow(2).mean())
    found = m.first_nonfinite
    assert found is not None and (found.step, found.tensor) == (0, "activation")
    assert found.layer == f"(outside blocks, before layers.{k})"
    assert culprit(m) == found.layer
    inside = probe_module(Poisoned(6, k, poison), torch.randn(4, 8), lambda out, _: out.pow(2).mean())
    assert inside.first_nonfinite is not None and inside.first_nonfinite.layer == f"layers.{k}"


class NanBackward(torch.autograd.Function):
    """Identity forward; NaN gradient backward: a block whose backward alone goes wrong."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: object, g: torch.Tensor) -> torch.Tensor:
        return g * math.nan


def test_backward_only_nan_is_located_at_the_gradient() -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for i, layer in enumerate(self.layers):
                x = layer(x)
                if i == 2:
                    x = NanBackward.apply(x)
            return x

    m = probe_module(Model(), torch.randn(3, 4), lambda out, _: out.sum())
    assert m.first_nonfinite is not None
    # dL/d(output of layers.2) is the first NaN: NanBackward sits between layers.2 and layers.3.
    assert (m.first_nonfinite.layer, m.first_nonfinite.tensor) == ("layers.2", "activation_grad")
    assert math.isnan(m.first_nonfinite.value)


class _NanWeightGrad(nn.Module):
    """A linear map whose weight gets a NaN gradient when `bad`, its input an exact one."""

    def __init__(self, bad: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4) / 2)
        self.bad = bad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ (NanBackward.apply(self.weight) if self.bad else self.weight).T


class _HeadFirst(nn.Module):
    """Blocks of _NanWeightGrad (0 and 1 of 3 bad), and a head, bad too where `bad_head`, defined
    before them and run after them."""

    def __init__(self, bad_head: bool) -> None:
        super().__init__()
        self.head = _NanWeightGrad(bad_head)
        self.blocks = nn.ModuleList([_NanWeightGrad(True), _NanWeightGrad(True), _NanWeightGrad(False)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


@pytest.mark.parametrize("bad_head", [False, True])
def test_a_nan_in_weight_gradients_alone_is_named_where_the_backward_made_it_first(bad_head: bool) -> None:
    """Blocks 0 and 1 of 3 (and the head, defined first) give their weights NaN gradients, every
    output gradient finite: the first non-finite value is the weight gradient the backward made
    first: block 1's, or the head's. Read by parameter order it was block 0's, or (in reverse) block
    0's again where the head was defined first (found by mutation testing, then in review); the exact
    re-run now records the order. Oracle: torch's own backward, the order its tensor hooks on the
    weights run in."""
    model, x = _HeadFirst(bad_head), torch.randn(3, 4)
    names = {
        id(p): ("(outside blocks)" if n.startswith("head") else n.split(".")[1])
        for n, p in model.named_parameters()
    }
    made: list[str] = []
    handles = [
        p.register_hook(lambda g, p=p: made.append(names[id(p)]) if not bool(g.isfinite().all()) else None)
        for p in model.parameters()
    ]
    outs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o)) for b in model.blocks]
    total = model(x).sum()
    grads = torch.autograd.grad(total, [*outs, *model.parameters()])
    for handle in [*handles, *hooks]:
        handle.remove()
    assert all(bool(g.isfinite().all()) for g in grads[:3])  # every block output's gradient finite
    m = probe_module(
        model, x, lambda out, _: out.sum(), blocks=[(str(i), b) for i, b in enumerate(model.blocks)]
    )
    assert m.first_nonfinite is not None
    assert (m.first_nonfinite.layer, m.first_nonfinite.tensor) == (made[0], "gradient")
    assert made[0] == ("(outside blocks)" if bad_head else "1")


class BadBackward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return NanBackward.apply(self.linear(x))  # type: ignore[no-any-return]


@pytest.mark.parametrize("k", [0, 3, 5])
def test_culprit_of_a_backward_nan_is_the_block_whose_backward_made_it(k: int) -> None:
    """The first NaN is dL/d(output of block k-1), made by block k's backward: block k is to blame
    (for k = 0 the NaN is only in the weight gradients and the input gradient, and block 0 is named)."""
    layers: list[nn.Module] = [nn.Linear(8, 8) for _ in range(6)]
    layers[k] = BadBackward()
    m = probe_module(nn.Sequential(*layers), torch.randn(4, 8), lambda out, _: out.sum())
    assert m.first_nonfinite is not None
    assert culprit(m) == str(k)


def test_culprit_of_a_nan_made_by_the_loss_backward_is_the_loss() -> None:
    m = probe_module(
        nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)),
        torch.randn(4, 8),
        lambda out, _: NanBackward.apply(out).sum(),
    )
    assert m.first_nonfinite is not None and m.first_nonfinite.tensor == "activation_grad"
    assert culprit(m) == "(after the last block)"


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


def test_blow_up_during_training_is_located_and_stops_the_run() -> None:
    c = Config.of("mlp", depth=30, width=64, init_scale=8.0, activation="linear", steps=10, lr=1.0)
    m = probe(c)
    nf = m.first_nonfinite
    assert nf is not None and nf.step >= 1 and nf.layer.startswith("layers.")
    assert m.steps_run == nf.step < c.run.steps
    assert math.isfinite(m.loss[0]) and not math.isfinite(m.loss[-1])


class Coin(nn.Module):
    """A block whose output is Inf where a dropout coin on 1 comes up 0 (probability 1/2): the first
    random draw of a step."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x)) / self.drop(torch.ones(1))


@pytest.mark.parametrize("seed", range(8))
def test_a_nan_from_a_random_draw_is_named_by_a_re_run_that_draws_the_same(seed: int) -> None:
    """Oracle: the coin itself, drawn as the step draws it (seeded with derived(seed, SALT_FORWARD),
    nothing drawn before it). The re-run that names the block must draw the same coin: it drew
    another one, came out finite, and the Inf was lost."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(8, 8), nn.Tanh()), Coin(8), nn.Sequential(nn.Linear(8, 8)))
    x = torch.randn(4, 8)
    blocks = [(str(i), block) for i, block in enumerate(model)]
    m = probe_module(model, x, lambda out, _: out.square().mean(), blocks=blocks, seed=seed)
    torch.manual_seed(derived(seed, SALT_FORWARD))
    inf = bool(torch.nn.functional.dropout(torch.ones(1), 0.5, training=True) == 0)
    found = m.first_nonfinite
    assert (found is not None) == inf
    if found is not None:
        assert (found.step, found.layer, found.tensor, found.value) == (0, "1", "activation", math.inf)


def test_a_weight_made_non_finite_by_an_update_is_at_the_step_after_it() -> None:
    """README: step k is the model after k updates. A bias that the first update makes Inf (an lr
    of 1e38 on a gradient of order 10) is non-finite at step 1; the loss there is the first
    non-finite one (the oracle: the losses the probe records), and the weights at init were finite."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4)), nn.Sequential(nn.Linear(4, 4)))
    m = probe_module(model, torch.randn(8, 4), lambda out, _: (out * 10).sum(), steps=3, lr=1e38)
    found = m.first_nonfinite
    assert found is not None and found.tensor == "weight"
    assert found.step == m.steps_run == 1 and math.isfinite(m.loss[0]) and not math.isfinite(m.loss[1])


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


def test_total_and_per_block_norms_match_torch() -> None:
    built = build(Config.of("resmlp", norm="post", depth=5, width=32, init_scale=1.3))
    m = probe_module(built.model, built.inputs, built.loss_fn, blocks=built.blocks)
    model = built.model
    model.zero_grad()
    built.loss_fn(model(built.inputs), built.inputs).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert m.grad_norm[0] == pytest.approx(float(torch.nn.utils.get_total_norm(grads)), rel=1e-5)
    for (_, block), norm in zip(built.blocks, m.layer_grad_norms, strict=True):
        block_grads = [p.grad for p in block.parameters() if p.grad is not None]
        assert norm == pytest.approx(float(torch.nn.utils.get_total_norm(block_grads)), rel=1e-5)
    assert m.growth == pytest.approx(math.prod(m.gains), rel=1e-9)


@pytest.mark.parametrize("max_norm", [1e-3, 0.5, 1e6])
def test_clipped_training_matches_clip_grad_norm(max_norm: float) -> None:
    c = Config.of("mlp", depth=4, width=16, init_scale=2.0, steps=3, lr=0.5, clip=max_norm)
    built = build(c)
    reference = copy.deepcopy(built.model)
    probe_module(
        built.model, built.inputs, built.loss_fn, blocks=built.blocks, steps=3, lr=0.5, clip=max_norm
    )
    opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        built.loss_fn(reference(built.inputs), built.inputs).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)
        opt.step()
    for ours, theirs in zip(built.model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs)


def test_deep_tanh_at_sigma_3_is_flagged_by_growth_and_at_sigma_1_is_not() -> None:
    for family, norm in [("mlp", "none"), ("resmlp", "post"), ("resmlp", "none")]:
        hot = verdict(probe(zoo(family, norm=norm, depth=32, width=128, init_scale=3.0)))
        assert "growth" in hot.names, (family, norm, hot)
        cool = verdict(probe(zoo(family, norm=norm, depth=8, width=128, init_scale=1.0)))
        assert not cool.exploded, (family, norm, cool)


def test_usage_errors_are_one_line_messages() -> None:
    x = torch.randn(2, 3)
    with pytest.raises(UsageError, match="no parameters that require grad"):
        probe_module(nn.ReLU(), x, lambda out, _: out.sum())
    with pytest.raises(UsageError, match="float tensor, got a tensor of dtype float32 and shape \\(2, 3\\)"):
        probe_module(nn.Linear(3, 3), x, lambda out, _: out)
    with pytest.raises(UsageError, match="does not require grad"):
        probe_module(nn.Linear(3, 3), x, lambda out, _: out.detach().sum())
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available"):
            probe(Config.of("mlp", device="cuda"))


def test_verdict_criteria_and_limits() -> None:
    m = probe(Config.of("mlp", depth=3, width=8, steps=2))
    assert not verdict(m).exploded
    tight = verdict(m, Limits(grad_norm=1e-9, growth=1e-9, divergence=1e-9))
    assert tight.names == ("grad_norm", "growth", "divergence")
    # vanishing fires when growth < 1 / limit
    assert verdict(m, Limits(vanishing=0.5 / m.growth)).names == ("vanishing",)
    assert verdict(m, Limits(vanishing=2.0 / m.growth)).names == ()
    with pytest.raises(ValueError, match=r"Limits\.growth=-1"):
        Limits(growth=-1)
    with pytest.raises(ValueError, match=r"Limits\.stall=0 must be a number > 0"):
        Limits(stall=0)  # a 0 bound is no limit: "off" is None


def test_stall_fires_when_the_loss_barely_moves_and_is_off_by_default() -> None:
    frozen = probe(Config.of("mlp", depth=3, width=16, steps=5, lr=1e-6))  # the loss cannot move at lr 1e-6
    learning = probe(Config.of("mlp", depth=3, width=16, steps=5, lr=0.5, optimizer="sgd"))
    assert frozen.loss[-1] / frozen.loss[0] > 0.999
    assert verdict(frozen).names == ()
    assert verdict(frozen, Limits(stall=0.99)).names == ("stall",)
    assert learning.loss[-1] < 0.99 * learning.loss[0]
    assert "stall" not in verdict(learning, Limits(stall=0.99)).names


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


class _Tanh(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x))


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


def scripted_tanh() -> nn.Module:
    """A _Tanh block as a torch.jit.script module (deprecated by torch, still what some models ship)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(_Tanh())


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


class _Doubling(nn.Module):
    """x -> W x with W twice an orthogonal matrix: a backward gain of exactly 2."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8, bias=False)
        nn.init.orthogonal_(self.linear.weight)
        with torch.no_grad():
            self.linear.weight *= 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def test_blocks_called_by_keyword_keep_their_input_side_and_their_chain() -> None:
    """Stages of blocks called as block(x=x): the input side was taken from a positional argument or
    `hidden_states` alone, so block 0's gain was lost (growth 2^5 for 2^6), and each stage's first
    block was read as starting a new chain (a NaN gain at the junction). Oracle: exact linear growth,
    six gains of 2."""
    torch.manual_seed(0)

    class Staged(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stages = nn.ModuleList(nn.ModuleList(_Doubling() for _ in range(3)) for _ in range(2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for stage in self.stages:
                for block in stage:
                    x = block(x=x)
            return x

    m = probe_module(Staged(), torch.randn(4, 8), lambda o, _: o.square().mean())
    assert m.activation_names[0] == "(input)" and len(m.gains) == 6
    assert m.gains == pytest.approx([2.0] * 6, rel=1e-5)
    assert m.growth == pytest.approx(2.0**6, rel=1e-5)


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


def test_a_keyword_call_of_two_tensors_has_no_input_side() -> None:
    """block(x=ids, bias=b) with integer ids: the one floating keyword tensor, the bias, was taken as
    the chain's entry, and block 0 got a gain against it. Two tensors: which is the chain is not read
    from the call. Oracle: the block's own arguments."""

    class Biased(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)

        def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            return self.emb(x) + bias

    biased, head = Biased(), nn.Linear(4, 4)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.biased, self.head, self.bias = biased, head, torch.randn(4)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.biased(x=ids, bias=self.bias))

    blocks = [("biased", biased), ("head", head)]
    m = probe_module(Model(), torch.randint(0, 10, (3, 5)), lambda o, _: o.square().mean(), blocks=blocks)
    assert m.activation_names[0] != "(input)"


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


def test_a_whole_sequence_rnn_wider_than_its_input_has_its_input_side() -> None:
    """An nn.RNN from 8 inputs to 16 hidden, the loss on the last step: its growth through time is
    block 0's gain from the input, though the shapes differ. Oracle: dL/dx and dL/d(rnn output) from
    torch's own backward; and rho^T growth makes it large (rho 3, relu: ~(3 / sqrt 2)^T)."""
    torch.manual_seed(0)
    rnn = nn.RNN(8, 16, batch_first=True, nonlinearity="relu", bias=False)
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(3.0 * torch.linalg.qr(torch.randn(16, 16))[0])
    head = nn.Linear(16, 4)

    class Last(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.head = rnn, head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(x)[0][:, -1])

    model, x = Last(), torch.randn(4, 16, 8)
    loss = lambda out, _: out.square().mean()  # noqa: E731
    m = probe_module(model, x, loss, blocks=[("rnn", rnn), ("head", head)])
    assert m.activation_names == ("(input)", "rnn", "head")
    xg = x.clone().requires_grad_()
    out = rnn(xg)[0]
    out.retain_grad()
    loss(head(out[:, -1]), None).backward()
    assert m.activation_grad_norms[0] == pytest.approx(xg.grad.norm().item(), rel=1e-5)
    assert m.activation_grad_norms[1] == pytest.approx(out.grad.norm().item(), rel=1e-5)
    assert m.growth > 100


def test_a_nan_gradient_norm_is_shown_as_nan_not_0() -> None:
    """Oracle: the Measurement's own grad_norm. A run whose every gradient norm is NaN has no peak to
    show: NaN (the nonfinite criterion fires), never a reassuring 0; a finite run shows its largest."""

    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    with torch.no_grad():
        net[1].weight[0, 0] = math.nan
    m = probe_module(net, torch.ones(1, 2), lambda o, _: o.sum())
    assert math.isnan(m.grad_norm[0]) and math.isnan(values(m)["grad_norm"])
    assert verdict(m).names == ("nonfinite",)
    fine = probe_module(nn.Linear(2, 2), torch.ones(1, 2), lambda o, _: o.sum(), steps=2)
    assert values(fine)["grad_norm"] == max(fine.grad_norm)


@pytest.mark.parametrize(("factor", "loss_scale"), [(1e20, 1e22), (1e-22, 1e-25)])
def test_huge_and_tiny_finite_norms_are_measured_exactly(factor: float, loss_scale: float) -> None:
    """Oracle: float64 torch.linalg.vector_norm of the same float32 tensors. Block 1's output x1e20
    and the loss x1e22 (float32 squares overflow), or x1e-22 and x1e-25 (subnormal squares): every
    norm is finite and exact, as it is for norms of ordinary size."""
    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3)])
    net[1].register_forward_hook(lambda module, args, out: out * factor)
    x = torch.randn(16, 8)
    blocks = [(str(b), net[b]) for b in range(3)]
    m = probe_module(net, x, lambda out, _: loss_scale * out.square().mean(), blocks=blocks)
    outs, h = [], x.clone().requires_grad_()
    entry = h
    for b in range(3):
        h = net[b](h)
        outs.append(h)
    grads = torch.autograd.grad(loss_scale * h.square().mean(), [entry, *outs])
    expect_out = [float(torch.linalg.vector_norm(t.detach().double())) for t in [x, *outs]]
    expect_grad = [float(torch.linalg.vector_norm(g.double())) for g in grads]
    assert m.first_nonfinite is None
    assert m.activation_norms == pytest.approx(expect_out, rel=1e-6, abs=0)
    assert m.activation_grad_norms == pytest.approx(expect_grad, rel=1e-6, abs=0)
    net.zero_grad()
    (loss_scale * net(x).square().mean()).backward()
    weight_grads = [torch.cat([p.grad.double().reshape(-1) for p in net[b].parameters()]) for b in range(3)]
    assert m.layer_grad_norms == pytest.approx([float(g.norm()) for g in weight_grads], rel=1e-6, abs=0)
    extreme = [v for v in (*m.activation_norms, *m.activation_grad_norms) if v > 1.8e19 or 0 < v < 1e-19]
    assert len(extreme) >= 2  # the ranges float32 squares cannot hold were measured


def test_norm_values_stacked_and_fused_equal_float64_norms() -> None:
    """Oracle: float64 torch.linalg.vector_norm of each tensor. 70 float32 tensors of one shape (a
    recurrent cell's outputs: normed as one stack) and 64 bfloat16 ones (another), at magnitudes whose float32
    squares overflow or go subnormal, mixed with tensors of other shapes (one fused call), after two
    head scalars of different dtypes: every value exact to float32 rounding, in the given order."""
    gen = torch.Generator().manual_seed(0)
    scales = [1.0, 1e20, 1e-22, 3e-3, 1e30]

    def tensor(shape: tuple[int, ...], scale: float, dtype: torch.dtype) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    tensors = [tensor((4, 8), scales[i % 5], torch.float32) for i in range(70)]
    tensors += [tensor((3,), scales[i % 5], torch.bfloat16) for i in range(64)]
    tensors += [tensor((5, 2), s, torch.float32) for s in scales] + [tensor((7,), 1e100, torch.float64)]
    order = torch.randperm(len(tensors), generator=gen).tolist()
    tensors = [tensors[i] for i in order]  # the groups interleaved
    where = {old: new for new, old in enumerate(order)}
    groups = [
        [where[i] for i in range(70)],
        [where[i] for i in range(70, 134)],
        [where[i] for i in range(134, 140)],
    ]
    groups.append(
        [where[i] for i in range(60, 74)] + [where[i] for i in range(74, 134)]
    )  # shapes differ: fused
    head = [torch.tensor(2.5, dtype=torch.bfloat16), torch.tensor(1e300, dtype=torch.float64)]
    got = norms.norm_values(tensors, False, head, groups[:2])
    fused = norms.norm_values(tensors, False, head, groups[2:])  # no stack there
    assert fused == pytest.approx(got, rel=1e-6, abs=0)
    assert got[:2] == [2.5, 1e300]
    expect = [float(torch.linalg.vector_norm(t.double())) for t in tensors]
    assert got[2:] == pytest.approx(expect, rel=1e-6, abs=0)
    assert norms.norm_values(tensors, True)[:3] == pytest.approx(expect[:3], rel=1e-12, abs=0)


def test_norms_on_cuda_sum_float32_and_bfloat16_in_float64() -> None:
    """The accumulator contract (no device needed: it is a choice of dtype): on CUDA, whose fused norm
    sums in its output dtype at memory-bound cost, float32 and bfloat16 tensors (squares can leave
    float32's range) are summed in float64; float16 in float32 (its squares cannot); on the CPU in
    float32, refined after (norms.refine); float64 always, and everything when exact."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert [norms.accumulator(d, False, cuda) for d in (torch.float32, torch.bfloat16, torch.float16)] == [
        torch.float64,
        torch.float64,
        torch.float32,
    ]
    assert norms.accumulator(torch.float32, False, cpu) == norms.accumulator(torch.bfloat16, False, cpu)
    assert norms.accumulator(torch.float32, False, cpu) == torch.float32
    assert norms.accumulator(torch.float64, False, cpu) == norms.accumulator(torch.float16, True, cpu)
    assert norms.accumulator(torch.float64, False, cpu) == torch.float64


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


@pytest.mark.parametrize(
    ("options", "said"),
    [
        (
            {"optimizer": "Adam", "steps": 2},
            "optimizer='Adam' is not allowed; expected one of ('sgd', 'adam') (did you mean 'adam'?)",
        ),  # ran SGD, silently
        (
            {"optimizer": "adamw", "steps": 2},
            "optimizer='adamw' is not allowed; expected one of ('sgd', 'adam')",
        ),
        (
            {"amp": "fp16"},
            "amp='fp16' is not allowed; expected one of ('none', 'bfloat16', 'float16')",
        ),  # ran float32, silently
        ({"clip": -1.0, "steps": 1}, "clip must be None or a finite number > 0, got -1.0"),  # reversed
        ({"steps": -1}, "steps must be >= 0, got -1"),  # UnboundLocalError from inside the probe
        ({"steps": 1.5}, "steps must be a whole number, got 1.5"),
        ({"steps": True}, "steps must be a whole number, got True"),  # ran one step, silently
        ({"lr": "x", "steps": 1}, "lr must be a finite number >= 0, got 'x'"),
    ],
)
def test_probe_module_refuses_training_settings_a_config_refuses(options: dict, said: str) -> None:
    built = build(zoo("mlp", depth=2))
    with pytest.raises(UsageError, match=re.escape(f"probe_module: {said}")) as caught:
        probe_module(built.model, built.inputs, built.loss_fn, **options)
    assert "\n" not in str(caught.value)
    with pytest.raises(UsageError, match="the first argument must be the model"):
        probe_module(built.inputs, built.model, built.loss_fn)  # type: ignore[arg-type]


def test_a_nan_in_the_data_is_the_inputs_and_one_made_before_block_0_the_models() -> None:
    """Before block 0, a NaN the model's code made was blamed on '(input)', as a NaN in the data is
    (found by a trial). Oracle: the construction, clean data against a poisoned batch."""
    data = torch.randn(4, 8)
    data[1, 3] = math.nan
    m = probe_module(Between(4, 9, 1.0), data, lambda out, _: out.pow(2).mean())
    assert m.first_nonfinite is not None and m.first_nonfinite.layer == "(input)"


def test_probe_module_takes_what_torch_takes_for_its_settings() -> None:
    """The settings' check first imposed a Config's limits on a plain module (found in review): a
    64-bit seed, numpy counts and rates, and lr 0 (a probe that does not move the weights) all ran
    before it and run again."""
    import numpy as np

    built = build(zoo("mlp", depth=2))
    for options in (
        {"seed": 2**40},
        {"seed": np.int64(3), "steps": np.int64(1)},
        {"steps": 1, "lr": np.float32(0.01), "clip": np.float32(1.0)},
        {"steps": 1, "lr": 0.0},
    ):
        m = probe_module(built.model, built.inputs, built.loss_fn, **options)
        assert m.steps_run == int(options.get("steps", 0)) and math.isfinite(m.growth)


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


def test_a_skip_around_the_whole_stack_does_not_hide_its_vanishing() -> None:
    """A stem, 4 blocks at 1/2 x orthogonal, and a skip from the stem's output to the model's output
    (y = h + blocks(h)): block 0's input, which requires grad, was read over all its uses, the skip's
    too, so the growth read about 1 where the stack shrinks the gradient 16-fold. Through block 0
    alone, every gain is 1/2. Oracle, exact: ||W^T v|| = g ||v|| for W = g x orthogonal."""
    torch.manual_seed(0)

    class Skipped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Linear(8, 8, bias=False)
            self.blocks = OrthogonalTowers(4, (0.5,)).towers[0]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.stem(x)
            return h + run_tower(self.blocks, h)[0]

    model = Skipped().double()
    blocks = [(f"blocks.{i}", layer) for i, layer in enumerate(model.blocks)]
    m = probe_module(
        model, torch.randn(4, 8, dtype=torch.float64), lambda o, _: o.square().sum(), blocks=blocks
    )
    assert m.gains == pytest.approx([0.5] * 4, rel=1e-6)
    assert m.growth == pytest.approx(0.5**4, rel=1e-6)


class _AroundBlocks(nn.Module):
    """Branch blocks with the residual add written in the model's forward, x = x + block(x) (or
    block(x) + x), optionally behind a stem whose output requires grad; `scale` multiplies the
    branch (x + scale * block(x))."""

    def __init__(self, stem: bool, first: bool, scale: float = 1.0) -> None:
        super().__init__()
        self.stem = nn.Linear(8, 8, bias=False, dtype=torch.float64) if stem else None
        self.layers = nn.ModuleList(nn.Linear(8, 8, bias=False, dtype=torch.float64) for _ in range(4))
        for layer in self.layers:
            nn.init.orthogonal_(layer.weight, gain=0.3)
        self.first, self.scale = first, scale

    def stream(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The residual stream: the input to the stack, then the sum after each block."""
        h = self.stem(x) if self.stem is not None else x
        out = [h]
        for layer in self.layers:
            branch = self.scale * layer(h) if self.scale != 1.0 else layer(h)
            h = branch + h if self.first else h + branch
            out.append(h)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stream(x)[-1]


@pytest.mark.parametrize(("stem", "first"), [(False, False), (False, True), (True, False)])
def test_a_residual_add_around_block_0_is_in_its_gain(stem: bool, first: bool) -> None:
    """Blocks that are residual branches, the add written in the model's forward (x = x + block(x)):
    block 0's input was read through block 0 alone, gain a (0.3 here) where the stream's is |I + W|,
    so the growth read about 0.3x what the gradient did. The add of block 0's input and output, as the
    next block takes it, is now on the chain too. Oracle: torch's gradients of the residual stream
    (the stack's input, then each sum), float64, their ratios."""
    torch.manual_seed(0)
    model = _AroundBlocks(stem, first)
    x = torch.randn(4, 8, dtype=torch.float64)
    loss = lambda o, _: o.square().sum()  # noqa: E731
    m = probe_module(model, x, loss)
    given = x.clone().requires_grad_()
    stream = model.stream(given)
    if not stem:
        stream[0] = given
    grads = [g.norm().item() for g in torch.autograd.grad(loss(stream[-1], x), stream)]
    want = [grads[i] / grads[i + 1] for i in range(4)]
    assert m.gains == pytest.approx(want, rel=1e-9)
    assert m.gains[0] > 0.9  # the branch alone is 0.3
    assert m.growth == pytest.approx(grads[0] / grads[-1], rel=1e-9)
    model.zero_grad()
    loss(model(x), x).backward()
    assert m.grad_norm[0] == pytest.approx(
        math.sqrt(sum(p.grad.square().sum().item() for p in model.parameters())), rel=1e-12
    )


def test_a_residual_add_around_block_0_behind_a_norm_is_in_its_gain() -> None:
    """XLM's layers written in the model's forward: h = LayerNorm(h + attention(h)), the branches the
    blocks, on an embedding-like stem's output. Block 0's input was read through its branch alone, so
    hf:xlm read growth 0.0067, a vanishing gradient, where the stream's is 0.998 (found by an audit).
    The add of the input and what block 0's output became, behind the next block's input, is now on
    the chain. Oracle: torch's gradients of the stem's output and of each sum, float64."""
    torch.manual_seed(0)

    class PostNormOutside(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Linear(8, 8, dtype=torch.float64)
            self.branches = nn.ModuleList(nn.Linear(8, 8, dtype=torch.float64) for _ in range(3))
            self.norms = nn.ModuleList(nn.LayerNorm(8, dtype=torch.float64) for _ in range(3))
            for branch in self.branches:
                nn.init.orthogonal_(branch.weight, gain=0.05)

        def stream(self, x: torch.Tensor) -> list[torch.Tensor]:
            out = [self.stem(x)]
            for branch, norm in zip(self.branches, self.norms, strict=True):
                out.append(out[-1] + branch(out[-1]))
                out.append(norm(out[-1]))
            return out

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.stream(x)[-1]

    model, x = PostNormOutside(), torch.randn(4, 8, dtype=torch.float64)
    loss = lambda o, _: (o * torch.arange(8.0, dtype=torch.float64)).square().sum()  # noqa: E731
    m = probe_module(model, x, loss)
    assert m.layer_names == ("branches.0", "branches.1", "branches.2")
    stream = model.stream(x)
    sums = [stream[0], *stream[1::2]]  # the stem's output, then each add
    grads = [g.norm().item() for g in torch.autograd.grad(loss(stream[-1], x), sums)]
    assert m.gains == pytest.approx([grads[i] / grads[i + 1] for i in range(3)], rel=1e-9)
    assert m.gains[0] > 0.5  # through the branch alone, about 0.05 / the norm's scale


class _NormOutside(nn.Module):
    """x = x + layer(norm(x)) on an embedding's output, the norms written outside the blocks (the
    layers): nn.LayerNorm with a positional embedding added after it, or an RMS norm written by hand
    (several autograd nodes, x used twice) scaled by (1 + w), as Gemma's."""

    def __init__(self, hand: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16, dtype=torch.float64)
        self.norms = nn.ModuleList(nn.LayerNorm(16, dtype=torch.float64) for _ in range(4))
        self.layers = nn.ModuleList(
            nn.Sequential(
                nn.Linear(16, 16, dtype=torch.float64), nn.Tanh(), nn.Linear(16, 16, dtype=torch.float64)
            )
            for _ in range(4)
        )
        self.head = nn.Linear(16, 50, dtype=torch.float64)
        self.pos = nn.Embedding(8, 16, dtype=torch.float64)
        self.hand = hand

    def norm(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if self.hand:  # Gemma's (1 + w): arithmetic on a parameter, nodes that do not lead to x
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + self.norms[i].weight)
        return self.norms[i](x) + self.pos(torch.arange(x.shape[-2]))  # an embedding added after it

    def stream(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        out = [self.emb(tokens)]
        for i, layer in enumerate(self.layers):
            out.append(out[-1] + layer(self.norm(i, out[-1])))
        return out

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.stream(tokens)[-1])


def _token_loss(out: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of a _NormOutside model's logits against its own tokens."""
    return nn.functional.cross_entropy(out.reshape(-1, 50), tokens.reshape(-1))


def _probe_layers(model: nn.Module, tokens: torch.Tensor) -> Measurement:
    """The probe of a _NormOutside model (or one built like it) on its layers, under _token_loss."""
    blocks = [(f"layers.{i}", layer) for i, layer in enumerate(model.layers)]
    return probe_module(model, tokens, _token_loss, blocks=blocks)


@pytest.mark.parametrize("hand", [False, True])
def test_a_residual_around_block_0_with_the_norm_outside_it_is_in_its_gain(hand: bool) -> None:
    """x = x + layer(norm(x)) with the norms outside the blocks (x-transformers' layout): block 0's
    input is norm(x), and its gain was read through its branch alone, 0.26 where the stream's is
    1.04, growth 0.28 for 1.14. Now the add of x and block 0's output is on the chain, its entry
    dL/dx along it (the add's and the norm's). Oracle: torch's gradients of the embedding's output
    and of each sum, float64, their ratios."""
    torch.manual_seed(0)
    model, tokens = _NormOutside(hand), torch.randint(0, 50, (2, 8))
    loss, m = _token_loss, _probe_layers(model, tokens)
    stream = model.stream(tokens)
    grads = [g.norm().item() for g in torch.autograd.grad(loss(model.head(stream[-1]), tokens), stream)]
    assert m.gains == pytest.approx([grads[i] / grads[i + 1] for i in range(4)], rel=1e-9)
    assert m.growth == pytest.approx(grads[0] / grads[-1], rel=1e-9)
    assert m.gains[0] > 0.9  # the branch alone is about 0.3


@pytest.mark.parametrize("hand", [False, True])
@pytest.mark.parametrize("given", ["plain", "requires_grad"])
def test_a_residual_with_the_norm_outside_on_a_raw_float_input_is_in_block_0s_gain(
    hand: bool, given: str
) -> None:
    """The same layout on the model's own float input, no embedding before it: nothing else needed
    that input's gradient, so the backward computed none into it, the taps read nothing and block 0
    was read through its branch alone (growth 1.02 for the stream's 1.85, found by a theory audit;
    0.24 for 1.16 at sigma_w 0.5, depth 8: a vanishing read where the gradient grows). Oracle:
    torch's gradients of the input and of each sum, float64."""
    torch.manual_seed(0)
    model, x = _NormOutside(hand), torch.randn(2, 8, 16, dtype=torch.float64)
    target = torch.randn(2, 8, 16, dtype=torch.float64)

    def stream(h: torch.Tensor) -> list[torch.Tensor]:
        out = [h]
        for i, layer in enumerate(model.layers):
            out.append(out[-1] + layer(model.norm(i, out[-1])))
        return out

    model.forward = lambda h: stream(h)[-1]  # type: ignore[method-assign]
    blocks = [(f"layers.{i}", layer) for i, layer in enumerate(model.layers)]
    m = probe_module(
        model,
        x.clone().requires_grad_(given == "requires_grad"),
        lambda out, _: (out * target).sum(),
        blocks=blocks,
    )
    sums = stream(x.clone().requires_grad_())
    grads = [g.norm().item() for g in torch.autograd.grad((sums[-1] * target).sum(), sums)]
    assert m.gains == pytest.approx([grads[i] / grads[i + 1] for i in range(4)], rel=1e-9)
    assert m.growth == pytest.approx(grads[0] / grads[-1], rel=1e-9)


def test_a_tensor_re_added_before_every_layer_is_no_residual_around_block_0() -> None:
    """h = layer_i(h + c), c a per-token embedding re-added before every layer: block 0 takes h + c
    and the next layer out_0 + c, an add of block 0's output and what its input was made from, as a
    residual with the norm outside is; but c is conditioning, not the stream (h's nodes do not lead
    to it): read as one, block 0's gain 1.02 for 0.46, growth 0.120 for 0.054 (found in review).
    Oracle: torch's gradients of block 0's input and of each layer's output, float64."""
    torch.manual_seed(0)

    class Conditioned(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(50, 16, dtype=torch.float64)
            self.cond = nn.Embedding(50, 16, dtype=torch.float64)
            self.layers = nn.ModuleList(
                nn.Sequential(nn.Linear(16, 16, dtype=torch.float64), nn.Tanh()) for _ in range(4)
            )
            self.head = nn.Linear(16, 50, dtype=torch.float64)

        def stream(self, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
            c, h, outs = self.cond(tokens), self.emb(tokens), []
            first = h + c
            for layer in self.layers:
                h = layer(h + c if outs else first)
                outs.append(h)
            return first, outs

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.head(self.stream(tokens)[1][-1])

    model, tokens = Conditioned(), torch.randint(0, 50, (2, 8))
    loss, m = _token_loss, _probe_layers(model, tokens)
    first, outs = model.stream(tokens)
    grads = [g.norm().item() for g in torch.autograd.grad(loss(model.head(outs[-1]), tokens), [first, *outs])]
    assert m.gains == pytest.approx([grads[i] / grads[i + 1] for i in range(4)], rel=1e-9)


def test_a_residual_around_block_0_on_a_learned_latent_with_the_norm_outside_is_in_its_gain() -> None:
    """x = x + layer(norm(x)) where x is a Parameter used as it is (a Perceiver's latent array), the
    norm an RMS norm written by hand: x's autograd node is a leaf, with no age, and the search for the
    norm's nodes stopped at the first (0.9825 for 0.9857; with a weight on the norm, the branch alone,
    0.25; found in review). Oracle: torch's gradients of x and of each sum, float64."""
    torch.manual_seed(0)

    class Latent(_NormOutside):
        def __init__(self) -> None:
            super().__init__(hand=True)
            self.latent = nn.Parameter(torch.randn(8, 16, dtype=torch.float64))

        def stream(self, tokens: torch.Tensor) -> list[torch.Tensor]:
            out = [self.latent]
            for i, layer in enumerate(self.layers):
                out.append(out[-1] + layer(self.norm(i, out[-1])))
            return out

    model, tokens = Latent(), torch.randint(0, 50, (8,))
    loss = lambda out, t: nn.functional.cross_entropy(out, t)  # noqa: E731
    m = probe_module(
        model, tokens, loss, blocks=[(f"layers.{i}", layer) for i, layer in enumerate(model.layers)]
    )
    stream = model.stream(tokens)
    grads = [g.norm().item() for g in torch.autograd.grad(loss(model.head(stream[-1]), tokens), stream)]
    assert m.gains == pytest.approx([grads[i] / grads[i + 1] for i in range(4)], rel=1e-9)


def test_a_residual_with_the_norm_outside_on_an_input_with_a_skip_around_the_stack_is_read_on_the_chain() -> (
    None
):
    """x = x + layer(norm(x)) with the embedding's output also added to the stack's output (a skip
    around the whole stack): x has a use off the chain, and a check that the taps' sum be x's whole
    gradient read block 0 through its branch alone, 0.36 for 1.02 (found in review). The stream goes
    on from block 0's sum, which is what tells it from a re-added tensor. Oracle: torch's gradient of
    each sum, and block 0's entry as the gradient through its unit alone (autograd.grad of the first
    sum against x, given the first sum's gradient), float64."""
    torch.manual_seed(0)

    class Skipped(_NormOutside):
        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            stream = self.stream(tokens)
            return self.head(stream[-1] + stream[0])

    model, tokens = Skipped(hand=False), torch.randint(0, 50, (2, 8))
    loss, m = _token_loss, _probe_layers(model, tokens)
    stream = model.stream(tokens)
    sums = torch.autograd.grad(
        loss(model.head(stream[-1] + stream[0]), tokens), stream[1:], retain_graph=True
    )
    (entry,) = torch.autograd.grad(stream[1], stream[0], grad_outputs=sums[0])
    norms = [g.norm().item() for g in (entry, *sums)]
    assert m.gains == pytest.approx([norms[i] / norms[i + 1] for i in range(4)], rel=1e-9)
    assert m.gains[0] > 0.9  # the branch alone is about 0.3


@pytest.mark.parametrize("after", ["norm", "half"])
def test_a_residual_with_the_norm_outside_and_the_sum_changed_after_is_read_on_the_chain(after: str) -> None:
    """x = norm2(x + layer(norm1(x))), or 0.5 * (x + layer(norm1(x))): the stream goes on from what
    is made from block 0's sum, not from the sum itself, and a check asking for the sum itself read
    block 0 through its branch alone, 1.68 for 2.09 (found in review). Oracle: torch's gradient of
    block 0's sum, and block 0's entry as the gradient through its unit alone, float64."""
    torch.manual_seed(0)

    class Changed(_NormOutside):
        def stream(self, tokens: torch.Tensor) -> list[torch.Tensor]:
            out = [self.emb(tokens)]
            for i, layer in enumerate(self.layers):
                added = out[-1] + layer(self.norm(i, out[-1]))
                out += [added, self.norms[i](added) if after == "norm" else 0.5 * added]
            return out

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.head(self.stream(tokens)[-1])

    model, tokens = Changed(hand=True), torch.randint(0, 50, (2, 8))
    loss, m = _token_loss, _probe_layers(model, tokens)
    stream = model.stream(tokens)
    (added,) = torch.autograd.grad(loss(model.head(stream[-1]), tokens), stream[1], retain_graph=True)
    (entry,) = torch.autograd.grad(stream[1], stream[0], grad_outputs=added)
    assert m.gains[0] == pytest.approx(entry.norm().item() / added.norm().item(), rel=1e-9)


def test_a_residual_around_block_0_is_read_under_a_loss_with_a_gradient_penalty() -> None:
    """A loss taking torch.autograd.grad with create_graph (R1, WGAN-GP) runs the residual add's node
    once itself before the probe's backward does: two dL/d sum were kept, none read, and block 0 read
    through its branch alone, |dL/d input| 608 for 1185 (found in review). Oracle: torch's gradients
    of the same loss with respect to the stem's output (used by block 0 and the add alone) and each
    block's output, float64."""
    torch.manual_seed(0)
    model = _AroundBlocks(stem=True, first=False)
    x = torch.randn(4, 8, dtype=torch.float64)
    assert model.stem is not None
    stem = model.stem.weight

    def penalised(out: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        (g,) = torch.autograd.grad(out.square().sum(), stem, create_graph=True)
        return out.square().sum() + 10.0 * g.square().sum()

    m = probe_module(model, x, penalised)
    outs: list[torch.Tensor] = []
    handles = [layer.register_forward_hook(lambda mod, i, o: outs.append(o)) for layer in model.layers]
    stream = model.stream(x)
    for handle in handles:
        handle.remove()
    norms = [g.norm().item() for g in torch.autograd.grad(penalised(stream[-1], x), [stream[0], *outs])]
    assert m.activation_grad_norms == pytest.approx(norms, rel=1e-9)


@pytest.mark.parametrize("stem", [False, True])
def test_a_scaled_residual_around_block_0_starts_the_chain_at_its_output(stem: bool) -> None:
    """x + 0.5 * block(x) is not one add of block 0's input and output: the skip is seen in the graph
    and no (input) is taken, on a plain float input (the probe gives the model a copy of it in a
    graph of its own) as behind a stem. The branch alone read a LayerScale of 0.1 on a branch of gain
    15 as block 0's gain 14.5 where the stream's is about 1 (a false explosion, found by a user's
    trial, behind a stem, then on a plain input); every gain is the stream's (dL/d block(x) is 0.5 x
    dL/d sum). Oracle: torch's stream gradients."""
    torch.manual_seed(0)
    model = _AroundBlocks(stem=stem, first=False, scale=0.5)
    x = torch.randn(4, 8, dtype=torch.float64)
    loss = lambda o, _: o.square().sum()  # noqa: E731
    m = probe_module(model, x, loss)
    stream = model.stream(x)
    grads = [g.norm().item() for g in torch.autograd.grad(loss(stream[-1], x), stream[1:])]
    along = [grads[i] / grads[i + 1] for i in range(3)]
    assert m.activation_names[0] == "layers.0"
    assert m.gains == pytest.approx(along, rel=1e-9)


class _LayerScaled(nn.Module):
    """A stem (or none: the input itself), then h = h + 0.1 * tanh(W h) written in the forward
    (LayerScale, ReZero), W of gain 15: a branch far above 1 under a small scale, the stream's gain
    about 1.06."""

    def __init__(self, depth: int, stem: bool = True) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 64) if stem else nn.Identity()
        self.blocks = nn.ModuleList(nn.Linear(64, 64, bias=False) for _ in range(depth))
        for block in self.blocks:
            nn.init.normal_(block.weight, std=15.0 / 64**0.5)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor, stream: list[torch.Tensor] | None = None) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            if stream is not None:
                stream.append(h)
            h = h + 0.1 * torch.tanh(block(h))
        if stream is not None:
            stream.append(h)
        return self.head(h)  # type: ignore[no-any-return]


@pytest.mark.parametrize("stem", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_layer_scale_around_block_0_is_no_false_explosion(seed: int, stem: bool) -> None:
    """Block 0 read through its branch alone, gain 14.5, under a LayerScale of 0.1: growth 104 at depth
    30, exploding, where torch's stream growth is 4.6-8.4 (found by a user's trial behind a stem; on a
    plain float input, whose uses the probe's copy of it now records, the same: growth 15-23 at depth
    8 before). Oracle: torch's gradients of the stream h_0 .. h_30; the probe reads from block 0's
    output, one gain fewer, each gain the stream's up to tanh' (within 1.5x)."""
    torch.manual_seed(seed)
    model = _LayerScaled(30, stem).double()
    x, y = torch.randn(8, 16 if stem else 64, dtype=torch.float64), torch.randint(0, 10, (8,))
    loss = lambda o, _: F.cross_entropy(o, y)  # noqa: E731
    m = probe_module(model, x, loss)
    stream: list[torch.Tensor] = []
    grads = torch.autograd.grad(loss(model(x.clone().requires_grad_(), stream), x), stream)
    oracle = (grads[0].norm() / grads[-1].norm()).item()
    assert m.activation_names[0] == "blocks.0" and not verdict(m).exploded
    assert oracle / 1.5 < m.growth < oracle * 1.5


class _Batched(nn.Module):
    """`_LayerScaled` fed its input from a batch nested in a dict and a tuple, as a data loader gives
    (the probe calls it with batch={"x": (x,)})."""

    def __init__(self, inner: _LayerScaled) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, batch: dict[str, tuple[torch.Tensor]]) -> torch.Tensor:
        return self.inner(batch["x"][0])  # type: ignore[no-any-return]


@pytest.mark.parametrize("seed", [0, 1])
def test_a_layer_scale_around_block_0_on_a_nested_input_is_no_false_explosion(seed: int) -> None:
    """The probe copies a float input into a graph at any depth of tuples, lists and dicts, so the
    skip around block 0 shows on batch={"x": (x,)} as on x (nested below the top level, it was read
    through the branch alone: growth 17.9 and 28.4 at depth 8, seeds 0 and 1, where torch's stream
    growth is 1.28 and 1.53). Oracle: torch's gradients of the stream, as in the test above."""
    torch.manual_seed(seed)
    inner = _LayerScaled(8, stem=False).double()
    x, y = torch.randn(8, 64, dtype=torch.float64), torch.randint(0, 10, (8,))
    loss = lambda o, _: F.cross_entropy(o, y)  # noqa: E731
    blocks = [(f"inner.blocks.{i}", b) for i, b in enumerate(inner.blocks)]
    m = probe_module(_Batched(inner), {"batch": {"x": (x,)}}, loss, blocks=blocks)
    stream: list[torch.Tensor] = []
    grads = torch.autograd.grad(loss(inner(x.clone().requires_grad_(), stream), x), stream)
    oracle = (grads[0].norm() / grads[-1].norm()).item()
    assert m.activation_names[0] == "inner.blocks.0"
    assert oracle / 1.5 < m.growth < oracle * 1.5


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


def test_a_cell_fed_its_input_plus_its_state_is_no_residual_whatever_the_tokens() -> None:
    """A cell called per token on x_t + h (input feeding): no residual around block 0, but where
    x_1 equals x_0 by value (a repeated token), x_1 + h_1 equalled block 0's input plus its output
    to the last bit, and its gradient was added to the input's: |dL/d input| 197.9 for 130.0 (found
    in review). For a plain input, the add is taken only where another block makes the next call.
    Oracle: torch's gradients of x_0 and of each call's output, float64."""
    torch.manual_seed(0)
    cell = nn.Sequential(nn.Linear(8, 8, bias=False, dtype=torch.float64), nn.Tanh())
    nn.init.orthogonal_(cell[0].weight, gain=0.9)

    class Feed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cell = cell

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.stack(self.steps(x, x[:, 0]), 1)

        def steps(self, x: torch.Tensor, first: torch.Tensor) -> list[torch.Tensor]:
            outs = [self.cell(first)]
            for t in range(1, x.shape[1]):
                outs.append(self.cell(x[:, t] + outs[-1]))
            return outs

    model, x = Feed(), torch.randn(3, 5, 8, dtype=torch.float64)
    x[:, 1] = x[:, 0]
    loss = lambda o, _: (o * torch.arange(8.0, dtype=torch.float64)).square().sum()  # noqa: E731
    m = probe_module(model, x, loss, blocks=[("cell", model.cell)])
    first = x[:, 0].clone().requires_grad_()
    outs = model.steps(x, first)
    norms = [g.norm().item() for g in torch.autograd.grad(loss(torch.stack(outs, 1), x), [first, *outs])]
    assert m.activation_grad_norms == pytest.approx(norms, rel=1e-9)


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
    through = recording.Recorder._through
    monkeypatch.setattr(
        recording.Recorder, "_through", lambda rec, grads: (ran.append(1), through(rec, grads))[1]
    )
    model, x = Keeps(), torch.randn(4, 8)
    probe_module(model, x, lambda o, _: o.square().sum())
    assert ran == [1]
    with pytest.raises(Exception, match="the loss fails"):
        probe_module(model, x, fails)
    model.kept.square().sum().backward()
    assert ran == [1]


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


@pytest.mark.parametrize(("warmup", "clip"), [(3, None), (4, 0.05)])
def test_training_with_warmup_and_clipping_matches_plain_torch(warmup: int, clip: float | None) -> None:
    """Oracle: a plain torch loop on a copy of the model: SGD whose lr at step k is lr x min(1, (k + 1) /
    warmup) (LambdaLR), after torch.nn.utils.clip_grad_norm_. Every step's loss and total gradient norm
    (float64 norms of torch's gradients), the weights after the last step, the per-block weight norms
    and the step-0 per-block gradient and activation norms (forward hooks, retain_grad) all match."""
    c = Config.of("mlp", depth=4, width=16, init_scale=2.0, steps=5, lr=0.5)
    built = build(c)
    reference = copy.deepcopy(built.model)
    m = probe_module(
        built.model,
        built.inputs,
        built.loss_fn,
        blocks=built.blocks,
        steps=5,
        lr=0.5,
        clip=clip,
        warmup=warmup,
    )
    opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / warmup))
    blocks = [dict(reference.named_modules())[name] for name, _ in built.blocks]
    losses, totals = [], []
    outs: list[torch.Tensor] = []

    def keep(module: nn.Module, args: Any, out: torch.Tensor) -> None:
        out.retain_grad()
        outs.append(out)

    for step in range(6):
        opt.zero_grad()
        outs.clear()
        hooks = [b.register_forward_hook(keep) for b in blocks]
        loss = built.loss_fn(reference(built.inputs), built.inputs)
        for h in hooks:
            h.remove()
        loss.backward()
        grads = [p.grad for p in reference.parameters() if p.grad is not None]
        losses.append(float(loss.detach()))
        totals.append(float(torch.linalg.vector_norm(torch.cat([g.double().reshape(-1) for g in grads]))))
        if step == 0:
            per_block = [
                float(
                    torch.linalg.vector_norm(torch.cat([p.grad.double().reshape(-1) for p in b.parameters()]))
                )
                for b in blocks
            ]
            forward = [float(torch.linalg.vector_norm(o.detach().double())) for o in outs]
            backward = [float(torch.linalg.vector_norm(o.grad.double())) for o in outs]
        if step == 5:
            break
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(reference.parameters(), clip)
        opt.step()
        sched.step()
    assert m.steps_run == 5
    assert m.loss == pytest.approx(losses, rel=1e-5)
    assert m.grad_norm == pytest.approx(totals, rel=1e-5)
    assert m.layer_grad_norms == pytest.approx(per_block, rel=1e-5)
    assert m.activation_norms[1:] == pytest.approx(forward, rel=1e-5)
    assert m.activation_grad_norms[1:] == pytest.approx(backward, rel=1e-5)
    assert m.chain_starts == () and m.chain_growths == ()  # one chain: its growth is the growth
    for ours, theirs in zip(built.model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs)
    weights = [
        float(torch.linalg.vector_norm(torch.cat([p.detach().double().reshape(-1) for p in b.parameters()])))
        for b in blocks
    ]
    assert m.weight_norms == pytest.approx(weights, rel=1e-6)
    assert probe_module(built.model, built.inputs, built.loss_fn, blocks=built.blocks).weight_norms == ()


def test_a_nan_made_before_the_only_block_is_the_models() -> None:
    """Oracle: the construction. With one block, a NaN the model's code multiplies into block 0's input
    (clean data) is made outside the blocks, before that block, as with many blocks; the same NaN
    in the data is the input's."""
    m = probe_module(Between(1, 0, math.nan), torch.randn(4, 8), lambda out, _: out.pow(2).mean())
    nf = m.first_nonfinite
    assert nf is not None and (nf.layer, nf.tensor) == ("(outside blocks, before layers.0)", "activation")
    data = torch.randn(4, 8)
    data[0, 0] = math.nan
    nf = probe_module(Between(1, 1, 1.0), data, lambda out, _: out.pow(2).mean()).first_nonfinite
    assert nf is not None and nf.layer == "(input)"


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


def test_output_gradients_under_a_gradscaler_are_the_unscaled_ones() -> None:
    """Oracle: dL/d(output) of each block (forward hooks, retain_grad) in a float32 run of the same
    model without autocast; float16 autocast under a GradScaler (scale 65536, a step it does not skip)
    gives the same norms to float16 precision (2%), not x65536 or /65536, and its total gradient norm
    too. The loss is taken in float32 (a float16 loss x65536 overflows: a skipped step, re-run unscaled)."""
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(3)))
    x = torch.randn(8, 16)
    blocks = list(model.named_children())
    m = probe_module(model, x, lambda o, _: o.float().square().mean(), blocks=blocks, amp="float16")
    assert m.loss_scale == (65536.0,) and m.skipped_steps == 0 and m.first_nonfinite is None
    outs: list[torch.Tensor] = []

    def keep(module: nn.Module, args: Any, out: torch.Tensor) -> None:
        out.retain_grad()
        outs.append(out)

    hooks = [b.register_forward_hook(keep) for _, b in blocks]
    model.zero_grad()
    model(x).square().mean().backward()
    for h in hooks:
        h.remove()
    expect = [float(torch.linalg.vector_norm(o.grad.double())) for o in outs]
    assert m.activation_grad_norms[1:] == pytest.approx(expect, rel=2e-2)
    total = torch.linalg.vector_norm(torch.cat([p.grad.double().reshape(-1) for p in model.parameters()]))
    assert m.grad_norm[0] == pytest.approx(float(total), rel=2e-2)


def measured(**fields: Any) -> Measurement:
    """A Measurement of a 3-block stack with the given fields (the rest of a finite, flat run)."""
    base: dict[str, Any] = {
        "layer_names": ("a", "b", "c"),
        "activation_names": ("(input)", "a", "b", "c"),
        "loss": (1.0,),
        "grad_norm": (1.0,),
        "layer_grad_norms": (1.0, 1.0, 1.0),
        "activation_norms": (1.0, 1.0, 1.0, 1.0),
        "activation_grad_norms": (1.0, 1.0, 1.0, 1.0),
        "gains": (1.0, 1.0, 1.0),
        "growth": 1.0,
        "weight_norms": (),
        "first_nonfinite": None,
        "steps_run": len(fields.get("loss", (1.0,))) - 1,
    }
    return Measurement(**(base | fields))


def test_each_criterion_reads_its_documented_value_and_bound() -> None:
    """Oracle: the definitions in Limits' docstring, by hand. grad_norm is the peak over the steps (an
    unscaled Inf counts, a GradScaler's skipped Inf does not); divergence and stall are the last over
    the first loss, from one step on; vanishing reads the smallest of the chains and their product and
    fires strictly below 1/limit; a finding float32 does not make is overflow, not nonfinite; each
    limit is passed strictly, and the defaults are 1e3, 1e2 and 2."""
    from stabilitycheck.measurement import NonFinite

    assert values(measured(grad_norm=(2.0, 50.0, 7.0), loss=(1.0, 2.0, 3.0)))["grad_norm"] == 50.0
    assert values(measured(grad_norm=(2.0, math.inf)))["grad_norm"] == math.inf
    assert values(measured(grad_norm=(2.0, math.inf), loss_scale=(1.0, 2.0)))["grad_norm"] == 2.0
    two = values(measured(loss=(2.0, 5.0)))
    assert two["divergence"] == two["stall"] == 2.5
    assert math.isnan(values(measured())["divergence"])
    three = values(measured(loss=(2.0, 8.0, 5.0)))  # the last over the first, not over the one before
    assert three["divergence"] == three["stall"] == 2.5
    chains = measured(growth=50.0, chain_growths=(50.0, 0.1), chain_starts=(2,))
    assert values(chains)["vanishing"] == pytest.approx(0.1)
    assert values(measured(growth=0.5, chain_growths=(0.5, 0.2), chain_starts=(2,)))["vanishing"] == 0.1
    assert verdict(measured(growth=0.01), Limits(vanishing=100.0)).names == ()  # 0.01 is not < 1/100
    assert verdict(measured(growth=0.0099), Limits(vanishing=100.0)).names == ("vanishing",)
    nf = NonFinite(0, "b", "activation", math.inf)
    both = verdict(measured(first_nonfinite=nf, overflow=nf))
    assert both.names == ("overflow",) and both.criteria[0].limit == math.inf
    alone = verdict(measured(first_nonfinite=nf))
    assert alone.names == ("nonfinite",) and alone.criteria[0].limit == math.inf
    assert verdict(measured(first_nonfinite=nf), Limits(nonfinite=False)).names == ()
    at = measured(growth=100.0, grad_norm=(1000.0,), loss=(1.0, 2.0))
    assert verdict(at).names == ()  # every value exactly at its default limit
    over = measured(growth=100.0001, grad_norm=(1000.001,), loss=(1.0, 2.0001))
    assert verdict(over).names == ("grad_norm", "growth", "divergence")
    assert [c.limit for c in verdict(over).criteria] == [1e3, 1e2, 2.0]
    # a point that vanishes and nothing else vanishes; one chain growing beside another vanishing explodes
    fading = verdict(measured(growth=0.001), Limits(vanishing=100.0))
    split = measured(growth=500.0, chain_growths=(500.0, 1e-6), chain_starts=(2,))
    assert fading.how == "vanishes" and verdict(split, Limits(vanishing=100.0)).how == "explodes"
    assert verdict(split, Limits(vanishing=100.0)).names == ("growth", "vanishing")


def test_every_norm_entry_point_is_exact_for_float32_squares_out_of_range() -> None:
    """Oracle: float64 torch.linalg.vector_norm of the same tensors. Finite float32 tensors whose
    squares overflow (x1e20) or go subnormal (x1e-20 on 8192 elements: a norm 1-90x LOW, and x1e-22)
    have exact norms from every entry point (a million squares of 1e-21 each, subnormal, sum to a norm
    above LOW: the threshold scales with sqrt(numel), found by mutation testing): norm(),
    fused_norms(), norm_values() with a stack of 70,
    in exact mode too; a sparse gradient with a repeated index norms as its dense sum."""
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(8192, generator=gen) * s for s in (1e20, 1e-20, 1e-22, 1.0)]
    tensors.append(torch.full((1 << 20,), 1e-21))  # a norm of 1e-18, above LOW but not LOW x sqrt(n)
    expect = [float(torch.linalg.vector_norm(t.double())) for t in tensors]
    assert [float(norms.norm(t)) for t in tensors] == pytest.approx(expect, rel=1e-6, abs=0)
    assert [float(v) for v in norms.fused_norms(tensors, False)] == pytest.approx(expect, rel=1e-6, abs=0)
    stack = [torch.randn(8192, generator=gen) * 1e-20 for _ in range(70)] + [
        torch.randn(64, generator=gen) * 1e20 for _ in range(70)
    ]
    groups = [list(range(70)), list(range(70, 140))]
    expect = [float(torch.linalg.vector_norm(t.double())) for t in stack]
    for exact in (False, True):
        got = norms.norm_values(stack, exact, groups=groups)
        assert got == pytest.approx(expect, rel=1e-6, abs=0), exact
    grad = torch.sparse_coo_tensor(
        torch.tensor([[0, 0, 2]]), torch.tensor([3.0, 4.0, 1.0]), (4,), check_invariants=True
    )
    assert float(torch.linalg.vector_norm(norms.dense(grad))) == pytest.approx(math.sqrt(50.0), rel=1e-7)


def test_float64_norms_whose_squares_leave_float64s_range_are_exact_in_the_probe() -> None:
    """Oracle: math.hypot over the values (scaled, exact to rounding). Float64 tensors whose squares
    overflow (x1e200) or go subnormal (x1e-200), alone, fused and stacked, in exact mode too; and a
    float64 linear MLP at sigma_w 10, 160 blocks deep, every value finite with norms up to 7e154: its
    activation norms read inf there, a non-finite value where there was none (found in an audit)."""
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(300, generator=gen, dtype=torch.float64) * s for s in (1e200, 1e-200, 1.0)]
    stack = [torch.randn(64, generator=gen, dtype=torch.float64) * 1e200 for _ in range(70)]
    for given, groups in ((tensors, []), (stack, [list(range(70))])):
        expect = [math.hypot(*t.tolist()) for t in given]
        for exact in (False, True):
            assert norms.norm_values(given, exact, groups=groups) == pytest.approx(expect, rel=1e-12, abs=0)
    c = Config.of(
        "mlp", activation="linear", init_scale=10.0, depth=160, width=16, batch_size=2, dtype="float64"
    )
    built = resolve("mlp").build(c)
    outputs: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _a, o: outputs.append(o)) for _, m in built.blocks]
    built.loss_fn(built.model(built.inputs), built.inputs).backward()
    for h in hooks:
        h.remove()
    assert (
        all(bool(o.isfinite().all()) for o in outputs)
        and max(math.hypot(*o.flatten().tolist()) for o in outputs) > 1e154
    )
    m = probe(c)
    assert m.first_nonfinite is None
    expect = [math.hypot(*o.flatten().tolist()) for o in outputs]
    assert m.activation_norms[1:] == pytest.approx(expect, rel=1e-12, abs=0)
    grads = [math.hypot(*p.grad.flatten().tolist()) for p in built.model.parameters()]
    assert m.grad_norm[0] == pytest.approx(math.hypot(*grads), rel=1e-12)


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


class _Tanhs(nn.Module):
    """`n` blocks of (nn.Linear 8, tanh) in a ModuleList."""

    def __init__(self, n: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def _square_mean(out: torch.Tensor, _: Any) -> torch.Tensor:
    return out.square().mean()


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


def test_a_parameter_fed_to_block_0_under_float16_amp_has_its_gradient_unscaled_once() -> None:
    """A learned query fed to block 0 is the chain's entry, and its gradient is the parameter's own
    .grad, which the GradScaler unscales in place: it was divided by the loss scale a second time.
    Oracle: the query is the model's only parameter, so the entry's gradient norm is the total
    gradient norm (and the scale, 65536, is far from 1)."""

    class Query(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query = nn.Parameter(torch.randn(4, 8))
            self.layers = nn.ModuleList([nn.Tanh(), nn.Tanh()])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.query
            for layer in self.layers:
                h = layer(h)
            return h * x

    torch.manual_seed(0)
    m = probe_module(Query(), torch.randn(4, 8), _square_mean, amp="float16")
    assert m.activation_names[0] == "(input)"
    assert m.activation_grad_norms[0] == pytest.approx(m.grad_norm[0], rel=1e-6)


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


class _Shift(nn.Module):
    """x + b: a parameter of its own beside a shared layer."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.randn(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.shift


def test_a_parameter_two_blocks_share_is_counted_in_the_first_blocks_weight_gradient() -> None:
    """Two blocks holding one Linear (tied): its gradient belongs to the first block that owns it,
    input side first, never to both or to the last. Oracle: torch's gradients of a plain backward,
    the shared weight's in block 0's L2 norm, block 1 holding only its own shift."""
    torch.manual_seed(0)
    shared = nn.Linear(8, 8, bias=False)

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(
                [nn.Sequential(shared, nn.Tanh()), nn.Sequential(shared, nn.Tanh(), _Shift(8))]
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                x = block(x)
            return x

    model, x = Tied(), torch.randn(4, 8)
    blocks = [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)]
    m = probe_module(model, x, lambda o, _: o.square().sum(), blocks=blocks)
    weight, shift = torch.autograd.grad(model(x).square().sum(), [shared.weight, model.blocks[1][2].shift])
    assert m.layer_grad_norms == pytest.approx([float(weight.norm()), float(shift.norm())], rel=1e-6)


def test_a_parameter_replaced_or_frozen_or_other_blocks_between_probes_reach_the_next_probe() -> None:
    """The probe caches which block owns each trainable parameter; a weight replaced by a new one,
    then a weight frozen, then other blocks given, between probes of one model, must each reach the
    next probe, as on a fresh model. Oracle: torch's gradients of the trainable parameters, summed
    per block (the first block owning each) and in all."""
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3)))
    x = torch.randn(4, 8)

    def loss_fn(o: torch.Tensor, _: object) -> torch.Tensor:
        return o.square().sum()

    def check(blocks: list[tuple[str, nn.Module]]) -> None:
        m = probe_module(model, x, loss_fn, blocks=blocks)
        trainable = [p for p in model.parameters() if p.requires_grad]
        grads = dict(
            zip(map(id, trainable), torch.autograd.grad(loss_fn(model(x), x), trainable), strict=True)
        )
        per_block = [
            math.sqrt(sum(float(grads[id(p)].norm()) ** 2 for p in b.parameters() if id(p) in grads))
            for _, b in blocks
        ]
        assert m.layer_grad_norms == pytest.approx(per_block, rel=1e-6)
        assert m.grad_norm[0] == pytest.approx(
            math.sqrt(sum(float(g.norm()) ** 2 for g in grads.values())), rel=1e-6
        )

    blocks = [(str(i), b) for i, b in enumerate(model)]
    check(blocks)
    model[2][0].weight = nn.Parameter(3 * model[2][0].weight.detach())
    check(blocks)
    model[0][0].weight.requires_grad_(False)
    check(blocks)
    check(blocks[1:])


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


class _LogOfSum(nn.Module):
    """ln(sum of the row - 7): NaN where the dropout before it kept 3 of 8 ones or fewer (2 each)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x.sum(-1, keepdim=True) - 7.0) * torch.ones_like(x)


def test_the_float64_re_run_of_a_nan_step_draws_its_dropout_masks_again() -> None:
    """The step whose NaN depends on the dropout mask is re-run in float64 from the random state it
    began with: the same mask, the same NaN named in the block that made it; a re-run drawing on
    would draw another mask and lose it (a mutant, found by mutation testing). Oracle: the mask
    torch draws first under manual_seed(derived(seed, SALT_FORWARD)) (the forward's seed: not `seed`,
    which the init drew from), by brute force over 20 seeds."""
    drop, log = nn.Dropout(0.5), _LogOfSum()
    model = nn.Sequential(drop, log, nn.Linear(8, 1))
    for seed in range(20):
        torch.manual_seed(derived(seed, SALT_FORWARD))
        kept = int((F.dropout(torch.ones(8), 0.5) > 0).sum())
        m = probe_module(
            model, torch.ones(1, 8), lambda o, _: o.sum(), blocks=[("0", drop), ("1", log)], seed=seed
        )
        found = m.first_nonfinite
        assert (found is not None) == (kept <= 3)
        if found is not None:
            assert (found.step, found.layer, found.tensor, found.reproduced) == (0, "1", "activation", True)


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


class _QKV(nn.Module):
    """A pre-norm block reading its input three times, as queries, keys and values."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln, self.f, self.g = nn.LayerNorm(d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return q + self.f(self.ln(q)) + self.g(self.ln(k)) * torch.tanh(v)


class _CalledThrice(nn.Module):
    """Each block called as layer(h, h, h) (Hugging Face's Funnel), on a small embedding that block 0's
    LayerNorm amplifies: the README's block-0 culprit."""

    def __init__(self, d: int = 32, depth: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, d)
        nn.init.normal_(self.emb.weight, std=0.01)
        self.layers = nn.ModuleList(_QKV(d) for _ in range(depth))
        self.head = nn.Linear(d, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        for layer in self.layers:
            h = layer(h, h, h)
        return self.head(h)


def test_an_entry_passed_to_block_0_three_times_is_its_one_input() -> None:
    """layer(h, h, h) passes one tensor three times: the probe read it as several same-shaped inputs,
    dropped the `(input)` entry and with it block 0's gain (growth 2.4 for 135 on a review's model,
    hf:funnel's 1.14 for 1.19). Oracle: torch's dL/d(embedding output) through all of block 0's uses
    of it, and dL/d(each block's output)."""
    torch.manual_seed(0)
    model, ids, z = _CalledThrice(), torch.randint(0, 50, (4, 7)), torch.randn(4, 7, 10)
    m = probe_module(model, ids, lambda out, _: (out * z).sum())
    h0 = model.emb(ids).detach().requires_grad_()
    h, outs = h0, []
    for layer in model.layers:
        h = layer(h, h, h)
        outs.append(h)
    grads = torch.autograd.grad((model.head(h) * z).sum(), [h0, *outs])
    assert m.activation_names[0] == "(input)" and len(m.activation_grad_norms) == 7
    assert m.activation_grad_norms == pytest.approx([float(g.norm()) for g in grads], rel=1e-5)
    assert m.growth == pytest.approx(float(grads[0].norm() / grads[-1].norm()), rel=1e-5) and m.growth > 100


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


class _Packed(nn.Module):
    """A _QKV block taking its keys and values packed: layer(h, (h, h))."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _QKV(32)

    def forward(self, h: torch.Tensor, kv: Any) -> torch.Tensor:
        return self.inner(h, kv[0], kv[1])  # type: ignore[no-any-return]


class _PackedStack(_CalledThrice):
    def __init__(self, pack: type) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Packed() for _ in range(6))
        self.pack = pack

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        for layer in self.layers:
            h = layer(h, self.pack([h, h]))
        return self.head(h)  # type: ignore[no-any-return]


@pytest.mark.parametrize("pack", [tuple, list])
def test_the_entry_passed_again_inside_a_container_is_not_taken(pack: type) -> None:
    """layer(h, (h, h)): the copy goes where the entry is passed as an argument; inside a container
    the original stays, whose gradient the copy's left out: (input) read 26 for torch's 1297 (found
    in review). Such a call takes no entry, as before; layer(h, h, h) does."""
    torch.manual_seed(0)
    model, ids, z = _PackedStack(pack), torch.randint(0, 50, (4, 7)), torch.randn(4, 7, 10)
    m = probe_module(model, ids, lambda out, _: (out * z).sum())
    assert m.activation_names[0] == "layers.0"


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


class _Chain(nn.Module):
    """h -> tanh(W_k h) over k Linear blocks; `dead_last`: the last block's output reaches the loss x 0."""

    def __init__(self, depth: int = 4, width: int = 8, scale: float = 2.0, dead_last: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.layers = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(depth))
        for layer in self.layers:
            with torch.no_grad():
                layer.weight.copy_(torch.randn(width, width, generator=g) * scale / math.sqrt(width))
        self.dead_last = dead_last

    def forward(self, x: torch.Tensor, keep: list | None = None) -> torch.Tensor:
        outs = []
        h = x
        for layer in self.layers:
            z = layer(h)  # the block's output (the probe's hook sees it), before the tanh
            if keep is not None:
                z.retain_grad()
            outs.append(z)
            h = torch.tanh(z)
        if keep is not None:
            keep.extend(outs)
        if self.dead_last:
            return torch.tanh(outs[-2]) + 0.0 * outs[-1]
        return h


def _blocks(model: _Chain):
    return [(f"layers.{i}", m) for i, m in enumerate(model.layers)]


def _loss(out, _):
    return out.pow(2).mean()


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


def test_steps_run_and_weight_norms_follow_the_steps() -> None:
    model, x = _Chain(scale=0.5), torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    m0 = probe_module(model, x, _loss, blocks=_blocks(model))
    assert m0.steps_run == 0 and len(m0.loss) == 1 and m0.weight_norms == ()
    m2 = probe_module(model, x, _loss, blocks=_blocks(model), steps=2)
    assert m2.steps_run == 2 and len(m2.loss) == 3 and len(m2.weight_norms) == 4


def test_output_gradients_under_a_gradscaler_are_unscaled() -> None:
    model, x = _Chain(scale=1.0), torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    plain = probe_module(model, x, _loss, blocks=_blocks(model))
    scaled = probe_module(
        model, x, lambda o, _: o.float().pow(2).mean(), blocks=_blocks(model), amp="float16"
    )
    assert scaled.loss_scale and scaled.loss_scale[0] > 1
    # float16 autocast rounds to ~1e-3; a scale left in would be off by 65536x
    assert list(scaled.activation_grad_norms) == pytest.approx(
        list(plain.activation_grad_norms), rel=3e-2, abs=0
    )
    assert scaled.grad_norm[0] == pytest.approx(plain.grad_norm[0], rel=3e-2, abs=0)


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


class _LinearDeadLast(nn.Module):
    """Linear blocks, no activation; the last block's output reaches the loss times 0 (a zero gradient)."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(2)
        self.layers = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(3))
        with torch.no_grad():
            for m in self.layers:
                m.weight.copy_(torch.randn(width, width, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.layers[0](x)
        b = self.layers[1](a)
        c = self.layers[2](b)
        return b + 0.0 * c


def test_the_profile_stays_at_step_0_when_gradients_reached_there() -> None:
    model = _LinearDeadLast()
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    m = probe_module(
        model,
        x,
        _loss,
        blocks=[(f"layers.{i}", layer) for i, layer in enumerate(model.layers)],
        steps=6,
        lr=1e6,
    )
    assert m.first_nonfinite is not None and m.first_nonfinite.step > 0  # it blows up after step 0
    assert m.profile_step == 0  # gradients reached block outputs at step 0: the profile is step 0's


F64 = torch.float64


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
    probing._run_step): the re-run must be the model's one forward. Oracle: a twin built the same way,
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
    """probing._in_graph copies each floating input 'that does not require grad'; one that does is the
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
    """Both re-runs of _run_step at once: the one on the inputs as given (the model refuses the probe's
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


class _Biased(nn.Module):
    """Block 0 of the model below: an embedding of integer ids plus a float bias."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.emb(x) + bias  # type: ignore[no-any-return]


class _CallsBiasedByKeyword(nn.Module):
    """Calls block 0 by keyword alone, the float bias first: block(bias=b, x=ids)."""

    def __init__(self) -> None:
        super().__init__()
        self.biased, self.head, self.bias = _Biased(), nn.Linear(4, 4), torch.randn(4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.biased(bias=self.bias, x=ids))  # type: ignore[no-any-return]


def test_a_keyword_call_of_two_tensors_has_no_input_side_whatever_their_order() -> None:
    """blockcalls.entry: called by keyword alone, the entry is `hidden_states` or else the call's one
    tensor argument, '(None, None) where that is not one tensor': with the float bias given before the
    integer ids, taking the first tensor read the bias as the chain's input. Oracle: the documented
    rule (the block's own arguments: two tensors)."""
    model = _CallsBiasedByKeyword()
    blocks = [("biased", model.biased), ("head", model.head)]
    m = probe_module(model, torch.randint(0, 10, (3, 5)), lambda o, _: o.square().mean(), blocks=blocks)
    assert m.activation_names == ("biased", "head")


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
    """probing._buffers: an inference tensor, which no forward outside inference mode can update, is
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
    """probing._together: a carried c whose gradient norm is inf in a finite step is left out of that
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


class _SilentThenInfinite(nn.Module):
    """Blocks whose outputs get no gradient (the loss takes them times 0: every step silent) beside a
    parameter read through sqrt, which SGD at lr 2 takes from 1 to exactly 0: its gradient goes inf."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(2))
        self.p = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x.sum() * 0 + self.p.sqrt().sum()


def test_the_profile_of_a_silent_run_is_the_step_where_a_non_finite_value_shows() -> None:
    """A run silent at every step takes its per-block profile from the step where a non-finite value
    shows (probe_module's docstring). Oracle: the documented rule on the model's design."""
    torch.manual_seed(0)
    model = _SilentThenInfinite()
    m = probe_module(model, torch.randn(4, 8), lambda out, _: out, steps=3, lr=2.0, amp="float16")
    assert not any(m.activation_grad_norms)  # silent at every step
    assert m.first_nonfinite is not None and m.first_nonfinite.step > 0
    assert m.profile_step == m.first_nonfinite.step


def test_a_block_output_read_sparsely_has_its_gradient_norm_taken_densely() -> None:
    """A block returning a weight that the model reads with F.embedding(sparse=True): dL/d output is a
    sparse tensor (the norm raised NotImplementedError); its norm is the dense gradient's, torch's."""

    class Table(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(
                torch.randn(10, 8, dtype=F64, generator=torch.Generator().manual_seed(0))
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.weight

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.b = Table(), nn.Sequential(nn.Linear(8, 8, dtype=F64), nn.Tanh())
            self.idx = torch.tensor([1, 3, 3, 7])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(nn.functional.embedding(self.idx, self.q(x), sparse=True)) * x

    model = Model()
    x = torch.randn(4, 8, dtype=F64)

    def loss(out: torch.Tensor, _: object) -> torch.Tensor:
        return out.square().mean()

    m = probe_module(model, x, loss, blocks=[("q", model.q), ("b", model.b)])
    w = model.q.weight
    own = torch.autograd.grad(loss(model.b(nn.functional.embedding(model.idx, w)) * x, x), w)[0]
    assert m.activation_grad_norms[1] == pytest.approx(float(own.norm()), rel=1e-12)


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


def test_sparse_block_outputs_are_normed_as_their_dense_values() -> None:
    """A block returning a sparse tensor: its forward norm is its values' (torch's vector_norm takes
    no sparse tensor: the probe crashed, a review found). Oracle: the same tensors made dense."""

    class Sparse(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x.to_dense() if x.is_sparse else x).to_sparse()

    torch.manual_seed(0)
    layers = nn.ModuleList(Sparse() for _ in range(4))

    def run(x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        outs = []
        for layer in layers:
            x = layer(x)
            outs.append(x)
        return x.to_dense(), outs

    model = nn.Module()
    model.layers = layers
    model.forward = lambda x: run(x)[0]  # type: ignore[method-assign]
    x = torch.randn(3, 8)
    m = probe_module(model, x, lambda out, _: out.pow(2).mean(), blocks=list(layers.named_children()))
    y, outs = run(x)
    grads = torch.autograd.grad(y.pow(2).mean(), outs)
    dense = [float(o.detach().to_dense().norm()) for o in outs]
    assert m.activation_norms[1:] == pytest.approx(dense, rel=1e-6)
    assert m.activation_grad_norms[1:] == pytest.approx([float(g.to_dense().norm()) for g in grads], rel=1e-6)


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
