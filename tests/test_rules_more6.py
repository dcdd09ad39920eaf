"""Round-6 mutation-testing additions (verdict and report logic: searching, counterexample, culprit,
verdicts, spikes, growthkind, staircase, phasemap, remedies, invariants, updates, layout, watching).
Each test's oracle is theory, brute force, torch's own functions or the documented rule (never a
number the code printed). Fast and deterministic."""

from __future__ import annotations

import json
import math

import pytest
import torch

from stabilitycheck.config import Config
from stabilitycheck.verdicts import Limits

# ---------------------------------------------------------------- counterexample.py


def test_a_counterexample_with_its_own_limits_round_trips_through_json() -> None:
    """The limits a counterexample was judged on are part of it: read back, they are the ones given
    (a report read back with the defaults says the wrong thresholds). Oracle: identity of the round trip."""
    from stabilitycheck.counterexample import Counterexample
    from stabilitycheck.seeds import assess

    config = Config.of("mlp", depth=2, width=4, batch_size=1).with_run(seeds=1)
    limits = Limits(grad_norm=None, growth=7.5, divergence=1.5, vanishing=40.0, stall=0.9, nonfinite=False)
    cx = Counterexample("mlp", config, assess(config, limits=limits), limits, ())
    back = Counterexample.from_dict(json.loads(json.dumps(cx.to_dict())))
    assert back.limits == limits
    assert back.config == config


# ---------------------------------------------------------------- spikes.py


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


# ---------------------------------------------------------------- verdicts.py


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
    from test_rules_more5 import _measurement

    from stabilitycheck.verdicts import vanishing, verdict

    m = _measurement(growth=1e-4, chain_growths=(math.nan, 1e-4), chain_feeds=((), (0,)))
    assert vanishing(m) == 1e-4
    assert verdict(m, Limits(vanishing=100.0)).names == ("vanishing",)


# ---------------------------------------------------------------- growthkind.py


@pytest.mark.parametrize(
    ("rate", "shown"),
    [
        (1.00812, "x1.008/block"),
        (0.99512, "x0.9951/block"),
        (1.51234, "x1.51/block"),
        (0.95123, "x0.951/block"),
    ],
)
def test_an_exponential_rate_gets_four_digits_only_near_one_on_either_side(rate: float, shown: str) -> None:
    """describe(): 4 significant digits where the rate is within 1% of 1 (x1.008/block over 128
    blocks is 2.7, not x1), 3 elsewhere, above 1 or below it alike. Oracle: that documented rule,
    with Python's own %g formatting of the rate."""
    from stabilitycheck.growthkind import Growth
    from stabilitycheck.spread import Spread

    log_rate = math.log(rate)
    g = Growth("exponential", Spread(log_rate, log_rate, log_rate), Spread(0.0, 0.0, 0.0))
    digits = 4 if abs(rate - 1) < 0.01 else 3
    assert g.describe() == f"exponential, x{rate:.{digits}g}/block" == f"exponential, {shown}"


# ---------------------------------------------------------------- culprit.py


def test_a_block_no_gradient_reached_is_left_out_of_the_spread_a_culprit_must_pass() -> None:
    """culprit_of: a block stands out past 3x the spread of the OTHER blocks' excesses, the median
    of their absolute values, over the numbers among them (a NaN gain: 0/0, a block no gradient
    reached, is no number). Here the excesses over the row median 1 are [2, 0, -2, NaN, 0, -2]: the
    spread of the others is median(0, 2, 0, 2) = 1, so block 0's excess 2 is not past 3: no block is
    named, the stack reads uniform at its median gain e^1. Oracle: the documented rule by hand."""
    import statistics

    from test_culprit import seed

    from stabilitycheck.culprit import culprit_of

    logs = [3.0, 1.0, -1.0, math.nan, 1.0, -1.0]
    numbers = [x for x in logs if not math.isnan(x)]
    mid = statistics.median(numbers)
    others = [abs(x - mid) for x in logs[1:] if not math.isnan(x)]
    assert logs[0] - mid <= max(math.log(2), 3 * statistics.median(others))  # does not stand out
    assert (
        culprit_of([seed(logs, growth=5.0) for _ in range(5)]) == f"uniform, median gain x{math.exp(mid):.3g}"
    )


