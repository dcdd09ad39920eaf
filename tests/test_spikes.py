"""The spike rule's defaults (spikes): the default window is OLMo-core's published 128 values (a change to 100
passed every test, whose references read rule.window). Oracle: the docstring's defaults, and the rule's
mean and population std over the last 128 accepted values computed with numpy."""

from __future__ import annotations

import numpy as np
import torch

from stabilitycheck.spikes import SpikeRule


def test_the_defaults_are_olmo_cores_published_values() -> None:
    rule = SpikeRule()
    assert (rule.window, rule.sigmas, rule.warmup, rule.floor) == (128, 6.0, 32, 1.0)


def test_the_default_window_reaches_128_values_back() -> None:
    """40 values of 10, then 100 of 1, then 3 (judged on values): the last 128 hold 28 tens, so 3 is
    far under mean + 6 std; a window of the last 100 alone (all ones, std 0) would flag it (> 2)."""
    rule = SpikeRule()
    series = [10.0] * 40 + [1.0] * 100
    window = np.array(series[-128:])
    mean, std = window.mean(), window.std()  # population std, as the rule's docstring
    threshold = mean + max(6 * std, abs(mean))
    last100 = np.array(series[-100:])
    assert threshold > 3.0 > last100.mean() + max(6 * last100.std(), abs(last100.mean()))  # 128 vs 100
    state = rule.state(1)
    for x in series:
        assert not bool(rule.update(state, torch.tensor([x])).flags[0])
    judged = rule.update(state, torch.tensor([3.0]))
    assert not bool(judged.flags[0])
    assert abs(float(judged.mean[0]) - mean) < 1e-9
    assert abs(float(judged.threshold[0]) - threshold) < 1e-9
    many = rule.update_many(rule.state(1), torch.tensor([*series, 3.0]).unsqueeze(1))
    assert not bool(many.flags.any())
