"""The growth kind's rules (growthkind) on exact gain stacks built so that each threshold sits just inside
or just outside, every expected value worked by hand from the Growth and input_apart docstrings."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from stabilitycheck.config import Config
from stabilitycheck.growthkind import FIT_R2, classify, explains, fit_growth, input_apart, kind_of, swing
from stabilitycheck.seeds import assess
from stabilitycheck.spread import Spread
from stabilitycheck.verdicts import Limits


@pytest.mark.parametrize(("offset", "apart"), [(0.16, True), (-0.16, True), (0.14, False), (-0.14, False)])
def test_an_input_gain_off_a_constant_stack_is_apart_past_3_times_the_sd_floor(
    offset: float, apart: bool
) -> None:
    """Guards the standard-deviation floor 0.05 (3 x 0.05 = 0.15 in log-gain); oracle by hand: the others
    are exactly 1.5 (standard deviation 0, so the floor decides), the input's log-gain ln 1.5 + offset."""
    assert input_apart([1.5 * math.exp(offset), *[1.5] * 5]) is apart


@pytest.mark.parametrize(("offset", "apart"), [(0.31, True), (0.29, False)])
def test_an_input_gain_is_apart_past_3_population_sds_of_the_others(offset: float, apart: bool) -> None:
    """Guards INPUT_SPREAD standard deviations where they are above the floor; oracle by hand: the others'
    log-gains are ln 1.5 +- 0.1 (mean ln 1.5, population standard deviation 0.1), so apart iff the input
    lies more than 0.3 from ln 1.5 (the sample deviation, 0.115, would put it at 0.35)."""
    rest = [1.5 * math.exp(0.1), 1.5 * math.exp(-0.1)] * 2
    assert input_apart([1.5 * math.exp(offset), *rest]) is apart


@pytest.mark.parametrize(("offset", "excess"), [(0.16, 0.0), (0.14, 0.02)])
def test_the_exponential_rate_leaves_out_only_an_input_gain_apart(offset: float, excess: float) -> None:
    """Guards the floor through the fitted rate; oracle, least squares by hand: gains ln 1.5 + offset then
    5 x 1.5. Left apart (0.16 > 0.15) the rest is exactly ln 1.5 per block; kept (0.14), the cumulative
    log growth over 6, 5, .., 1 blocks is x ln 1.5 plus 0.14 at x = 6, whose slope is ln 1.5 plus
    0.14 (6 - 3.5) / 17.5 = 0.02."""
    gains = [1.5 * math.exp(offset), *[1.5] * 5]
    kind = kind_of([gains] * 3, [math.prod(gains)] * 3, 0.5)
    assert kind.kind == "exponential"
    assert kind.rate.mid == pytest.approx(math.log(1.5) + excess, abs=1e-12)


@pytest.mark.parametrize(("gains", "rate"), [([3.0], math.log(3)), ([2.0, 8.0], math.log(4))])
def test_a_short_stacks_rate_is_its_log_growth_per_block(gains: list[float], rate: float) -> None:
    """Guards the rate of a stack too short to fit (1 or 2 gains); oracle, the Growth definition by
    hand: rate ** blocks is the growth, 3 = 3 ** 1 and 2 x 8 = 4 ** 2 (neither gain of the two, nor
    their growth over 3 block calls); no fit explains anything there (NaN r2 and exponent)."""
    fit = fit_growth(gains)
    assert fit[0] == pytest.approx(rate, rel=1e-12)
    assert all(math.isnan(x) for x in fit[1:])
    kind = kind_of([gains] * 3, [math.prod(gains)] * 3, 0.5)
    assert kind.kind == "n/a" and kind.rate.mid == pytest.approx(rate, rel=1e-12)