@pytest.mark.parametrize(
    ("layer", "blamed"),
    [("enc.1", "(a block taking enc.1's output)"), ("dec.0", "dec.1"), ("enc.0", "enc.1")],
)
def test_a_backward_nan_at_a_chains_last_output_is_blamed_on_the_blocks_taking_it(
    layer: str, blamed: str
) -> None:
    """culprit._single: a non-finite dL/d(out_i) was made by the backward of call i + 1, or, where
    call i + 1 starts a new chain, by whichever blocks take out_i (an encoder's last output feeds
    every decoder layer). Oracle: that rule (README's culprit row) by hand on an encoder (enc.0,
    enc.1) and a decoder (dec.0, dec.1) whose first call, index 3, starts the second chain."""
    from stabilitycheck.culprit import culprit_of
    from stabilitycheck.measurement import Measurement, NonFinite

    names = ("(input)", "enc.0", "enc.1", "dec.0", "dec.1")
    m = Measurement(
        layer_names=names[1:],
        activation_names=names,
        loss=(math.nan,),
        grad_norm=(math.nan,),
        layer_grad_norms=(1.0,) * 4,
        activation_norms=(1.0,) * 5,
        activation_grad_norms=(1.0,) * 5,
        gains=(1.0,) * 4,
        growth=math.nan,
        weight_norms=(),
        first_nonfinite=NonFinite(0, layer, "activation_grad", math.nan),
        steps_run=0,
        chain_starts=(3,),
    )
    assert culprit_of([m]) == blamed


# ---------------------------------------------------------------- growthkind.py (typical stack)


def test_the_typical_stack_has_nan_only_where_every_seed_has_a_junction() -> None:
    """growthkind._typical_stack: each block's geometric mean over seeds; NaN where EVERY seed has
    NaN there (a junction between chains, the same in every draw); None where a gain is otherwise
    not a positive number (one seed's NaN: 0/0 in that draw alone). Oracle: that docstring, with
    the geometric means by hand (sqrt(2 x 8) = 4)."""
    from stabilitycheck.growthkind import _typical_stack

    got = _typical_stack([[2.0, math.nan, 2.0], [8.0, math.nan, 2.0]])
    assert got is not None and got[0] == pytest.approx(4.0, rel=1e-12) and math.isnan(got[1])
    assert got[2] == pytest.approx(2.0, rel=1e-12)
    assert _typical_stack([[2.0, 2.0, 2.0], [2.0, math.nan, 2.0]]) is None


# ---------------------------------------------------------------- staircase.py


def _trace_rows(rows: list[list[bool]]) -> tuple[list[object], list[str], dict[int, set[int]]]:
    from stabilitycheck.staircase import trace

    edges: list[object] = []
    notes: list[str] = []
    asked: dict[int, set[int]] = {}

    def fires(x: int, y: int) -> bool:
        asked.setdefault(y, set()).add(x)
        return rows[y][x]

    trace(fires, len(rows[0]), len(rows), edges, notes)
    return edges, notes, asked


def test_the_frontier_is_confirmed_by_a_second_quiet_point_below_it() -> None:
    """Module docstring: both sides of a frontier are confirmed by one more point, two quiet below
    it; a firing point two below the first-found frontier breaks monotonicity there, and the row is
    bisected below it for its lowest transition. Oracle: brute force (the smallest firing x of a row
    whose firing points are 2 and 4..7; the bisection on x = 7, 3, 5, 4 alone finds 4)."""
    row = [x == 2 or x >= 4 for x in range(8)]
    edges, notes, asked = _trace_rows([row])
    assert {3, 2} <= asked[0]  # f - 1 and f - 2 of the first frontier (4)
    assert edges[0].x == min(x for x in range(8) if row[x]) == 2  # type: ignore[attr-defined]
    assert len(notes) == 1 and "x index 2 fires but x index 3 does not" in notes[0]


def test_the_frontier_is_confirmed_by_a_second_firing_point_above_it() -> None:
    """Module docstring: two firing points above the frontier; a quiet point right above the
    first-found frontier breaks monotonicity and is said. Oracle: brute force on a row firing at 3
    and 5..7 (the bisection on x = 7, 3, 1, 2 alone finds 3, never asking 4)."""
    row = [x == 3 or x >= 5 for x in range(8)]
    edges, notes, asked = _trace_rows([row])
    assert 4 in asked[0]
    assert edges[0].x == min(x for x in range(8) if row[x]) == 3  # type: ignore[attr-defined]
    assert len(notes) == 1 and "x index 3 fires but x index 4 does not" in notes[0]


def test_a_walked_row_is_bisected_below_its_lowest_measured_firing_point() -> None:
    """Module docstring: a row whose measured points break monotonicity is bisected again below its
    LOWEST firing point. Oracle: brute force over every row firing set of 6 points where the trace
    says it broke monotonicity: the frontier then is a measured transition (x fires, x - 1 quiet or
    x = 0) at or below every firing point the row measured."""
    import itertools

    for bits in itertools.product([False, True], repeat=6):
        rows = [[x >= 3 for x in range(6)], list(bits)]
        edges, _, asked = _trace_rows(rows)
        f = edges[1].x  # type: ignore[attr-defined]
        firing_asked = [x for x in asked[1] if rows[1][x]]
        if f is None:
            assert not firing_asked
            continue
        assert rows[1][f] and (f == 0 or (f - 1 in asked[1] and not rows[1][f - 1]))
        assert f <= min(firing_asked)


