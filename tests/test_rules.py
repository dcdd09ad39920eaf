"""The documented rules of verdicts, spreads, kinds of growth, culprits, junctions, remedies, staircases,
mean-field and phase-map theory, the merge of ranks and the GradScaler and rescaling checks, each at the
boundary a plausible bug crosses (each test here failed on a mutant that the rest of the suite let
pass). Oracles: the rule written out, hand arithmetic, brute force, or torch itself."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.multiprocessing.spawn import spawn

from stabilitycheck.measurement import Measurement, NonFinite


def _m(**kw: Any) -> Measurement:
    base: dict[str, Any] = dict(
        layer_names=("a", "b", "c"),
        activation_names=("in", "a", "b", "c"),
        loss=(1.0, 1.0),
        grad_norm=(1.0, 1.0),
        layer_grad_norms=(1.0, 1.0, 1.0),
        activation_norms=(1.0, 1.0, 1.0, 1.0),
        activation_grad_norms=(1.0, 1.0, 1.0, 1.0),
        gains=(1.0, 1.0, 1.0),
        growth=1.0,
        weight_norms=(),
        first_nonfinite=None,
        steps_run=1,
    )
    base.update(kw)
    return Measurement(**base)


# --- verdicts.py -----------------------------------------------------------------------------------


def test_an_infinite_grad_norm_without_a_scaler_is_the_peak_and_fires_grad_norm() -> None:
    """V2: an Inf total norm is left out only under a GradScaler (a step it skipped); without one it is
    the peak, and grad_norm fires on it even with nonfinite switched off (_above: Inf counts)."""
    from stabilitycheck.verdicts import Limits, peak_grad_norm, verdict

    nf = NonFinite(1, "b", "activation_grad", math.inf)
    m = _m(grad_norm=(3.0, math.inf), first_nonfinite=nf)
    assert peak_grad_norm(m) == math.inf
    assert "grad_norm" in verdict(m, Limits(nonfinite=False)).names
    scaled = _m(grad_norm=(3.0, math.inf), loss_scale=(65536.0, 32768.0), skipped_steps=1)
    assert peak_grad_norm(scaled) == 3.0


def test_vanishing_fires_strictly_below_one_over_the_limit() -> None:
    """V3: 'growth below 1/limit' -- a growth exactly at 1/limit (0.5 for limit 2, exact in binary)
    does not fire; one ulp below does."""
    from stabilitycheck.verdicts import Limits, fires

    lim = Limits(vanishing=2.0)
    assert not fires("vanishing", 0.5, lim)
    assert fires("vanishing", math.nextafter(0.5, 0.0), lim)


def test_how_says_vanishes_only_when_vanishing_alone_fired() -> None:
    """V4: a point where vanishing fired beside an explosion criterion explodes."""
    from stabilitycheck.verdicts import Criterion, Verdict

    both = Verdict(True, (Criterion("grad_norm", 2e3, 1e3), Criterion("vanishing", 1e-3, 1e-2)))
    assert both.how == "explodes"
    assert Verdict(True, (Criterion("vanishing", 1e-3, 1e-2),)).how == "vanishes"


def test_divergence_is_judged_after_a_single_step() -> None:
    """V6: with steps=1 the loss has two entries (init and after the update); their ratio is the
    divergence value, 3.0 / 1.0 > 2.0."""
    from stabilitycheck.verdicts import Limits, values, verdict

    m = _m(loss=(1.0, 3.0))
    assert values(m)["divergence"] == 3.0
    assert verdict(m, Limits()).names == ("divergence",)


def test_vanishing_reads_the_product_of_chains_in_series() -> None:
    """V7: an encoder and its decoder each shrinking x0.1 pass the gradient x0.01 end to end
    (readings.paths_of: chains in series multiply); at a vanishing limit of 50 (bound 0.02) that fires
    though neither chain alone does."""
    from stabilitycheck.verdicts import Limits, vanishing, verdict

    m = _m(growth=0.1, chain_growths=(0.1, 0.1), chain_feeds=((), (0,)), chain_starts=(2,))
    assert vanishing(m) == pytest.approx(0.01)
    assert "vanishing" in verdict(m, Limits(vanishing=50.0)).names


# --- spread.py -------------------------------------------------------------------------------------


def _nearest_rank(xs: list[float], q: float) -> float:
    """Brute-force oracle: the smallest x (NaN lowest) such that at least q * n values are <= it."""

    def key(x: float) -> float:
        return -math.inf if math.isnan(x) else x

    for x in sorted(xs, key=key):
        if sum(1 for y in xs if key(y) <= key(x)) >= q * len(xs):
            return x
    raise AssertionError


@pytest.mark.parametrize("n", range(1, 12))
@pytest.mark.parametrize("q", [0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
def test_quantile_is_the_nearest_rank_for_every_n_and_q(n: int, q: float) -> None:
    """S1: ceil(q n)-th smallest (round() differs at q n = 2.5, 4.5 ...)."""
    from stabilitycheck.spread import quantile

    xs = [float(10 * k + 1) for k in range(n)][::-1]
    assert quantile(xs, q) == _nearest_rank(xs, q)


def test_nan_sorts_below_every_number_in_the_quantile_and_the_spread() -> None:
    """S2/S3: NaN seeds count as the lowest values; the median of [nan, nan, 0.329] is NaN, while the
    range is over the numbers: 'nan (0.329-0.329, 2 NaN)' (the docstring's example)."""
    from stabilitycheck.spread import Spread, quantile

    assert quantile([2.0, math.nan, 1.0], 1.0) == 2.0
    assert quantile([2.0, math.nan, 1.0], 0.5) == 1.0
    s = Spread.of([math.nan, 0.329, math.nan], 0.5)
    assert math.isnan(s.mid) and (s.low, s.high, s.nan) == (0.329, 0.329, 2)
    assert s.describe() == "nan (0.329-0.329, 2 NaN)"


# --- growthkind.py ---------------------------------------------------------------------------------


def test_a_vanishing_stack_is_not_flat() -> None:
    """G3: 'flat when the total growth is within x2' -- both ways: a stack halving the gradient per
    block (growth 2^-8) is exponential at x0.5/block, not flat."""
    from stabilitycheck.growthkind import kind_of

    profiles = [[0.5] * 8 for _ in range(3)]
    kind = kind_of(profiles, [0.5**8] * 3, 0.5)
    assert kind.kind == "exponential"
    assert math.exp(kind.rate.mid) == pytest.approx(0.5)
    assert kind_of([[1.3] * 2] * 3, [1.69] * 3, 0.5).kind == "flat"  # within x2 either way
    assert kind_of([[0.77] * 2] * 3, [0.77**2] * 3, 0.5).kind == "flat"


def test_the_typical_stack_is_the_geometric_mean_over_seeds() -> None:
    """G6: seeds at 2a and 2/a per block have a geometric mean of exactly 2 everywhere: a clean
    exponential at x2/block, whatever a is (an arithmetic mean, a + 1/a, is a kinked stack)."""
    from stabilitycheck.growthkind import _typical_stack, kind_of

    a = [1, 1, 1, 1, 1, 1, 1, 1, 8, 8, 8, 8]
    profiles = [[2 * x for x in a], [2 / x for x in a]]
    assert _typical_stack(profiles) == pytest.approx([2.0] * len(a))
    kind = kind_of(profiles, [2.0 ** len(a)] * 2, 0.5)
    assert kind.kind == "exponential"


# --- meanfield.py ----------------------------------------------------------------------------------


def _gauss(f: Any, s: float) -> float:
    """E[f(s z)], z ~ N(0, 1), by a dense Riemann sum in float64 (independent of Gauss-Hermite)."""
    z = torch.linspace(-12.0, 12.0, 400_001, dtype=torch.float64)
    w = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi) * (z[1] - z[0])
    return float((f(s * z) * w).sum())


