"""The spike rule against a plain-Python reference (the trend's line by numpy's polyfit), and
against the rule as OLMo-core publishes it (the window's mean + 6 sigma, non-finite values entering
the window, flagged values entering unclamped), which fails each of the three changes."""

from __future__ import annotations

import itertools
import math
import random
from collections import deque

import numpy as np
import pytest
import torch

from stabilitycheck.spikes import SpikeRule

Step = tuple[bool, float, float]  # flagged, what the trend expected, the threshold
KEYS = ("flags", "expected", "threshold")  # spikes.Judged's fields


def trend_of(rule: SpikeRule, window: list[float]) -> tuple[float, float]:
    """What the trend expects next and the noise, written out: numpy's least-squares line through the
    last min(n, trend) values at positions 0, 1, ... read at the next position (one value: itself),
    or the smaller of the last two values where that is higher; the noise sqrt(sum d^2 / (2 (n - 1)))
    over the successive differences of the window's n values, or the standard deviation of the
    line's values about it (n - 2 degrees of freedom) where that is larger."""
    if not window:
        return 0.0, 0.0
    noise = math.sqrt(
        sum((b - a) ** 2 for a, b in itertools.pairwise(window)) / (2 * max(len(window) - 1, 1))
    )
    last = window[-rule.trend :]
    if len(last) == 1:
        return last[0], noise
    positions = np.arange(len(last))
    line = np.polyfit(positions, np.array(last), 1)
    off = np.array(last) - np.polyval(line, positions)
    if len(last) > 2:  # the spread about the line, where it is not the whole of the noise
        noise = max(noise, math.sqrt(float((off * off).sum()) / (len(last) - 2)))
    return max(float(np.polyval(line, len(last))), min(window[-2:])), noise


def reference_steps(
    rule: SpikeRule, series: list[float], published: bool = False, logged: bool = False
) -> list[Step]:
    """The rule written out with a deque: per value, (flagged, expected, threshold). `published` is
    OLMo's: the window's mean + sigmas x std, every value enters as it is, and a step is taken only
    when x <= that (so a NaN anywhere in the window flags). `logged`: a norm's rule, the same on ln x
    with the floor ln(1 + floor), what it expected and its threshold given back as exp."""
    window: deque[float] = deque(maxlen=rule.window)
    steps = []
    for x in series:
        warm = len(window) >= rule.warmup
        if published:
            n = len(window)
            mean = sum(window) / n if n else 0.0
            std = math.sqrt(sum((v - mean) ** 2 for v in window) / n) if n else 0.0
            threshold = mean + rule.sigmas * std
            steps.append((warm and not x <= threshold, mean, threshold))
            window.append(x)
            continue
        if logged and math.isfinite(x) and x < 0:  # a loss gone negative: on its values from now on
            logged = False
            window = deque((math.exp(v) for v in window), maxlen=rule.window)
        expected, noise = trend_of(rule, list(window))
        if logged:
            y = math.log(x) if math.isfinite(x) and x > 0 else x
            threshold = expected + max(rule.sigmas * noise, math.log1p(rule.floor))
            flagged = not math.isfinite(x) or (warm and x != 0 and y > threshold)
            steps.append((flagged, math.exp(expected), math.exp(threshold)))
            if math.isfinite(x) and x != 0:
                window.append(min(y, threshold) if warm else y)
            continue
        threshold = expected + max(rule.sigmas * noise, rule.floor * abs(expected))
        steps.append((not math.isfinite(x) or (warm and x > threshold and x != 0), expected, threshold))
        if math.isfinite(x) and x != 0:  # a zero is no measurement
            window.append(min(x, threshold) if warm else x)
    return steps


def reference(
    rule: SpikeRule, series: list[float], published: bool = False, logged: bool = False
) -> list[bool]:
    return [flag for flag, _, _ in reference_steps(rule, series, published, logged)]


def run(rule: SpikeRule, columns: list[list[float]], logged: bool | None = False) -> list[list[bool]]:
    """The torch rule over several series at once: flags per series."""
    return [[flag for flag, _, _ in col] for col in run_steps(rule, columns, logged)]


