"""Round-5 mutation-testing additions: each test's oracle is theory, brute force or torch's own float64
functions (never a number the code printed). Fast and deterministic."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from stabilitycheck import Config, meanfield, norms
from stabilitycheck import invariants_common as ic
from stabilitycheck import seeds as seeds_mod
from stabilitycheck.configprobe import probe
from stabilitycheck.errors import StabilityError
from stabilitycheck.measurement import INPUT, Measurement, NonFinite, ratio
from stabilitycheck.probing import probe_module
from stabilitycheck.readings import Step, chains_of, gains_of, growth_of, locate, paths_of, unscored
from stabilitycheck.spread import Spread, quantile
from stabilitycheck.tokens import token_ids
from stabilitycheck.verdicts import CRITERIA, Limits, fires


def _hypot(t: torch.Tensor) -> float:
    """Brute-force exact L2 norm: Python's math.hypot scales internally, correct for any finite values."""
    return math.hypot(*t.double().flatten().tolist())


# ---------------------------------------------------------------- norms


@pytest.mark.parametrize("how", ["fused", "norm", "values"])
def test_float32_values_whose_squares_overflow_have_a_finite_exact_norm(how: str) -> None:
    t = torch.full((10,), 1e20)  # finite in float32 (max 3.4e38); its float32 squares overflow
    want = torch.linalg.vector_norm(t.double()).item()
    if how == "fused":
        got = norms.fused_norms([t], exact=False)[0].item()
    elif how == "norm":
        got = norms.norm(t).item()
    else:
        got = norms.norm_values([t], exact=False)[0]
    assert got == pytest.approx(want, rel=1e-12, abs=0)


@pytest.mark.parametrize("n", [1000, 65536, 65537, 1 << 22])
@pytest.mark.parametrize("fill", ["1/3", "0.1", "randn"])
def test_a_float32_norm_is_within_the_documented_5e_5_of_float64(n: int, fill: str) -> None:
    """The README's and norms.py's bound, against torch's float64 norm: one value repeated is the worst
    case of float32 sums (its equal squares round alike: 4.6e-5 measured, where 3e-8 was claimed),
    random data ~1e-7; the same from every entry point."""
    t = (
        torch.randn(n, generator=torch.Generator().manual_seed(0))
        if fill == "randn"
        else torch.full((n,), 1 / 3 if fill == "1/3" else 0.1)
    )
    want = float(torch.linalg.vector_norm(t.double()))
    bound = 5e-5 if fill != "randn" else 1e-6
    assert float(norms.norm(t)) == pytest.approx(want, rel=bound, abs=0)
    assert float(norms.fused_norms([t], exact=False)[0]) == pytest.approx(want, rel=bound, abs=0)
    assert norms.norm_values([t], exact=False)[0] == pytest.approx(want, rel=bound, abs=0)


@pytest.mark.parametrize("value", [1e200, 1e-200])
def test_float64_values_whose_squares_leave_float64_have_their_exact_norm(value: float) -> None:
    d = torch.full((7,), value, dtype=torch.float64)
    d[3] = 2 * value
    got = norms.norm_values([torch.ones(3), d], exact=False)
    assert got[0] == pytest.approx(math.sqrt(3), rel=1e-7, abs=0)
    assert got[1] == pytest.approx(_hypot(d), rel=1e-12, abs=0)


def test_a_zero_float64_tensor_beside_a_tiny_one_has_norm_zero() -> None:
    tiny = torch.full((4,), 1e-200, dtype=torch.float64)
    got = norms.norm_values([torch.zeros(5, dtype=torch.float64), tiny], exact=False)
    assert got[0] == 0.0
    assert got[1] == pytest.approx(_hypot(tiny), rel=1e-12, abs=0)