@pytest.mark.parametrize("sigma", [0.5, 2.0, 4.0])
def test_the_first_blocks_gain_is_at_the_input_variance_times_sigma_squared(sigma: float) -> None:
    """M1: x ~ N(0, 1), so block 0's pre-activations W x have variance q_0 = sigma^2 (not 1); its gain
    is sqrt(sigma^2 E[tanh'(sigma z)^2]), and block 1's at q_1 = sigma^2 E[tanh(sigma z)^2]."""
    from stabilitycheck.meanfield import zoo_growth

    def sech4(h: torch.Tensor) -> torch.Tensor:
        return torch.cosh(h) ** -4

    chi0 = sigma**2 * _gauss(sech4, sigma)
    q1 = sigma**2 * _gauss(lambda h: torch.tanh(h) ** 2, sigma)
    chi1 = sigma**2 * _gauss(sech4, math.sqrt(q1))
    one = zoo_growth("mlp", {"activation": "tanh", "init_scale": sigma, "depth": 1})
    two = zoo_growth("mlp", {"activation": "tanh", "init_scale": sigma, "depth": 2})
    assert one == pytest.approx(math.sqrt(chi0), rel=1e-6)
    assert two == pytest.approx(math.sqrt(chi0 * chi1), rel=1e-6)


# --- phasemap.py -----------------------------------------------------------------------------------


