"""The probe's first non-finite value: the step, block and tensor where a NaN or Inf first shows
(forward, backward, update, data, random draws), the float64 re-run that names it, and its culprit."""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import pytest
import torch
from probe_models import NanBackward, _loss, culprit
from torch import nn
from torch.nn import functional as F

from stabilitycheck.config import Config
from stabilitycheck.configprobe import probe
from stabilitycheck.measurement import NonFinite
from stabilitycheck.probing import probe_module
from stabilitycheck.rng import SALT_FORWARD, derived
from stabilitycheck.verdicts import values, verdict


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


def test_a_nan_in_the_data_is_the_inputs_and_one_made_before_block_0_the_models() -> None:
    """Before block 0, a NaN the model's code made was blamed on '(input)', as a NaN in the data is
    (found by a trial). Oracle: the construction, clean data against a poisoned batch."""
    data = torch.randn(4, 8)
    data[1, 3] = math.nan
    m = probe_module(Between(4, 9, 1.0), data, lambda out, _: out.pow(2).mean())
    assert m.first_nonfinite is not None and m.first_nonfinite.layer == "(input)"


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


def _normed() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 1)
    )


@pytest.mark.parametrize("rerun", ["non-finite", "float16 overflow"])
def test_a_step_run_again_starts_from_the_buffers_its_forward_started_from(rerun: str) -> None:
    """The re-runs of a step (in float64, to locate a non-finite value; unscaled, where the float16
    GradScaler's gradients overflowed) start from the buffers the step started from: BatchNorm's
    statistics are updated once by a steps=0 probe, as by one forward (they were updated twice).
    Oracle: a twin's one plain forward in train mode (under the probe's autocast)."""
    model, twin, x = _normed(), _normed(), torch.randn(16, 8)
    with torch.autocast("cpu", dtype=torch.float16, enabled=rerun != "non-finite"):
        twin(x)
    blocks = [("0", model[0]), ("2", model[2])]
    if rerun == "non-finite":
        m = probe_module(model, x, lambda out, _: (out * 1e38).sum() * 1e38, blocks=blocks)
        assert m.first_nonfinite is not None
    else:
        m = probe_module(model, x, lambda out, _: out.float().sum() * 1e3, blocks=blocks, amp="float16")
        assert m.skipped_steps == 1
    for bn, plain in ((model[1], twin[1]), (model[3], twin[3])):
        assert int(bn.num_batches_tracked) == 1
        assert torch.equal(bn.running_mean, plain.running_mean)
        assert torch.equal(bn.running_var, plain.running_var)


def test_a_later_step_run_again_to_locate_a_non_finite_value_updates_the_buffers_once() -> None:
    """A NaN at step 2 (a step run without hooks) is located by a re-run from that step's buffers:
    three forwards' worth of BatchNorm updates after the probe, not four."""
    model, x = _normed(), torch.randn(16, 8)

    def loss(out: torch.Tensor, _: object) -> torch.Tensor:  # Inf from the third forward on
        return out.sum() * (math.inf if int(model[1].num_batches_tracked) >= 3 else 1.0)

    m = probe_module(model, x, loss, blocks=[("0", model[0]), ("2", model[2])], steps=3, lr=1e-3)
    assert m.first_nonfinite is not None and m.first_nonfinite.step == 2 and m.first_nonfinite.reproduced
    assert int(model[1].num_batches_tracked) == 3


def test_the_profile_of_a_step_run_again_is_that_of_the_step_that_ran() -> None:
    """spectral_norm iterates its vectors at each forward: the float64 re-run locating an Inf ran on
    vectors iterated twice, its output norms 10% off the step's. Oracle: a deep copy's one forward."""
    from torch.nn.utils.parametrizations import spectral_norm

    class Boom(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * math.inf

    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Sequential(spectral_norm(nn.Linear(16, 16)), nn.Tanh()) for _ in range(3)]
    with torch.no_grad():  # vectors far from converged: each iteration moves them
        for layer in layers:
            p = layer[0].parametrizations.weight[0]  # type: ignore[index]
            p._u.copy_(F.normalize(torch.randn(16), dim=0))
            p._v.copy_(F.normalize(torch.randn(16), dim=0))
    model = nn.Sequential(*layers, nn.Sequential(nn.Linear(16, 16), Boom()))
    twin, x = copy.deepcopy(model), torch.randn(8, 16)
    m = probe_module(model, x, lambda out, _: out.sum(), blocks=[(str(i), model[i]) for i in range(4)])
    assert m.first_nonfinite is not None
    norms = [float(x.norm())]
    handles = [
        twin[i].register_forward_hook(lambda _m, _a, out: norms.append(float(out.detach().norm())))
        for i in range(4)
    ]
    twin(x)
    for h in handles:
        h.remove()
    assert m.activation_norms[:4] == pytest.approx(norms[:4], rel=1e-6)


@pytest.mark.parametrize("rerun", ["non-finite", "float16 overflow"])
def test_a_step_run_again_leaves_an_expanded_buffer_as_it_is(rerun: str) -> None:
    """A buffer made with expand (a position table broadcast over the batch) shares memory between
    its elements: copying it back before a step's re-run raised 'more than one element of the
    written-to tensor refers to a single memory location' (found by a review). No forward can write
    into it in place either: it is not kept. Oracle: the re-run's finding, and the buffer unchanged."""

    class Table(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8)
            self.register_buffer("pe", torch.ones(1, 8).expand(16, 8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x + self.pe)

    torch.manual_seed(0)
    model, x = Table(), torch.randn(16, 8)
    if rerun == "non-finite":
        m = probe_module(model, x, lambda out, _: (out * 1e38).sum() * 1e38, blocks=[("lin", model.lin)])
        assert m.first_nonfinite is not None
    else:
        m = probe_module(
            model, x, lambda out, _: out.float().sum() * 1e5, blocks=[("lin", model.lin)], amp="float16"
        )
        assert m.skipped_steps == 1
    assert model.pe.stride() == (0, 1) and bool((model.pe == 1).all())