@pytest.mark.parametrize("g", [1.05, 1.1, 1.3])
def test_a_linear_rnn_grows_exponentially_at_its_exact_rate_under_a_per_token_loss(g: float) -> None:
    """Oracle, exact: a linear RNN with W = g x orthogonal grows g^(T-1) through time, x g per step. Its
    per-token loss adds a factor ~1/sqrt(1 - g^-2) on top (3.3 at g = 1.05, 2.4 at 1.1), past the x2
    any rate law is allowed: it read irregular (found in an audit against theory); the kind is that of
    the through-time profile, at rate g."""
    off = Limits(grad_norm=None, growth=None, divergence=None)
    c = Config.of("rnn", seq_len=60, init_scale=g, activation="linear", width=16, batch_size=4, seeds=3)
    j = assess(c, limits=off)
    assert j.kind.kind == "exponential"
    assert math.exp(j.kind.rate.mid) == pytest.approx(g, rel=1e-4)
    assert j.per_token is not None and j.growth.mid == pytest.approx(g ** (60 - 1), rel=1e-3)


def _non_normal_profile(steps: int) -> list[float]:
    """The exact backward gains, input side first, of h_(t+1) = W h_t under the loss (h_T * Z).sum():
    dL/dh_(T-k) = Z W^k with W = 0.5 I + 2 x the superdiagonal (8 x 8: spectral radius 0.5, largest
    singular value 2.47) and a fixed Z, by plain float64 products."""
    w = [[0.5 if i == j else 2.0 if j == i + 1 else 0.0 for j in range(8)] for i in range(8)]
    z = [[math.sin(1.0 + 7 * r + c) for c in range(8)] for r in range(4)]
    norms = []
    for _ in range(steps + 1):
        norms.append(math.sqrt(sum(x * x for row in z for x in row)))
        z = [[sum(row[i] * w[i][j] for i in range(8)) for j in range(8)] for row in z]
    return [norms[k + 1] / norms[k] for k in range(steps)][::-1]


@pytest.mark.parametrize("steps", range(30, 40))
def test_a_transient_that_rises_and_falls_back_is_not_flat(steps: int) -> None:
    """A non-normal recurrence amplifies the gradient ~1e3x inside the stack and lets it fall back by the
    input (rho < 1): however close to 1 the growth from end to end, the stack is not flat (Growth: flat needs
    the growth from every block to the output within x2). Oracle: the exact profile's end-to-end growth and
    interior peak, and that no constant rate or depth law fits a profile that rises then falls."""
    gains = _non_normal_profile(steps)
    peak = max(math.prod(gains[j:]) for j in range(steps))
    assert peak > 100  # the oracle: the transient
    kind = kind_of([gains] * 3, [math.prod(gains)] * 3, 0.5)
    assert kind.kind == "irregular", (math.prod(gains), kind.describe())


@pytest.mark.parametrize("wiggle", [1.3, 1.9])
def test_a_stack_whose_every_partial_growth_is_within_x2_is_flat(wiggle: float) -> None:
    """Guards that the swing rule leaves a truly flat stack flat: gains alternating wiggle, 1 / wiggle never
    take the growth from any block past x`wiggle` < 2 (oracle by hand)."""
    gains = [wiggle, 1 / wiggle] * 6
    assert kind_of([gains] * 3, [math.prod(gains)] * 3, 0.5).kind == "flat"