def test_theorys_frontier_is_strictly_above_the_limit_like_the_verdict() -> None:
    """P3: the growth criterion fires on growth > limit (verdicts._above); a linear RNN's last-step growth
    is exactly sigma^(T-1) = 10^2 = 100 at T = 3, on the limit: not past it. The frontier is T = 4."""
    from stabilitycheck.phasemap import theory
    from stabilitycheck.space import Axis
    from stabilitycheck.verdicts import Limits

    base = SimpleNamespace(family="rnn", subject="rnn", values={"activation": "linear", "init_scale": 10.0})
    pm = SimpleNamespace(
        limits=Limits(growth=100.0),
        base=base,
        loss="last",
        x=Axis("seq_len", (1, 2, 3, 4, 5)),
        y=Axis("init_scale", (10.0,)),
    )
    assert theory(pm) == (3,)  # index of T = 4


# --- distributed.py --------------------------------------------------------------------------------


def test_to_series_combines_two_ranks_as_one_full_batch_would() -> None:
    """D1: with the full-batch loss the mean of W rank losses, dL/d(out) on rank r is dL_r/d(out_r) / W:
    output-gradient squares add up divided by W^2 (3^2 + 4^2 over 2^2: norm 2.5); block outputs and
    weights add up as they are; the loss is the mean. Checked against torch autograd on a real split."""
    from stabilitycheck.distributed import Layout, to_series

    lay = Layout(n_blocks=1)
    p = lay.parts()
    rows = torch.zeros(2, lay.width, dtype=torch.float64)
    rows[:, p["loss"]] = torch.tensor([[1.0], [3.0]], dtype=torch.float64)
    rows[:, p["activation"]] = torch.tensor([[4.0], [5.0]], dtype=torch.float64)
    rows[:, p["activation_grad"]] = torch.tensor([[9.0], [16.0]], dtype=torch.float64)
    out = to_series(rows, lay)
    assert float(out[p["loss"]]) == 2.0
    assert float(out[p["activation"]]) == 3.0
    assert float(out[p["activation_grad"]]) == pytest.approx(2.5)
    # the same from autograd: a batch of two halves, loss = mean of the halves' losses
    y = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    halves = [(y[r] ** 2).sum() * (r + 1) for r in range(2)]
    (sum(halves) / 2).backward()
    local = [torch.autograd.grad((y[r] ** 2).sum() * (r + 1), y)[0][r] for r in range(2)]
    rows[:, p["activation_grad"]] = torch.stack([(g**2).sum() for g in local]).unsqueeze(1)
    assert float(to_series(rows, lay)[p["activation_grad"]]) == pytest.approx(float(y.grad.norm()))


# --- invariants_training.py ------------------------------------------------------------------------


class _PartialScaler:
    """A broken loss scaler: checks only the entries `reads` of each gradient (flattened) for Inf/NaN
    before stepping (every other one, or all but the last: off-by-ones torch's GradScaler, which reads
    every entry, does not make). Otherwise a correct static-then-backoff scaler."""

    def __init__(self, reads: slice) -> None:
        self.s, self.reads = 2.0**16, reads

    def get_scale(self) -> float:
        return self.s

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.s

    def step(self, opt: torch.optim.Optimizer) -> None:
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        for g in grads:
            g.div_(self.s)
        if any(not bool(g.view(-1)[self.reads].isfinite().all()) for g in grads):
            self.s /= 2
            return
        opt.step()

    def update(self) -> None:
        pass