def test_subnormal_float32_squares_beside_a_normal_tensor_are_refined() -> None:
    # 1.1e-21 squared is 1.2e-42, subnormal in float32 (spacing 1.4e-45): a float32 sum is off ~2e-4;
    # the norm 1.1e-18 lies between LOW and LOW * sqrt(numel), so only the per-numel bound catches it
    small = torch.full((10**6,), 1.1e-21)
    big = torch.ones(10)
    for tensors in ([small], [big, small]):
        got = norms.norm_values(tensors, exact=False)[-1]
        want = torch.linalg.vector_norm(small, dtype=torch.float64).item()
        assert got == pytest.approx(want, rel=1e-9, abs=0)


def test_a_large_cpu_tensor_is_normed_over_every_element_including_the_tail() -> None:
    n = norms.CHUNK * 2 + 10
    t = torch.ones(n)
    t[norms.CHUNK * 2] = 1000.0  # the first element past the whole pieces
    want = math.sqrt(n - 1 + 1000.0**2)
    assert norms.norm(t).item() == pytest.approx(want, rel=1e-6, abs=0)
    assert norms.fused_norms([torch.ones(3), t], exact=False)[1].item() == pytest.approx(
        want, rel=1e-6, abs=0
    )


def test_a_large_float32_tensor_among_small_ones_is_summed_accurately() -> None:
    g = torch.Generator().manual_seed(0)
    big = torch.rand(1 << 23, generator=g) + 0.5
    small = torch.ones(3)
    want = torch.linalg.vector_norm(big, dtype=torch.float64).item()
    got = norms.accumulated([small, big], exact=False)
    assert got[1].item() == pytest.approx(want, rel=3e-7, abs=0)
    assert norms.norm_values([small, big], exact=False)[1] == pytest.approx(want, rel=3e-7, abs=0)


def test_mixed_dtypes_each_get_their_own_accumulator() -> None:
    d = torch.full((5,), 1e-30, dtype=torch.float64)  # its squares underflow in float32
    d[0] = 1e-30 * (1 + 1e-12)
    f = torch.ones(4)
    got = norms.fused_norms([f, d], exact=False)
    assert got[0].item() == pytest.approx(2.0, rel=1e-7, abs=0)
    assert got[1].dtype == torch.float64
    assert got[1].item() == pytest.approx(_hypot(d), rel=1e-14, abs=0)


def test_a_sparse_gradient_with_repeated_indices_has_the_dense_gradients_norm() -> None:
    emb = torch.nn.Embedding(10, 3, sparse=True)
    ids = torch.tensor([1, 1, 1, 4, 1])
    emb(ids).sum().backward()
    g = emb.weight.grad
    assert g.is_sparse
    want = torch.linalg.vector_norm(g.to_dense().double()).item()  # row 1 took 4 ones per column
    assert want == pytest.approx(math.sqrt(3 * 16 + 3))
    assert norms.norm_values([norms.dense(g)], exact=False)[0] == pytest.approx(want, rel=1e-7, abs=0)


def test_an_exact_stack_of_many_small_tensors_is_summed_in_float64() -> None:
    g = torch.Generator().manual_seed(1)
    ts = [torch.randn(257, generator=g) for _ in range(norms.STACK_MIN)]
    got = norms.norm_values(ts, exact=True, groups=[list(range(len(ts)))])
    want = [torch.linalg.vector_norm(t.double()).item() for t in ts]
    assert got == pytest.approx(want, rel=1e-14, abs=0)


# ---------------------------------------------------------------- readings


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


# ---------------------------------------------------------------- measurement


def test_ratio_of_zero_gradients() -> None:
    assert math.isnan(ratio(0.0, 0.0))
    assert ratio(3.0, 0.0) == math.inf
    assert ratio(3.0, 2.0) == 1.5


def _measurement(**kw) -> Measurement:
    base = dict(
        layer_names=("a", "b"),
        activation_names=("a", "b"),
        loss=(1.0,),
        grad_norm=(2.0,),
        layer_grad_norms=(1.0, 1.0),
        activation_norms=(1.0, 1.0),
        activation_grad_norms=(2.0, 1.0),
        gains=(2.0,),
        growth=2.0,
        weight_norms=(),
        first_nonfinite=None,
        steps_run=0,
        chain_starts=(1,),
        chain_growths=(1.0, 1.0),
        chain_feeds=((), (0,)),
    )
    base.update(kw)
    return Measurement(**base)


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


