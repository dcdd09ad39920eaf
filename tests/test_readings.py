"""The readings of one step's numbers (readings.py) where a probe cannot easily reach them: the paths
of chains against brute force over every path, and a junction with no record of what it takes.
Also each reading on hand-made steps: gains, chains in series, unscored zeros, growth_of, locate."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stabilitycheck.measurement import INPUT
from stabilitycheck.readings import (
    Step,
    between_gain,
    chains_of,
    cut_before,
    gains_of,
    growth_of,
    locate,
    paths_of,
    unscored,
)


def _paths(feeds: list[tuple[int, ...]]) -> list[list[int]]:
    """Every path of chains, brute force: from each chain that takes none, along every chain that takes
    it, to each chain that none takes."""
    taken = {f for fed in feeds for f in fed}
    starts = [k for k, fed in enumerate(feeds) if not fed]
    out: list[list[int]] = []

    def walk(path: list[int]) -> None:
        nexts = [k for k, fed in enumerate(feeds) if path[-1] in fed]
        if path[-1] not in taken:
            out.append(path)
        for k in nexts:
            walk([*path, k])

    for s in starts:
        walk([s])
    return out


@given(st.data(), st.integers(1, 6))
def test_paths_of_is_the_largest_and_smallest_product_over_every_path(data: st.DataObject, n: int) -> None:
    """Oracle: brute force, every path from a chain taking none to a chain none takes, its growth the
    product of its chains'; feeds drawn as any sets of earlier chains (a DAG in order)."""
    growths = data.draw(st.lists(st.floats(0.05, 20.0), min_size=n, max_size=n))
    feeds = [
        tuple(sorted(data.draw(st.sets(st.integers(0, k - 1), max_size=k)))) if k else () for k in range(n)
    ]
    products = [math.prod(growths[k] for k in path) for path in _paths(feeds)]
    most, least = paths_of(growths, feeds)
    assert math.isclose(most, max(products), rel_tol=1e-12)
    assert math.isclose(least, min(products), rel_tol=1e-12)


def test_a_head_on_two_shrinking_towers_has_its_smallest_path_through_the_smaller() -> None:
    """By hand: towers at 0.5 and 0.2, a head at 0.5 taking both: paths 0.25 and 0.1."""
    assert paths_of([0.5, 0.2, 0.5], [(), (), (0, 1)]) == (0.25, 0.1)


def test_a_junction_of_no_record_follows_the_chain_before_it() -> None:
    """Three chains (junctions at calls 2 and 4), what the first junction takes recorded, the second's
    not: it is read as following the chain before it, in series (the rule before junctions were
    recorded), not the first. Growth per chain, first over last of its output-gradient norms."""
    act = [8.0, 4.0, 6.0, 3.0, 5.0, 1.0]
    chains, feeds = chains_of(act, frozenset({2, 4}), frozenset(), {2: frozenset({0})})
    assert chains == (2.0, 2.0, 5.0)
    assert feeds == ((), (0,), (1,))


def test_zero_gradients_at_a_chains_output_end_are_unscored_and_at_its_input_end_kept() -> None:
    """By hand: per chain (junction at call 4), the trailing exact zeros, skipping unreached outputs
    (call 2), are read as unreached; the leading ones (a gradient that died on its way back) stay."""
    act = [0.0, 3.0, 0.0, 0.0, 5.0, 0.0, 2.0, 0.0]
    assert unscored(act, frozenset({4}), frozenset({2})) == frozenset({3, 7})
    assert unscored([0.0, 0.0, 1.0], frozenset(), frozenset()) == frozenset()
    assert unscored([0.0, 0.0, 4.0], frozenset({2}), frozenset()) == frozenset()
    assert unscored([0.0, 0.0], frozenset(), frozenset()) == frozenset()


def test_a_chain_whose_every_gradient_is_0_is_kept_and_reads_no_growth() -> None:
    """An encoder behind a dead link (every gradient exactly 0) beside a decoder: dropped as unscored,
    the model read the decoder's growth alone, flat (found in review); kept, its growth is 0 / 0, none
    (NaN), as before. Oracle: the rule, first over last norm per chain, by hand."""
    act = [0.0, 0.0, 0.0, 20.8, 20.0]
    breaks = frozenset({3})
    chains, _ = chains_of(act, breaks, unscored(act, breaks, frozenset()), {3: frozenset({0})})
    assert math.isnan(chains[0]) and chains[1] == 20.8 / 20.0