def run_steps(rule: SpikeRule, columns: list[list[float]], logged: bool | None = False) -> list[list[Step]]:
    """The torch rule over several series at once, step by step: (flag, expected, threshold) per series
    (`logged`: every series a norm's)."""
    state = rule.state(len(columns), logged=[logged] * len(columns))
    out: list[list[Step]] = [[] for _ in columns]
    for step in range(len(columns[0])):
        judged = rule.update(state, torch.tensor([c[step] for c in columns], dtype=torch.float64))
        got = zip(judged.flags.tolist(), judged.expected.tolist(), judged.threshold.tolist(), strict=True)
        for s, entry in enumerate(got):
            out[s].append(entry)
    return out


def run_many(
    rule: SpikeRule, columns: list[list[float]], chunk: int, logged: bool | None = False
) -> list[list[Step]]:
    """update_many over chunks of `chunk` steps (as the watcher's flushes do): (flag, expected,
    threshold) per series."""
    state = rule.state(len(columns), logged=[logged] * len(columns))
    xs = torch.tensor(columns, dtype=torch.float64).T
    parts = [rule.update_many(state, xs[i : i + chunk]) for i in range(0, len(xs), chunk)]
    flags, expects, limits = (torch.cat([getattr(p, k) for p in parts]).T.tolist() for k in KEYS)
    return [
        list(zip(map(bool, f), e, t, strict=True)) for f, e, t in zip(flags, expects, limits, strict=True)
    ]


def flags_of(steps: list[Step]) -> list[bool]:
    return [flag for flag, _, _ in steps]


def noisy(n: int, rng: random.Random, level: float = 1.0, noise: float = 0.05) -> list[float]:
    return [level * (1 + noise * rng.gauss(0, 1)) for _ in range(n)]


def spiky(
    rng: random.Random, series: int, n: int, spikes: int, factors: list[float], bad: list[float]
) -> list[list[float]]:
    """`series` noisy series of `n` values at random levels, each with `spikes` values multiplied by
    one of `factors` and one value replaced by one of `bad`."""
    columns = []
    for _ in range(series):
        column = noisy(n, rng, level=rng.uniform(0.1, 10), noise=rng.uniform(0.01, 0.3))
        for _ in range(spikes):
            column[rng.randrange(n)] *= rng.choice(factors)
        column[rng.randrange(n)] = rng.choice(bad)
        columns.append(column)
    return columns


@pytest.mark.parametrize("seed", range(4))
def test_matches_the_reference_on_series_with_spikes_and_non_finite_values(seed: int) -> None:
    rule = SpikeRule(window=16, warmup=4, sigmas=3.0, floor=0.2)
    columns = spiky(random.Random(seed), 6, 120, 8, [3.0, 10.0, 0.1], [math.nan, math.inf, -math.inf])
    got = run(rule, columns)
    assert got == [reference(rule, s) for s in columns]
    for chunk in (1, 7, 50, 120):
        assert [flags_of(col) for col in run_many(rule, columns, chunk)] == got
    assert any(any(f) for f in got)  # the series do contain flags: the comparison is not vacuous