def test_gradscaler_guards_catch_a_scaler_checking_every_other_entry() -> None:
    """IT1: the 'inside' poison sits at an odd entry, so a scaler reading only even entries steps on it.
    Every parameter here has 5 or 1 entries, so the end poisons (first and last entry) are even ones,
    and numel // 2 is even: only the odd inside entry, (numel // 2) | 1, can catch this scaler."""
    from torch import nn

    from stabilitycheck import StabilityError
    from stabilitycheck.invariants_gradscaler import assert_gradscaler_guards

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 5), nn.Tanh(), nn.Linear(5, 1))  # 5, 5, 5, 1 entries
    x = torch.randn(4, 1)
    with pytest.raises(StabilityError):
        assert_gradscaler_guards(
            model, x, lambda out, _: (out**2).mean(), _PartialScaler(slice(None, None, 2))
        )


def test_norms_combine_as_torchs_total_norm_does_nan_first() -> None:
    """math.hypot reads inf beside NaN as inf; torch's total norm of such gradients is NaN, and so is
    the probe's (found in review). Oracle: torch.nn.utils.get_total_norm."""
    from stabilitycheck.layout import combined

    for values in ([math.inf, math.nan], [math.nan, 2.0], [3.0, 4.0], [math.inf, 1.0]):
        expect = float(
            torch.nn.utils.get_total_norm([torch.tensor([v], dtype=torch.float64) for v in values])
        )
        got = combined(values)
        assert got == expect or (math.isnan(got) and math.isnan(expect)), values
    assert combined([1e200, 1e200]) == math.sqrt(2) * 1e200  # where torch's squares overflow


def _m2(**kw: Any) -> Measurement:
    """A two-block Measurement (blocks 'a' and 'b' after the input 'in'), every reading 1 unless given."""
    two: dict[str, Any] = {
        "layer_names": ("a", "b"),
        "activation_names": ("in", "a", "b"),
        "layer_grad_norms": (1.0, 1.0),
        "activation_norms": (1.0, 1.0, 1.0),
        "activation_grad_norms": (1.0, 1.0, 1.0),
        "gains": (1.0, 1.0),
    }
    return _m(**{**two, **kw})


# --- culprit.py ------------------------------------------------------------------------------------


def test_a_gain_of_exactly_one_does_not_amplify_in_the_short_stack_vote() -> None:
    """CU7: with fewer than three gains the seeds vote for their largest *amplifying* block (gain > 1).
    A largest gain of exactly 1.0 amplifies nothing, so the vote falls back to the block with the
    largest weight gradient ('b' here); one ulp above 1 the largest-gain block ('a') is named."""
    from stabilitycheck.culprit import culprit_of

    flat = _m2(gains=(1.0, 0.5), layer_grad_norms=(1.0, 5.0))
    assert culprit_of([flat, flat]) == "b"
    above = _m2(gains=(math.nextafter(1.0, 2.0), 0.5), layer_grad_norms=(1.0, 5.0))
    assert culprit_of([above, above]) == "a"


# --- growthkind.py ---------------------------------------------------------------------------------


def test_the_input_segment_stands_apart_only_on_four_gains_or_more() -> None:
    """G1: input_apart needs 4 blocks (gains) or more -- on 3, leaving the input out would leave 2
    points to fit, which any line and any power law fit exactly. The same shape (input gain 1, the
    rest 3: far past 3 sd of at least 0.05, and the rest carrying all the log growth) is apart on 4."""
    from stabilitycheck.growthkind import input_apart

    assert not input_apart([1.0, 3.0, 3.0])
    assert input_apart([1.0, 3.0, 3.0, 3.0])


def test_an_input_segment_that_is_the_growth_is_not_left_apart() -> None:
    """G7: the input segment is apart only where the other blocks carry at least half the log growth
    (else it is the growth, as one block's spike). Input x100 over gain-1 blocks: far from the others
    (any sd), but the rest carries ~0 of ln 100, so not apart; with the rest at x3 each (3 ln 3 = 3.3
    of a total 7.9: under half) still not apart; at x6 each (5.4 of 10.0: over half) apart."""
    from stabilitycheck.growthkind import input_apart

    assert not input_apart([100.0, 1.01, 0.99, 1.0])
    assert not input_apart([100.0, 3.0, 3.0, 3.0])
    assert input_apart([100.0, 6.0, 6.0, 6.0])