# ---------------------------------------------------------------- seeds and spread


def _row(growth: float, vanishing: float) -> dict[str, float]:
    row = {c: 0.0 for c in CRITERIA}
    row.update(growth=growth, vanishing=vanishing, grad_norm=1.0, divergence=1.0, stall=1.0)
    return row


GROWTH_CLASSES = (math.nan, 1.0, 1e4)  # NaN, under the bound 100, over it
VANISH_CLASSES = (math.nan, 1e-4, 1.0)  # NaN, under 1/100 (fires), above it


def _k_seed_fires(values: list[float], name: str, lim: Limits, q: float) -> bool:
    return fires(name, quantile(values, q), lim)


@pytest.mark.parametrize("budget", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("q", [0.2, 0.5, 0.75, 1.0])
def test_settled_by_counts_is_exactly_what_every_completion_agrees_on(budget: int, q: float) -> None:
    """Curtailment is exact: brute force over every class of value the unseen seeds could take."""
    lim = Limits(grad_norm=None, divergence=None, vanishing=100.0)  # nonfinite on: the margin decides nothing
    for n in range(1, budget + 1):
        for name, classes in (("growth", GROWTH_CLASSES), ("vanishing", VANISH_CLASSES)):
            for seen in itertools.product(classes, repeat=n):
                rows = [_row(v if name == "growth" else 1.0, v if name == "vanishing" else 1.0) for v in seen]
                outcomes = {
                    _k_seed_fires([*seen, *rest], name, lim, q)
                    for rest in itertools.product(classes, repeat=budget - n)
                }
                want = outcomes.pop() if len(outcomes) == 1 else None
                got = seeds_mod._settled(rows, lim, budget, q)[name]
                assert got is want, (name, seen, budget, q)


def test_the_margin_needs_every_seed_far_and_on_one_side() -> None:
    lim = Limits(grad_norm=None, divergence=None, nonfinite=False)
    # one seed 10x under the growth bound is not 1000x: not far, and 1 of 5 seeds decides nothing
    assert seeds_mod._settled([_row(10.0, 1.0)], lim, 5, 0.5)["growth"] is None
    # one seed 1000x under decides the pass
    assert seeds_mod._settled([_row(0.1, 1.0)], lim, 5, 0.5)["growth"] is False
    # one seed 1000x over decides the fire
    assert seeds_mod._settled([_row(1e5, 1.0)], lim, 5, 0.5)["growth"] is True
    # two seeds each far (10^4x) but on opposite sides: the counts decide, and 1 of 2 fires: open
    assert seeds_mod._settled([_row(0.01, 1.0), _row(1e6, 1.0)], lim, 5, 0.5)["growth"] is None


def test_far_is_symmetric_and_never_for_nan_or_going_nonfinite() -> None:
    lim = Limits()
    assert seeds_mod._far("growth", 0.1, lim, 1000.0)  # 100 / 0.1 = 1000
    assert seeds_mod._far("growth", 1e5, lim, 1000.0)
    assert not seeds_mod._far("growth", 1.0, lim, 1000.0)
    assert not seeds_mod._far("growth", math.nan, lim, 1.0)
    assert not seeds_mod._far("nonfinite", 0.0, lim, 1.0)
    assert not seeds_mod._far("overflow", 0.0, lim, 1.0)


def test_seed_of_starts_at_the_base_and_stays_in_32_bits() -> None:
    for base in (0, 7, 3_000_000_000, 2**32 - 1):
        assert seeds_mod.seed_of(base, 0) == base
        got = [seeds_mod.seed_of(base, i) for i in range(50)]
        assert all(0 <= s < 2**32 for s in got) and len(set(got)) == 50
    # consecutive bases give different 2nd seeds (no base's seeds are another's shifted by one)
    assert seeds_mod.seed_of(1, 1) != seeds_mod.seed_of(0, 2)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 10])
