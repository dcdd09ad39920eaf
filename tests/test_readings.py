"""The readings of one step's numbers (readings.py) where a probe cannot easily reach them: the paths
of chains against brute force over every path, and a junction with no record of what it takes."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from stabilitycheck.readings import chains_of, cut_before, paths_of, unscored


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