def test_a_window_of_zeros_before_a_cut_is_unscored_beside_a_live_one() -> None:
    """By hand: a chain whose every gradient is exactly 0, ended by a cut (truncated BPTT: the next
    call took its last output detached) while another chain has a gradient: the loss takes nothing
    from it, read as unreached. The same zeros before a junction that is no cut (a tower behind a zero
    gate, an encoder behind a dead link) are kept (0 / 0, said as unread), as is every chain where
    none has a gradient."""
    act = [0.0, 0.0, 0.0, 4.0, 2.0, 1.0]
    cut = frozenset({3})
    assert unscored(act, cut, frozenset(), cut) == frozenset({0, 1, 2})
    assert unscored(act, cut, frozenset()) == frozenset()
    assert unscored([0.0] * 6, cut, frozenset(), cut) == frozenset()
    two = frozenset({3, 6})
    assert unscored([0.0, 0.0, 0.0, 4.0, 0.0, 0.0, 2.0], two, frozenset(), frozenset({6})) == {4, 5}
    chains, _ = chains_of(act, cut, unscored(act, cut, frozenset(), cut), {3: frozenset()})
    assert chains == (4.0,)


# Pinned where mutation testing found no other test failing: readings:
# cut_before must look at the output *before* a severed call (s - 1), as its docstring says; oracle:
# the definition, worked by hand on index sets.


def test_a_cut_is_where_the_output_before_the_severed_call_got_no_gradient() -> None:
    # calls 0, 1 unreached (a frozen backbone), call 2 takes its input detached and is reached:
    # the output before it (1) got no gradient while its own did -> a cut at 2
    assert cut_before(frozenset({2}), frozenset({0, 1})) == (2,)
    # the output after it (3) being unreached says nothing of a cut at 2; the one before is reached
    assert cut_before(frozenset({2}), frozenset({3})) == ()
    # the severed call itself unreached: no cut (its output got no gradient either)
    assert cut_before(frozenset({2}), frozenset({1, 2})) == ()
    # several, sorted: 5 (4 unreached) and 2 (1 unreached); 7 has 6 reached
    assert cut_before(frozenset({7, 5, 2}), frozenset({1, 4, 8})) == (2, 5)


NONE: frozenset[int] = frozenset()


def test_one_chain_reads_first_over_last_output_gradient() -> None:
    chains, feeds = chains_of([8.0, 4.0, 2.0, 1.0], NONE, NONE, {})
    assert chains == (8.0,) and feeds == ((),)
    # every entry counts: the last one too
    chains, _ = chains_of([8.0, 4.0, 2.0, 0.5], NONE, NONE, {})
    assert chains == (16.0,)


def test_a_chain_where_one_of_several_outputs_was_reached_has_no_growth() -> None:
    chains, _ = chains_of([3.0, 5.0, 7.0], frozenset({1}), frozenset({2}), {})
    assert chains == (1.0,)  # a one-call chain grows by 1 (3/3); the (5, unreached 7) chain has none


def test_chains_in_series_feed_each_other_by_default() -> None:
    act = [8.0, 4.0, 2.0, 1.0]  # chain 0: 8/4 = 2, chain 1: 2/1 = 2
    chains, feeds = chains_of(act, frozenset({2}), NONE, {})
    assert chains == (2.0, 2.0) and feeds == ((), (0,))
    assert growth_of(chains, feeds, len(act)) == 4.0  # in series: the product


def test_only_zeros_at_a_chains_output_end_are_unscored() -> None:
    assert unscored([4.0, 0.0, 2.0, 0.0, 0.0], NONE, NONE) == frozenset({3, 4})


def _brute_paths(chains, feeds):
    """Every path from a chain that takes none to one that no chain takes: its product."""
    taken = {f for fed in feeds for f in fed}
    products = []

    def walk(k, acc):
        acc *= chains[k]
        if not feeds[k]:
            products.append(acc)
        for f in feeds[k]:
            walk(f, acc)

    for end in range(len(chains)):
        if end not in taken:
            walk(end, 1.0)
    return max(products), min(products)


