"""The verdict's criteria (verdicts), on hand-made Measurements; oracles from the docstrings' rules worked
by hand: a decoder vanishing behind a growing encoder still fires vanishing (each chain's own growth
counts, not only the path's product), and a float16 range problem (`overflow`, the same non-finite
value the float32 re-run did not reproduce) is reported as overflow, never also as nonfinite."""

from __future__ import annotations

import math

from stabilitycheck.measurement import Measurement, NonFinite
from stabilitycheck.verdicts import Limits, values, verdict


def _m(**kw: object) -> Measurement:
    base: dict[str, object] = dict(
        layer_names=("a", "b"),
        activation_names=("a", "b"),
        loss=(1.0,),
        grad_norm=(1.0,),
        layer_grad_norms=(1.0, 1.0),
        activation_norms=(1.0, 1.0),
        activation_grad_norms=(1.0, 1.0),
        gains=(1.0,),
        growth=1.0,
        weight_norms=(),
        first_nonfinite=None,
        steps_run=0,
    )
    base.update(kw)
    return Measurement(**base)  # type: ignore[arg-type]


def test_a_vanishing_decoder_behind_a_growing_encoder_fires_on_its_own_growth() -> None:
    # encoder grows 1.06, the decoder taking it shrinks to 0.0095: the path's product is 0.01007, above
    # 1/100, but the decoder alone is below it
    m = _m(growth=1.06, chain_starts=(1,), chain_growths=(1.06, 0.0095), chain_feeds=((), (0,)))
    assert values(m)["vanishing"] == 0.0095
    assert verdict(m, Limits(vanishing=100.0)).names == ("vanishing",)
    # in series two chains of 0.5 make a path of 0.25, below either: the smallest is the path's
    both = _m(growth=0.25, chain_starts=(1,), chain_growths=(0.5, 0.5), chain_feeds=((), (0,)))
    assert math.isclose(values(both)["vanishing"], 0.25)


def test_an_overflow_is_reported_as_overflow_alone() -> None:
    nf = NonFinite(0, "b", "activation", math.inf)
    m = _m(first_nonfinite=nf, overflow=nf, growth=math.nan, gains=(math.nan,))
    assert values(m)["nonfinite"] == 0.0
    assert verdict(m).names == ("overflow",)
    plain = _m(first_nonfinite=nf, growth=math.nan, gains=(math.nan,))
    assert verdict(plain).names == ("nonfinite",)