@pytest.mark.parametrize("q", [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
def test_quantile_is_numpys_nearest_rank(n: int, q: float) -> None:
    np = pytest.importorskip("numpy")  # torch runs without it
    xs = [float((7 * i) % n) + 0.5 * i for i in range(n)]
    want = float(np.quantile(np.array(xs), q, method="inverted_cdf"))
    assert quantile(xs, q) == want


def test_nan_sorts_below_every_number_in_a_quantile_and_the_spread() -> None:
    assert math.isnan(quantile([2.0, math.nan, 1.0], 1 / 3))
    assert quantile([2.0, math.nan, 1.0], 2 / 3) == 1.0
    s = Spread.of([math.nan, math.nan, 3.0, 1.0, 2.0], 0.5)  # r = 3: the third smallest, NaN lowest
    assert (s.low, s.mid, s.high, s.nan) == (1.0, 1.0, 3.0, 2)


# ---------------------------------------------------------------- tokens


@pytest.mark.parametrize("vocab,pads", [(5, [0]), (5, [4]), (6, [0, 3, 5]), (5, [5, -1, None]), (3, [])])
def test_token_ids_are_uniform_over_the_vocabulary_less_its_pads(vocab, pads) -> None:
    g = torch.Generator().manual_seed(0)
    ids = token_ids(vocab, pads, (20000,), g)
    allowed = [i for i in range(vocab) if i not in pads]
    counts = torch.bincount(ids, minlength=vocab)
    assert ids.min() >= 0 and ids.max() < vocab
    for i in range(vocab):
        if i in allowed:
            expect = 20000 / len(allowed)
            assert abs(counts[i].item() - expect) < 6 * math.sqrt(expect), (i, counts.tolist())
        else:
            assert counts[i] == 0, (i, counts.tolist())


def test_a_vocabulary_of_pads_alone_is_drawn_as_it_is() -> None:
    ids = token_ids(2, [0, 1], (1000,), torch.Generator().manual_seed(0))
    assert set(ids.tolist()) == {0, 1}


# ---------------------------------------------------------------- meanfield


def _mf_brute(sigma: float, act: str, depth: int, q_in: float) -> list[float]:
    """ln growths by a 400k-point Riemann sum over z in [-14, 14], independent of the Gauss-Hermite rule."""
    z = torch.linspace(-14, 14, 400_000, dtype=torch.float64)  # symmetric, no node at 0
    w = torch.exp(-z * z / 2) / math.sqrt(2 * math.pi) * (z[1] - z[0])
    phi = {"tanh": torch.tanh, "relu": torch.relu, "linear": lambda x: x}[act]
    dphi = {
        "tanh": lambda x: 1 / torch.cosh(x) ** 2,
        "relu": lambda x: (x > 0).double(),
        "linear": torch.ones_like,
    }[act]
    q, out, acc = sigma**2 * q_in, [], 0.0
    for _ in range(depth):
        h = math.sqrt(q) * z
        chi = sigma**2 * float((w * dphi(h) ** 2).sum())
        acc += 0.5 * math.log(chi)
        out.append(acc)
        q = sigma**2 * float((w * phi(h) ** 2).sum())
    return out


@pytest.mark.parametrize(
    "sigma,act,q_in",
    [(1.5, "tanh", 1.0), (3.0, "tanh", 0.5), (0.7, "tanh", 2.0), (2.0, "relu", 1.0), (1.3, "linear", 1.0)],
)
def test_mean_field_growth_matches_a_brute_force_integral(sigma, act, q_in) -> None:
    meanfield._CHAINS.clear()
    meanfield.log_growths(
        sigma, act, 2, q_in=1.0 if q_in != 1.0 else 0.25
    )  # another q_in first: no cross-talk
    got = meanfield.log_growths(sigma, act, 4, q_in=q_in)
    assert list(got) == pytest.approx(_mf_brute(sigma, act, 4, q_in), rel=1e-6, abs=1e-9)


def test_relu_growth_is_sigma_over_sqrt2_per_block() -> None:
    meanfield._CHAINS.clear()
    got = meanfield.zoo_growth("mlp", {"activation": "relu", "init_scale": 2.0, "depth": 6})
    assert got == pytest.approx((2.0 / math.sqrt(2)) ** 6, rel=1e-12)


def test_fixed_points_at_the_edge() -> None:
    # tanh at sigma = 1: q -> 0 (as 1/(2l): E[tanh(sqrt(q) z)^2] = q - 2q^2 + ...),
    # chi at q = 0 is sigma^2 tanh'(0)^2 = 1
    assert meanfield.q_star(1.0, "tanh") == 0.0
    assert meanfield.chi_1(1.0, "tanh") == pytest.approx(1.0, abs=1e-12)
    # relu at sigma = 1: q halves each block, to 0
    assert meanfield.q_star(1.0, "relu") < 1e-9
    # linear at sigma = 1: q stays
    assert meanfield.q_star(1.0, "linear") == 1.0


def test_a_linear_rnns_last_step_growth_is_sigma_to_the_t_minus_1_as_probed() -> None:
    from stabilitycheck import Config
    from stabilitycheck.configprobe import probe

    sigma, t = 1.3, 9
    c = Config.of("rnn", seq_len=t, width=16, init_scale=sigma, activation="linear", batch_size=4)
    predicted = meanfield.zoo_growth("rnn", {"activation": "linear", "init_scale": sigma, "seq_len": t})
    assert predicted == pytest.approx(sigma ** (t - 1), rel=1e-12, abs=0)
    assert probe(c, last_step=True).growth == pytest.approx(predicted, rel=1e-4, abs=0)


# ---------------------------------------------------------------- invariants_common


def test_rtols_and_spacings_per_dtype() -> None:
    assert ic.rtol_of(torch.int64) == ic.DTYPE_RTOL[torch.float64]
    assert ic.rtol_of(torch.complex64) == ic.DTYPE_RTOL[torch.float64]
    assert ic.subnormal_spacing(torch.float32) == 2.0**-149
    assert ic.subnormal_spacing(torch.float64) == 2.0**-1074
    assert ic.subnormal_spacing(torch.float16) == 2.0**-24
    assert (
        ic.coarsest([torch.ones(1), torch.ones(1, dtype=torch.bfloat16), torch.ones(1, dtype=torch.float64)])
        == torch.bfloat16
    )
    assert ic.coarsest([torch.ones(1, dtype=torch.int64)]) == torch.float64


def test_reduction_error_is_relative() -> None:
    t = [torch.full((4,), 1.0), torch.full((9,), 1.0)]  # per-tensor norms 2 and 3: total sqrt(13)
    assert ic.reduction_error(t, 2.0, 2 * math.sqrt(13)) == pytest.approx(0.5, rel=1e-6, abs=0)
    assert ic.reduction_error(t, 2.0, 0.0) == 0.0


def test_norms_in_float64_and_totals_of_any_order() -> None:
    g = torch.Generator().manual_seed(0)
    t = torch.randn(4097, generator=g) * 1e3
    want = _hypot(t)
    assert ic.norms_of([t, torch.empty(0)]) == [pytest.approx(want, rel=1e-14, abs=0), 0.0]
    assert ic.total_of([3.0, 4.0], math.inf) == 4.0
    assert ic.total_of([3.0, 4.0], 1.0) == 7.0
    assert ic.total_of([3.0, 4.0], 2.0) == 5.0


def test_check_factor_finds_the_least_squares_factor() -> None:
    b = [
        ("w", torch.tensor([3.0, 4.0], dtype=torch.float64)),
        ("v", torch.tensor([1.0, 0.0], dtype=torch.float64)),
    ]
    a = [(n, 2.5 * t) for n, t in b]
    assert ic.check_factor(b, a, None, "h", None) == pytest.approx(2.5, rel=1e-15, abs=0)


def test_check_factor_refuses_a_negative_factor() -> None:
    b = [("w", torch.tensor([3.0, 4.0], dtype=torch.float64))]
    with pytest.raises(StabilityError, match="negative"):
        ic.check_factor(b, [("w", -b[0][1])], None, "h", None)


def test_check_factor_tolerance_scales_with_the_factor() -> None:
    # after = 1e-6 * before plus an error 1e-4 relative to after: far beyond float64's rtol of the factor's
    # size, though tiny next to before's norm
    b = torch.tensor([3.0, 4.0, 0.0], dtype=torch.float64)
    a = 1e-6 * b + torch.tensor([0.0, 0.0, 5e-10], dtype=torch.float64)
    with pytest.raises(StabilityError):
        ic.check_factor([("w", b)], [("w", a)], None, "h", None)


def test_check_factor_counts_at_most_one_spacing_per_element_near_zero() -> None:
    # float16: every one of 10^4 near-zero elements off by 16 subnormal spacings (2^-20) is not rounding
    n = 10_000
    b = torch.zeros(n, dtype=torch.float16)
    b[0] = 1e-3
    a = b.clone()
    a[1:] = 2.0**-20
    with pytest.raises(StabilityError):
        ic.check_factor([("w", b)], [("w", a)], None, "h", None)


def test_state_kept_restores_buffers_too() -> None:
    bn = torch.nn.BatchNorm1d(3)
    before = [t.clone() for t in (*bn.parameters(), *bn.buffers())]
    with ic.state_kept(bn):
        bn.train()
        bn(torch.randn(8, 3, generator=torch.Generator().manual_seed(0)) + 5)
        with torch.no_grad():
            bn.weight.mul_(3)
    after = [*bn.parameters(), *bn.buffers()]
    assert all(torch.equal(x, y) for x, y in zip(before, after, strict=True))


# ---------------------------------------------------------------- probing (autograd as the oracle)


class _Chain(nn.Module):
    """h -> tanh(W_k h) over k Linear blocks; `dead_last`: the last block's output reaches the loss x 0."""

    def __init__(self, depth: int = 4, width: int = 8, scale: float = 2.0, dead_last: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.layers = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(depth))
        for layer in self.layers:
            with torch.no_grad():
                layer.weight.copy_(torch.randn(width, width, generator=g) * scale / math.sqrt(width))
        self.dead_last = dead_last

    def forward(self, x: torch.Tensor, keep: list | None = None) -> torch.Tensor:
        outs = []
        h = x
        for layer in self.layers:
            z = layer(h)  # the block's output (the probe's hook sees it), before the tanh
            if keep is not None:
                z.retain_grad()
            outs.append(z)
            h = torch.tanh(z)
        if keep is not None:
            keep.extend(outs)
        if self.dead_last:
            return torch.tanh(outs[-2]) + 0.0 * outs[-1]
        return h


def _blocks(model: _Chain):
    return [(f"layers.{i}", m) for i, m in enumerate(model.layers)]


def _loss(out, _):
    return out.pow(2).mean()


def _autograd_gradient_norms(model: _Chain, x: torch.Tensor) -> tuple[float, list[float]]:
    x = x.clone().requires_grad_()
    keep: list[torch.Tensor] = []
    _loss(model(x, keep), None).backward()
    return x.grad.double().norm().item(), [h.grad.double().norm().item() for h in keep]


def test_probe_growth_is_input_over_last_output_gradient_by_autograd() -> None:
    model, x = _Chain(), torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    gx, gh = _autograd_gradient_norms(model, x)
    m = probe_module(model, x, _loss, blocks=_blocks(model))
    assert m.growth == pytest.approx(gx / gh[-1], rel=1e-5, abs=0)
    assert list(m.activation_grad_norms) == pytest.approx([gx, *gh], rel=1e-5, abs=0)


def test_a_last_output_reached_with_a_zero_gradient_is_not_the_chains_end() -> None:
    model, x = _Chain(dead_last=True), torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    gx, gh = _autograd_gradient_norms(model, x)
    assert gh[-1] == 0.0 and gh[-2] > 0
    m = probe_module(model, x, _loss, blocks=_blocks(model))
    assert m.growth == pytest.approx(gx / gh[-2], rel=1e-5, abs=0)


def test_steps_run_and_weight_norms_follow_the_steps() -> None:
    model, x = _Chain(scale=0.5), torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    m0 = probe_module(model, x, _loss, blocks=_blocks(model))
    assert m0.steps_run == 0 and len(m0.loss) == 1 and m0.weight_norms == ()
    m2 = probe_module(model, x, _loss, blocks=_blocks(model), steps=2)
    assert m2.steps_run == 2 and len(m2.loss) == 3 and len(m2.weight_norms) == 4


def test_output_gradients_under_a_gradscaler_are_unscaled() -> None:
    model, x = _Chain(scale=1.0), torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    plain = probe_module(model, x, _loss, blocks=_blocks(model))
    scaled = probe_module(
        model, x, lambda o, _: o.float().pow(2).mean(), blocks=_blocks(model), amp="float16"
    )
    assert scaled.loss_scale and scaled.loss_scale[0] > 1
    # float16 autocast rounds to ~1e-3; a scale left in would be off by 65536x
    assert list(scaled.activation_grad_norms) == pytest.approx(
        list(plain.activation_grad_norms), rel=3e-2, abs=0
    )
    assert scaled.grad_norm[0] == pytest.approx(plain.grad_norm[0], rel=3e-2, abs=0)


class _InPlaceAfter(nn.Module):
    """Linear blocks; the output of block `k` is multiplied by 3 in place after the block returns it."""

    def __init__(self, k: int, depth: int = 3, width: int = 6) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.layers = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(depth))
        for layer in self.layers:
            with torch.no_grad():
                layer.weight.copy_(torch.randn(width, width, generator=g) / math.sqrt(width))
        self.k = k

    def forward(self, x: torch.Tensor, keep: list | None = None) -> torch.Tensor:
        h = x
        for i, layer in enumerate(self.layers):
            z = layer(h)
            if keep is not None:  # the oracle: out of place, dL/d(output as returned)
                z.retain_grad()
                keep.append(z)
                h = torch.tanh(z * 3 if i == self.k else z)
            else:
                if i == self.k:
                    z.mul_(3)
                h = torch.tanh(z)
        return h


@pytest.mark.parametrize("k", [0, 1])
def test_a_block_output_changed_in_place_after_its_block_reads_the_gradient_as_returned(k: int) -> None:
    model = _InPlaceAfter(k)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    keep: list[torch.Tensor] = []
    xr = x.clone().requires_grad_()
    _loss(model(xr, keep), None).backward()
    want = [xr.grad.double().norm().item(), *(z.grad.double().norm().item() for z in keep)]
    m = probe_module(model, x, _loss, blocks=[(f"layers.{i}", layer) for i, layer in enumerate(model.layers)])
    assert list(m.activation_grad_norms) == pytest.approx(want, rel=1e-5, abs=0)


# ---------------------------------------------------------------- seeds: probes, through-time, quantile seed


def _linear_rnn(sigma: float, t: int) -> Config:
    return Config.of("rnn", seq_len=t, width=16, init_scale=sigma, activation="linear", batch_size=4, seeds=1)


def test_seed_probes_keep_last_step_probes_apart() -> None:
    sigma, t = 0.7, 9
    sp = seeds_mod.SeedProbes()
    c = _linear_rnn(sigma, t)
    per_token = sp(c, None)
    last = sp(c, None, last_step=True)
    assert last.growth == pytest.approx(sigma ** (t - 1), rel=1e-4, abs=0)  # exact for a linear rnn
    assert (sp.made, sp.made_last) == (1, 1)
    assert sp(c.with_run(seeds=7, quantile=0.9), None) is per_token  # what a probe does not read
    assert (sp.made, sp.made_last) == (1, 1)


def test_vanishing_of_a_recurrent_subject_is_judged_through_time() -> None:
    sigma, t = 0.5, 9  # through time: 0.5^8 = 0.0039 < 1/100
    lim = Limits(grad_norm=None, growth=None, divergence=None, vanishing=100.0)
    j = seeds_mod.assess(_linear_rnn(sigma, t), limits=lim)
    fired = {c.name: c.value for c in j.verdict.criteria}
    assert fired["vanishing"] == pytest.approx(sigma ** (t - 1), rel=1e-4, abs=0)


def test_the_measurement_shown_is_the_seed_at_the_quantile() -> None:
    c = Config.of("mlp", depth=6, width=16, init_scale=1.5, batch_size=4, seeds=3, quantile=1.0)
    lim = Limits(grad_norm=None, growth=1e6, divergence=None)
    j = seeds_mod.assess(c, limits=lim)
    assert len(j.seeds) == 3
    growths = [probe(c.with_run(seed=s)).growth for s in j.seeds]
    assert j.measurement.growth == max(growths)
    assert j.measured_seed == j.seeds[growths.index(max(growths))]


# ---------------------------------------------------------------- junctions: a scaled add is no residual


class _ScaledSkip(nn.Module):
    """stem, then x + 0.5 * block0(x) written as `mul` or as torch.add(..., alpha=0.5): the same function."""

    def __init__(self, alpha_form: bool, width: int = 6) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(11)
        self.stem = nn.Linear(width, width, bias=False)
        self.layers = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(3))
        with torch.no_grad():
            for m in (self.stem, *self.layers):
                m.weight.copy_(torch.randn(width, width, generator=g) / math.sqrt(width))
        self.alpha_form = alpha_form

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        x = self.stem(inp)
        out = self.layers[0](x)
        h = torch.add(x, out, alpha=0.5) if self.alpha_form else x + 0.5 * out
        h = self.layers[1](torch.tanh(h))
        return self.layers[2](torch.tanh(h))