@pytest.mark.parametrize(
    "chains,feeds",
    [
        ((2.0, 0.5, 3.0), ((), (0,), (1,))),  # series: prefix 2 is not a path
        ((4.0, 0.25, 10.0), ((), (), (0, 1))),  # two towers into a head
        ((0.1, 5.0, 0.2, 2.0), ((), (), (0, 1), (2,))),
        ((3.0, 0.01), ((), (0,))),
    ],
)
def test_paths_of_matches_brute_force_over_every_path(chains, feeds) -> None:
    assert paths_of(chains, feeds) == pytest.approx(_brute_paths(chains, feeds))


def test_growth_of_a_flat_path_with_a_shrinking_chain_is_the_path() -> None:
    # chains side by side: 0.5 and 0.8 (both shrink); the largest chain does not exceed 1: the path
    assert growth_of((0.5, 0.8), ((), ()), 2) == 0.8
    # an encoder growing 50 before a decoder at 0.01: the path reads 0.5, the chain 50 shows
    assert growth_of((50.0, 0.01), ((), (0,)), 4) == 50.0
    # a chain growing 0.9 and a path of 0.95: neither grows, the path is read
    assert growth_of((0.9, 0.95), ((), ()), 2) == 0.95
    # in series, 0.9 then 0.5: one path, 0.45; no chain grows, so no chain's own growth replaces it
    assert growth_of((0.9, 0.5), ((), (0,)), 4) == pytest.approx(0.45, rel=1e-15, abs=0)


def test_growth_with_calls_but_no_readable_chain_is_nan() -> None:
    assert math.isnan(growth_of((), (), 3))
    assert growth_of((), (), 0) == 1.0


def test_gains_are_each_entry_over_the_next_and_nan_across_a_junction() -> None:
    g = gains_of([8.0, 4.0, 1.0, 0.5], frozenset({2}), NONE)
    assert g[0] == 2.0 and math.isnan(g[1]) and g[2] == 2.0


def _step(**kw) -> Step:
    base = dict(
        loss=1.0,
        grads=[1.0, 1.0, 1.0],
        weights=[],
        calls=(INPUT, "a", "b"),
        breaks=NONE,
        feeds={},
        unreached=NONE,
        forward=[1.0, 1.0, 1.0],
        backward=[1.0, 1.0, 1.0],
    )
    base.update(kw)
    return Step(**base)


def test_locate_names_the_output_side_gradient_first() -> None:
    nf = locate(0, _step(backward=[math.nan, 1.0, math.inf]), ["a", "b"], [0, 1, 1])
    assert (nf.layer, nf.tensor, nf.value) == ("b", "activation_grad", math.inf)


def test_locate_takes_weight_grads_output_side_first_when_the_order_is_unknown() -> None:
    nf = locate(0, _step(grads=[math.nan, 1.0, math.inf]), ["a", "b"], [0, 0, 1])
    assert (nf.layer, nf.tensor, nf.value) == ("b", "gradient", math.inf)


def test_a_nonfinite_input_given_to_the_model_is_named_as_the_input() -> None:
    given = locate(0, _step(forward=[math.nan, 1.0, 1.0], given_finite=False), ["a", "b"], [0, 1, 1])
    made = locate(0, _step(forward=[math.nan, 1.0, 1.0], given_finite=True), ["a", "b"], [0, 1, 1])
    assert given.layer == INPUT
    assert made.layer == "(outside blocks, before a)"


def test_a_chain_taking_an_unreadable_chain_takes_what_that_one_took() -> None:
    """readings.chains_of: a chain of outputs no gradient reached has no growth, 'and a chain taking one
    takes what that one took': chain 2 (from call 4) takes chain 1 (calls 2-3, unreached), which took
    chain 0, so chain 2 is fed by chain 0. Oracle: the documented rule, by hand."""
    from stabilitycheck.readings import chains_of

    act = [8.0, 4.0, 0.0, 0.0, 6.0, 3.0]
    chains, feeds = chains_of(
        act, frozenset({2, 4}), frozenset({2, 3}), {2: frozenset({0}), 4: frozenset({2})}
    )
    assert chains == (2.0, 2.0)
    assert feeds == ((), (0,))


def test_under_a_gradscaler_a_non_finite_gradient_alone_is_no_finding() -> None:
    """readings.locate: 'Under a GradScaler (grads_count False) non-finite gradients are a skipped
    step, not a finding'; with grads counted they are one. Oracle: the documented rule."""
    from stabilitycheck.measurement import INPUT
    from stabilitycheck.readings import Step, locate

    step = Step(
        loss=1.0,
        grads=[1.0, float("inf")],
        weights=[],
        calls=(INPUT, "a", "b"),
        breaks=frozenset(),
        feeds={},
        unreached=frozenset(),
        forward=[1.0, 1.0, 1.0],
        backward=[1.0, float("nan"), 1.0],
    )
    assert locate(0, step, ["a", "b"], [0, 1], grads_count=False) is None
    found = locate(0, step, ["a", "b"], [0, 1])
    assert found is not None and found.tensor == "activation_grad"


