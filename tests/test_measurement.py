"""A Measurement's own arithmetic and text (measurement): ratios of zero gradients, a strict JSON
round trip, what a NonFinite describes."""

from __future__ import annotations

import math

from measurements import _measurement

from stabilitycheck.measurement import Measurement, NonFinite, ratio


def test_ratio_of_zero_gradients() -> None:
    assert math.isnan(ratio(0.0, 0.0))
    assert ratio(3.0, 0.0) == math.inf
    assert ratio(3.0, 2.0) == 1.5


def test_measurement_round_trips_through_strict_json() -> None:
    import json

    from stabilitycheck.report import strict_json

    nf = NonFinite(1, "b", "activation", math.nan)
    m = _measurement(first_nonfinite=nf, growth=math.nan)
    back = Measurement.from_dict(json.loads(strict_json(m.to_dict())))
    assert back.chain_feeds == ((), (0,))
    assert math.isnan(back.growth) and math.isnan(back.first_nonfinite.value)
    assert back.first_nonfinite.layer == "b"
    assert back == dataclasses_replace_nan(back, m)


def dataclasses_replace_nan(back: Measurement, m: Measurement) -> Measurement:
    """`m` with its NaNs taken from `back` (NaN != NaN): equal iff every other field is."""
    import dataclasses

    return dataclasses.replace(m, growth=back.growth, first_nonfinite=back.first_nonfinite)


def test_nonfinite_describe_reads_a_norm_except_for_the_loss() -> None:
    assert (
        NonFinite(1, "layers.2", "activation", math.nan).describe()
        == "step 1: activation of layers.2, L2 norm nan"
    )
    assert NonFinite(0, "x", "loss", math.inf).describe() == "step 0: loss of x, inf"


def test_a_block_name_starting_with_a_digit_is_quoted_where_it_is_shown() -> None:
    """An nn.Sequential's children are named '0', '1', ...: bare, the culprit '1', 'weight of 0' and
    'block 70' beside '36 layers' read as counts or indexes (a new user's trial). Each name of a group
    is quoted alone; other names and the culprit's sentences are shown as they are."""
    from stabilitycheck.measurement import shown

    assert shown("70") == "'70'" and shown("0[3]") == "'0[3]'" and shown("1, 6") == "'1', '6'"
    assert shown("layers.0") == "layers.0" and shown("layer4.0, layer4.1") == "layer4.0, layer4.1"
    assert shown("uniform, median gain x1.52") == "uniform, median gain x1.52"
    assert NonFinite(0, "0", "weight", math.nan).describe() == "step 0: weight of '0', L2 norm nan"