def test_an_add_with_alpha_reads_as_the_same_function_written_with_a_multiply() -> None:
    inp = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    got = []
    for alpha_form in (False, True):
        model = _ScaledSkip(alpha_form)
        blocks = [(f"layers.{i}", m) for i, m in enumerate(model.layers)]
        got.append(probe_module(model, inp, _loss, blocks=blocks))
    plain, alpha = got
    assert alpha.activation_names == plain.activation_names
    assert list(alpha.activation_grad_norms) == pytest.approx(
        list(plain.activation_grad_norms), rel=1e-6, abs=0
    )
    assert alpha.growth == pytest.approx(plain.growth, rel=1e-6, abs=0)


class _LinearDeadLast(nn.Module):
    """Linear blocks, no activation; the last block's output reaches the loss times 0 (a zero gradient)."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(2)
        self.layers = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(3))
        with torch.no_grad():
            for m in self.layers:
                m.weight.copy_(torch.randn(width, width, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.layers[0](x)
        b = self.layers[1](a)
        c = self.layers[2](b)
        return b + 0.0 * c


def test_the_profile_stays_at_step_0_when_gradients_reached_there() -> None:
    model = _LinearDeadLast()
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    m = probe_module(
        model,
        x,
        _loss,
        blocks=[(f"layers.{i}", layer) for i, layer in enumerate(model.layers)],
        steps=6,
        lr=1e6,
    )
    assert m.first_nonfinite is not None and m.first_nonfinite.step > 0  # it blows up after step 0
    assert m.profile_step == 0  # gradients reached block outputs at step 0: the profile is step 0's


# ---------------------------------------------------------------- rng


def test_rng_state_restores_torchs_cpu_generator() -> None:
    from stabilitycheck.rng import rng_state, set_rng_state

    state = rng_state()
    a = torch.rand(5)
    set_rng_state(state)
    assert torch.equal(torch.rand(5), a)


def test_host_rng_state_restores_python_and_numpy() -> None:
    np = pytest.importorskip("numpy")  # torch runs without it
    import random

    from stabilitycheck.rng import host_rng_state, set_host_rng_state

    state = host_rng_state()
    a = (random.random(), float(np.random.rand()))
    set_host_rng_state(state)
    assert (random.random(), float(np.random.rand())) == a
