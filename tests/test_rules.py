"""The documented rules of verdicts, spreads, kinds of growth, mean-field and phase-map theory, the
merge of ranks and the GradScaler guard, each at the boundary a plausible bug crosses (each test here
failed on a mutant that the rest of the suite let pass). Oracles: the rule written out, hand
arithmetic, brute force, or torch itself."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch

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
    one = zoo_growth("mlp", {"activation": "tanh", "init_scale": sigma, "depth": 1}, False)
    two = zoo_growth("mlp", {"activation": "tanh", "init_scale": sigma, "depth": 2}, False)
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


class _EveryOtherEntryScaler:
    """A broken loss scaler: checks only the even entries of each gradient (g.view(-1)[::2]) for Inf/NaN
    before stepping. Otherwise a correct static-then-backoff scaler."""

    def __init__(self) -> None:
        self.s = 2.0**16

    def get_scale(self) -> float:
        return self.s

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.s

    def step(self, opt: torch.optim.Optimizer) -> None:
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        for g in grads:
            g.div_(self.s)
        if any(not bool(g.view(-1)[::2].isfinite().all()) for g in grads):
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
    from stabilitycheck.invariants_training import assert_gradscaler_guards

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 5), nn.Tanh(), nn.Linear(5, 1))  # 5, 5, 5, 1 entries
    x = torch.randn(4, 1)
    with pytest.raises(StabilityError):
        assert_gradscaler_guards(model, x, lambda out, _: (out**2).mean(), _EveryOtherEntryScaler())


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