@pytest.mark.parametrize("logged", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_the_expected_value_and_threshold_of_each_judged_value_match_the_reference(
    seed: int, logged: bool
) -> None:
    rule = SpikeRule(window=16, warmup=4, sigmas=3.0, floor=0.2)
    columns = spiky(random.Random(seed), 4, 90, 6, [3.0, 10.0], [math.nan])
    if logged:  # norms: never negative (a 30% noise draws a few)
        columns = [[abs(x) for x in col] for col in columns]
    wanted = [reference_steps(rule, col, logged=logged) for col in columns]
    for chunk in (None, 1, 13, 90):
        got = run_steps(rule, columns, logged) if chunk is None else run_many(rule, columns, chunk, logged)
        for col, want in zip(got, wanted, strict=True):
            for (flag, expected, threshold), (flag0, expected0, threshold0) in zip(col, want, strict=True):
                assert flag == flag0
                assert expected == pytest.approx(expected0, rel=1e-9, abs=1e-12)
                assert threshold == pytest.approx(threshold0, rel=1e-9, abs=1e-12)
        pairs = [(x, s) for xs, col in zip(columns, got, strict=True) for x, s in zip(xs, col, strict=True)]
        spikes = [(x, t) for x, (f, _, t) in pairs if f and math.isfinite(x)]
        assert spikes and all(x > t for x, t in spikes)  # a finite flagged value is above its threshold


def test_one_nan_flags_one_step_and_a_x3_spike_50_steps_later_is_caught() -> None:
    rule = SpikeRule()
    series = noisy(400, random.Random(1))
    series[200] = math.nan
    series[250] *= 3
    ours = [i for i, f in enumerate(reference(rule, series)) if f]
    assert ours == [200, 250]
    assert [i for i, f in enumerate(run(rule, [series])[0]) if f] == ours
    assert [i for i, f in enumerate(flags_of(run_many(rule, [series], 50)[0])) if f] == ours
    published = [i for i, f in enumerate(reference(rule, series, published=True)) if f]
    assert len(published) >= rule.window  # the NaN stays in OLMo's window for 128 steps


def test_a_x4_spike_20_steps_after_a_x10_spike_is_caught() -> None:
    rule = SpikeRule()
    series = noisy(400, random.Random(2))
    series[200] *= 10
    series[220] *= 4
    assert [i for i, f in enumerate(run(rule, [series])[0]) if f] == [200, 220]
    assert [i for i, f in enumerate(flags_of(run_many(rule, [series], 64)[0])) if f] == [200, 220]
    published = [i for i, f in enumerate(reference(rule, series, published=True)) if f]
    assert 200 in published and 220 not in published  # the unclamped x10 inflates the std


def test_nothing_is_flagged_during_warm_up_except_non_finite_values() -> None:
    rule = SpikeRule(warmup=8, window=16)
    series = [1.0, 1.0, 100.0, 1.0, math.inf, 1.0, 1.0, 1.0, 1.0, 1.0, 1000.0]
    flags = run(rule, [series])[0]
    assert [i for i, f in enumerate(flags) if f] == [4, 10]  # the 100 entered (unclamped) in warm-up


def test_a_series_of_zeros_then_values_is_not_flagged_and_zeros_never_enter_the_window() -> None:
    """A frozen block's gradients are exactly 0 until it is unfrozen: the window held zeros (mean and
    std 0, threshold 0), so the first real value was flagged, entered clamped to 0, and every later
    step was flagged (found by a trial: 100 of 200 steps; with skip=True training stopped). A zero is
    no measurement now. Oracle: the reference rule, and the same series with its zeros removed."""
    rule = SpikeRule()
    rng = random.Random(3)
    series = [0.0] * 100 + noisy(300, rng)
    series[300] *= 3
    flagged = [i for i, f in enumerate(run(rule, [series])[0]) if f]
    assert flagged == [300]
    assert [i for i, f in enumerate(flags_of(run_many(rule, [series], 64)[0])) if f] == flagged
    # zeros anywhere (a part that did not run on some steps) change nothing else: the same flags,
    # means and thresholds as the series without them, zeros themselves never flagged
    holey = [0.0 if rng.random() < 0.3 else x for x in series[100:]]
    kept = [x for x in holey if x != 0]
    for got in (run_steps(rule, [holey])[0], run_many(rule, [holey], 37)[0]):
        nonzero = [step for x, step in zip(holey, got, strict=True) if x != 0]
        assert not any(flag for x, (flag, _, _) in zip(holey, got, strict=True) if x == 0)
        for (flag, expected, threshold), (flag0, expected0, threshold0) in zip(
            nonzero, reference_steps(rule, kept), strict=True
        ):
            assert flag == flag0
            assert expected == pytest.approx(expected0, rel=1e-9)
            assert threshold == pytest.approx(threshold0, rel=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_a_norms_rule_matches_the_reference_on_zeros_and_non_finite_values_in_any_chunking(seed: int) -> None:
    """The logged rule (a norm's): zeros, NaN and +Inf (a norm is never negative) in any chunking."""
    rule = SpikeRule(window=16, warmup=4, sigmas=3.0, floor=0.2)
    rng = random.Random(seed)
    columns = [[abs(x) for x in col] for col in spiky(rng, 5, 120, 6, [3.0, 10.0, 0.1], [math.nan, math.inf])]
    for column in columns:
        for _ in range(10):
            column[rng.randrange(120)] = 0.0
    expected = [reference_steps(rule, col, logged=True) for col in columns]
    for chunk in (None, 1, 9, 120):
        got = run_steps(rule, columns, True) if chunk is None else run_many(rule, columns, chunk, True)
        for col, want in zip(got, expected, strict=True):
            assert [f for f, _, _ in col] == [f for f, _, _ in want]
            assert [t for _, _, t in col] == pytest.approx([t for _, _, t in want], rel=1e-9)
    assert any(f for col in expected for f, _, _ in col)


def test_a_norm_whose_noise_is_a_factor_raises_no_flag_on_its_logarithm() -> None:
    """Oracle, the log-normal law: 2,000 norms x exp(0.35 z), z standard normal (a weight gradient's
    noise, a factor: block 0's of a clean pre-norm transformer reached 2.7-3.8x its window mean).
    6 sigma of ln x is a chance of 1e-9 a step: no flag on its logarithm, where the rule on the
    values, whose right tail is far longer than a normal's, flags some. A x3 spike of a norm whose
    noise is 5% (a block's output: 22 sigma of ln x) is caught on both."""
    rule = SpikeRule()
    rng = random.Random(0)
    heavy = [math.exp(0.35 * rng.gauss(0, 1)) for _ in range(2000)]
    assert not any(run(rule, [heavy], logged=True)[0])
    assert any(reference(rule, heavy))
    steady = noisy(400, rng)
    steady[300] *= 3
    for logged in (False, True):
        assert [i for i, f in enumerate(run(rule, [steady], logged)[0]) if f] == [300]


@pytest.mark.parametrize("seed", range(3))
def test_a_loss_is_judged_on_its_logarithm_where_its_first_value_is_positive(seed: int) -> None:
    """A series whose mode waits on its first accepted value (the loss's): after leading zeros and a
    NaN, a positive first value makes it a norm's rule, a negative one the rule on the values. Oracle:
    the reference with the mode given, in any chunking; a batch-32 loss's factor noise (log-normal,
    0.35) raises no flag on its logarithm where the values' rule flags some."""
    rule = SpikeRule(window=16, warmup=4, sigmas=3.0, floor=0.2)
    rng = random.Random(seed)
    lead = [0.0, math.nan, 0.0]
    positive = lead + [abs(x) for x in spiky(rng, 1, 100, 5, [3.0, 10.0], [math.inf])[0]]
    negative = lead + [-abs(x) for x in spiky(rng, 1, 100, 5, [3.0, 10.0], [math.nan])[0]]
    for column, mode in ((positive, True), (negative, False)):
        want = reference_steps(rule, column, logged=mode)
        for chunk in (None, 1, 2, 7, 103):
            got = run_steps(rule, [column], None) if chunk is None else run_many(rule, [column], chunk, None)
            assert [f for f, _, _ in got[0]] == [f for f, _, _ in want]
            judged = len(lead)  # before its first value the window is empty: no threshold to compare
            assert [t for _, _, t in got[0][judged:]] == pytest.approx(
                [t for _, _, t in want[judged:]], rel=1e-9, abs=1e-12
            )
    noise = random.Random(0)  # the draw test_a_norm_whose_noise_is_a_factor... flags on its values
    heavy = [math.exp(0.35 * noise.gauss(0, 1)) for _ in range(2000)]
    assert not any(run(SpikeRule(), [heavy], None)[0]) and any(reference(SpikeRule(), heavy))


@pytest.mark.parametrize("seed", range(3))
def test_a_loss_gone_negative_is_judged_on_its_values_from_then_on(seed: int) -> None:
    """A loss that starts positive and crosses zero (a likelihood, a scheduled bonus): its values
    below zero were read as ln 1, a loss of 1, and a fall from 0.025 to -0.008 was flagged (found in
    review). From its first negative value on it is judged on its values, its window turned back from
    ln values. Oracle: the plain-Python reference, in any chunking; the fall itself is no flag."""
    rule = SpikeRule(window=32, warmup=8)
    rng = random.Random(seed)
    column = [0.025 * math.exp(0.05 * rng.gauss(0, 1)) for _ in range(100)]
    column += [-0.008 + 0.001 * rng.gauss(0, 1) for _ in range(60)]
    column[130] = 0.5  # a real spike after the crossing: caught on the values
    want = reference_steps(rule, column, logged=True)
    assert [i for i, (f, _, _) in enumerate(want) if f] == [130]
    for chunk in (None, 1, 3, 64, 160):
        got = run_steps(rule, [column], None) if chunk is None else run_many(rule, [column], chunk, None)
        assert [f for f, _, _ in got[0]] == [f for f, _, _ in want]
        assert [t for _, _, t in got[0]] == pytest.approx([t for _, _, t in want], rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_zeros_runs_and_non_finite_values_match_the_reference_in_any_chunking(seed: int) -> None:
    """Also on a negative series (a loss can be one) under a floor below 1, whose threshold can be
    below 0: a zero is not flagged there either (a reviewer's case)."""
    rule = SpikeRule(window=16, warmup=4, sigmas=3.0, floor=0.2)
    rng = random.Random(seed)
    columns = spiky(rng, 5, 120, 6, [3.0, 10.0], [math.nan, math.inf])
    columns.append([-x for x in noisy(120, rng)])
    for column in columns:
        start = rng.randrange(100)
        end = min(start + rng.randrange(40), len(column))
        column[start:end] = [0.0] * (end - start)
        for _ in range(10):
            column[rng.randrange(120)] = 0.0
    expected = [reference_steps(rule, col) for col in columns]
    for chunk in (None, 1, 9, 120):
        got = run_steps(rule, columns) if chunk is None else run_many(rule, columns, chunk)
        for col, want in zip(got, expected, strict=True):
            assert [f for f, _, _ in col] == [f for f, _, _ in want]
            assert [t for _, _, t in col] == pytest.approx([t for _, _, t in want], rel=1e-9, abs=1e-12)


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="warmup"):
        SpikeRule(window=8, warmup=9)
    with pytest.raises(ValueError, match="sigmas"):
        SpikeRule(sigmas=0)
    # wrong types: refused here, not at the first flush of a training run (window=64.5 passed every
    # check and raised a TypeError from torch.zeros at step 49, losing the log)
    for wrong, name in (
        ({"window": 64.5}, "window"),
        ({"warmup": "8"}, "warmup"),
        ({"sigmas": "6"}, "sigmas"),
    ):
        with pytest.raises(ValueError, match=f"SpikeRule needs .*{name}"):
            SpikeRule(**wrong)  # type: ignore[arg-type]


@pytest.mark.parametrize("level", [1.0, -0.5, 0.25])
def test_a_value_exactly_at_the_threshold_is_not_a_spike(level: float) -> None:
    """Oracle: the rule's definition, by hand. After `warmup` values of exactly `level` the window has
    no noise, its trend is flat at `level` and the threshold is level + floor x |level| (2 level, or 0
    for a negative level, all exact in binary): a value at it is not above it, one a step of float64
    above it is. The same in step-by-step and batched form; the reference's numpy line gives the
    level and threshold within rounding (not to the last bit the flags at them need)."""
    rule = SpikeRule(window=8, warmup=4)
    at = level + abs(level)
    for x, flagged in ((at, False), (math.nextafter(at, math.inf), True)):
        series = [level] * 4 + [x]
        steps = run_steps(rule, [series])[0]
        assert steps[-1] == (flagged, level, at)
        assert run_many(rule, [series], 5)[0][-1] == (flagged, level, at)
        assert reference_steps(rule, series)[-1][1:] == pytest.approx((level, at), rel=1e-12)


def _last(rule: SpikeRule, series: list[float], logged: bool = False) -> Step:
    """The rule's (flag, expected, threshold) for the last value of `series`, step by step."""
    return run_steps(rule, [series], logged)[0][-1]


def test_the_default_rule_is_the_documented_one_window_128_warmup_32_trend_32_six_sigma_floor_1() -> None:
    """Oracle: the README's rule by hand, on windows whose trend and noise are exact in binary. A x50
    after 31 accepted values is warm-up, after 32 it is flagged. 1, 2, ..., 40: the line through the
    last 32 expects 41, the noise is sqrt(39 / 78) (differences of 1), so the threshold is
    41 + max(6 x 0.707, 1 x 41) = 82 (the window's mean and std, 20.5 and 11.5, would give 89.7). A
    flat window of 2.0 has no noise: the floor alone, 2 + 1 x 2 = 4."""
    rule = SpikeRule()
    assert _last(rule, [1.0] * 31 + [50.0])[0] is False
    assert _last(rule, [1.0] * 32 + [50.0])[0] is True
    rising = [float(k) for k in range(1, 41)]
    for x, flagged in ((81.5, False), (82.0, False), (83.0, True)):
        assert _last(rule, [*rising, x]) == (flagged, 41.0, 82.0)
        many = rule.update_many(rule.state(1), torch.tensor([*rising, x], dtype=torch.float64).unsqueeze(1))
        assert bool(many.flags[-1, 0]) is flagged
        assert float(many.threshold[-1, 0]) == pytest.approx(82.0, rel=1e-12)
    assert _last(rule, [2.0] * 40 + [4.0]) == (False, 2.0, 4.0)
    assert _last(rule, [2.0] * 40 + [4.5])[0] is True


def test_the_noise_reaches_128_values_back_and_the_trend_32() -> None:
    """40 values alternating 1 and 3, then 100 of 1, then 3 (on values): the last 128 values hold 28
    of the alternating ones, whose 28 differences of 2 (the last, from 3 to the first 1) make the
    noise sqrt(28 x 4 / 254), so 3 is under 1 + 6 x 0.66; a window of the last 100 alone (no
    noise) would flag it (> 2). Then 96 values of 10 and 1, 2, ..., 32: the line through the last 32
    expects 33, through 33 it leans on one 10 and expects less."""
    rule = SpikeRule()
    series = [1.0, 3.0] * 20 + [1.0] * 100
    noise = math.sqrt(28 * 4 / (2 * 127))
    flagged, expected, threshold = _last(rule, [*series, 3.0])
    assert (flagged, expected) == (False, 1.0)
    assert threshold == pytest.approx(1 + 6 * noise, rel=1e-12) and threshold > 3.0
    assert _last(SpikeRule(window=100), [*series, 3.0])[0] is True
    step = [10.0] * 96 + [float(k) for k in range(1, 33)]
    assert _last(rule, [*step, 1.0])[1] == pytest.approx(33.0, rel=1e-12)
    wider = _last(SpikeRule(trend=33), [*step, 1.0])[1]
    assert wider == pytest.approx(trend_of(SpikeRule(trend=33), step)[0], rel=1e-12) and wider < 32.5


def test_a_norms_default_rule_is_the_documented_one_on_its_logarithm() -> None:
    """Oracle, by hand: a norm is judged on ln x. Norms e^1 .. e^40 hold ln values 1 .. 40: the trend
    expects e^41, the threshold is e^(41 + max(6 sqrt(1/2), ln 2)). A flat window of 2.0: the floor
    alone, twice what the trend expects, 4."""
    rule = SpikeRule()
    rising = [math.exp(k) for k in range(1, 41)]
    limit = 41 + 6 * math.sqrt(0.5)
    for x, flagged in ((math.exp(limit - 0.1), False), (math.exp(limit + 0.1), True)):
        got = _last(rule, [*rising, x], logged=True)
        assert got[0] is flagged
        assert got[1:] == pytest.approx((math.exp(41), math.exp(limit)), rel=1e-12)
    got = _last(rule, [2.0] * 40 + [4.5], logged=True)
    assert got[0] is True and got[1:] == pytest.approx((2.0, 4.0), rel=1e-12)
    assert _last(rule, [2.0] * 40 + [3.9], logged=True)[0] is False


@pytest.mark.parametrize("seed", range(5))
def test_a_x50_spike_while_a_norm_still_falls_early_in_training_is_caught(seed: int) -> None:
    """A norm falling x50 over its first 60 steps, then flat, with 5% noise (an output gradient
    early in training), and a x50 at step 100: the window's mean and std (OLMo's rule, on ln x) still
    hold the fall and put the threshold past it; the trend's rule flags it alone. The reference
    written out above agrees."""
    rng = random.Random(seed)
    series = [50.0 ** max(0.0, 1 - t / 60) * math.exp(0.05 * rng.gauss(0, 1)) for t in range(300)]
    series[100] *= 50
    rule = SpikeRule()
    flagged = [i for i, f in enumerate(run(rule, [series], logged=True)[0]) if f]
    assert flagged == [100]
    assert [i for i, f in enumerate(reference(rule, series, logged=True)) if f] == flagged
    olmo = reference(rule, [math.log(x) for x in series], published=True)
    assert not olmo[100]


@pytest.mark.parametrize("seed", range(5))
def test_a_norm_levelling_off_after_a_fall_is_not_flagged_at_the_turn(seed: int) -> None:
    """A norm falling x100 over 30 steps, then flat with 5% noise (a loss or gradient levelling off):
    the line through the last 32 values still points down at the turn and reads the flat values
    more than twice above it (numpy's line: the oracle), so the expected value is the smaller of the
    last two values where that is higher: no flag, on the step-by-step and the batched rule."""
    rng = random.Random(seed)
    series = [100.0 ** -min(1.0, t / 30) * math.exp(0.05 * rng.gauss(0, 1)) for t in range(200)]
    logs = [math.log(x) for x in series]
    rule = SpikeRule()
    over = [
        t
        for t in range(rule.warmup, len(logs))
        if logs[t] - np.polyval(np.polyfit(np.arange(32), logs[t - 32 : t], 1), 32) > math.log(2)
    ]
    assert over  # the line alone would have flagged the turn
    assert not any(run(rule, [series], logged=True)[0])
    assert not any(flags_of(run_many(rule, [series], 50, logged=True)[0]))


@pytest.mark.parametrize("seed", range(5))
def test_a_norm_that_wanders_slowly_is_not_flagged_for_climbing_back_from_a_dip(seed: int) -> None:
    """ln x an AR(1) process, each step 0.97 of the last plus noise of 0.2 (spread ~0.8 in ln x, as
    the output of a small regression model's head under AdamW): its successive differences read a
    noise ~6x too small and its line through a dip points down, so an ordinary climb back passed
    twice what was expected (a review: 31 clean steps flagged over 10 runs of the README's example
    model). The spread of the values about the line is the noise where it is larger: no flag in
    2,000 steps, while a x50 there is still caught."""
    rng = random.Random(seed)
    logs = [0.0]
    for _ in range(1999):
        logs.append(0.97 * logs[-1] + 0.2 * rng.gauss(0, 1))
    series = [math.exp(v) for v in logs]
    rule = SpikeRule()
    assert not any(run(rule, [series], logged=True)[0])
    assert not any(flags_of(run_many(rule, [series], 50, logged=True)[0]))
    window = np.array(logs[872:1000])
    differences = math.sqrt(float((np.diff(window) ** 2).sum()) / (2 * 127))  # what they alone read
    assert differences < 0.2 < 0.3 < float(window.std())
    series[1000] *= 50
    assert [i for i, f in enumerate(run(rule, [series], logged=True)[0]) if f] == [1000]


def test_one_call_over_more_steps_than_a_pass_flags_as_step_by_step() -> None:
    """update_many over 3,000 steps at once runs passes of at most PASS steps: after the x10 at step
    40 a pass starts at 41 and spans PASS steps with no flag, so the x10 at 41 + PASS is the first
    step of the next pass; it and every other step are judged as by update, thresholds too."""
    from stabilitycheck.spikes import PASS

    series = noisy(3000, random.Random(7))
    for at in (40, 41 + PASS, 2900):
        series[at] *= 10
    rule = SpikeRule()
    one = run_steps(rule, [series])[0]
    many = run_many(rule, [series], 3000)[0]
    assert [i for i, (f, _, _) in enumerate(many) if f] == [40, 41 + PASS, 2900]
    assert [f for f, _, _ in many] == [f for f, _, _ in one]
    assert [t for _, _, t in many] == pytest.approx([t for _, _, t in one], rel=1e-9)
