"""The spike rule's defaults (spikes): window 128, sigmas 6, warm-up 32 and floor 1 (OLMo-core's
published window and sigmas), trend 32. Oracle: the docstring's defaults. Also noisier and unmeasured
columns, masked rows, a warmup as long as the window, a negative loss."""

from __future__ import annotations

import math

import pytest
import torch

from stabilitycheck.spikes import SpikeRule, noisier, unmeasured


def test_the_defaults_are_the_documented_ones() -> None:
    rule = SpikeRule()
    assert (rule.window, rule.sigmas, rule.warmup, rule.floor, rule.trend) == (128, 6.0, 32, 1.0, 32)


def test_a_trend_under_one_is_refused_and_one_longer_than_the_window_goes_through_the_window() -> None:
    """trend=0 and 2.5 are refused; SpikeRule(window=16) keeps the default trend of 32 and reads
    exactly as trend=16 (a window holds at most 16 values)."""
    for trend in (0, 2.5):
        with pytest.raises(ValueError, match="trend"):
            SpikeRule(trend=trend)  # type: ignore[arg-type]
    series = torch.tensor([1.0 + 0.1 * k + 0.05 * (-1) ** k for k in range(40)] + [30.0]).unsqueeze(1)
    short, wide = SpikeRule(window=16, warmup=8), SpikeRule(window=16, warmup=8, trend=16)
    got, want = short.update_many(short.state(1), series), wide.update_many(wide.state(1), series)
    assert torch.equal(got.threshold, want.threshold) and bool(got.flags[-1, 0])


def test_a_loss_above_one_gone_negative_is_judged_on_its_values_in_any_chunking() -> None:
    """A loss judged on its logarithm (it started positive) whose window sits above ln 1: its first
    negative value reads ln 1 = 0 there, below the threshold, so no flag stops the vectorised pass;
    the pass must still stop at it and turn the window back into values (the rule's own statement:
    from its first negative value on, the values). Oracle: the plain-Python reference of the
    documented rule (tests/test_watch_rule.reference_steps), step by step and in any chunking."""
    import random

    from test_watch_rule import reference_steps, run_many, run_steps

    from stabilitycheck.spikes import SpikeRule

    rule = SpikeRule(window=32, warmup=8)
    rng = random.Random(0)
    column = [5.0 * math.exp(0.05 * rng.gauss(0, 1)) for _ in range(60)]
    column += [-0.5 + 0.01 * rng.gauss(0, 1) for _ in range(80)]
    column[130] = 3.0  # a spike on the values, once the window holds the negative values alone
    want = reference_steps(rule, column, logged=True)
    assert [i for i, (f, _, _) in enumerate(want) if f] == [130]
    for chunk in (None, 1, 7, 140):
        got = run_steps(rule, [column], None) if chunk is None else run_many(rule, [column], chunk, None)
        assert [f for f, _, _ in got[0]] == [f for f, _, _ in want]
        assert [t for _, _, t in got[0]] == pytest.approx([t for _, _, t in want], rel=1e-9, abs=1e-12)


def test_a_warmup_as_long_as_the_window_is_allowed_and_judges_from_a_full_window() -> None:
    """SpikeRule's documented bounds are 1 <= warmup <= window: warmup == window is a rule (judge
    only full windows), not a usage error. Oracle: the documented bound and the rule by hand."""
    from stabilitycheck.spikes import SpikeRule

    rule = SpikeRule(window=8, warmup=8)
    state = rule.state(1)
    series = [1.0] * 7 + [5.0, 12.0]
    flags = [bool(rule.update(state, torch.tensor([x], dtype=torch.float64)).flags[0]) for x in series]
    # 5.0 comes with 7 values in the window (not warm): no flag, and it enters as it is; then the
    # window [1 x 7, 5] has mean 1.5, std sqrt(14 / 8), threshold 1.5 + 6 x 1.32 = 9.44 < 12
    assert flags == [False] * 8 + [True]


NAN, INF = math.nan, math.inf


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal entries, NaN equal to NaN."""
    return bool(torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)))


def test_noisier_zeroes_the_finite_values_of_its_columns_and_keeps_the_non_finite_ones() -> None:
    """noisier's docstring: the finite values of `cols` set to 0, a non-finite one still flagged (kept
    as it is); other columns untouched; the input not modified. Oracle: the rule by hand."""
    series = torch.tensor([[1.0, 2.0, NAN, INF, -INF, 5.0, 6.0]], dtype=torch.float64)
    kept = series.clone()
    got = noisier(series, [slice(0, 1), slice(2, 6)])
    want = torch.tensor([[0.0, 2.0, NAN, INF, -INF, 0.0, 6.0]], dtype=torch.float64)
    assert _same(got, want)
    assert _same(series, kept)


def test_unmeasured_zeroes_every_value_of_its_columns_non_finite_ones_too() -> None:
    """unmeasured's docstring: `cols` set to 0, no measurement (not 'finite values': a value that was
    not measured is no finding either). Oracle: the rule by hand."""
    series = torch.tensor([[1.0, NAN, INF, 4.0]], dtype=torch.float64)
    got = unmeasured(series, slice(1, 3))
    assert _same(got, torch.tensor([[1.0, 0.0, 0.0, 4.0]], dtype=torch.float64))


def test_the_rows_masked_are_the_only_rows_left_unjudged() -> None:
    """With `rows` (steps x series), only the masked steps' `cols` are set to 0, by unmeasured and by
    noisier alike; the other steps keep every value. Oracle: the rule by hand, row by row."""
    series = torch.arange(1.0, 13.0, dtype=torch.float64).reshape(4, 3)
    rows = torch.tensor([True, False, True, False])
    want = series.clone()
    want[0, 1:] = 0.0
    want[2, 1:] = 0.0
    assert torch.equal(unmeasured(series, slice(1, 3), rows), want)
    assert torch.equal(noisier(series, [slice(1, 2), slice(2, 3)], rows), want)