def test_a_rows_vanishing_band_ends_where_every_seed_fell_below_one_over_the_limit() -> None:
    """PhaseMap.band(vanishing=True): the smallest measured x where one of the seeds fell below
    1/limit (the lowest seed's growth), and where all of them did (the highest seed's growth below
    it), not where the quantile did. Oracle: that docstring, by hand on the seeds' ranges."""
    from stabilitycheck.phasemap import Point
    from stabilitycheck.space import Axis
    from stabilitycheck.spread import Spread

    rows = [Spread(0.5, 1.0, 2.0), Spread(0.001, 0.005, 0.05), Spread(0.001, 0.002, 0.005)]
    points = tuple(Point(x, 0, False, g.mid < 0.01, (), g, 5, 0) for x, g in enumerate(rows))
    pm = _map(
        Config.of("mlp"),
        Axis("depth", (1, 2, 3)),
        Axis("init_scale", (1.0,)),
        Limits(vanishing=100.0),
        points,
    )
    some = min(x for x, g in enumerate(rows) if g.low < 1 / 100.0)
    every = min(x for x, g in enumerate(rows) if g.high < 1 / 100.0)
    assert pm.band(0, vanishing=True) == (some, every) == (1, 2)


def test_a_point_where_growth_and_vanishing_both_fired_is_both_exploded_and_vanished() -> None:
    """phasemap.Point.of: `exploded` where a criterion other than vanishing fired, `vanished` where
    vanishing fired, alone or not (an encoder growing beside a decoder vanishing fires both). Oracle:
    the field comments, on a verdict naming both."""
    import dataclasses

    from closed_form import ScaledIdentity

    from stabilitycheck.phasemap import Point
    from stabilitycheck.seeds import assess
    from stabilitycheck.verdicts import Criterion, Verdict

    subject = ScaledIdentity()
    base = assess(subject.config().with_run(seeds=1), subject, Limits())  # type: ignore[arg-type]
    both = Verdict(True, (Criterion("growth", 1e3, 1e2), Criterion("vanishing", 1e-3, 1e-2)))
    p = Point.of(0, 0, dataclasses.replace(base, verdict=both, exploded_seeds=1), Limits())
    assert p.exploded and p.vanished and p.criteria == ("growth", "vanishing")
    alone = Point.of(
        0,
        0,
        dataclasses.replace(base, verdict=Verdict(True, (Criterion("vanishing", 1e-3, 1e-2),))),
        Limits(),
    )
    assert alone.vanished and not alone.exploded


# ---------------------------------------------------------------- remedies.py


def test_clipping_is_offered_only_where_there_are_steps_to_clip() -> None:
    """remedies.clip: norm clipping at CLIP_NORM during the optimiser steps, only meaningful where
    there are steps (at steps=0 nothing is clipped: the re-judged Config would be the same point
    and its 'not fixed' a non-result); never where a clip is set already. Oracle: that docstring."""
    from stabilitycheck import remedies

    c = Config.of("mlp")
    assert remedies.clip(c.with_run(steps=0), None) is None  # type: ignore[arg-type]
    for steps in (1, 3):
        offered = remedies.clip(c.with_run(steps=steps), None)  # type: ignore[arg-type]
        assert offered is not None and offered.run.clip == remedies.CLIP_NORM == 1.0
        assert offered.with_run(clip=None) == c.with_run(steps=steps)  # nothing else changed
    assert remedies.clip(c.with_run(steps=3, clip=5.0), None) is None  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("dtype", "amp"), [("float32", "bfloat16"), ("float32", "float16"), ("bfloat16", "none")]
)
def test_float32_is_offered_for_reduced_dtypes_and_for_autocast(dtype: str, amp: str) -> None:
    """remedies.float32: float32 in place of float16/bfloat16 OR autocast (a float32 model under
    autocast computes in the reduced type just the same). Oracle: that docstring; a float32 run
    without autocast has nothing to remedy."""
    from stabilitycheck import remedies

    c = Config.of("mlp").with_run(dtype=dtype, amp=amp)
    offered = remedies.float32(c, None)  # type: ignore[arg-type]
    assert offered is not None and (offered.run.dtype, offered.run.amp) == ("float32", "none")
    assert remedies.float32(Config.of("mlp").with_run(dtype="float32", amp="none"), None) is None  # type: ignore[arg-type]


def test_a_remedy_that_could_not_be_judged_round_trips_with_its_reason() -> None:
    """Remedy: `skipped` says why the remedied model could not be judged (fixed then None); a report
    read back from JSON says the same ('not judged (...)'), not 'not fixed ()'. Oracle: round-trip
    identity of the Remedy and of its describe() text."""
    from stabilitycheck.remedies import Remedy

    config = Config.of("mlp", depth=2)
    for r in (
        Remedy("critical-init", config, None, skipped="the model raised ValueError: bad init"),
        Remedy("clip", config, False, ("growth",), "36 (18-126)"),
        Remedy("float32", None, None),
    ):
        back = Remedy.from_dict(json.loads(json.dumps(r.to_dict())))
        assert back == r and back.describe() == r.describe()
    assert Remedy("w", config, None, skipped="x").describe() == "w: not judged (x)"