NAN, INF = math.nan, math.inf


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


def _two_call_step(**kw: Any) -> Step:
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
    found = locate(0, _two_call_step(loss=INF, backward=[NAN, NAN], grads=[NAN]), ("a", "b"), [0])
    assert found is not None and found.tensor == "loss" and found.value == INF


def test_the_between_gain_is_the_median_over_block_0s_chain_of_positive_finite_ratios() -> None:
    """By hand, Measurement.between_gain's rule: ||dL/d out_at-1|| / ||dL/d x_at|| for each call `at`
    after the first and before the first junction past call 0 (breaks 6 and 7; a break at 0 starts
    nothing), 1 for each call that took the output as returned; a ratio of 0 or inf (no gradient
    crossed) is left out. Kept: at 1, 8 / 4 = 2; as returned at 4: 1; median 1.5. Left out: at 0 (no
    output before it), at 2 (4 / 0), at 3 (0 / 1), at 6 and 7 (past the junction: 0.5 and 25)."""
    backward = [8.0, 4.0, 0.0, 1.0, 2.0, 0.5, 0.25, 0.1]
    crossed = [(0, 1.0), (1, 4.0), (2, 0.0), (3, 1.0), (6, 1.0), (7, 0.01)]
    assert between_gain(backward, crossed, [4], frozenset({0, 6, 7})) == 1.5
    # a call taking the output as returned at or past the junction is left out too
    assert between_gain(backward, [(1, 4.0)], [4, 6, 7], frozenset({6})) == 1.5
    # nothing to take a ratio of: 1
    assert between_gain(backward, [(2, 0.0), (7, 0.01)], [], frozenset({6})) == 1.0


def test_a_chain_growing_between_1_and_2_is_not_hidden_by_a_shrinking_one_after_it() -> None:
    """growth_of: a chain whose own growth is above 1 (1.5) in series with one at 0.1 (path 0.15) reads
    its own 1.5; one at exactly 1 does not grow, and the path (0.5) is read."""
    assert growth_of((1.5, 0.1), ((), (0,)), 4) == 1.5
    assert growth_of((1.0, 0.5), ((), (0,)), 4) == 0.5


def test_chains_with_no_feeds_recorded_are_in_series() -> None:
    """paths_of without feeds: each chain takes the one before it, one path, the product (3 = 2 x 3 x
    0.5)."""
    assert paths_of([2.0, 3.0, 0.5], []) == (3.0, 3.0)


def test_locate_names_block_0_as_the_owner_of_a_non_finite_weight_or_gradient() -> None:
    """Block 0's weights and gradients are named after block 0 (names[0]), not as outside the blocks."""
    weight = locate(2, _step(weights=[1.0, INF, 1.0]), ["a", "b"], [0, 0, 1])
    gradient = locate(0, _step(grads=[1.0, NAN, 1.0]), ["a", "b"], [0, 0, 1])
    assert (weight.step, weight.layer, weight.tensor) == (2, "a", "weight")
    assert (gradient.layer, gradient.tensor) == ("a", "gradient")
    outside = locate(0, _step(grads=[1.0, NAN, 1.0]), ["a", "b"], [0, -1, 1])
    assert outside.layer == "(outside blocks)"


def test_a_nan_made_before_the_only_block_is_named_before_it() -> None:
    """The entry's copy of a finite input non-finite with one block after it: the model's code made it
    before that block (the rule needs a call after the entry, and one is enough)."""
    found = locate(0, _two_call_step(calls=(INPUT, "a"), forward=[NAN, 1.0]), ("a",), [0])
    assert found is not None and found.layer == "(outside blocks, before a)"


def test_zeros_in_a_chain_of_their_own_after_a_junction_at_call_1_are_kept() -> None:
    """A junction at call 1: [3] and [0] are two chains, and the 0 is a whole chain of zeros (kept,
    reading no growth), not the output end of a chain [3, 0]."""
    assert unscored([3.0, 0.0], frozenset({1}), NONE) == frozenset()
