"""Round-9 mutation-testing additions (readings, the growth kind, the vanishing criterion, the
probe's loops, cuts, junctions and carried state). Each test's oracle is the documented rule spelt
out by hand on numbers chosen for it, the model's construction, or torch's own gradients (never a
number the code printed). Fast and deterministic."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import pytest
import torch

from stabilitycheck.growthkind import FIT_R2, classify, fit_growth, kind_of, swing
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


# ---------------------------------------------------------------- the probe's internals


def test_a_module_looped_twice_and_modules_named_alike_are_found() -> None:
    """loops._looped by construction: a cell called exactly twice on its own output is looped (two
    calls are the least that make a loop); modules `f` and `ff` both looped are both found (`ff` is
    no submodule of `f`, whose name it starts with)."""
    from torch import nn

    from stabilitycheck.loops import _looped

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cell = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for _ in range(2):
                x = torch.tanh(self.cell(x))
            return x

    class Alike(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.f, self.ff = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in (self.f, self.ff):
                for _ in range(3):
                    x = torch.tanh(layer(x))
            return x

    x = torch.randn(2, 4)
    assert _looped(Two(), (x,)) == ["cell"]
    assert _looped(Alike(), (x,)) == ["f", "ff"]


def test_the_cut_check_reads_lists_and_a_slice_is_no_cut() -> None:
    """recording._cut by hand: a state passed as a list, [h.detach(), c], is cut as a tuple is; a
    detached slice of h at its start (the same data pointer, another shape) beside a live view of h
    is no cut: the gradient reaches h through the view."""
    from stabilitycheck.recording import _cut

    x = torch.randn(2, 3)
    h = torch.randn(2, 3, requires_grad=True) * 1.0
    assert _cut((x, [h.detach(), x]), {}, h)
    assert not _cut((h.detach()[:, :2], h.view(2, 3)), {}, h)


def _grads_of(model: torch.nn.Module, blocks: list[tuple[str, torch.nn.Module]], run: Any) -> list[float]:
    """Torch's ||dL/d out|| of each block call, in call order: the oracle (retain_grad on each output)."""
    outs: list[torch.Tensor] = []

    def keep(_: Any, __: Any, out: Any) -> None:
        first = out[0] if isinstance(out, tuple) else out
        first.retain_grad()
        outs.append(first)

    handles = [m.register_forward_hook(keep) for _, m in blocks]
    try:
        run().backward()
    finally:
        for handle in handles:
            handle.remove()
    return [float(o.grad.norm()) if o.grad is not None else 0.0 for o in outs]


def test_a_head_on_two_towers_one_of_one_cell_call_is_a_merge() -> None:
    """Tower A is an RNN cell called once (block 0, whose input is no `(input)` entry), tower B two
    Linear layers, a head on both: the head's call starts a chain that takes both towers (by
    construction), and tower B's growth is torch's |dL/d b0| / |dL/d b1|."""
    from torch import nn

    from stabilitycheck.probing import probe_module

    class Towers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.RNNCell(4, 4)
            self.b = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
            self.head = nn.Linear(8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.cat([self.a(x), self.b(x)], -1))

    torch.manual_seed(0)
    x, model = torch.randn(2, 4), Towers()
    blocks = [("a", model.a), ("b.0", model.b[0]), ("b.1", model.b[1]), ("head", model.head)]
    m = probe_module(model, (x,), lambda out, _: out.pow(2).sum(), blocks=blocks)
    assert m.chain_starts == (1, 3) and m.chain_feeds[-1] == (0, 1)
    g = _grads_of(model, blocks, lambda: model(x).pow(2).sum())
    assert m.chain_growths[1] == pytest.approx(g[1] / g[2], rel=1e-6)