def test_a_remedy_measured_and_still_failing_reads_not_fixed_with_what_still_fires() -> None:
    """Remedy.describe: 'fixed' only where the re-judged Config stopped exploding (fixed True); one
    measured and still failing reads 'not fixed (criteria)' (README: 'says `not fixed (vanishing)`'),
    one that does not apply 'n/a'. Oracle: the README's texts."""
    from stabilitycheck.remedies import Remedy

    config = Config.of("mlp", depth=2)
    assert (
        Remedy("critical-init", config, False, ("vanishing",)).describe()
        == "critical-init: not fixed (vanishing)"
    )
    assert Remedy("clip", config, True).describe() == "clip: fixed"
    assert Remedy("float32", None, None).describe() == "float32: n/a"
    # with the growth it was judged on, quantile (min-max) over seeds: a fix near the limit shows
    assert Remedy("float32", config, True, (), "98.4 (53.1-166)").describe() == (
        "float32: fixed at growth 98.4 (53.1-166)"
    )


def test_remedies_are_judged_on_vanishing_at_the_growth_limit_unless_one_is_set() -> None:
    """remedies.judged_on: the search's limits, with vanishing judged at the growth limit (growth
    below 1/100 by default) where no vanishing limit is set; a set one is kept. Oracle: that
    docstring (and README: 'remedies are judged on vanishing below 1/100 too')."""
    from stabilitycheck.remedies import judged_on

    assert judged_on(Limits()) == Limits(vanishing=100.0)
    custom = Limits(growth=7.0, grad_norm=50.0, divergence=None)
    assert judged_on(custom) == Limits(growth=7.0, grad_norm=50.0, divergence=None, vanishing=7.0)
    assert judged_on(Limits(vanishing=3.0)) == Limits(vanishing=3.0)


# ---------------------------------------------------------------- phasemap.py


def _map(
    base: Config, x: object, y: object, limits: Limits, points: tuple[object, ...] = (), loss: str = "default"
):  # type: ignore[no-untyped-def]
    from stabilitycheck.phasemap import PhaseMap

    return PhaseMap(
        label="t",
        base=base,
        x=x,
        y=y,
        limits=limits,
        loss=loss,
        init_knob="init_scale",  # type: ignore[arg-type]
        points=points,
        explode=(),
        vanish=None,
        violations=(),
        elapsed=0.0,
        interrupted=False,  # type: ignore[arg-type]
    )


def test_the_theory_frontier_is_where_the_growth_passes_the_limit_strictly() -> None:
    """phasemap.theory: per row the smallest x whose mean-field growth passes the limit, as the
    verdict's growth criterion does: strictly above it (verdicts: value > limit). A linear RNN on its
    last step grows exactly sigma^(T - 1): at sigma = 10 and limit 100, T = 3 gives 100.0 exactly
    (not past it), T = 4 gives 1000. Oracle: that closed form and the strict comparison."""
    from stabilitycheck.phasemap import theory
    from stabilitycheck.space import Axis

    base = Config.of("rnn", activation="linear", init_scale=10.0, seq_len=2)
    pm = _map(
        base,
        Axis("seq_len", (1, 2, 3, 4, 5)),
        Axis("init_scale", (2.0, 10.0)),
        Limits(growth=100.0),
        loss="last",
    )
    want = tuple(
        next((i for i, t in enumerate((1, 2, 3, 4, 5)) if s ** (t - 1) > 100.0), None) for s in (2.0, 10.0)
    )
    assert want == (None, 3)
    assert theory(pm) == want


def test_a_maps_probes_are_every_seed_its_points_spent() -> None:
    """PhaseMap.probes: the seeds probed in all, the sum over its points of the seeds each verdict
    spent (fired or not). Oracle: that sum by hand."""
    from stabilitycheck.phasemap import Point
    from stabilitycheck.space import Axis
    from stabilitycheck.spread import Spread

    s = Spread(1.0, 1.0, 1.0)
    points = (Point(0, 0, False, False, (), s, 3, 0), Point(1, 0, True, False, ("growth",), s, 5, 2))
    pm = _map(Config.of("mlp"), Axis("depth", (1, 2)), Axis("init_scale", (1.0,)), Limits(), points)
    assert pm.probes == 3 + 5 and pm.verdicts == 2
    assert pm.to_dict()["probes"] == 8


# ---------------------------------------------------------------- watchstate.py


def _loss_fn(model: torch.nn.Module, batch: object) -> torch.Tensor:  # importable: a bundle pickles it
    return model(batch).sum()