def _jordan_gains(size: int, steps: int, seed: int) -> list[float]:
    """The exact per-step backward gains of h' = W h through a Jordan block W = I + N of `size` at
    spectral radius 1, input side first: ||G W^k|| / ||G W^(k-1)|| for a last-step gradient G, in
    float64 (the closed form of what a probe of such a linear cell reads)."""
    import torch

    w = torch.eye(size, dtype=torch.float64) + torch.diag(torch.ones(size - 1, dtype=torch.float64), 1)
    g = torch.randn(size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    norms = [float(g.norm())]
    for _ in range(steps - 1):
        g = g @ w
        norms.append(float(g.norm()))
    return [norms[k] / norms[k - 1] for k in range(len(norms) - 1, 0, -1)]


@pytest.mark.parametrize(("size", "steps"), [(2, 64), (2, 128), (2, 256)])
def test_a_jordan_block_at_radius_1_grows_as_a_power_of_the_steps(size: int, steps: int) -> None:
    """Theory: ||G W^k|| ~ k^(size - 1) through a Jordan block at spectral radius 1, no exponential rate
    (its per-step log-gain decays like 1 / distance to the output). It read 'irregular: no constant rate
    or depth law fits' (a theory audit); the depth law from the output side fits, and its power gives the
    growth within x2, as the kind promises. (Size 3 grows ~k^2 / 2 times |G_1| / |G|, a factor near 1/4
    that no depth^p within x2 gives: irregular by that promise.)"""
    profiles = [_jordan_gains(size, steps, seed) for seed in range(3)]
    growths = [math.prod(p) for p in profiles]
    got = kind_of(profiles, growths, 0.5)
    assert got.kind == "polynomial", got.describe()
    growth = sorted(growths)[1]
    assert abs(got.exponent.mid * math.log(steps) - math.log(growth)) <= math.log(2)


def _triangular_gains(rho: float, steps: int) -> list[float]:
    """The exact per-step backward gains, input side first, of h' = W h through the non-normal
    W = [[rho, rho], [0, rho / 2]] under a last-step gradient G = e1: G W^k = (rho^k, 2 rho^k (1 - 2^-k)),
    whose norm tends to C rho^k with C = sqrt(1 + 2^2) = sqrt(5) (closed form; float64 products)."""
    z, norms = (1.0, 0.0), [1.0]
    for _ in range(steps):
        z = (z[0] * rho, z[0] * rho + z[1] * rho / 2)
        norms.append(math.hypot(*z))
    return [norms[k + 1] / norms[k] for k in range(steps)][::-1]


@pytest.mark.parametrize(
    ("rho", "steps", "kind"),
    [
        (0.6, 255, "exponential"),
        (2.0, 100, "exponential"),
        (1.3, 60, "exponential"),
        (1.05, 100, "irregular"),
    ],
)
def test_a_non_normal_recurrence_grows_at_its_spectral_radius_past_its_constant(
    rho: float, steps: int, kind: str
) -> None:
    """Theory: through a non-normal W the gradient grows as C rho^T, rho the spectral radius, its constant
    C (sqrt(5) here, past x2) set by the steps next to the output, every other gain rho. Past 1e+-6 the
    rate law needs to give the growth within 5% of its log only, and reads exponential at rate rho (it
    read irregular: a theory audit, a tanh RNN at radius 0.60 over 255 steps); a growth of 300 that
    rho^T misses by more than x2 still reads irregular (Growth's promise)."""
    gains = _triangular_gains(rho, steps)
    growth = math.prod(gains)
    assert math.log(growth) - steps * math.log(rho) == pytest.approx(0.5 * math.log(5), rel=1e-9)  # oracle
    got = kind_of([gains] * 3, [growth] * 3, 0.5)
    assert got.kind == kind, got.describe()
    assert math.exp(got.rate.mid) == pytest.approx(rho, rel=2e-3)


# Pinned where mutation testing found no other test failing: a law's slack is x2 (LAW_SLACK = ln 2),
# 5% of the log growth only for a fit of r2 >= 0.999 (LAW_FIT). Oracle: numpy's own least-squares
# line through the cumulative log growth C(j) against the blocks to the output; the exponential law
# is rate ** blocks, which must give the growth (C at the input) within x2 where the line fits less.


def _stack(lo: float, hi: float, blocks: int) -> list[float]:
    """Gains rising geometrically from lo (input side) to hi (output side)."""
    return [lo * (hi / lo) ** (j / (blocks - 1)) for j in range(blocks)]


def _rate_miss(gains: list[float]) -> tuple[float, float]:
    """|ln(rate ** blocks) - ln growth| of numpy's least-squares rate, and that line's r2."""
    logs = np.log(gains)
    blocks = len(gains)
    cumulative = np.array([logs[j:].sum() for j in range(blocks)])
    x = np.array([blocks - j for j in range(blocks)], dtype=float)
    slope, intercept = np.polyfit(x, cumulative, 1)
    resid = cumulative - (intercept + slope * x)
    r2 = 1 - (resid**2).sum() / ((cumulative - cumulative.mean()) ** 2).sum()
    return abs(slope * blocks - cumulative[0]), float(r2)


def test_a_rate_missing_the_growth_by_2x_to_4x_is_no_exponential_law() -> None:
    gains = _stack(1.5, 8.0, 16)
    miss, r2 = _rate_miss(gains)
    assert not input_apart(gains)
    assert 0.9 < r2 < 0.999  # the line fits C well, not almost exactly ...
    assert math.log(2) < miss < math.log(4)  # ... and its rate ** blocks is off the growth by 2.4x
    assert miss < 0.05 * abs(math.log(math.prod(gains)))  # within 5% of the log: x2 holds it (LAW_FIT)
    assert fit_growth(gains)[1] == -math.inf
    assert kind_of([gains], [math.prod(gains)], 0.5).kind != "exponential"


def test_a_rate_within_2x_of_the_growth_keeps_its_fit() -> None:
    gains = _stack(1.04, 2.0, 24)
    miss, r2 = _rate_miss(gains)
    assert miss < math.log(2)
    assert fit_growth(gains)[1] == pytest.approx(r2, rel=1e-9)


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


@pytest.mark.parametrize(
    ("rate", "shown"),
    [
        (1.00812, "x1.008/block"),
        (0.99512, "x0.9951/block"),
        (1.51234, "x1.51/block"),
        (0.95123, "x0.951/block"),
    ],
)
def test_an_exponential_rate_gets_four_digits_only_near_one_on_either_side(rate: float, shown: str) -> None:
    """describe(): 4 significant digits where the rate is within 1% of 1 (x1.008/block over 128
    blocks is 2.7, not x1), 3 elsewhere, above 1 or below it alike. Oracle: that documented rule,
    with Python's own %g formatting of the rate."""
    from stabilitycheck.growthkind import Growth
    from stabilitycheck.spread import Spread

    log_rate = math.log(rate)
    g = Growth("exponential", Spread(log_rate, log_rate, log_rate), Spread(0.0, 0.0, 0.0))
    digits = 4 if abs(rate - 1) < 0.01 else 3
    assert g.describe() == f"exponential, x{rate:.{digits}g}/block" == f"exponential, {shown}"


def test_the_typical_stack_has_nan_only_where_every_seed_has_a_junction() -> None:
    """growthkind._typical_stack: each block's geometric mean over seeds; NaN where EVERY seed has
    NaN there (a junction between chains, the same in every draw); None where a gain is otherwise
    not a positive number (one seed's NaN: 0/0 in that draw alone). Oracle: that docstring, with
    the geometric means by hand (sqrt(2 x 8) = 4)."""
    from stabilitycheck.growthkind import _typical_stack

    got = _typical_stack([[2.0, math.nan, 2.0], [8.0, math.nan, 2.0]])
    assert got is not None and got[0] == pytest.approx(4.0, rel=1e-12) and math.isnan(got[1])
    assert got[2] == pytest.approx(2.0, rel=1e-12)
    assert _typical_stack([[2.0, 2.0, 2.0], [2.0, math.nan, 2.0]]) is None


NAN, INF = math.nan, math.inf


LN2 = math.log(2)


def _fit(rate: float, r2_lin: float, exponent: float, r2_log: float) -> tuple[float, float, float, float]:
    return (rate, r2_lin, exponent, r2_log)


def test_a_fit_below_the_r2_threshold_is_irregular_and_above_it_a_law() -> None:
    """FIT_R2 = 0.9 by hand: a rate whose fit explains 0.85 of the cumulative log growth is no law
    (irregular), one that explains 0.95 is exponential."""
    assert FIT_R2 == 0.9
    assert classify([_fit(0.5, 0.85, 0.1, 0.2)], [40.0], 0.5).kind == "irregular"
    assert classify([_fit(0.5, 0.95, 0.1, 0.2)], [40.0], 0.5).kind == "exponential"


def test_a_depth_law_far_below_the_growth_is_no_law() -> None:
    """Gains whose cumulative log growth is exactly A + p ln(n / (j + 1)) with A = 3 (a last gain of
    e^3 on top of a depth law): the log fit is exact (r2 1), but depth^p gives e^3 x less than the
    growth, beyond x2: no depth law (the check took the fit's excess only, not its shortfall)."""
    n, p, offset = 10, 1.0, 3.0
    cumulative = [offset + p * math.log(n / (j + 1)) for j in range(n - 1)] + [0.0]
    gains = [math.exp(cumulative[j] - cumulative[j + 1]) for j in range(n - 1)]
    _, _, exponent, r2_log = fit_growth(gains, apart=False)
    assert exponent * math.log(n) < cumulative[0] - LN2 and r2_log == -INF


def test_swing_reads_excursions_below_and_from_the_output() -> None:
    """swing by hand, the largest |ln| growth from a block to the output: [10, 0.1] dips to 0.1 at the
    output end and back to 1 (ln 10, a fall); [0.25, 4, 4] reads 16 from the middle block, 4 overall
    (ln 16: from the input side it would read ln 4); a junction (NaN) counts as gain 1."""
    assert math.isclose(swing([10.0, 0.1]), math.log(10))
    assert math.isclose(swing([0.25, 4.0, 4.0]), math.log(16))
    assert math.isclose(swing([2.0, NAN, 0.5]), LN2)


def test_a_flat_typical_stack_is_flat_though_each_seed_swings() -> None:
    """Two seeds whose excursions cancel in the typical stack (each block's geometric mean gain over
    seeds, the stack the kind is read on): flat, though each seed alone swings x4."""
    profiles = [[4.0, 0.25, 1.0, 1.0], [0.25, 4.0, 1.0, 1.0]]
    assert kind_of(profiles, [1.0, 1.0], 0.5).kind == "flat"


def test_a_vanishing_stack_is_exponential_not_flat() -> None:
    """Gains 0.5 x 10 (growth 1e-3): flat needs the growth within x2 both ways; this falls x1000."""
    kind = kind_of([[0.5] * 10], [0.5**10], 0.5)
    assert kind.kind == "exponential" and math.isclose(math.exp(kind.rate.mid), 0.5)


def test_flat_reads_the_growth_at_the_quantile_and_an_unknown_swing_as_none() -> None:
    """classify by hand: growths 1.0, 1.2 and 50 at the median read 1.2, within x2: flat (the largest,
    50, is not the verdict's); a NaN swing (a gain that is no positive number) leaves flat to the
    ends alone."""
    fits = [_fit(0.0, 1.0, 0.0, 1.0)] * 3
    assert classify(fits, [1.0, 1.2, 50.0], 0.5).kind == "flat"
    assert classify(fits[:1], [1.5], 0.5, wide=NAN).kind == "flat"


def test_flat_is_within_x2_strictly() -> None:
    """'Within x2' by hand: a growth of exactly 2, or a swing of exactly ln 2, is not flat; a NaN swing
    leaves flat to the ends, and a growth of 0.01 is beyond x2 the other way."""
    fits = [_fit(0.0, 1.0, 0.0, 1.0)]
    assert classify(fits, [2.0], 0.5).kind != "flat"
    assert classify(fits, [1.5], 0.5, wide=math.log(2)).kind != "flat"
    assert classify(fits, [0.01], 0.5, wide=NAN).kind != "flat"


def test_every_seed_leaves_the_input_segment_apart_as_the_typical_stack_does() -> None:
    """The typical stack (geometric means [8, 1.22, 2.45, 1.22, 2.45]) has an input segment standing
    apart; seed B's own ([8, 1, 4, 1, 4], its other gains spread wide) would not. Every seed is fitted
    alike, without it: the rate spread is that of both seeds' fits with the segment left out."""
    a, b = [8.0, 1.5, 1.5, 1.5, 1.5], [8.0, 1.0, 4.0, 1.0, 4.0]
    kind = kind_of([a, b], [math.prod(a), math.prod(b)], 0.5)
    expected = Spread.of([fit_growth(a, apart=True)[0], fit_growth(b, apart=True)[0]], 0.5)
    assert kind.rate == expected
    assert fit_growth(b, apart=True)[0] != fit_growth(b)[0]  # the seed alone would read otherwise


@pytest.mark.parametrize(
    ("law", "growth", "r2", "explained"),
    [
        (20.0 - 0.69, 20.0, 0.5, True),  # within x2, whatever the fit
        (20.0 - 0.8, 20.0, 0.9995, True),  # past x2, within 5% of the log, on a near-perfect fit
        (20.0 - 0.8, 20.0, 0.998, False),  # the same miss on a fit below r2 0.999
        (20.0 - 1.5, 20.0, 0.9995, False),  # 7.5% of the log: a law off by x4.5 explains nothing
        (-131.0 + 1.31, -131.0, 0.99999, True),  # the docstring's RNN: C = 0.27 on a growth of 1e-57
    ],
)
def test_a_law_explains_a_growth_within_x2_or_within_5_percent_of_its_log_on_a_clean_fit(
    law: float, growth: float, r2: float, explained: bool
) -> None:
    """explains() as documented, at the edges of both rules (a share of 0.5 in place of 0.05 passed
    a law 7.5% off the log growth as 'exponential': a mutant no test killed)."""
    assert explains(law, growth, r2) is explained


TRUNCATED = """
import torch
from torch import nn

class Cell(nn.Module):
    def __init__(self, gain):
        super().__init__()
        self.w, self.u = nn.Linear(16, 16, bias=False), nn.Linear(16, 16, bias=False)
        q, _ = torch.linalg.qr(torch.randn(16, 16))
        with torch.no_grad():
            self.w.weight.copy_(gain * q)

    def forward(self, x, h):
        return self.w(h) + self.u(x)

class Net(nn.Module):
    def __init__(self, gain, window):
        super().__init__()
        self.cell, self.head, self.window = Cell(gain), nn.Linear(16, 3), window

    def forward(self, x):
        h = x.new_zeros(x.shape[0], 16)
        for t in range(x.shape[1]):
            if t and t % self.window == 0:
                h = h.detach()
            h = self.cell(x[:, t], h)
        return self.head(h)

def build(gain=2.0, window=10):
    return Net(gain, window)

def batch(model, seq_len=40, batch_size=4):
    return torch.randn(batch_size, seq_len, 16)
"""


@pytest.mark.parametrize("window", [10, 40])
def test_truncated_backpropagation_grows_at_its_cells_exact_rate(tmp_path: Path, window: int) -> None:
    """A linear cell W = 2 Q (Q orthogonal: every step multiplies the gradient's norm by exactly 2), its
    state detached every 10 of 40 tokens: the loss on the last token reaches the last window alone,
    growth 2^9, and the windows before it measured no gain (0 / 0), which entered the fit as gains of
    1 and read 'irregular' (found by an audit). Oracle: the exact rate 2 per step, as without windows."""
    path = tmp_path / "truncated.py"
    path.write_text(TRUNCATED)
    j = assess(Config.of(f"{path}:build", window=window, dtype="float64"), limits=Limits(grad_norm=None))
    assert j.growth.mid == pytest.approx(2.0 ** (min(window, 40) - 1), rel=1e-5)  # Q: a float32 QR
    assert j.kind.kind == "exponential" and j.kind.rate.mid == pytest.approx(math.log(2.0), rel=1e-6)