# --- junctions.py ----------------------------------------------------------------------------------


def test_only_an_add_of_alpha_one_is_a_residual_written_around_block_0() -> None:
    """J1: the residual add around block 0 is the add, alpha 1, of block 0's output and its input (its
    input side hands dL/d sum on unchanged: torch's own AddBackward0 scales the second input by alpha).
    torch.add(raw, first, alpha=2) is an AddBackward0 too, but no identity: it is left unread."""
    from stabilitycheck.junctions import skip_around

    w = torch.randn(4, requires_grad=True)
    raw = w * 1.0
    first = torch.tanh(raw)
    one = torch.add(raw, first)
    found = skip_around((one,), raw, first, False)
    assert found is not None and found[0] is one.grad_fn
    two = torch.add(raw, first, alpha=2.0)
    assert type(two.grad_fn).__name__ == "AddBackward0"
    assert skip_around((two,), raw, first, False) is None


def test_a_call_taking_block_0s_input_takes_no_chain_when_it_is_the_entry() -> None:
    """J3: with `entry`, outputs[0] is block 0's input, no output of chain 0: a second tower taking that
    input (or what is computed from it) runs beside the first and takes no chain; a call taking chain
    0's last output (or a sum on it) takes chain 0. Without `entry`, outputs[0] is chain 0's own."""
    from stabilitycheck.junctions import taken_chains

    w = torch.randn(4, requires_grad=True)
    inp = w * 1.0
    out0 = torch.tanh(inp)
    out1 = torch.tanh(out0)
    outputs = [inp, out0, out1]
    assert taken_chains(outputs, [], (inp,), True) == frozenset()
    assert taken_chains(outputs, [], (torch.sin(inp),), True) == frozenset()
    assert taken_chains(outputs, [], (out1 + 1,), True) == frozenset({0})
    assert taken_chains(outputs, [], (inp,), False) == frozenset({0})


# --- invariants_rescaling.py -----------------------------------------------------------------------


def test_rescaling_runs_the_model_under_its_seed_not_the_global_random_state() -> None:
    """IR3: every forward the check compares runs under `seed` (a dropout in training mode drops the
    same units in each, whatever the caller's random state): the first number each forward draws is
    torch's first draw after torch.manual_seed(seed), and the same after the global state moved."""
    from stabilitycheck.invariants_rescaling import assert_rescaling_equivariant

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 64), torch.nn.Dropout(0.5), torch.nn.Linear(64, 4)
    ).train()
    inputs = torch.randn(8, 16)
    draws: list[float] = []

    def loss_fn(out: torch.Tensor, _inputs: Any) -> torch.Tensor:
        return out.pow(2).mean()

    def drawing(module: torch.nn.Module, args: Any) -> None:
        draws.append(float(torch.rand(())))

    model[0].register_forward_pre_hook(drawing)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        expected = float(torch.rand(()))
    for state in (1, 2):
        torch.manual_seed(state)
        assert_rescaling_equivariant(model, inputs, loss_fn, 3.7, seed=5)
    assert len(draws) >= 4 and all(d == expected for d in draws)

    # --- invariants_training.py ------------------------------------------------------------------------

    def update(self) -> None:
        pass


def _square_mean(out: torch.Tensor, _inputs: Any) -> torch.Tensor:
    return (out**2).mean()


def test_gradscaler_guards_poison_the_last_entry_of_the_last_gradient() -> None:
    """IT4: the end poison of the last gradient sits at its last entry (the first gradient's at its
    first), so a scaler that never reads a tensor's last entry steps on it. The last parameter here is
    a bias of 3 entries: its inside poison, (3 // 2) | 1 = 1, is read by that scaler, as are every
    other gradient's poisons (first entries, and odd middle ones short of the end): only the last
    entry of the last gradient can catch it. torch's GradScaler passes the same model."""
    from stabilitycheck import StabilityError
    from stabilitycheck.invariants_gradscaler import assert_gradscaler_guards

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    assert [p.numel() for p in model.parameters()] == [5, 5, 15, 3]
    x = torch.randn(4, 1)
    assert_gradscaler_guards(model, x, _square_mean, torch.amp.GradScaler("cpu"))
    with pytest.raises(StabilityError):
        assert_gradscaler_guards(model, x, _square_mean, _PartialScaler(slice(None, -1)))