def _two_calls(tmp_path: object) -> tuple[object, torch.nn.Module, list[torch.Tensor], list[torch.Tensor]]:
    """A Snapshot that saw two model calls, torch drawing random numbers before each (dropout, a
    mask): the CPU RNG state at each call, read by torch itself, and each call's output."""
    from pathlib import Path

    from stabilitycheck.watchstate import Snapshot

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 3)
    snap = Snapshot(model, _loss_fn, Path(str(tmp_path)) / "bundle")
    states, outputs = [], []
    for mode in (True, False):  # the first call in training mode, the second in eval
        model.train(mode)
        torch.rand(5)  # a draw between the calls: each call starts from its own state
        states.append(torch.get_rng_state())
        snap.on_call()
        out = model(torch.ones(2, 3))
        snap.on_output(out)
        outputs.append(out)
    return snap, model, states, outputs


def test_the_replay_state_is_the_first_model_call_the_loss_is_computed_from(tmp_path: object) -> None:
    """Snapshot._made_by: the RNG state, modes and autocast dtype of the FIRST model call the loss is
    computed from (a loss over two calls replays from the first: starting at the second's state
    draws other dropout masks). Oracle: torch.get_rng_state() read at each call, and the modes set."""
    snap, _, states, outputs = _two_calls(tmp_path)
    rng, modes, amp = snap._made_by(outputs[0].sum() + outputs[1].sum())  # type: ignore[attr-defined]
    assert torch.equal(rng["cpu"], states[0]) and not torch.equal(rng["cpu"], states[1])
    assert modes == [True] and amp is None  # the Linear's mode at the first call
    rng, modes, _ = snap._made_by(outputs[1].sum())  # type: ignore[attr-defined]
    assert torch.equal(rng["cpu"], states[1]) and modes == [False]


def test_a_loss_with_no_graph_replays_from_the_first_calls_state_and_the_last_calls_modes(
    tmp_path: object,
) -> None:
    """Snapshot._made_by without a graph to follow (a loss passed detached or as a number): the first
    call's RNG state and the last call's modes (docstring). Oracle: torch.get_rng_state() at each call."""
    snap, _, states, outputs = _two_calls(tmp_path)
    rng, modes, _ = snap._made_by(float(outputs[1].detach().sum()))  # type: ignore[attr-defined]
    assert torch.equal(rng["cpu"], states[0]) and not torch.equal(rng["cpu"], states[1])
    assert modes == [False]


# ---------------------------------------------------------------- invariants_clip.py


def test_clipping_whose_right_answer_underflows_to_zero_passes() -> None:
    """assert_clipped_norm_bounded: all-zero gradients after clipping fail only where the clipped
    entries would be representable (at least the dtype's subnormal spacing); at max_norm 1e-8 in
    float16 the right answer (entries 1e-8 / 2 x 1 = 5e-9) is below float16's smallest subnormal
    (6e-8) and rounds to 0. Oracle: torch.nn.utils.clip_grad_norm_ is the correct clipper, and the
    exact product 5e-9 rounds to 0 in float16 (torch's own conversion)."""
    from stabilitycheck.invariants import assert_clipped_norm_bounded

    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float16))
    p.grad = torch.ones(4, dtype=torch.float16)
    before = [p.grad.clone()]
    torch.nn.utils.clip_grad_norm_([p], 1e-8)
    assert torch.tensor(1e-8 / 2, dtype=torch.float64).to(torch.float16).item() == 0.0
    assert not bool(p.grad.any())
    assert_clipped_norm_bounded([p], 1e-8, before=before)


# ---------------------------------------------------------------- invariants_training.py


def test_a_scaler_checking_every_other_entry_is_caught_whatever_the_tensor_sizes() -> None:
    """assert_gradscaler_guards poisons an ODD entry in a tensor's middle, so a scaler sampling every
    other entry (the even ones) steps on it. Here every gradient (16, 4, 20, 5 entries) has numel // 2
    even, and the end entries poisoned (the first of each, the last of the last: index 4) are even
    too: only the odd middle entry tells this scaler apart. Oracle: the broken scaler is faulty by
    construction (tests/broken.EvenEntriesScaler) and must be caught; torch's GradScaler passes."""
    import broken

    from stabilitycheck.errors import StabilityError
    from stabilitycheck.invariants import assert_gradscaler_guards

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 5))
    assert [p.numel() for p in model.parameters()] == [16, 4, 20, 5]
    x, y = torch.randn(8, 4), torch.randn(8, 5)

    def loss_fn(out: torch.Tensor, inputs: object) -> torch.Tensor:
        return ((out - y) ** 2).mean()

    assert_gradscaler_guards(model, x, loss_fn)  # torch's own GradScaler passes
    with pytest.raises(StabilityError, match="EvenEntriesScaler stepped on a gradient holding"):
        assert_gradscaler_guards(model, x, loss_fn, broken.EvenEntriesScaler())  # type: ignore[arg-type]


# ---------------------------------------------------------------- updates.py


