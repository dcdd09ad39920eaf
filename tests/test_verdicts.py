"""The verdict's criteria (verdicts), on hand-made Measurements; oracles from the docstrings' rules worked
by hand: a decoder vanishing behind a growing encoder still fires vanishing (each chain's own growth
counts, not only the path's product), and a float16 range problem (`overflow`, the same non-finite
value the float32 re-run did not reproduce) is reported as overflow, never also as nonfinite."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from measurements import _m_abc, _stack_seed

from stabilitycheck.measurement import Measurement, NonFinite
from stabilitycheck.verdicts import Limits, values, vanishing, verdict


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


def test_an_infinite_grad_norm_without_a_scaler_is_the_peak_and_fires_grad_norm() -> None:
    """V2: an Inf total norm is left out only under a GradScaler (a step it skipped); without one it is
    the peak, and grad_norm fires on it even with nonfinite switched off (_above: Inf counts)."""
    from stabilitycheck.verdicts import Limits, peak_grad_norm, verdict

    nf = NonFinite(1, "b", "activation_grad", math.inf)
    m = _m_abc(grad_norm=(3.0, math.inf), first_nonfinite=nf)
    assert peak_grad_norm(m) == math.inf
    assert "grad_norm" in verdict(m, Limits(nonfinite=False)).names
    scaled = _m_abc(grad_norm=(3.0, math.inf), loss_scale=(65536.0, 32768.0), skipped_steps=1)
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

    m = _m_abc(loss=(1.0, 3.0))
    assert values(m)["divergence"] == 3.0
    assert verdict(m, Limits()).names == ("divergence",)


def test_vanishing_reads_the_product_of_chains_in_series() -> None:
    """V7: an encoder and its decoder each shrinking x0.1 pass the gradient x0.01 end to end
    (readings.paths_of: chains in series multiply); at a vanishing limit of 50 (bound 0.02) that fires
    though neither chain alone does."""
    from stabilitycheck.verdicts import Limits, vanishing, verdict

    m = _m_abc(growth=0.1, chain_growths=(0.1, 0.1), chain_feeds=((), (0,)), chain_starts=(2,))
    assert vanishing(m) == pytest.approx(0.01)
    assert "vanishing" in verdict(m, Limits(vanishing=50.0)).names


def test_a_fired_criterion_carries_the_bound_it_passed_so_its_text_is_true() -> None:
    """verdicts.Criterion: the limit it PASSED (vanishing: 1/limit, from below), so describe()'s
    'value op limit' holds for every criterion that fired. Oracle: the arithmetic relation the text
    states, checked on the numbers, and the documented bound 1/limit for vanishing."""
    from stabilitycheck.verdicts import judge

    named = {
        "overflow": 0.0,
        "nonfinite": 0.0,
        "grad_norm": 5e3,
        "growth": 3e2,
        "divergence": 4.0,
        "vanishing": 1e-3,
        "stall": 4.0,
    }
    lim = Limits(vanishing=100.0, stall=0.95)
    v = judge(named, lim)
    assert v.names == ("grad_norm", "growth", "divergence", "vanishing", "stall")
    for c in v.criteria:
        assert (c.value < c.limit) if c.name == "vanishing" else (c.value > c.limit)
    (van,) = [c for c in v.criteria if c.name == "vanishing"]
    assert van.limit == pytest.approx(1 / 100.0, rel=1e-15)
    assert van.describe() == "vanishing 0.001 < 0.01"


def test_a_chain_with_no_growth_to_read_leaves_vanishing_judged_on_the_growth() -> None:
    """verdicts.vanishing: where a chain's own growth is NaN (0/0: no gradient reached it), no path
    through it can be read and the criterion reads the overall growth, which was measured: 1e-4 is
    below 1/100 and fires (Limits: growth below 1/limit is a failure when asked for; NaN never fires,
    so a NaN read from the unmeasured chain would hide it). Oracle: the documented bound, by hand."""
    from measurements import _measurement

    from stabilitycheck.verdicts import vanishing, verdict

    m = _measurement(growth=1e-4, chain_growths=(math.nan, 1e-4), chain_feeds=((), (0,)))
    assert vanishing(m) == 1e-4
    assert verdict(m, Limits(vanishing=100.0)).names == ("vanishing",)


NAN, INF = math.nan, math.inf


def test_vanishing_reads_the_smallest_path_through_branching_chains() -> None:
    """Chain A (x0.1) feeds B (x0.1) and C (x10) side by side: the paths are A.B = 0.01 and A.C = 1.
    The vanishing criterion reads the smallest path, 0.01, below every chain alone (0.1)."""
    m = Measurement(
        layer_names=("a", "b", "c"),
        activation_names=("a", "b", "c"),
        loss=(1.0,),
        grad_norm=(1.0,),
        layer_grad_norms=(1.0, 1.0, 1.0),
        activation_norms=(1.0, 1.0, 1.0),
        activation_grad_norms=(1.0, 1.0, 1.0),
        gains=(NAN, NAN),
        growth=10.0,
        weight_norms=(),
        first_nonfinite=None,
        steps_run=0,
        chain_starts=(1, 2),
        chain_growths=(0.1, 0.1, 10.0),
        chain_feeds=((), (0,), (0,)),
    )
    assert math.isclose(vanishing(m), 0.01)


def test_a_limit_of_zero_is_refused() -> None:
    """Limits by hand: a limit must be a number > 0 (a growth limit of 0 fires on every model)."""
    from stabilitycheck.errors import ConfigError
    from stabilitycheck.verdicts import Limits

    with pytest.raises(ConfigError):
        Limits(growth=0.0)


def test_the_peak_grad_norm_leaves_nan_out_and_one_loss_has_no_rise() -> None:
    """peak_grad_norm and values by hand: a NaN step (the nonfinite criterion's) is no peak, in any
    order; a run of one loss (steps=0) has no rise: divergence and stall NaN, never firing (a rise of
    1 would fire a stall limit of 0.5 on every model probed without steps)."""
    from stabilitycheck.verdicts import Limits, fires, peak_grad_norm, values

    m = _stack_seed([1.0, 1.0, 1.0])
    assert peak_grad_norm(replace(m, grad_norm=(NAN, 5.0, 1.0))) == 5.0
    named = values(replace(m, loss=(1.0,)))
    assert math.isnan(named["stall"]) and math.isnan(named["divergence"])
    assert not fires("stall", named["stall"], Limits(stall=0.5))


def test_going_non_finite_is_judged_against_an_infinite_limit() -> None:
    """criterion by hand: nonfinite and overflow name no number as their limit; inf stands for it (the
    JSON's limit), not the 0.0 the counts compare with."""
    from stabilitycheck.verdicts import Limits, criterion

    assert criterion("nonfinite", INF, Limits()).limit == INF
    assert criterion("overflow", INF, Limits()).limit == INF


def test_limits_text_names_the_criteria_read_after_steps_only_where_steps_ran() -> None:
    from stabilitycheck.config import Config
    from stabilitycheck.space import Axis, Space
    from stabilitycheck.verdicts import limits_text

    lim = Limits(stall=0.5)
    assert limits_text(lim) == "nonfinite, grad_norm > 1000, growth > 100, divergence > 2, stall > 0.5"
    assert limits_text(lim, trained=False) == "nonfinite, grad_norm > 1000, growth > 100"
    base = Config.of("mlp")
    assert not Space("s", base, (Axis.range("depth", 1, 3),)).trains()
    assert Space("s", base, (Axis.range("steps", 0, 2),)).trains()
    assert not Space("s", base, (Axis.range("steps", 0, 0),)).trains()
    assert Space("s", base.with_run(steps=1), ()).trains()


def test_a_verdict_read_back_from_strict_json_keeps_its_numbers_and_nan_for_null() -> None:
    """Verdict.to_dict / from_dict: the values and limits come back as written; where strict JSON wrote
    a NaN value as null, NaN comes back (and a null name or field other than value/limit stays null)."""
    from stabilitycheck.verdicts import Criterion, Verdict

    v = Verdict(True, (Criterion("growth", 314.0, 100.0), Criterion("nonfinite", math.inf, math.inf)))
    assert Verdict.from_dict(v.to_dict()) == v
    data = {"exploded": True, "criteria": [{"name": "grad_norm", "value": None, "limit": 1000.0}]}
    (c,) = Verdict.from_dict(data).criteria
    assert c.name == "grad_norm" and math.isnan(c.value) and c.limit == 1000.0


def test_a_criterion_prints_3_significant_digits_or_as_many_as_tell_it_from_its_limit() -> None:
    """Criterion.describe's rule: 3 significant digits, more only where 3 would print the value as its
    limit."""
    from stabilitycheck.verdicts import Criterion

    assert Criterion("growth", 123456.0, 100.0).describe() == "growth 1.23e+05 > 100"
    assert Criterion("growth", 100.06, 100.0).describe() == "growth 100.1 > 100"
    assert Criterion("grad_norm", 1000.5, 1000.0).describe() == "grad_norm 1000.5 > 1000"