# --- distributed.py --------------------------------------------------------------------------------


def test_the_rank_behind_a_non_finite_total_grad_norm_is_the_first_with_a_bad_weight_gradient() -> None:
    """D2: the total grad norm is the series after a row's last column (index width, parts()'s
    grad_norm), which no rank logs: its culprit rank is the lowest whose weight-gradient entries hold a
    non-finite value; a block series' own column is read for every other series."""
    from stabilitycheck.distributed import Layout, nonfinite_rank

    lay = Layout(n_blocks=2)
    assert lay.parts()["grad_norm"] == slice(lay.width, lay.width + 1)
    grad = lay.parts()["gradient"].start + 1
    rows = [[1.0] * lay.width for _ in range(3)]
    rows[2][grad] = math.inf
    rows[1][0] = math.nan  # a loss column: not the total grad norm's
    assert nonfinite_rank(rows, lay, lay.width) == 2
    assert nonfinite_rank(rows, lay, 0) == 1
    assert nonfinite_rank(rows, lay, grad) == 2
    assert nonfinite_rank(rows, lay, 1) is None


def _grad_norm_worker(rank: int, out: str) -> None:
    """One of two gloo ranks holding the same plain (replicated, as under DDP) gradients: writes
    full_grad_norm and torch's own norm of the one copy."""
    from stabilitycheck.distributed import full_grad_norm

    dist.init_process_group("gloo", init_method=(Path(out) / "store").as_uri(), rank=rank, world_size=2)
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same values on both ranks: one gradient, replicated
    params: list[torch.Tensor] = [torch.nn.Parameter(torch.zeros(n, dtype=torch.float64)) for n in (3, 7)]
    for p in params:
        p.grad = torch.randn_like(p)
    got = full_grad_norm(params)
    want = float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
    Path(out, f"rank{rank}.json").write_text(json.dumps([got, want]))
    dist.destroy_process_group()


def test_the_full_grad_norm_counts_a_replicated_gradient_once(tmp_path: Path) -> None:
    """D3: a plain tensor's gradient is replicated on every rank (DDP), so each rank's squared norm is
    divided by the world size before the all_reduce: on two ranks with the same gradients the full
    norm is that gradient's norm (torch.nn.utils.get_total_norm of one copy), not sqrt(2) times it."""
    if not dist.is_available():
        pytest.skip("torch.distributed with gloo is not available here")
    spawn(_grad_norm_worker, args=(str(tmp_path),), nprocs=2, join=True)
    for rank in range(2):
        got, want = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got == pytest.approx(want, rel=1e-12)


# --- remedies.py -----------------------------------------------------------------------------------


def test_a_warmup_is_offered_only_over_two_steps_or_more() -> None:
    """R2: a linear warmup over the probed steps runs step k (from 0) at lr x (k + 1) / steps, so over
    one step it is the plain lr: no remedy, not offered. Over two steps or more it is, over them all;
    never without steps, nor where a warmup is already set."""
    from stabilitycheck import remedies
    from stabilitycheck.config import Config

    c = Config.of("mlp")
    assert remedies.warmup(c.with_run(steps=0), None) is None  # type: ignore[arg-type]
    assert remedies.warmup(c.with_run(steps=1), None) is None  # type: ignore[arg-type]
    for steps in (2, 5):
        offered = remedies.warmup(c.with_run(steps=steps), None)  # type: ignore[arg-type]
        assert offered is not None and offered.run.warmup == steps
    assert remedies.warmup(c.with_run(steps=5, warmup=2), None) is None  # type: ignore[arg-type]