@pytest.mark.parametrize(("bad", "overflowed"), [(False, False), (True, False), (True, True)])
def test_an_update_the_gradscaler_skips_is_counted_as_skipped(bad: bool, overflowed: bool) -> None:
    """updates.update returns 1 for an update a GradScaler skipped, 0 for one it took: what
    Measurement.skipped_steps adds up. Skipped: a non-finite total, or scaled gradients that
    `overflowed` while the unscaled total the caller measured is finite (docstring). Oracle: torch's
    GradScaler's own record (it backs its scale off exactly on a skipped step), weights unchanged."""
    from stabilitycheck.updates import Training, update

    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    direction = torch.tensor([1.0, math.inf if bad else 2.0, 0.0])
    scaler.scale((p * direction).sum()).backward()
    assert p.grad is not None
    total = 1.0 if overflowed else float(torch.linalg.vector_norm(p.grad / scaler.get_scale()))
    before, weights = scaler.get_scale(), p.detach().clone()
    settings = Training(1, 0, 0, 0.1, "sgd", "none", 1.0)
    skipped = update(opt, scaler, [p], 0, total, settings, overflowed=overflowed)
    backed_off = scaler.get_scale() < before
    assert skipped == int(backed_off) == int(bad)
    assert torch.equal(p.detach(), weights) == bad


def test_a_clip_of_zero_is_refused() -> None:
    """probe_module's clip must be None or a finite number > 0 (training_settings' contract and its
    message): a clip of 0 would zero every update. Oracle: that documented contract."""
    from stabilitycheck.errors import UsageError
    from stabilitycheck.updates import Training, training_settings

    assert training_settings(1, 0, 0, 0.1, "sgd", "none", 0.5) == Training(1, 0, 0, 0.1, "sgd", "none", 0.5)
    for bad in (0, 0.0, -1.0, math.inf, math.nan):
        with pytest.raises(UsageError, match="clip must be None or a finite number > 0"):
            training_settings(1, 0, 0, 0.1, "sgd", "none", bad)


def test_a_micro_batch_replays_from_its_own_calls_not_an_earlier_micro_batchs(tmp_path: object) -> None:
    """Snapshot: the calls it pairs a loss with are those since the last micro-batch (on_batch starts
    afresh): a second micro-batch whose loss has no graph to follow replays from ITS first call's
    RNG state, not the first micro-batch's. Oracle: torch.get_rng_state() read at each call."""
    from pathlib import Path

    from stabilitycheck.watchstate import Snapshot

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 3)
    snap = Snapshot(model, _loss_fn, Path(str(tmp_path)) / "bundle")
    states = []
    for micro in range(2):
        torch.rand(5)
        states.append(torch.get_rng_state())
        snap.on_call()
        out = model(torch.ones(2, 3))
        snap.on_output(out)
        loss = out.sum()
        snap.on_batch(0, None, loss.detach(), None, loss if micro == 0 else None)
    (_, _, first, _, _, _), (_, _, second, _, _, _) = snap.batches[0]
    assert torch.equal(first["cpu"], states[0]) and torch.equal(second["cpu"], states[1])


# ---------------------------------------------------------------- watching.py


def _watched_rows(tmp_path: object, **options: object) -> list[dict[str, object]]:
    from pathlib import Path

    from stabilitycheck import watch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    Path(str(tmp_path)).mkdir(parents=True, exist_ok=True)
    log = Path(str(tmp_path)) / "w.jsonl"
    with watch(model, opt, log=log, flush_every=4, report=None, **options) as w:  # type: ignore[arg-type]
        for _ in range(6):
            opt.zero_grad()
            loss = _loss_fn(model, torch.randn(8, 4))
            w.loss(loss)
            loss.backward()
            opt.step()
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_with_a_replay_bundle_the_weight_norms_are_measured_every_step(tmp_path: object) -> None:
    """watch's weights_every defaults to once per flush, and to every step with a bundle (README:
    'default: once per flush; every step with a bundle'): a replay re-runs any step, so each step's
    weights are kept. Oracle: that documented default, read off the log (null: not measured)."""
    from pathlib import Path

    plain = _watched_rows(Path(str(tmp_path)) / "a")
    assert [r["weight"] is not None for r in plain] == [True, False, False, False, True, False]
    bundled = _watched_rows(
        Path(str(tmp_path)) / "b", bundle=Path(str(tmp_path)) / "bundle", compute_loss=_loss_fn
    )
    assert all(r["weight"] is not None for r in bundled)


# ---------------------------------------------------------------- searching.py


def _prober_with(judged: dict[tuple[int, int], bool], screened: dict[tuple[int, int], bool] | None = None):  # type: ignore[no-untyped-def]
    """A Prober over depth 1..4 x init_scale (1, 2, 3) of the closed-form subject whose points were
    judged as given (True: failed), on the full rule (`judged`) or on the screen's seed alone."""
    import dataclasses

    from closed_form import ScaledIdentity

    from stabilitycheck.searching import Prober
    from stabilitycheck.seeds import assess
    from stabilitycheck.space import Axis, Space
    from stabilitycheck.verdicts import Criterion, Verdict

    subject = ScaledIdentity()
    space = Space(
        "cf",
        subject.config().with_run(seeds=1),
        (Axis.range("depth", 1, 4), Axis("init_scale", (1.0, 2.0, 3.0))),
    )
    prober = Prober(space, subject, Limits(), lambda _: None, None)  # type: ignore[arg-type]
    base = assess(space.config((0, 0)), subject, Limits())  # type: ignore[arg-type]
    fired = Verdict(True, (Criterion("growth", 1e3, 1e2),))
    stable = Verdict(False, ())

    def judgement(failed: bool, seed: int):  # type: ignore[no-untyped-def]
        return dataclasses.replace(
            base, verdict=fired if failed else stable, seeds=(seed,), exploded_seeds=int(failed)
        )

    prober.seen = {i: judgement(f, 0) for i, f in judged.items()}
    prober.first = {(i, 7): judgement(f, 7) for i, f in (screened or {}).items()}
    return prober, space


