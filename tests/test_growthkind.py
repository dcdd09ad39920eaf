"""The growth kind's rules (growthkind) on exact gain stacks built so that each threshold sits just inside
or just outside, every expected value worked by hand from the Growth and input_apart docstrings."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stabilitycheck.config import Config
from stabilitycheck.growthkind import fit_growth, input_apart, kind_of
from stabilitycheck.seeds import assess
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