def test_the_critical_init_is_no_remedy_where_the_init_is_already_critical() -> None:
    """R4: the critical-init remedy sets the init knob to its critical value, and is none (not offered)
    where the knob already has it: mean-field theory puts a bias-free tanh MLP's chi_1 = 1 at sigma_w
    = 1 and a ReLU MLP's at sqrt(2) (chi_1 = sigma_w^2 / 2). Off it, the remedy moves the knob there."""
    from stabilitycheck.config import Config
    from stabilitycheck.remedies import critical_init
    from stabilitycheck.subjects import resolve

    mlp = resolve("mlp")
    assert critical_init(Config.of("mlp", init_scale=1.0), mlp) is None
    assert critical_init(Config.of("mlp", activation="relu", init_scale=math.sqrt(2)), mlp) is None
    fixed = critical_init(Config.of("mlp", init_scale=2.0), mlp)
    assert fixed is not None and fixed.knob("init_scale") == 1.0
    fixed = critical_init(Config.of("mlp", activation="relu", init_scale=1.0), mlp)
    assert fixed is not None and fixed.knob("init_scale") == math.sqrt(2)


# --- staircase.py ----------------------------------------------------------------------------------


def test_a_row_breaking_monotonicity_is_bisected_below_its_lowest_firing_point() -> None:
    """ST5: a row whose measured points break monotonicity (x = 2 fires, x = 3 does not) is bisected
    again below its lowest firing point for its lowest transition: here the frontier is x = 0, the
    brute-force smallest x that fires in that row; a bisection up to the quiet point instead keeps
    x = 2, above a firing point it measured."""
    from stabilitycheck.staircase import trace

    rows = [(False, False, False, False), (True, False, True, False)]
    edges: list[Any] = []
    notes: list[str] = []

    def fires(x: int, y: int) -> bool:
        return rows[y][x]

    trace(fires, 4, 2, edges, notes)
    assert [e.x for e in edges] == [None, min(x for x in range(4) if rows[1][x])]
    assert edges[1].how == "bisection" and len(notes) == 1 and notes[0].startswith("row 1: x index 2 fires")


# --- meanfield.py ----------------------------------------------------------------------------------


def test_tanh_at_sigma_one_has_fixed_point_zero_and_is_exactly_critical() -> None:
    """M2: for tanh, tanh(h)^2 < h^2 for h != 0, so q -> sigma^2 E[tanh(sqrt(q) z)^2] < q for every
    q > 0 when sigma <= 1: the only fixed point is q* = 0 (reached like 1 / (2 l) at sigma = 1, too
    slowly for any iteration to converge on), and chi_1 = sigma^2 tanh'(0)^2 = 1 there (to the
    quadrature's rounding; q = 5e-5, where 10^4 iterations stop, gives 1 - 1e-4)."""
    from stabilitycheck.meanfield import chi_1, q_star

    assert q_star(1.0, "tanh") == 0.0
    assert chi_1(1.0, "tanh") == pytest.approx(1.0, rel=1e-12)
    assert q_star(0.9, "tanh") == 0.0
    assert chi_1(0.9, "tanh") == pytest.approx(0.9**2, rel=1e-12)


def test_a_model_file_config_without_its_init_knob_reads_it_at_its_default(tmp_path: Path) -> None:
    """A Config naming some of a model file's knobs alone (as a user writes it for assert_stable) has
    the init knob at the file's default: the critical-init remedy said 'n/a (no init knob ...)' there,
    where the CLI, whose Configs name every knob, said the file's init_scale is at its critical value
    (a new user's trial). Oracle: the file's own defaults (init_scale 1.0, critical by INIT; 2.0 not)."""
    from stabilitycheck.config import Config
    from stabilitycheck.remedies import critical_init, why_not
    from stabilitycheck.subjects import resolve

    for default, fixed in ((1.0, False), (2.0, True)):
        path = tmp_path / f"init{int(default)}.py"
        path.write_text(
            "import torch\nfrom torch import nn\nINIT = ('init_scale', 1.0)\n"
            f"def build(depth=3, init_scale={default}):\n"
            "    return nn.Sequential(*(nn.Linear(8, 8) for _ in range(depth)))\n"
            "def batch(model, batch_size=4):\n    return torch.randn(batch_size, 8)\n"
        )
        subject = resolve(str(path))
        sparse = Config.of(str(path), depth=5)
        remedy = critical_init(sparse, subject)
        if fixed:
            assert remedy is not None and remedy.knob("init_scale") == 1.0 and remedy.knob("depth") == 5
        else:
            assert remedy is None
            assert why_not("critical-init", sparse, subject) == "init_scale is at its critical value, 1.0"