def test_a_lower_neighbour_skipped_on_the_screens_seed_is_said_unjudged() -> None:
    """_unjudged: the one-step-lower neighbours of the counterexample that were skipped, on the full
    rule or on the screen's seed alone (Prober.judged: both); the descent took them as not
    exploding, unverified. Oracle: that docstring, with one skip of each kind."""
    from stabilitycheck.searching import _unjudged

    prober, space = _prober_with({(2, 2): True, (1, 1): False})
    prober.first[((2, 1), 7)] = "too large (9 MiB estimated, 1 MiB allowed)"
    prober.seen[(1, 2)] = "the model raised ValueError: no"
    got = dict(_unjudged(prober, (2, 2)))
    assert got == {
        space.config((2, 1)): "too large (9 MiB estimated, 1 MiB allowed)",
        space.config((1, 2)): "the model raised ValueError: no",
    }


def test_a_skip_on_a_seed_outside_the_full_rule_does_not_skip_the_full_rule() -> None:
    """Prober.__call__ reuses a screen's skip only where the screen ran the full rule's FIRST seed
    (the base seed, where the full rule starts): a point skipped on a steered screen seed the full
    rule never runs is judged by the full rule (Prober: a point is skipped where it cannot be
    judged). Oracle: the closed-form subject runs at every seed, so the full rule judges it."""
    from stabilitycheck.seeds import Judgement

    prober, space = _prober_with({})
    prober.space = space = type(space)(space.label, space.base.with_run(seeds=2), space.axes)
    prober.screen_seed = 7
    prober.first[((1, 1), 7)] = "the model raised ValueError: seed 7 alone"
    got = prober((1, 1))
    assert isinstance(got, Judgement) and got.seeds[0] == 0  # judged, from the base seed on
    prober.first[((2, 1), 0)] = "the model raised ValueError: seed 0"  # the full rule's first seed
    assert prober((2, 1)) == "the model raised ValueError: seed 0"


def _brute_below(judged: dict[tuple[int, int], bool], at: tuple[int, int]) -> tuple[int, int] | None:
    below = [
        i for i, f in judged.items() if f and i != at and all(a <= b for a, b in zip(i, at, strict=True))
    ]
    return min(below, key=lambda i: (sum(i), i)) if below else None


def test_the_failure_below_is_the_smallest_judged_point_at_or_below_in_every_knob() -> None:
    """SearchResult.below (_failing_below): the smallest point (knob sum, then lexicographic) judged
    at or below the counterexample IN EVERY KNOB, not itself, that failed. A failing point lower in
    one knob but higher in another is not below it. Oracle: brute force over the judged points."""
    from stabilitycheck.searching import _failing_below

    at = (3, 1)
    judged = {at: True, (0, 2): True, (2, 1): True, (1, 0): False, (3, 0): True, (0, 0): False}
    prober, space = _prober_with(judged)
    want = _brute_below(judged, at)
    assert want == (2, 1)  # (0, 2) has the smaller sum but a higher init_scale
    got = _failing_below(prober, at)
    assert got is not None and got[0] == space.config(want) and got[2] is None  # judged on the full rule
    judged[(1, 0)] = True  # now two lower failures: the smallest
    prober, space = _prober_with(judged)
    got = _failing_below(prober, at)
    assert got is not None and got[0] == space.config(_brute_below(judged, at)) == space.config((1, 0))


def test_a_failure_below_seen_on_the_screens_seed_alone_says_that_seed() -> None:
    """The third field of `below`: the seed a point failed on alone where the screen judged it (one
    seed, steering only), None where the full rule did (docstring of SearchResult.below)."""
    from stabilitycheck.searching import _failing_below

    prober, space = _prober_with({(3, 2): True}, screened={(1, 1): True})
    got = _failing_below(prober, (3, 2))
    assert got is not None and got[0] == space.config((1, 1)) and got[2] == 7
    prober, space = _prober_with({(3, 2): True, (1, 1): True})
    got = _failing_below(prober, (3, 2))
    assert got is not None and got[0] == space.config((1, 1)) and got[2] is None