def test_an_lstm_cell_called_once_is_read_on_h() -> None:
    """An nn.LSTMCell called once (a one-token step between two layers): no next call takes its c, so
    its state is h alone: its norms are torch's ||h|| and ||dL/dh||."""
    from torch import nn

    from stabilitycheck.probing import probe_module

    class Once(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.cell, self.out = nn.Linear(4, 4), nn.LSTMCell(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h, _ = self.cell(torch.tanh(self.inp(x)))
            return self.out(h)  # type: ignore[no-any-return]

    torch.manual_seed(0)
    x, model = torch.randn(2, 4), Once()
    blocks = [("inp", model.inp), ("cell", model.cell), ("out", model.out)]
    m = probe_module(model, (x,), lambda out, _: out.pow(2).sum(), blocks=blocks)
    h, _ = model.cell(torch.tanh(model.inp(x)))
    at = m.activation_names.index("cell")
    assert m.activation_norms[at] == pytest.approx(float(h.detach().norm()), rel=1e-6)
    g = _grads_of(model, blocks, lambda: model(x).pow(2).sum())
    assert m.activation_grad_norms[at] == pytest.approx(g[1], rel=1e-6)


def test_a_loss_on_the_last_cell_state_reaches_the_last_call() -> None:
    """An nn.LSTMCell over 5 tokens, the loss on c_T alone (an encoder handing its state on): the last
    call's gradient comes through c alone, ||dL/dc_T|| = ||2 c_T||, and the call is reached (its gain
    is read, not NaN)."""
    from torch import nn

    from stabilitycheck.probing import probe_module

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cell = nn.LSTMCell(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = c = torch.zeros(2, 4)
            for t in range(x.shape[1]):
                h, c = self.cell(x[:, t], (h, c))
            return c

    torch.manual_seed(0)
    x, model = torch.randn(2, 5, 4), Encoder()
    m = probe_module(model, (x,), lambda out, _: out.pow(2).sum(), blocks=[("cell", model.cell)])
    c_last = model(x)
    assert m.activation_grad_norms[-1] == pytest.approx(float((2 * c_last).detach().norm()), rel=1e-6)
    assert not any(math.isnan(g) for g in m.gains) and math.isfinite(m.growth)


# ---------------------------------------------------------------- spread.py


def test_the_bracket_is_the_most_confident_of_the_narrowest_pairs() -> None:
    """spread.bracket against the rule spelt out: for each width w = 1, 2, ..., the pairs (i, i + w)
    of order statistics and their coverage, the sum over k from i to i + w - 1 of C(n, k) q^k
    (1 - q)^(n - k); the first width where one reaches 90%, and of its pairs the most confident
    (at q 0.25 or 0.9 the pairs of one width differ, and the least confident one also reaches it)."""
    from stabilitycheck.spread import WANT, bracket

    def coverage(n: int, q: float, i: int, j: int) -> float:
        return sum(math.comb(n, k) * q**k * (1 - q) ** (n - k) for k in range(i, j))

    for n in (12, 24, 30):
        for q in (0.25, 0.5, 0.9):
            got = bracket([float(v) for v in range(n)], q)
            assert got is not None
            for w in range(1, n):
                pairs = {(i, i + w): coverage(n, q, i, i + w) for i in range(1, n - w + 1)}
                best = max(pairs, key=lambda p: pairs[p])
                if pairs[best] >= WANT:
                    assert (got.i, got.j) == best, (n, q, got, best)
                    assert got.confidence == pytest.approx(pairs[best], rel=1e-12)
                    break


# ---------------------------------------------------------------- culprit.py


def _seed(gains: list[float], grads: tuple[float, ...] | None = None) -> Measurement:
    """One seed's Measurement of a stack with these gains (block i named b<i>)."""
    names = tuple(f"b{i}" for i in range(len(gains)))
    return Measurement(
        layer_names=names,
        activation_names=("(input)", *names),
        loss=(1.0,),
        grad_norm=(1.0,),
        layer_grad_norms=grads or (1.0,) * len(names),
        activation_norms=(1.0,) * (len(names) + 1),
        activation_grad_norms=(1.0,) * (len(names) + 1),
        gains=tuple(gains),
        growth=math.prod(g for g in gains if not math.isnan(g)),
        weight_norms=(),
        first_nonfinite=None,
        steps_run=0,
    )


SPIKE = [1.0, 1.0, 40.0, 1.0, 1.0, 1.0]


def test_a_spike_is_named_whatever_a_seed_of_no_gains_or_a_junction_or_an_infinite_gain() -> None:
    """Block b2 gains x40 among gain-1 blocks in every seed: it is the culprit (its gain the largest in
    every seed). So it stays beside a seed no gradient reached (every gain NaN: the seeds vote on their
    largest amplifying block), a seed with a junction first (NaN, below every number, never the
    largest) and a seed with an infinite gain elsewhere (x / 0: no number, left out as NaN is)."""
    from stabilitycheck.culprit import culprit_of

    spike = _seed(SPIKE)
    assert culprit_of([spike, spike, _seed([NAN] * 6)]) == "b2"
    junction = _seed([NAN, *SPIKE[1:]])
    assert culprit_of([junction] * 3) == "b2"
    infinite = _seed([1.0, INF, 40.0, 1.0, 1.0, 1.0])
    assert culprit_of([spike, spike, spike, infinite]) == "b2"


def test_the_largest_weight_gradient_leaves_a_nan_one_out() -> None:
    """A stack with no amplifying block (every gain 0.9, growth above 1 given) falls to the block with
    the largest weight gradient; a NaN one (the first) is no number and not the largest."""
    from stabilitycheck.culprit import _single

    assert _single(_seed([0.9, 0.9, 0.9], grads=(NAN, 5.0, 1.0))) == "b1"


def test_a_spread_of_nan_values_only_names_no_count() -> None:
    """Spread.describe by hand: the NaN count is said beside the range of the other seeds; where every
    seed is NaN there is no range of others to say it beside."""
    assert Spread(NAN, NAN, NAN, 3).describe() == "nan (nan-nan)"
    assert Spread(0.329, NAN, 0.329, 2).describe() == "nan (0.329-0.329, 2 NaN)"


# ---------------------------------------------------------------- verdicts.py and seeds.py, more


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

    m = _seed([1.0, 1.0, 1.0])
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


def test_a_recurrent_judgement_reads_growth_kind_and_culprit_on_its_through_time_probes() -> None:
    """seeds._judgement by hand: per-token growths 1.2^30 = 237 on three seeds, through-time profiles
    of gain 0.9 per step on three seeds (growths 2, 3 and 1e6 set apart): the growth is the
    through-time median, 3, the per-token one kept beside it (237), and the kind is the through-time
    profile's, x0.9 per step, not the per-token x1.2."""
    from stabilitycheck.seeds import _judgement
    from stabilitycheck.verdicts import Limits, values

    ms = [_seed([1.2] * 30) for _ in range(3)]
    through = [replace(_seed([0.9] * 30), growth=g) for g in (2.0, 3.0, 1e6)]
    per_seed = [
        {**values(m), "growth": t.growth, "vanishing": t.growth} for m, t in zip(ms, through, strict=True)
    ]
    judged = _judgement(ms, per_seed, through, (0, 1, 2), Limits(), 0.5, 3)
    assert judged.growth.mid == 3.0 and judged.per_token is not None
    assert judged.per_token.mid == pytest.approx(1.2**30, rel=1e-9)
    assert judged.kind.kind == "exponential" and math.exp(judged.kind.rate.mid) == pytest.approx(
        0.9, rel=1e-9
    )
    assert judged.measurement is through[1] and judged.measured_seed == 1


def test_a_probe_is_reused_whatever_the_seeds_budget_or_quantile() -> None:
    """SeedProbes by hand: a probe reads neither the seeds budget nor the quantile, so the same point
    and seed asked for under another budget or quantile is the probe already run (made once)."""
    from stabilitycheck.config import Config
    from stabilitycheck.seeds import SeedProbes

    probes = SeedProbes()
    config = Config.of("mlp", depth=2, width=8, batch_size=4)
    first = probes(config, None)
    again = probes(config.with_run(seeds=1, quantile=0.9), None)
    assert probes.made == 1 and again is first


def test_a_recurrent_subjects_vanishing_reads_the_last_step_even_without_the_through_time_line() -> None:
    """assess by hand: an RNN with a vanishing limit judges vanishing on the loss on the last step (the
    through-time growth, probed here by the test) also where the report's through-time line is not
    asked for (a search's points): a per-token loss hides the vanishing under later tokens' gradients."""
    from stabilitycheck.config import Config
    from stabilitycheck.configprobe import probe
    from stabilitycheck.seeds import assess
    from stabilitycheck.verdicts import Limits

    config = Config.of("rnn", seq_len=6, width=8, batch_size=4, seeds=1)
    judged = assess(config, limits=Limits(vanishing=100.0))
    last = probe(config.with_run(seed=judged.seeds[0]), last_step=True)
    assert judged.values[0]["vanishing"] == last.growth == judged.growth.mid
    assert judged.per_token is not None and judged.per_token.mid != last.growth


def test_the_judgement_reads_every_quantile_at_q_and_sums_skipped_steps() -> None:
    """seeds._judgement by hand at q = 0.9 over three seeds (nearest rank: the 3rd smallest): growths
    50, 150 and 300 fire growth at 300, not at the median's 150; the through-time spread's quantile is
    the largest of 2, 3 and 4; the steps a GradScaler skipped are every seed's, 1 + 2 + 3. The rate a
    kind shows is the q-quantile of the seeds' fits too (classify: rates 0.1, 0.2, 0.3 read 0.3)."""
    from stabilitycheck.seeds import _judgement
    from stabilitycheck.verdicts import Limits, values

    ms = [
        replace(_seed([1.0] * 4), growth=g, skipped_steps=k) for g, k in ((50.0, 1), (150.0, 2), (300.0, 3))
    ]
    judged = _judgement(ms, [values(m) for m in ms], [], (0, 1, 2), Limits(), 0.9, 3)
    (fired,) = [c for c in judged.verdict.criteria if c.name == "growth"]
    assert fired.value == 300.0 and judged.growth.mid == 300.0 and judged.per_token is None
    assert judged.skipped_steps == 6
    through = [replace(_seed([1.0] * 4), growth=g) for g in (2.0, 3.0, 4.0)]  # the growths judged, ms beside
    beside = _judgement(through, [values(m) for m in through], ms, (0, 1, 2), Limits(), 0.9, 3)
    assert beside.per_token is not None and beside.per_token.mid == 4.0 and beside.growth.mid == 300.0
    fits = [_fit(r, 1.0, 0.0, 0.0) for r in (0.1, 0.2, 0.3)]
    assert classify(fits, [1e3] * 3, 0.9).rate.mid == 0.3


def test_a_growth_of_zero_is_far_from_every_limit() -> None:
    """seeds._far by hand: a growth of exactly 0 (no gradient came back) is infinitely far from a
    limit in ratio, so one seed may decide on it (a ratio b / 0 raised)."""
    from stabilitycheck.seeds import _far
    from stabilitycheck.verdicts import Limits

    assert _far("growth", 0.0, Limits(), 1000.0)


def test_a_recurrent_judgement_names_a_non_finite_value_its_own_loss_met() -> None:
    """seeds._judgement by hand: the per-token probes went non-finite in block b1 (seed 1), the
    last-step ones stayed finite: the verdict's nonfinite is the model's own loss's, so the culprit
    and the measurement shown are its probes' (seed 1's, as its growth is the median; the culprit read
    on its finite ones, one seed of three a minority: their gains of 2, not the through-time 0.9),
    while the growth stays the through-time one."""
    from stabilitycheck.measurement import NonFinite
    from stabilitycheck.seeds import _judgement
    from stabilitycheck.verdicts import Limits, values

    bad = NonFinite(0, "b1", "activation", math.inf)
    ms = [replace(_seed([2.0] * 4), first_nonfinite=bad if i == 1 else None) for i in range(3)]
    through = [replace(_seed([0.9] * 4), growth=g) for g in (2.0, 3.0, 4.0)]
    per_seed = [
        {**values(m), "growth": t.growth, "vanishing": t.growth} for m, t in zip(ms, through, strict=True)
    ]
    judged = _judgement(ms, per_seed, through, (0, 1, 2), Limits(), 0.5, 3)
    assert judged.culprit == "uniform, median gain x2" and judged.measurement is ms[1]
    assert judged.growth.mid == 3.0
