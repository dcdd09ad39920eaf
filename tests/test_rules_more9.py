"""Round-9 mutation-testing additions (readings, the growth kind, the vanishing criterion). Each
test's oracle is the documented rule spelt out by hand on numbers chosen for it (never a number the
code printed). Fast and deterministic."""

from __future__ import annotations

import math
from typing import Any

from stabilitycheck.growthkind import FIT_R2, Growth, classify, fit_growth, kind_of, over_tokens, swing
from stabilitycheck.measurement import Measurement
from stabilitycheck.readings import Step, growth_of, locate, unscored
from stabilitycheck.spread import Spread
from stabilitycheck.verdicts import vanishing

NAN, INF = math.nan, math.inf
NONE: frozenset[int] = frozenset()
LN2 = math.log(2)


# ---------------------------------------------------------------- readings.py


def test_an_unreached_last_output_does_not_end_the_scan_for_zeros_before_it() -> None:
    """A chain [3, 0, U] whose last output no gradient reached (U) and whose middle one's is exactly 0:
    the 0 is at the chain's output end all the same (unscored), or the growth reads 3 / 0 = inf."""
    assert unscored([3.0, 0.0, 7.0], NONE, frozenset({2})) == frozenset({1})


def test_a_nan_gradient_at_the_output_end_is_kept_not_unscored() -> None:
    """Only an exact 0 is unscored: a NaN norm there is a finding, dropped it would hide it."""
    assert unscored([3.0, NAN], NONE, NONE) == frozenset()


def test_a_nan_chain_makes_the_growth_nan_in_any_order() -> None:
    """A chain whose growth is NaN (0 / 0) beside another: the model's growth is unknown (NaN), not the
    other chain's, whichever comes first (max() with a NaN depends on the order)."""
    assert math.isnan(growth_of([2.0, NAN], [(), ()], 4))
    assert math.isnan(growth_of([NAN, 2.0], [(), ()], 4))


def _step(**kw: Any) -> Step:
    base: dict[str, Any] = dict(
        loss=1.0,
        grads=[1.0],
        weights=[],
        calls=("a", "b"),
        breaks=NONE,
        feeds={},
        unreached=NONE,
        forward=[1.0, 1.0],
        backward=[1.0, 1.0],
    )
    base.update(kw)
    return Step(**base)


def test_an_infinite_loss_is_located_at_the_loss() -> None:
    """Every forward output finite and the loss inf (an overflowing reduction): the first non-finite
    value is the loss's, not a later gradient's."""
    found = locate(0, _step(loss=INF, backward=[NAN, NAN], grads=[NAN]), ("a", "b"), [0])
    assert found is not None and found.tensor == "loss" and found.value == INF


# ---------------------------------------------------------------- growthkind.py


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


def test_a_vanishing_stack_is_never_accumulated_over_tokens() -> None:
    """over_tokens by hand: growth 0.01 with a through-time growth of 1e-6 is no accumulation (that is
    growth above 1 the through-time product explains under half of); the kind stays its own or the
    through-time one's, never 'accumulated'."""
    rate = Spread(math.log(0.6), math.log(0.6), math.log(0.6))
    own = Growth("exponential", rate, Spread(NAN, NAN, NAN))
    assert over_tokens(own, 0.01, 1e-6, own).kind == "exponential"


# ---------------------------------------------------------------- verdicts.py


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