def test_a_bundle_of_a_step_between_weight_measurements_keeps_the_last_measured_weight_norms(
    tmp_path: object,
) -> None:
    """With weights_every=2, the weight norms of an unmeasured step are the last measured ones,
    standing in (watching: 'the last measured weight norms stand in for this step's in its row'), as
    the host rule's rows do: a replay bundle written for such a step keeps them, not zeros. Oracle:
    torch.linalg.vector_norm of each block's weights at the last measured step (before its update)."""
    from pathlib import Path

    from stabilitycheck import watch
    from stabilitycheck.spikes import SpikeRule

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    blocks = [("a", model[0]), ("b", model[2])]
    bundle = Path(str(tmp_path)) / "bundle"
    norms = []
    with watch(
        model,
        opt,
        blocks=blocks,
        bundle=bundle,
        compute_loss=_loss_fn,
        weights_every=2,
        rule=SpikeRule(window=8, warmup=2),
        report=None,
    ) as w:
        for step in range(5):
            opt.zero_grad()
            with torch.no_grad():
                norms.append(
                    [
                        float(torch.linalg.vector_norm(torch.cat([p.flatten() for p in m.parameters()])))
                        for _, m in blocks
                    ]
                )
            loss = _loss_fn(model, torch.ones(8, 4)) * (1e6 if step == 3 else 1.0)  # step 3: a spike
            w.loss(loss)
            loss.backward()
            opt.step()
    meta = json.loads((bundle / "meta.json").read_text())
    assert meta["step"] == 3  # flagged first at step 3, whose weights were not measured (3 % 2)
    from stabilitycheck.distributed import Layout

    weight = Layout(len(blocks)).parts()["weight"]
    got = meta["values"][weight]
    assert got[:2] == pytest.approx(norms[2], rel=1e-6)  # step 2's: the last measured before step 3


# ---------------------------------------------------------------- alarms.py


def _frames(*modules: str) -> object:
    """A chain of stand-in frames, innermost first, each running code of `modules[i]` (what
    in_own_code reads of a frame: f_globals['__name__'] and f_back)."""
    from types import SimpleNamespace

    back = None
    for name in reversed(modules):
        back = SimpleNamespace(f_globals={"__name__": name}, f_back=back)
    return back


@pytest.mark.parametrize(
    ("chain", "own"),
    [
        (("stabilitycheck.watching",), True),
        (("torch.nn.modules.module", "stabilitycheck.capture"), True),  # a torch hook our code set
        (("contextlib", "functools", "stabilitycheck.watching"), True),
        (("torch.autograd.graph", "torch.nn.modules.module", "stabilitycheck.watching"), True),
        (("torch.nn.modules.module", "train"), False),  # torch called by the user's loop
        (("train", "stabilitycheck.watching"), False),  # the user's code, whoever called it
        (("torch.optim.sgd",), False),
    ],
)
def test_own_code_is_this_package_or_torch_and_contextlib_it_called(
    chain: tuple[str, ...], own: bool
) -> None:
    """alarms.in_own_code: this package's code, or code of torch (or contextlib, functools) this
    package's code called, as a hook or a helper; anything else, the user's. Oracle: that docstring,
    on stand-in frame chains (innermost first)."""
    from stabilitycheck.alarms import in_own_code

    assert in_own_code(_frames(*chain)) is own


def test_signals_held_in_a_block_are_raised_again_after_it_sigterm_first() -> None:
    """alarms.signals_held: SIGINT and SIGTERM arriving in the block are held and raised again as it
    ends, under the handlers in place before it, SIGTERM first (a KeyboardInterrupt raised first would
    leave the SIGTERM behind it unsent). Oracle: that docstring, with recording handlers of our own."""
    import signal

    from stabilitycheck.alarms import signals_held

    got: list[int] = []
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for s in previous:
            signal.signal(s, lambda signum, frame: got.append(signum))
        with signals_held():
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGINT)
            assert got == []  # held while the block runs
        assert got == [signal.SIGTERM, signal.SIGINT]  # each once, SIGTERM first
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def test_a_sigterm_after_the_watcher_let_go_or_a_second_one_ends_the_process_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Termination: a SIGTERM that reaches its handler after close (closed from another thread, the
    handler still in place) does what the default handler does, end the process, as a second SIGTERM
    does; only the first one while open unwinds the run (Terminated). Oracle: Termination's docstring
    ('a second one ends it at once') and the handler's comment (one after close: the default's); the
    process ending is observed through a stand-in for alarms._die, which would send the real SIGTERM."""
    from stabilitycheck import alarms

    class Died(Exception):
        pass

    def die() -> None:
        raise Died

    monkeypatch.setattr(alarms, "_die", die)
    closed = alarms.Termination()  # installed False: never opened, or closed
    with pytest.raises(Died):
        closed._on_term(15, None)
    open_ = alarms.Termination()
    open_.installed = True  # as open() leaves it (without touching the real handler here)
    with pytest.raises(alarms.Terminated):
        open_._on_term(15, None)  # the first, in the user's code (no frame of ours): unwinds the run
    with pytest.raises(Died):
        open_._on_term(15, None)  # a second one
