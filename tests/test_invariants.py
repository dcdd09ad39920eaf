"""Each invariant passes on PyTorch's own implementation and catches a deliberately broken one
(tests/broken.py), with the numbers in its message.
Also the shared helpers (invariants_common: rtols, spacings, check_factor, state_kept) and assert_stable."""

from __future__ import annotations

import copy
import math
import random
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import broken
import pytest
import torch
from torch import nn

from stabilitycheck import invariants_common as ic
from stabilitycheck.config import RUN_FIELDS, Config
from stabilitycheck.configprobe import probe
from stabilitycheck.errors import StabilityError, UsageError
from stabilitycheck.families import knob_specs
from stabilitycheck.invariants import (
    assert_bounded_growth,
    assert_clipped_norm_bounded,
    assert_clipped_value_bounded,
    assert_direction_preserved,
    assert_finite_training,
    assert_gradscaler_guards,
    assert_rescaling_equivariant,
    check_clip_grad_norm,
)
from stabilitycheck.invariants_gradscaler import UNHIDDEN
from stabilitycheck.invariants_stable import Unstable, assert_stable
from stabilitycheck.measurement import Measurement
from stabilitycheck.probing import probe_module
from stabilitycheck.space import Axis, Space
from stabilitycheck.subject import Built
from stabilitycheck.subjects import resolve
from stabilitycheck.verdicts import Limits


def build(config: Config) -> Built:
    return resolve(config.subject).build(config)


Clipper = Callable[[list[nn.Parameter], float], object]


class Params(list[nn.Parameter]):
    """A model's parameters, keeping the model so invariants can name them (`.named`)."""

    named: nn.Module


def with_grads(dtype: str = "float32", seed: int = 0) -> tuple[Params, list[torch.Tensor]]:
    """A small pre-norm resmlp's parameters after one backward (total gradient norm ~1.6), and
    copies of their gradients."""
    b = build(Config.of("resmlp", norm="pre", depth=3, width=16, batch_size=4, dtype=dtype, seed=seed))
    b.loss_fn(b.model(b.inputs), b.inputs).backward()
    params = Params(b.model.parameters())
    params.named = b.model
    return params, [p.grad.detach().clone() for p in params if p.grad is not None]


def total(grads: list[torch.Tensor]) -> float:
    return float(torch.linalg.vector_norm(torch.stack([g.double().norm() for g in grads])))


def torch_clip(params: list[nn.Parameter], max_norm: float) -> object:
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16", "float16"])
@pytest.mark.parametrize("max_norm", [1e-6, 0.1, 1.0, 1e6])
def test_torch_norm_clipping_passes(dtype: str, max_norm: float) -> None:
    params, before = with_grads(dtype)
    returned = torch.nn.utils.clip_grad_norm_(params, max_norm)
    assert float(returned) == pytest.approx(total(before), rel=1e-2)  # the pre-clip norm
    assert_clipped_norm_bounded(params, max_norm, before=before, returned=returned)
    factor = assert_direction_preserved(before, [p.grad for p in params if p.grad is not None])
    coef = min(1.0, max_norm / (total(before) + 1e-6))
    rel = 0.1 if dtype == "float16" else 1e-2  # float16 holds a coefficient ~5e-7 only to 6e-8 (subnormal)
    assert factor == pytest.approx(coef, rel=rel)


@pytest.mark.parametrize("norm_type", [1.0, math.inf])
def test_torch_norm_clipping_passes_for_other_norms(norm_type: float) -> None:
    params, before = with_grads()
    torch.nn.utils.clip_grad_norm_(params, 0.05, norm_type=norm_type)
    assert_clipped_norm_bounded(params, 0.05, norm_type, before=before)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16", "float16"])
def test_a_clip_returning_the_clipped_norm_is_caught_and_torchs_passes(norm_type: float, dtype: str) -> None:
    """Guards `returned=`; oracle: torch's clip returns the total norm before clipping (float64 here by
    hand) and passes; a clip returning the norm after it returns max_norm, which a log of spikes reads
    as capped (only where no clipping happened are both the same, and it passes)."""
    params, before = with_grads(dtype)
    pre = float(
        torch.linalg.vector_norm(torch.stack([g.double().norm(norm_type) for g in before]), norm_type)
    )
    for max_norm in (pre / 10, pre * 10):
        for p, b in zip((p for p in params if p.grad is not None), before, strict=True):
            p.grad = b.clone()
        returned = broken.clip_returning_clipped_norm(params, max_norm, norm_type)
        if max_norm > pre:
            assert_clipped_norm_bounded(params, max_norm, norm_type, before=before, returned=returned)
            continue
        assert float(returned) == pytest.approx(max_norm, rel=2e-2)
        with pytest.raises(StabilityError, match="another value than the total norm before") as info:
            assert_clipped_norm_bounded(params, max_norm, norm_type, before=before, returned=returned)
        assert reported(str(info.value), "of before= is ") == pytest.approx(pre, rel=1e-6)
        for p, b in zip((p for p in params if p.grad is not None), before, strict=True):
            p.grad = b.clone()
        got = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
        assert_clipped_norm_bounded(params, max_norm, norm_type, before=before, returned=got)


def test_returned_without_before_is_a_usage_error() -> None:
    params, _ = with_grads()
    got = torch.nn.utils.clip_grad_norm_(params, 0.1)
    with pytest.raises(UsageError, match="pass before= too") as caught:
        assert_clipped_norm_bounded(params, 0.1, returned=got)
    assert "\n" not in str(caught.value)


def reported(message: str, label: str) -> float:
    """The number the invariant's message gives after `label` (e.g. "Total 2-norm after clipping: ")."""
    match = re.search(re.escape(label) + r"([-+0-9.e]+|inf|nan)", message)
    assert match is not None, (label, message)
    return float(match.group(1))


@pytest.mark.parametrize(
    "clipper", [broken.clip_per_tensor, broken.clip_twice_as_loose, broken.clip_value_as_norm]
)
def test_clipped_norm_catches_wrong_clippers(clipper: Clipper) -> None:
    """Each wrong clipper leaves the total above max_norm 0.1; the message's figures are checked
    against torch's own norms of the clipped gradients, not against a printed run."""
    params, before = with_grads()
    clipper(params, 0.1)
    after = [p.grad for p in params if p.grad is not None]
    norms = [float(torch.linalg.vector_norm(g.double())) for g in after]
    for given_before in (None, before):
        with pytest.raises(StabilityError) as info:
            assert_clipped_norm_bounded(params.named, 0.1, before=given_before)
        message = str(info.value)
        total_after = reported(message, "Total 2-norm after clipping: ")
        assert total_after == pytest.approx(math.hypot(*norms), rel=1e-5)
        bound = reported(message, "(allowed: <= ")
        assert 0.1 <= bound < total_after and bound == pytest.approx(0.1, rel=1e-5)
        over = sum(n > bound for n in norms)
        assert f"Tensors over bound on their own: {over} / {len(after)}" in message
        largest = max(range(len(norms)), key=norms.__getitem__)
        name = [n for n, p in params.named.named_parameters() if p.grad is not None][largest]
        assert f"Largest: {name!r} with norm" in message and "max_norm 0.1" in message
    if clipper is broken.clip_twice_as_loose:  # torch's clip to 2 x max_norm: the total is 0.2
        assert math.hypot(*norms) == pytest.approx(0.2, rel=1e-5)


def test_clipped_norm_catches_inf_turned_into_nan() -> None:
    params, _ = with_grads()
    broken.inject(params, math.inf)
    broken.clip_inf_to_nan(params, 1.0)
    with pytest.raises(StabilityError) as info:
        assert_clipped_norm_bounded(params.named, 1.0)
    message = str(info.value)
    grads = [(n, p.grad) for n, p in params.named.named_parameters() if p.grad is not None]
    (first, g0), nans = grads[0], [n for n, g in grads if bool(g.isnan().any())]
    assert nans == [first]  # 0 x Inf = NaN where the Inf was; every other entry is finite (coef 0)
    assert f"Non-finite tensors: 1 / {len(grads)}" in message
    assert f"{first!r} holds 1 NaN and 0 Inf of {g0.numel()}" in message
    assert "error_if_nonfinite=True" in message


def test_clipped_norm_catches_small_gradients_scaled_up() -> None:
    params, before = with_grads()
    broken.clip_always_normalise(params, 10.0)
    assert_clipped_norm_bounded(params, 10.0)  # the bound alone cannot see it...
    with pytest.raises(StabilityError, match=r"before clipping was 1\.\d+ <= max_norm 10, so clipping must"):
        assert_clipped_norm_bounded(params, 10.0, before=before)  # ...the before/after contract does


def test_a_clip_that_zeroes_every_gradient_is_caught() -> None:
    """`max_norm // total` is 0: every gradient becomes zero. The bound alone cannot see it (zeros are
    within any bound); the before/after contract and the direction invariant both do."""
    params, before = with_grads()
    assert total(before) > 0.1  # so clipping to 0.1 is needed, and the bug bites
    broken.clip_floor_division(params, 0.1)
    after = [p.grad for p in params if p.grad is not None]
    assert all(not bool(g.any()) for g in after)
    assert_clipped_norm_bounded(params, 0.1)
    with pytest.raises(StabilityError) as info:
        assert_clipped_norm_bounded(params, 0.1, before=before)
    assert "Every gradient is zero after clipping" in str(info.value)
    assert reported(str(info.value), "total norm before was ") == pytest.approx(total(before), rel=1e-5)
    with pytest.raises(StabilityError, match="Every tensor is zero after"):
        assert_direction_preserved(before, after)
    assert assert_direction_preserved([0 * g for g in before], after) == 0.0  # zero stays zero


@pytest.mark.parametrize(("dtype", "entry"), [(torch.float16, 40000.0), (torch.float32, 3e38)])
def test_torch_clip_zeroes_finite_gradients_whose_total_norm_overflows(
    dtype: torch.dtype, entry: float
) -> None:
    """A finding in torch itself (2.13): clip_grad_norm_ computes the total norm in the gradient
    dtype, so finite gradients whose total norm exceeds the dtype's max (float16 65504, float32 3.4e38)
    get the coefficient max_norm / inf = 0 and all become zero, silently (the returned total is inf;
    error_if_nonfinite=False is the default). The invariants catch it from the float64 total."""
    p = nn.Parameter(torch.zeros(4, dtype=dtype))
    p.grad = torch.full((4,), entry, dtype=dtype)  # every entry finite; total norm 2 x entry
    assert 2 * entry > torch.finfo(dtype).max
    before = [p.grad.clone()]
    returned = torch.nn.utils.clip_grad_norm_([p], 1.0)
    assert math.isinf(float(returned)) and not bool(p.grad.any())  # the finding
    assert_clipped_norm_bounded([p], 1.0)  # zeros are within the bound...
    with pytest.raises(StabilityError, match="Every gradient is zero after clipping") as info:
        assert_clipped_norm_bounded([p], 1.0, before=before)  # ...but not what the contract promises
    assert reported(str(info.value), "total norm before was ") == pytest.approx(2 * entry, rel=1e-5)
    assert reported(str(info.value), "expected them x ") == pytest.approx(0.5 / entry, rel=1e-5)
    with pytest.raises(StabilityError, match="Every tensor is zero after"):
        assert_direction_preserved(before, [p.grad])


def test_value_clipping_passes_and_one_sided_clipping_is_caught() -> None:
    params, before = with_grads()
    torch.nn.utils.clip_grad_value_(params, 0.01)
    assert_clipped_value_bounded(params, 0.01, before=before)
    params, before = with_grads()
    broken.clip_value_one_sided(params, 0.01)
    with pytest.raises(StabilityError) as info:
        assert_clipped_value_bounded(params, 0.01)
    assert "exceed clip_value=0.01" in str(info.value) and "(allowed: <= 0.01" in str(info.value)


def test_value_clipping_an_inf_into_a_finite_value_is_caught() -> None:
    params, _ = with_grads()
    broken.inject(params, -math.inf)
    before = [p.grad.clone() for p in params if p.grad is not None]
    torch.nn.utils.clip_grad_value_(params, 0.01)  # maps -Inf to -0.01: the blow-up disappears
    assert_clipped_value_bounded(params, 0.01)
    with pytest.raises(StabilityError, match=r"'layers\.0\.w1' holds 0 NaN and 1 Inf of 256"):
        assert_clipped_value_bounded(params.named, 0.01, before=before)


@pytest.mark.parametrize("clipper", [broken.clip_per_tensor, broken.clip_value_as_norm])
def test_direction_preserved_catches_per_tensor_and_value_clipping(clipper: Clipper) -> None:
    params, before = with_grads()
    clipper(params, 0.1)
    after = {n: p.grad for n, p in zip("abcdefghijklmn", params, strict=True) if p.grad is not None}
    with pytest.raises(StabilityError) as info:
        assert_direction_preserved(before, after)
    message = str(info.value)
    assert "Tensors off the common factor" in message and "/ 14" in message and "with cosine" in message


def test_direction_preserved_catches_a_flip_and_a_changed_shape() -> None:
    _, before = with_grads()
    with pytest.raises(StabilityError, match="The common factor -2 is negative"):
        assert_direction_preserved(before, [-2 * g for g in before])
    with pytest.raises(StabilityError, match=r"Shape changed: '\[0\]' was \(16, 16\), is \(256,\)"):
        assert_direction_preserved(before, [before[0].reshape(-1), *before[1:]])
    assert assert_direction_preserved(before, [0.25 * g for g in before]) == pytest.approx(0.25)


def zoo(family: str, **knobs: object) -> Built:
    """A small zoo model; knobs the family does not have (an mlp's norm, an lstm's depth) are dropped."""
    values = {"depth": 4, "width": 16, "seq_len": 5, "batch_size": 3, **knobs}
    names = {spec.name for spec in knob_specs(family)} | set(RUN_FIELDS)
    return build(Config.of(family, **{k: v for k, v in values.items() if k in names}))


@pytest.mark.parametrize("family", ["mlp", "resmlp", "lstm", "transformer"])
@pytest.mark.parametrize("c", [1e-3, 3.7, 1e3])
def test_rescaling_passes_on_zoo_models(family: str, c: float) -> None:
    b = zoo(family, norm="pre")
    assert_rescaling_equivariant(b.model, b.inputs, b.loss_fn, c)
    assert all(p.grad is None for p in b.model.parameters())  # .grad restored


def test_rescaling_catches_a_loss_whose_backward_ignores_grad_output() -> None:
    b = zoo("mlp")
    assert_rescaling_equivariant(b.model, b.inputs, b.loss_fn, 4.0)
    with pytest.raises(StabilityError) as info:
        assert_rescaling_equivariant(b.model, b.inputs, broken.loss_ignoring_grad_output, 4.0)
    message = str(info.value)
    assert (
        "did not scale every gradient by 4" in message and "Tensors off the common factor 4: 4 / 4" in message
    )
    assert "scaled by 1 with cosine 1" in message


class _State(NamedTuple):
    x: torch.Tensor
    h: torch.Tensor


class _TakesState(nn.Module):
    """A float32 model fed a namedtuple: the rescaling check's float64 re-run rebuilt it as
    _State(generator) and raised TypeError (found by a code review)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, state: _State) -> torch.Tensor:
        return torch.tanh(self.lin(state.x) + state.h)


def test_rescaling_takes_a_namedtuple_input_and_still_catches_a_clamp() -> None:
    torch.manual_seed(0)
    model, state = _TakesState(), _State(torch.randn(8, 4), torch.randn(8, 4))

    def loss_fn(out: torch.Tensor, _: Any) -> torch.Tensor:
        return out.square().mean()

    assert_rescaling_equivariant(model, (state,), loss_fn, 3.0)
    broken.clamp_grad_hooks(model, bound=1e-4)
    with pytest.raises(StabilityError, match=r"did not scale every gradient by 1000"):
        assert_rescaling_equivariant(model, (state,), loss_fn, 1e3)


def test_rescaling_catches_gradient_clamping_hooks() -> None:
    b = zoo("resmlp", norm="pre", init_scale=2.0)
    broken.clamp_grad_hooks(b.model, bound=1e-3)
    with pytest.raises(StabilityError, match=r"did not scale every gradient by 1000"):
        assert_rescaling_equivariant(b.model, b.inputs, b.loss_fn, 1e3)


@pytest.mark.parametrize("c", [0.0, -1.0, math.inf, math.nan])
def test_rescaling_rejects_a_bad_factor(c: float) -> None:
    b = zoo("mlp")
    with pytest.raises(UsageError, match="c must be a finite number > 0"):
        assert_rescaling_equivariant(b.model, b.inputs, b.loss_fn, c)


class _ProductMinus(nn.Module):
    """out = w p q - w r for a one-element parameter w = 1 and inputs x = (p, q, r): the gradient of w
    is p q - r, which float32 computes as fl(p q) - r (the product rounded once; the subtraction is
    exact by Sterbenz's lemma, r being within a factor 2 of fl(p q)). Its rounding error is known by
    hand: p = q = 1 + 2^-12 give p q = 1 + 2^-11 + 2^-24, a tie that rounds to even, 1 + 2^-11, so the
    error is 2^-24 whatever r is, while r sets the gradient's norm n = 1 + 2^-11 - r."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.w * x[0]) * x[1] - self.w * x[2]


@pytest.mark.parametrize("log2_n", [-7, -20])  # rounding error 2^-17 of n (under the cap), 2^-4 (over)
@pytest.mark.parametrize("ratio", [0.8, 1.25])
def test_rescaling_rejects_a_deviation_just_over_its_tolerance_and_passes_one_just_under(
    log2_n: int, ratio: float
) -> None:
    """The tolerance as documented, worked by hand for one tensor of norm n with float32 rounding error
    e = 2^-24 at c = 4: c x (rtol n + rtol n + 4 min(e, sqrt(eps) n)) + the subnormal spacing (the
    total gradient norm is n). A clamping hook (nonlinear: it leaves the c = 1 gradient alone) takes
    c n down by `ratio` x that tolerance: 0.8 x passes, 1.25 x fails. At n = 2^-7 the 4 e term and the
    rtol terms are of a size (a 10x looser floor or 40 e in place of 4 e would pass 1.25 x); at n = 2^-20,
    e is 1/16 of n, far beyond the sqrt(eps) cap (uncapped it would pass 1.25 x)."""
    one, tiny = 1.0 + 2.0**-12, 2.0**-24
    n = 2.0**log2_n
    r = 1.0 + 2.0**-11 - n
    x = torch.tensor([one, one, r], dtype=torch.float32)
    assert float(x[2]) == r  # r is a float32
    model = _ProductMinus()
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = lambda out, _: out.sum()  # noqa: E731
    loss_fn(model(x), x).backward()
    assert float(model.w.grad) == n  # type: ignore[arg-type]  # fl(p q) - r, by hand
    assert one * one - r == n + tiny  # the float64 gradient: the rounding error is 2^-24
    model.w.grad = None
    c, f32 = 4.0, torch.finfo(torch.float32)
    rtol = 1.3e-6  # torch.testing's float32 rtol
    e = min(tiny, math.sqrt(f32.eps) * n)
    allowed = c * rtol * n + f32.smallest_normal * f32.eps + c * (4 * e + rtol * n)
    bound = float(torch.tensor(c * n - ratio * allowed, dtype=torch.float32))
    assert bound > n  # the c = 1 gradient is left alone
    assert (c * n - bound) / allowed == pytest.approx(ratio, rel=0.01)
    assert_rescaling_equivariant(model, x, loss_fn, c)  # honest: c n exactly (c a power of 2)
    model.w.register_hook(lambda g: g.clamp(-bound, bound))
    if ratio < 1:
        assert_rescaling_equivariant(model, x, loss_fn, c)
    else:
        with pytest.raises(StabilityError, match=r"did not scale every gradient by 4"):
            assert_rescaling_equivariant(model, x, loss_fn, c)


@pytest.mark.parametrize("constant", [math.inf, -math.inf, math.nan])
def test_rescaling_fails_on_a_non_finite_loss_even_where_the_gradients_are_finite(constant: float) -> None:
    """A constant added to the loss leaves every gradient as it was (d/dw of a constant is 0), so the
    gradients are finite and scale by c exactly; the loss itself is not finite, which the invariant
    reports as such."""
    model = _ProductMinus()
    x = torch.tensor([1.0, 2.0, 3.0])
    assert_rescaling_equivariant(model, x, lambda out, _: out.sum(), 4.0)
    with pytest.raises(StabilityError, match=r"The loss is not finite \((-?inf|nan)\)"):
        assert_rescaling_equivariant(model, x, lambda out, _: out.sum() + constant, 4.0)


DEEP = Config.of("resmlp", norm="pre", init_scale=3.0, depth=48, width=32, batch_size=4)
"""Deep enough for a per-block gain above 1 to compound: the settings the two broken stacks fail at."""


def probe_built(b: Built, **kw: object) -> object:
    return probe_module(b.model, b.inputs, b.loss_fn, blocks=b.blocks, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", range(4))
def test_bounded_growth_catches_post_norm_in_disguise(seed: int) -> None:
    """Pre-norm: the skip path is the identity, each block adds f(LN(x)) whose Jacobian shrinks as
    1/||x|| while the stream grows, so the gradient grows polynomially in depth (measured here from
    the input, seeds 0-11: growth 73-321). The disguise normalises after the sum: each block's
    Jacobian is J_LN(x + f(x)) (I + J_f), and with tanh at init_scale 3 that is about 1.2-1.4 per
    block, which compounds over 48 blocks (measured, seeds 0-11: growth 2.7e4-6.7e6). A limit of 1e3
    sits 3x above the first and 27x below the second."""
    c = DEEP.with_knobs(activation="tanh", seed=seed)
    assert_bounded_growth(probe_built(build(c)), 1e3)  # type: ignore[arg-type]
    fake = probe_built(broken.disguised_prenorm(c))
    with pytest.raises(StabilityError) as info:
        assert_bounded_growth(fake, 1e3)  # type: ignore[arg-type]
    message = str(info.value)
    assert f"Overall growth: {fake.growth:.4g} (allowed: <= 1000)" in message  # type: ignore[attr-defined]
    assert "Layers over bound: 0 / 48" in message and "Worst layer: 'layers." in message


def test_bounded_growth_passes_the_gains_the_probe_does_not_take() -> None:
    """Oracle: the construction, a stable stack (growth < 1). A block run only for a logged number and
    an encoder-decoder's junction have NaN gains by definition, between finite norms: there is no
    gain to bound. They failed it as 'above the limit, worst gain nan' (every hf:t5 would); a NaN
    gradient still fails it."""

    class Logged(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3))
            self.seen = 0.0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.blocks[1](self.blocks[0](x))
            self.seen = float(self.blocks[2](x).detach().norm())
            return x

    torch.manual_seed(0)
    m = probe_module(Logged(), torch.randn(4, 8), lambda o, _: o.pow(2).mean())
    assert math.isnan(m.gains[-1]) and m.growth < 1.0
    assert_bounded_growth(m, 1e3)
    with warnings.catch_warnings():  # torch's note on nested tensors, about inference speed
        warnings.simplefilter("ignore")
        junction = nn.Transformer(8, 2, 2, 2, 16, batch_first=True)
    src, tgt = torch.randn(2, 5, 8), torch.randn(2, 4, 8)
    t = probe_module(junction, (src, tgt), lambda o, _: o.pow(2).mean())
    assert any(math.isnan(g) for g in t.gains) and t.growth < 1e3
    assert_bounded_growth(t, 1e3)


def test_bounded_growth_counts_layers_over_a_gain_limit_and_nan_and_fails_where_nothing_was_measured() -> (
    None
):
    m = probe_built(broken.disguised_prenorm(DEEP.with_knobs(activation="tanh")))
    with pytest.raises(StabilityError, match=r"Layers over bound: \d+ / 48"):
        assert_bounded_growth(m, 1e9, gain_limit=1.5)  # type: ignore[arg-type]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    silent = probe_module(net, torch.ones(1, 2), lambda o, _: o.sum() * 0)
    assert math.isnan(silent.growth) and all(g == 0.0 for g in silent.activation_grad_norms)
    # no gradient reached any block (0 / 0): nothing was measured, which passed any limit (an audit:
    # torchvision's ViT, its head zero-initialised); with steps=1 the growth is read after one update
    with pytest.raises(
        StabilityError, match=r"(?s)could not be measured.*no gradient reached any block output"
    ):
        assert_bounded_growth(silent, 10.0)
    head = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 2))
    nn.init.zeros_(head[4].weight)
    blocks = [("0", head[0]), ("2", head[2])]
    zero = probe_module(head, torch.ones(3, 2), lambda o, _: o.pow(2).sum(), blocks=blocks)
    with pytest.raises(StabilityError, match="steps=1"):
        assert_bounded_growth(zero, 10.0)
    assert_bounded_growth(
        probe_module(head, torch.ones(3, 2), lambda o, _: o.pow(2).sum(), blocks=blocks, steps=1), 10.0
    )
    with torch.no_grad():
        net[1].weight[0, 0] = math.nan
    nan = probe_module(net, torch.ones(1, 2), lambda o, _: o.sum())
    with pytest.raises(StabilityError, match="Overall growth: nan"):
        assert_bounded_growth(nan, 10.0)  # a NaN gradient is reported, never passed
    with pytest.raises(UsageError):
        assert_bounded_growth(nan, -1.0)


@pytest.mark.parametrize("seed", range(3))
def test_finite_training_catches_a_pre_norm_block_whose_norm_never_runs(seed: int) -> None:
    """Without the LayerNorm, a linear branch multiplies the stream by about sqrt(1 + init_scale**4)
    = 9 per block, and 9**40 passes float32's 3.4e38: it overflows near block 40 (measured: 39-40)."""
    c = DEEP.with_knobs(activation="linear", seed=seed)
    real = build(c)
    m = assert_finite_training(real.model, real.inputs, real.loss_fn, blocks=real.blocks, steps=5)
    assert m.steps_run == 5
    fake = broken.prenorm_without_norm(c)
    with pytest.raises(StabilityError) as info:
        assert_finite_training(fake.model, fake.inputs, fake.loss_fn, blocks=fake.blocks, steps=5)
    message = str(info.value)
    assert "Training went non-finite within 5 adam steps at lr=0.001" in message
    assert "Steps finite: 0 / 6 (step 0 at init, then one per update)" in message
    assert re.search(r"First non-finite: step 0, layer 'layers\.(39|40)', tensor 'activation'", message)


def test_finite_training_names_the_step_when_a_large_lr_blows_up() -> None:
    b = zoo("mlp", activation="relu", init_scale=1.5)
    with pytest.raises(StabilityError, match=r"First non-finite: step [1-9]") as info:
        assert_finite_training(b.model, b.inputs, b.loss_fn, steps=20, lr=1e30, optimizer="sgd")
    step = int(re.search(r"First non-finite: step (\d+)", str(info.value))[1])  # type: ignore[index]
    assert f"Steps finite: {step} / 21" in str(info.value)  # steps 0..step-1 of the 21 measured
    with pytest.raises(UsageError, match="steps must be an int >= 1"):
        assert_finite_training(b.model, b.inputs, b.loss_fn, steps=0)


def test_finite_training_of_a_config_uses_its_steps_lr_and_optimizer() -> None:
    """The Config form probes the Config itself: the same lr 1e30 blows up, lr 0.01 does not."""
    c = Config.of("mlp", activation="relu", init_scale=1.5, steps=20, optimizer="sgd", lr=0.01)
    assert assert_finite_training(c) == probe(c)
    with pytest.raises(StabilityError, match=r"within 20 sgd steps at lr=1e\+30") as info:
        assert_finite_training(c.with_run(lr=1e30))
    assert re.search(r"First non-finite: step [1-9]", str(info.value))
    with pytest.raises(UsageError, match=r"trains for the Config's run\.steps, which is 0"):
        assert_finite_training(c.with_run(steps=0))  # the user gave no steps= (it said 'got steps=0')
    b = build(c)
    with pytest.raises(UsageError, match="takes no inputs or loss_fn"):
        assert_finite_training(c, b.inputs, b.loss_fn)  # type: ignore[call-overload]
    with pytest.raises(UsageError, match="pass inputs and loss_fn too"):
        assert_finite_training(b.model)  # type: ignore[call-overload]
    # a run setting beside a Config is refused, not ignored (steps=50, lr=1e30 passed after the
    # Config's 20 steps at 0.01, found by a new user's trial); a module still takes them
    for setting in ({"steps": 50, "lr": 1e30}, {"optimizer": "adam"}, {"seed": 3}, {"clip": 1.0}):
        with pytest.raises(UsageError, match=rf"from the Config, not {next(iter(setting))}=") as caught:
            assert_finite_training(c, **setting)  # type: ignore[call-overload]
        assert "\n" not in str(caught.value)
    for also in ({}, {"steps": 5}, {"seed": 1}):  # no Config holds blocks, with another setting too
        with pytest.raises(UsageError, match="call it on the module") as caught:
            assert_finite_training(c, blocks=b.blocks, **also)  # type: ignore[call-overload]
        assert "\n" not in str(caught.value)
    with pytest.raises(StabilityError, match=r"within 20 sgd steps at lr=1e\+30"):
        assert_finite_training(b.model, b.inputs, b.loss_fn, steps=20, lr=1e30, optimizer="sgd")


def test_rescaling_of_a_model_whose_hooks_cast_to_float32_is_judged_not_a_crash() -> None:
    """A parameter hook `g.float()` is linear, and correct on a float32 model; the check's float64
    re-run (the rounding error it allows) made autograd raise 'hook has changed the type of value',
    a RuntimeError out of the check (found by an audit). The rounding error is then taken at its cap:
    the model passes, and a hook of the same cast returning the first gradient it saw (stale, not
    x c) still fails, named."""
    b = zoo("resmlp", norm="pre")
    handles = [p.register_hook(lambda g: g.float()) for p in b.model.parameters()]
    assert_rescaling_equivariant(b.model, b.inputs, b.loss_fn, 4.0)
    for h in handles:
        h.remove()

    def stale(kept: dict[str, torch.Tensor]) -> Any:
        return lambda g: kept.setdefault("g", g.detach().clone()).float()

    for p in b.model.parameters():
        p.register_hook(stale({}))
    with pytest.raises(StabilityError, match=r"did not scale every gradient by 4"):
        assert_rescaling_equivariant(b.model, b.inputs, b.loss_fn, 4.0)


def test_gradscaler_guards_pass_for_torch_gradscaler() -> None:
    b = zoo("resmlp", norm="pre")
    assert_gradscaler_guards(b.model, b.inputs, b.loss_fn)  # torch.amp.GradScaler("cpu")
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    assert_gradscaler_guards(b.model, b.inputs, b.loss_fn, scaler)
    n = sum(p.requires_grad for p in b.model.parameters())
    poisoned = 3 * 2 * 2 + n - 2  # Inf, -Inf, NaN x first, last gradient x end, middle; one between
    halved = 1024.0 * 0.5**poisoned  # backed off once per poisoned step, then set to 2^8 where that
    # left at 1 or below, set above it for the clean step; one more skip after that halves it again
    assert scaler.get_scale() == (UNHIDDEN if halved <= 1.0 else halved) / 2


def test_gradscaler_guards_catch_a_scaler_checking_only_the_middle_tensors_it_skips() -> None:
    """A scaler checking matrices alone steps on a NaN in a LayerNorm's bias, a tensor between the
    first and the last (it passed: only those two were poisoned)."""
    b = zoo("resmlp", norm="pre")
    with pytest.raises(StabilityError, match="WeightsOnlyScaler stepped on a gradient holding"):
        assert_gradscaler_guards(b.model, b.inputs, b.loss_fn, broken.WeightsOnlyScaler())  # type: ignore[arg-type]


def test_gradscaler_guards_catch_a_scaler_checking_only_the_ends_of_each_tensor() -> None:
    """A scaler reading only each gradient's first and last entries (or every other entry) steps on a
    NaN inside a tensor: it passed, every poison went to an end entry."""
    b = zoo("resmlp", norm="pre")
    for scaler in (broken.EndsOnlyScaler(), broken.EvenEntriesScaler()):
        with pytest.raises(StabilityError, match=f"{type(scaler).__name__} stepped on a gradient holding"):
            assert_gradscaler_guards(b.model, b.inputs, b.loss_fn, scaler)  # type: ignore[arg-type]


def test_gradscaler_guards_catch_a_scaler_checking_every_third_entry_at_powers_of_4() -> None:
    """Every matrix and bias of a width-64 MLP has 4^k entries, 3j + 1: the first, last and middle odd
    entry poisoned were all every third one's, and a scaler checking every third entry passed (found
    by an audit). The entry inside is one no stride from 2 to 7 reaches from the first; torch's
    GradScaler passes."""
    b = build(Config.of("mlp", width=64, depth=3, batch_size=4))
    assert all(p.numel() in (4**3, 4**6) for p in b.model.parameters())
    assert_gradscaler_guards(b.model, b.inputs, b.loss_fn)
    with pytest.raises(StabilityError, match="ThirdEntriesScaler stepped on a gradient holding"):
        assert_gradscaler_guards(b.model, b.inputs, b.loss_fn, broken.ThirdEntriesScaler())  # type: ignore[arg-type]


@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("scaler", [broken.StaleOnSkipScaler, broken.ClearsStateOnSkipScaler])
def test_gradscaler_guards_catch_a_skip_that_changes_the_model_after_a_clean_step(
    scaler: type[broken.UnguardedScaler], opt: str
) -> None:
    """Every poisoned step ran before any clean one, on an optimizer with no state: a scaler stepping
    on the last clean gradients, or clearing Adam's moments, where it should skip passed (found by an
    audit). A skip after the clean step is checked too: weights and optimizer state bit-identical."""
    b = zoo("mlp")

    def make(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return (
            torch.optim.Adam(params, lr=1e-3)
            if opt == "adam"
            else torch.optim.SGD(params, lr=0.01, momentum=0.9)
        )

    assert_gradscaler_guards(b.model, b.inputs, b.loss_fn, optimizer=make)
    with pytest.raises(StabilityError, match=f"{scaler.__name__} changed the model on a step it skipped"):
        assert_gradscaler_guards(b.model, b.inputs, b.loss_fn, scaler(), optimizer=make)  # type: ignore[arg-type]


@pytest.mark.parametrize("scaler", [broken.NeverUnscalesScaler(), broken.UnscalesTwiceScaler()])
def test_gradscaler_guards_catch_wrong_unscaling_under_adam(scaler: object) -> None:
    """Adam's first update, lr m / (sqrt(v) + eps), does not depend on the gradient's scale where eps
    is negligible (1e-30 here), so the weights of a scaler that never unscales (or unscales twice)
    matched a correct one's and it passed; Adam's moments are the gradient's, 65536x off. torch's own
    GradScaler passes with Adam."""
    b = zoo("resmlp", norm="pre")

    def adam(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=1e-3, eps=1e-30)

    assert_gradscaler_guards(b.model, b.inputs, b.loss_fn, optimizer=adam)
    with pytest.raises(StabilityError, match="optimizer state unlike one plain step"):
        assert_gradscaler_guards(b.model, b.inputs, b.loss_fn, scaler, optimizer=adam)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("scaler", "expected"),
    [
        (broken.UnguardedScaler(), "UnguardedScaler stepped on a gradient holding inf"),
        (broken.NanOnlyScaler(), "NanOnlyScaler stepped on a gradient holding inf"),
        (broken.FirstGradOnlyScaler(), "FirstGradOnlyScaler stepped on a gradient holding inf (in 'layers.3"),
        (broken.NeverStepsScaler(), "did not take a clean step (finite gradients)"),
        (broken.NeverUnscalesScaler(), "clean step did not update the weights as a step on the unscaled"),
        (broken.UnscalesTwiceScaler(), "clean step did not update the weights as a step on the unscaled"),
        (broken.PositiveInfScaler(), "PositiveInfScaler stepped on a gradient holding -inf"),
        (torch.amp.GradScaler("cpu", enabled=False), "GradScaler stepped on a gradient holding inf"),
    ],
)
def test_gradscaler_guards_catch_broken_scalers(scaler: object, expected: str) -> None:
    b = zoo("mlp")
    with pytest.raises(StabilityError) as info:
        assert_gradscaler_guards(b.model, b.inputs, b.loss_fn, scaler)  # type: ignore[arg-type]
    assert expected in str(info.value)
    if "stepped on" in expected and "FirstGrad" not in expected:
        assert "Weight tensors changed: 4 / 4; non-finite: 1 / 4" in str(
            info.value
        ) and "(allowed: unchanged)" in str(info.value)


def test_every_invariant_hides_its_own_frames_from_the_failure_report() -> None:
    """pytest's own traceback filter (what a failing test shows) drops every frame inside
    stabilitycheck/invariants*.py: the report ends at the user's call. One failing call per assert_*."""
    import stabilitycheck.invariants as inv

    params, before = with_grads()
    b = zoo("mlp")
    m = probe_built(broken.disguised_prenorm(DEEP))
    fake = broken.prenorm_without_norm(DEEP.with_knobs(activation="linear"))
    failing: dict[str, Callable[[], object]] = {
        "assert_clipped_norm_bounded": lambda: assert_clipped_norm_bounded(params, 1e-3),
        "assert_clipped_value_bounded": lambda: assert_clipped_value_bounded(params, 1e-6),
        "assert_direction_preserved": lambda: assert_direction_preserved(before, [-g for g in before]),
        "assert_rescaling_equivariant": lambda: assert_rescaling_equivariant(
            b.model, b.inputs, broken.loss_ignoring_grad_output, 4.0
        ),
        "assert_finite_training": lambda: assert_finite_training(
            fake.model, fake.inputs, fake.loss_fn, blocks=fake.blocks, steps=1
        ),
        "assert_bounded_growth": lambda: assert_bounded_growth(m, 1.0),  # type: ignore[arg-type]
        "assert_gradscaler_guards": lambda: assert_gradscaler_guards(
            b.model, b.inputs, b.loss_fn, broken.UnguardedScaler()
        ),
    }
    assert set(failing) == {n for n in dir(inv) if n.startswith("assert_")}  # a new one needs a row
    for name, call in failing.items():
        with pytest.raises(StabilityError) as info:
            call()
        shown = [str(entry.path) for entry in info.traceback.filter(info)]
        assert not any(Path(path).name.startswith("invariants") for path in shown), (name, shown)
        assert isinstance(info.value, AssertionError)


def test_gradscaler_guard_accepts_a_clean_step_whose_gradients_are_all_zero() -> None:
    # A dead ReLU stack (all pre-activations negative) has zero gradients: a correct clean step
    # leaves its weights unchanged, which is not a scaler that "never steps".
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    with torch.no_grad():
        model[0].bias.fill_(-100.0)
    x = torch.randn(2, 4)

    def loss_fn(out: torch.Tensor, _: object) -> torch.Tensor:
        return out.sum() * 0.0 + model[0](x).relu().sum()

    assert_gradscaler_guards(model, x, loss_fn)


@pytest.mark.parametrize("norm_type", [1.0, 2.0])
def test_torchs_own_clip_passes_on_a_million_float32_values_and_a_1_percent_error_does_not(
    norm_type: float,
) -> None:
    """Oracle: torch.nn.utils.clip_grad_norm_. Its float32 total over 1e6 values is off by up to 1e-5
    (L2) and 1e-4 (L1) relative, which the clipped norm inherits: that is allowed, measured with
    torch's own reduction; a clip 1% too weak is still caught at that size."""
    for seed in range(3):
        grad = torch.randn(1_000_000, generator=torch.Generator().manual_seed(seed))
        p = nn.Parameter(torch.zeros(1_000_000))
        p.grad = grad.clone()
        torch.nn.utils.clip_grad_norm_([p], 1.0, norm_type=norm_type)
        assert_clipped_norm_bounded([p], 1.0, norm_type, before=[grad])
        p.grad = grad.clone()
        torch.nn.utils.clip_grad_norm_([p], 1.01, norm_type=norm_type)  # the broken one: 1% over
        with pytest.raises(StabilityError, match="torch's own rounding of the total included"):
            assert_clipped_norm_bounded([p], 1.0, norm_type, before=[grad])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rescaling_passes_a_bias_whose_exact_gradient_is_zero(dtype: torch.dtype) -> None:
    """A bias before a BatchNorm has gradient 0 in exact arithmetic (the normalisation removes any
    shift), so its computed gradient is rounding noise with no direction to keep; backward is still
    linear, and the invariant must pass at c = 5 and 1000 (it failed on that one tensor)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.Linear(32, 4)).to(dtype)
    x, y = torch.randn(8, 16, dtype=dtype), torch.randint(0, 4, (8,))
    for c in (5.0, 1000.0):
        assert_rescaling_equivariant(model, x, lambda out, _: nn.functional.cross_entropy(out, y), c)
    nn.functional.cross_entropy(model(x), y).backward()  # the .grad fields were restored to None
    assert float(model[0].bias.grad.norm()) < 1e-6 * float(model[0].weight.grad.norm())  # type: ignore[union-attr]


@pytest.mark.parametrize("scale", [1e-3, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rescaling_passes_torchs_backward_through_a_batchnorm_at_any_input_scale(
    scale: float, dtype: torch.dtype
) -> None:
    """At inputs x 1e-3 the bias before a BatchNorm (exact gradient 0) is rounding noise larger than
    sqrt(eps) of its own norm, where its measured rounding error was capped: torch's own backward
    failed on 10 of 10 seeds in float32 (an audit). Oracle: torch's backward is linear; the float64
    run of the same model scales every gradient by c to 1e-12 of the total."""
    y = torch.arange(8) % 4

    def loss(out: torch.Tensor, _: object) -> torch.Tensor:
        return nn.functional.cross_entropy(out.to(torch.promote_types(out.dtype, torch.float32)), y)

    for seed in range(4):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
        x = torch.randn(8, 16) * scale
        wide = copy.deepcopy(model).double()
        g1 = torch.autograd.grad(loss(wide(x.double()), None), list(wide.parameters()))
        g3 = torch.autograd.grad(3.0 * loss(wide(x.double()), None), list(wide.parameters()))
        total = math.sqrt(sum(float(a.norm()) ** 2 for a in g1))
        assert all(float((b - 3.0 * a).norm()) <= 1e-12 * total for a, b in zip(g1, g3, strict=True))
        assert_rescaling_equivariant(model.to(dtype), x.to(dtype), loss, 3.0, seed=seed)


def test_rescaling_catches_a_hook_normalising_the_gradient_of_a_bias_before_a_batchnorm() -> None:
    """That bias's gradient is rounding alone, whose error is not capped at sqrt(eps) of its own norm:
    a hook normalising it to unit norm made a float64 gradient of unit norm, 'smaller than the error',
    and the bug passed (a review). Uncapped only where the float64 gradient is also a rounding's
    share of the total. Oracle: the hooked bias's gradient has norm 1 at c = 1 and at c = 3."""
    y = torch.arange(8) % 4
    loss = lambda out, _: nn.functional.cross_entropy(out, y)  # noqa: E731
    for seed in range(3):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
        model[0].bias.register_hook(lambda g: g / g.norm().clamp_min(1e-30))
        x = torch.randn(8, 16)
        norms = [
            float(torch.autograd.grad(c * loss(model(x), x), [model[0].bias])[0].norm()) for c in (1.0, 3.0)
        ]
        assert norms == pytest.approx([1.0, 1.0])
        with pytest.raises(StabilityError, match="did not scale every gradient"):
            assert_rescaling_equivariant(model, x, loss, 3.0, seed=seed)


class _ResidualTanh(nn.Module):
    """x + tanh(fc(norm(x))), fc's weights at std 1/sqrt(16)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(16), nn.Linear(16, 16)
        nn.init.normal_(self.fc.weight, std=0.25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(self.norm(x)))


def _clamp_input_grads(_m: nn.Module, grads: Any, _out: Any) -> tuple[torch.Tensor | None, ...]:
    return tuple(g.clamp(-1e-3, 1e-3) if g is not None else None for g in grads)


@pytest.mark.parametrize("c", [0.5, 3.0])
@pytest.mark.parametrize("clamped", [True, False])
def test_rescaling_catches_a_clamping_hook_on_a_small_share_of_a_bfloat16_gradient(
    clamped: bool, c: float
) -> None:
    """Every tensor was allowed rtol of the total gradient norm, bfloat16's 1.6%: a hook clamping the
    gradient into block 1, whose tensors before it are 0.25% of the total and off c x by 66-95%,
    passed (an audit). Where a float64 re-run measures the rounding, that share is the dtype's eps.
    Oracle: the clamp binds (the first layer's gradients are not c x theirs, compared directly), and
    without it the same model passes."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 16), _ResidualTanh(), _ResidualTanh(), _ResidualTanh(), nn.Linear(16, 10)
    )
    model = model.to(torch.bfloat16)
    if clamped:
        model[2].register_full_backward_hook(_clamp_input_grads)
    x, y = torch.randn(8, 16, dtype=torch.bfloat16), torch.arange(8) % 10
    loss = lambda out, _: nn.functional.cross_entropy(out.float(), y)  # noqa: E731
    if not clamped:
        assert_rescaling_equivariant(model, x, loss, c)
        return
    g1 = torch.autograd.grad(loss(model(x), x), list(model[0].parameters()))
    gc = torch.autograd.grad(c * loss(model(x), x), list(model[0].parameters()))
    pairs = zip(g1, gc, strict=True)
    assert max(float((b.double() - c * a.double()).norm() / (c * a.double()).norm()) for a, b in pairs) > 0.3
    with pytest.raises(StabilityError, match="did not scale every gradient"):
        assert_rescaling_equivariant(model, x, loss, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clipped_norm_accepts_any_coefficient_from_torchs_to_the_exact_one(dtype: torch.dtype) -> None:
    """Oracle: torch's coefficient max_norm / (total + 1e-6) and the exact max_norm / total both clip
    correctly. [3e-3, 4e-3, 0] has total 5e-3: scaled by exactly 0.2 it has norm max_norm = 1e-3 and
    its direction, yet it was rejected for not being x 0.19996. A factor outside the two fails."""
    grad = torch.tensor([3e-3, 4e-3, 0.0], dtype=dtype)
    p = nn.Parameter(torch.zeros(3, dtype=dtype))
    torchs, exact = 1e-3 / (5e-3 + 1e-6), 1e-3 / 5e-3
    for c in (torchs, (torchs + exact) / 2, exact):
        p.grad = grad * c
        assert_clipped_norm_bounded([p], 1e-3, before=[grad])
    p.grad = grad.clone()
    torch.nn.utils.clip_grad_norm_([p], 1e-3)  # torch's own
    assert_clipped_norm_bounded([p], 1e-3, before=[grad])
    for c in (torchs * (1 - 1e-3), exact * (1 + 1e-3)):
        p.grad = grad * c
        with pytest.raises(StabilityError):
            assert_clipped_norm_bounded([p], 1e-3, before=[grad])


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_per_tensor_clipping_fails_with_before_whatever_its_total(norm_type: float) -> None:
    """Brute force over 20 gradient draws: a clip per tensor (each to max_norm on its own) can leave
    the total within max_norm (always for the inf-norm), so the bound alone passes it; with before=
    the contract of one common coefficient catches every draw where it changed anything."""
    caught_by_bound = 0
    for seed in range(20):
        params, before = with_grads(seed=seed)
        max_norm = 0.5 * max(float(torch.linalg.vector_norm(b, norm_type)) for b in before)
        for g in (p.grad for p in params if p.grad is not None):
            g.mul_(min(1.0, max_norm / (float(torch.linalg.vector_norm(g, norm_type)) + 1e-6)))
        try:
            assert_clipped_norm_bounded(params, max_norm, norm_type)
        except StabilityError:
            caught_by_bound += 1
        with pytest.raises(StabilityError):
            assert_clipped_norm_bounded(params, max_norm, norm_type, before=before)
    if norm_type == math.inf:
        assert caught_by_bound == 0  # the inf-norm total of per-tensor clipped gradients is <= max_norm


def test_gradscaler_guard_blames_a_nan_weight_on_the_model_not_the_scaler() -> None:
    """Oracle: torch's GradScaler itself skips the step (the weights keep every value, NaN included,
    compared with equal_nan); the invariant said it 'stepped on a gradient holding inf' because
    NaN != NaN. It now says the model's weight was non-finite before any step, and names it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    with torch.no_grad():
        model[0].weight[0, 0] = math.nan
    x = torch.randn(4, 8)
    weights = [p.detach().clone() for p in model.parameters()]
    scaler, opt = torch.amp.GradScaler("cpu"), torch.optim.SGD(model.parameters(), lr=0.01)
    scaler.scale(model(x).square().mean()).backward()
    scaler.step(opt)
    scaler.update()
    assert all(
        torch.allclose(p, w, rtol=0, atol=0, equal_nan=True)
        for p, w in zip(model.parameters(), weights, strict=True)
    )
    with pytest.raises(StabilityError) as info:
        assert_gradscaler_guards(model, x, lambda out, _: out.square().mean())
    message = str(info.value)
    assert "before any step" in message and "first: '0.weight'" in message and "stepped" not in message


def _layer_grads(shapes: list[tuple[int, ...]], seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.zeros(shape)) for shape in shapes]
    for p in params:
        p.grad = torch.randn(*p.shape, generator=gen) * 0.01
    return params


@pytest.mark.parametrize("shapes", [[(2048, 2048)], [(1024, 4096), (4096,)], [(1 << 22,)]])
def test_clip_grad_norm_check_allows_torchs_own_rounding_of_large_float32_layers(
    shapes: list[tuple[int, ...]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Single process, torch's own clip: a correct total off the float64 norm by torch's float32
    rounding (5e-5 relative on a 2048 x 2048 layer) passes; a total 1e-3 off (a wrong reduction) or a
    local-shard-like half of it does not. The fixed rtol of 1e-5 failed torch itself here."""
    params = _layer_grads(shapes)
    exact = math.sqrt(sum(float(p.grad.double().square().sum()) for p in params))  # type: ignore[union-attr]
    assert check_clip_grad_norm(params) == pytest.approx(exact, rel=1e-3)
    clip = torch.nn.utils.clip_grad_norm_
    for factor in (1 + 1e-3, 0.5):
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda ps, m, f=factor: clip(ps, m) * f)
        with pytest.raises(StabilityError, match="full-model gradient norm"):
            check_clip_grad_norm(params)


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_clip_grad_norm_check_leaves_non_finite_gradients_as_they_were(bad: float) -> None:
    """An infinite max norm scales by inf / inf = NaN when the total is non-finite: the check turned
    every gradient into NaN. Now they are unchanged (bitwise), and a non-finite total matches in kind."""
    params = _layer_grads([(16, 16), (16,)])
    params[0].grad[3, 4] = bad  # type: ignore[index]
    before = [p.grad.clone() for p in params]  # type: ignore[union-attr]
    value = check_clip_grad_norm(params)
    assert math.isnan(value) if math.isnan(bad) else value == math.inf
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p.grad.isnan(), b.isnan())  # type: ignore[union-attr]
        assert torch.equal(p.grad.nan_to_num(), b.nan_to_num())  # type: ignore[union-attr]


@pytest.mark.parametrize("returned", [5.0, math.nan])
def test_clip_grad_norm_check_fails_a_clip_that_reads_inf_gradients_as_finite_or_nan(
    returned: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gradients holding an Inf have an infinite total norm: a clip_grad_norm_ that returns a finite
    number for them (one leaving the non-finite entries out) or NaN fails the check; torch's own
    passes (the test above). Oracle: the construction."""
    params = _layer_grads([(16, 16), (16,)])
    params[0].grad[3, 4] = math.inf  # type: ignore[index]
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda ps, m: torch.tensor(returned))
    with pytest.raises(StabilityError, match="full-model gradient norm is inf"):
        check_clip_grad_norm(params)


def test_clip_grad_norm_check_blames_an_overflow_only_where_torchs_total_overflowed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A total off by half on finite gradients whose norm torch can take is a wrong reduction (a
    local-shard norm?), not torch's total overflowing; the message must not say it overflowed."""
    params = _layer_grads([(16, 16), (16,)])
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda ps, m: clip(ps, m) * 0.5)
    with pytest.raises(StabilityError, match="local-shard norm") as err:
        check_clip_grad_norm(params)
    assert "overflowed" not in str(err.value)


def test_clip_grad_norm_check_takes_a_generator_of_parameters() -> None:
    """model.parameters(), as clip_grad_norm_ accepts: the first norm used it up, so torch's clip saw
    no parameters and returned 0."""
    model = nn.Linear(8, 8)
    model(torch.randn(4, 8)).square().sum().backward()
    expected = math.sqrt(sum(float(p.grad.double().square().sum()) for p in model.parameters()))  # type: ignore[union-attr]
    assert check_clip_grad_norm(model.parameters()) == pytest.approx(expected, rel=1e-6)


def test_direction_preserved_pairs_two_mappings_by_key() -> None:
    """A correct clip_grad_norm_ with `after` built in another key order passes (the two dicts were
    paired by position: 'Shape changed' or a cosine of a pair never meant); a clip that scales one
    tensor differently still fails; different key sets are a usage error naming them."""
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 3))
    model(torch.randn(8, 16)).square().sum().backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}  # type: ignore[union-attr]
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    after = {n: p.grad.clone() for n, p in reversed(list(model.named_parameters()))}  # type: ignore[union-attr]
    assert assert_direction_preserved(before, after) < 1
    after["1.bias"] *= 0.5
    with pytest.raises(StabilityError, match=re.escape("'1.bias'")):
        assert_direction_preserved(before, after)
    with pytest.raises(UsageError, match=re.escape("only in before ['1.bias']")):
        assert_direction_preserved(before, {k: v for k, v in after.items() if k != "1.bias"})


def test_rescaling_check_leaves_batchnorm_statistics_as_they_were() -> None:
    """Its forward passes updated a BatchNorm's running mean and variance and its batch count; only
    the .grad fields were restored."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert_rescaling_equivariant(model, torch.randn(16, 8), lambda out, _: out.square().mean(), c=7.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _ClampsInFloat32(torch.autograd.Function):
    """Identity forward; a backward that clamps its gradient at 1e-3 in float32 alone (a low-precision
    kernel's bug), exact in float64, the dtype the check's rounding re-run uses."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x * 1.0

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return g.clamp(-1e-3, 1e-3) if g.dtype == torch.float32 else g


@pytest.mark.parametrize("c", [3.0, 7.3, 0.5, 1e-3, 1024.0])
def test_rescaling_catches_a_backward_fault_in_the_models_dtype_alone(c: float) -> None:
    """The float64 re-run that measures rounding never sees a fault of the float32 path alone, so
    it must not be taken as rounding whole: an uncapped allowance where the re-runs scaled by c missed
    this clamp at every c (a review). Oracle: the clamp bites at c = 1 and at c, unequally."""
    torch.manual_seed(0)
    a, b = nn.Linear(8, 16), nn.Linear(16, 4)
    model = nn.Sequential(a, nn.Tanh(), _Apply(_ClampsInFloat32), b)
    with pytest.raises(StabilityError, match=rf"did not scale every gradient by {c:g}"):
        assert_rescaling_equivariant(model, torch.randn(32, 8), lambda out, _: out.square().mean(), c)


class _Apply(nn.Module):
    """A module applying an autograd Function."""

    def __init__(self, fn: type[torch.autograd.Function]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn.apply(x)  # type: ignore[no-any-return]


def test_torchs_own_backward_passes_where_c_puts_its_gradients_among_the_subnormals() -> None:
    """float16 gradients x 1e-4 and float32 gradients x 1e-38 fall among the subnormals and lose
    precision there: torch's own backward, linear, failed the check (float32: 4.1e-44 off, 2.8e-44
    allowed) until the run at c was measured against its own float64 re-run, where they are normal
    numbers: what they lose is rounding."""
    torch.manual_seed(0)
    half = nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 4)).half()
    assert_rescaling_equivariant(
        half, torch.randn(32, 16).half(), lambda out, _: out.float().square().mean(), c=1e-4
    )
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    assert_rescaling_equivariant(model, torch.randn(32, 16), lambda out, _: out.square().mean(), c=1e-38)


def test_a_rescaling_failure_among_the_subnormals_says_so() -> None:
    """A hook that clamps the gradient fails at c = 1e-38 in float32, whose gradients x c fall below
    float32's smallest normal (1.2e-38): the message names that too, for a c near 1 checks the same
    linearity without it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    model[0].weight.register_hook(lambda g: g.sign() * 1e-30)  # ignores its upstream gradient's scale
    with pytest.raises(
        StabilityError, match=r"In float32, gradients x 1e-38 fall below \S+, among the subnormals"
    ):
        assert_rescaling_equivariant(model, torch.randn(32, 16), lambda out, _: out.square().mean(), c=1e-38)


def test_gradscaler_guard_leaves_the_model_as_it_was() -> None:
    """It left the model one SGD step further on, with its BatchNorm statistics updated."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert_gradscaler_guards(model, torch.randn(16, 8), lambda out, _: out.square().mean())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_clip_checks_pass_torchs_own_clips_on_empty_and_all_zero_gradients() -> None:
    """Oracle: torch's clip_grad_norm_ and clip_grad_value_, which the checks must pass. An empty
    gradient tensor raised RuntimeError from max() / the infinity norm; all-zero gradients with a
    max_norm at or below torch's 1e-6 raised ZeroDivisionError (a dead-ReLU MLP under Hypothesis)."""
    import torch.nn as nn

    params = [nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(0))]
    for norm_type in (2.0, 1.0, math.inf):
        if norm_type != math.inf:  # torch's own infinity norm raises on the empty tensor
            for p in params:
                p.grad = torch.full_like(p, 3.0)
            before = [p.grad.clone() for p in params]  # type: ignore[union-attr]
            torch.nn.utils.clip_grad_norm_(params, 1.0, norm_type)
            assert_clipped_norm_bounded(params, 1.0, norm_type, before=before)
        zeros = [nn.Parameter(torch.zeros(3))]
        zeros[0].grad = torch.zeros(3)
        torch.nn.utils.clip_grad_norm_(zeros, 1e-6, norm_type)
        assert_clipped_norm_bounded(zeros, 1e-6, norm_type, before=[torch.zeros(3)])
    for p in params:
        p.grad = torch.full_like(p, 3.0)
    torch.nn.utils.clip_grad_value_(params, 1.0)
    assert_clipped_value_bounded(params, 1.0)


@pytest.mark.parametrize("norm_type", [math.nan, "fro", -1.0, 0.0, True])
def test_a_norm_type_torch_cannot_clip_by_is_a_usage_error(norm_type: object) -> None:
    """NaN passed anything (every comparison with it is false); 'fro' raised from _foreach_norm."""
    grads = [torch.full((3,), 100.0)]
    with pytest.raises(UsageError, match=r"norm_type must be a number > 0 or math\.inf"):
        assert_clipped_norm_bounded(grads, 1.0, norm_type, before=[g.clone() for g in grads])  # type: ignore[arg-type]


def test_gradscaler_guards_on_a_float16_model_is_a_usage_error() -> None:
    """torch's GradScaler raises 'Attempting to unscale FP16 gradients.' on float16 parameters: the
    check says what to do instead (float32 weights, a float16 autocast forward). Oracle: torch's own
    GradScaler raising on the same model."""
    model = torch.nn.Linear(4, 2).half()
    x = torch.randn(3, 4).half()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(model(x).float().square().mean()).backward()
    with pytest.raises(ValueError, match="FP16"):
        scaler.step(opt)
    with pytest.raises(UsageError, match="parameters are float16"):
        assert_gradscaler_guards(model, x, lambda out, _: out.float().square().mean())


@pytest.mark.parametrize("check", [assert_clipped_norm_bounded, assert_clipped_value_bounded])
def test_a_clip_check_with_no_gradient_to_check_is_a_usage_error(check: Callable[..., None]) -> None:
    """Given the gradients instead of their parameters (total norm 1e6 against max_norm 1), or a model
    never backpropagated, the checks passed: there was no .grad to check (found by a trial)."""
    params, grads = with_grads()
    huge = [g * 1e6 for g in grads]
    with pytest.raises(UsageError, match=r"has a \.grad, so there is nothing to check") as caught:
        check(huge, 1.0)
    assert "\n" not in str(caught.value)
    fresh = build(Config.of("mlp", depth=2, width=8)).model
    with pytest.raises(UsageError, match="nothing to check"):
        check(fresh.parameters(), 1.0)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    check(params, 1.0)  # the parameters themselves pass after torch's clip


def _per_sample(out: torch.Tensor, _: object) -> torch.Tensor:
    return out.pow(2).mean(-1)  # one loss per sample: not a scalar


def _detached(out: torch.Tensor, _: object) -> torch.Tensor:
    return out.detach().pow(2).mean()


@pytest.mark.parametrize(
    ("call", "said"),
    [
        (
            lambda b: assert_rescaling_equivariant(b.model, b.inputs, _per_sample, 2.0),
            "must be a scalar float tensor",
        ),
        (lambda b: assert_rescaling_equivariant(b.model, b.inputs, _detached, 2.0), "does not require grad"),
        (lambda b: assert_gradscaler_guards(b.model, b.inputs, _per_sample), "must be a scalar float tensor"),
        (lambda b: assert_gradscaler_guards(b.model, b.inputs, _detached), "does not require grad"),
        (lambda b: assert_gradscaler_guards(b.model, b.inputs, b.loss_fn, poisons=[]), "poisons must be"),
        (lambda b: assert_gradscaler_guards(b.model, b.inputs, b.loss_fn, poisons=[1.0]), "poisons must be"),
        (
            lambda b: assert_gradscaler_guards(
                b.model, b.inputs, b.loss_fn, optimizer=torch.optim.SGD(b.model.parameters())
            ),
            "optimizer must make the optimizer from the parameters",
        ),
        (
            lambda b: assert_gradscaler_guards(
                b.model, b.inputs, b.loss_fn, torch.optim.SGD(b.model.parameters())
            ),
            "scaler must be a torch.amp.GradScaler",
        ),
    ],
)
def test_misusing_the_rescaling_and_gradscaler_checks_is_one_line(
    call: Callable[[Built], None], said: str
) -> None:
    """Each raised from deep inside torch or the check (grad can be implicitly created only for scalar
    outputs, ZeroDivisionError, 'SGD' object is not callable, a finite poison blamed on the scaler;
    found by a trial)."""
    b = zoo("mlp")
    with pytest.raises(UsageError, match=re.escape(said)) as caught:
        call(b)
    assert "\n" not in str(caught.value)


def test_a_model_or_a_name_where_a_config_or_measurement_goes_is_one_line() -> None:
    """assert_bounded_growth(config), probe(model), assert_stable('mlp') raised AttributeErrors from
    inside (found by a trial; assert_finite_training takes a Config, so the first is an easy slip)."""
    from stabilitycheck.invariants_stable import assert_stable

    c = Config.of("mlp", depth=2, width=8)
    model = build(c).model
    for call, said in (
        (lambda: assert_bounded_growth(c, 100), "assert_bounded_growth takes a Measurement, got Config"),  # type: ignore[arg-type]
        (lambda: assert_bounded_growth(model, 100), "takes a Measurement, got Stack"),  # type: ignore[arg-type]
        (lambda: probe(model), "probe takes a Config, got Stack"),  # type: ignore[arg-type]
        (lambda: probe("mlp"), "probe takes a Config, got str"),  # type: ignore[arg-type]
        (lambda: assert_stable(model), "assert_stable takes a Config or a Space, got Stack"),  # type: ignore[arg-type]
        (lambda: assert_stable("mlp"), "assert_stable takes a Config or a Space, got str"),  # type: ignore[arg-type]
    ):
        with pytest.raises(UsageError, match=re.escape(said)) as caught:
            call()
        assert "\n" not in str(caught.value)


def test_torchs_l1_clip_of_float16_gradients_among_the_subnormals_passes() -> None:
    """Each clipped entry rounds to the float16 subnormal grid, off by up to half a spacing: an L1
    norm adds those errors up entry by entry, where the allowance was sized for L2's square root.
    torch's clip failed at 1.1e-4 against 1.03e-4 allowed, though even the exact coefficient, rounded
    once, gives 1.1e-4 (found by a trial). Oracle: that exactly-rounded answer passes too."""
    gen = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.zeros(2000, dtype=torch.float16))
    before = (torch.randn(2000, generator=gen, dtype=torch.float64) * 1e-7).to(torch.float16)
    exact = 1e-4 / float(torch.linalg.vector_norm(before.double(), 1))
    p.grad = (before.double() * exact).to(torch.float16)  # the exact coefficient, rounded once
    assert float(torch.linalg.vector_norm(p.grad.double(), 1)) > 1.05e-4  # over the old allowance
    assert_clipped_norm_bounded([p], 1e-4, norm_type=1.0, before=[before])
    p.grad = before.clone()
    torch.nn.utils.clip_grad_norm_([p], 1e-4, norm_type=1.0)
    assert_clipped_norm_bounded([p], 1e-4, norm_type=1.0, before=[before])


def test_a_scaler_that_steps_on_zeroed_gradients_is_told_it_stepped_the_optimizer() -> None:
    """Its skipped steps leave Adam's weights as they were but count steps, so the clean step's update,
    bias-corrected by that count, differs: it was reported as a wrong update ('must unscale once'),
    where the fault is the steps taken (found by a trial). The optimizer state is checked first."""
    b = zoo("mlp")

    def adam(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=1e-3)

    with pytest.raises(StabilityError, match="optimizer state unlike one plain step") as caught:
        assert_gradscaler_guards(b.model, b.inputs, b.loss_fn, broken.ZeroesAndStepsScaler(), optimizer=adam)  # type: ignore[arg-type]
    assert "'step'" in str(caught.value) and "A skipped step must not step the optimizer" in str(caught.value)


def test_gradscaler_guards_take_poisons_as_tensors_too() -> None:
    """poisons=(torch.tensor(nan),) was checked and passed; the argument check refused it, saying a
    NaN is not non-finite (found in review)."""
    b = zoo("mlp")
    assert_gradscaler_guards(b.model, b.inputs, b.loss_fn, poisons=(torch.tensor(math.nan),))


def test_value_clipping_allows_only_the_dtypes_rounding_over_clip_value() -> None:
    """Oracle: torch.nn.utils.clip_grad_value_, whose entries are +-clip_value exactly (rounded to the
    gradient dtype: 1e-45 becomes float32's smallest subnormal 1.4e-45), passes; a clamp 5e-6 wide of
    clip_value (4x float32's rtol 1.3e-6) is caught; a clamp to the wrong bound inside it is caught with
    `before`, since clamping is exact."""
    for clip_value in (0.01, 1e-45):
        params, before = with_grads()
        torch.nn.utils.clip_grad_value_(params, clip_value)
        assert_clipped_value_bounded(params, clip_value, before=before)
    params, before = with_grads()
    for p in params:
        p.grad.clamp_(-0.01 * (1 + 5e-6), 0.01 * (1 + 5e-6))  # type: ignore[union-attr]
    with pytest.raises(StabilityError, match=r"exceed clip_value=0\.01"):
        assert_clipped_value_bounded(params, 0.01)
    params, before = with_grads()
    torch.nn.utils.clip_grad_value_(params, 0.005)  # half the bound: within it, but not the clamp
    assert_clipped_value_bounded(params, 0.01)
    with pytest.raises(StabilityError, match=r"differ from before\.clamp\(-0\.01, 0\.01\)"):
        assert_clipped_value_bounded(params, 0.01, before=before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_direction_tolerance_is_the_dtypes_rtol(dtype: torch.dtype) -> None:
    """Oracle: torch.testing's rtol per dtype, written out. Two tensors of equal norm scaled by 1 + 4 rtol and
    1 - 4 rtol (least-squares factor 1, each off by 4 rtol of its norm) are caught; scaled both by the
    exact 0.5 they pass, also when before is float64 and after is `dtype` (the coarser dtype's rtol)."""
    rtol = {torch.float16: 1e-3, torch.bfloat16: 1.6e-2, torch.float32: 1.3e-6, torch.float64: 1e-7}[dtype]
    d = 4 * rtol
    base = torch.randn(2, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    base = base / base.norm(dim=1, keepdim=True)
    before = [base[0].to(dtype), base[1].to(dtype)]
    after = [(base[0] * (1 + d)).to(dtype), (base[1] * (1 - d)).to(dtype)]
    with pytest.raises(StabilityError, match="Tensors off the common factor"):
        assert_direction_preserved(before, after)
    assert assert_direction_preserved(before, [0.5 * b for b in before]) == 0.5
    mixed = assert_direction_preserved(list(base), [(0.5 * b).to(dtype) for b in base])
    assert mixed == pytest.approx(0.5, rel=rtol)


def test_rtol_of_a_dtype_not_in_the_table_is_float64s() -> None:
    """Oracle: rtol_of's documented default (float64's rtol for dtypes not in DTYPE_RTOL)."""
    from stabilitycheck.invariants import DTYPE_RTOL, rtol_of

    assert rtol_of(torch.float8_e5m2) == DTYPE_RTOL[torch.float64] == 1e-7


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_direction_preserved_fails_on_a_non_finite_before_or_after(bad: float) -> None:
    """Oracle: the definition (no direction is defined for NaN or Inf): a gradient holding one, before
    or after, fails instead of passing through NaN comparisons."""
    _, before = with_grads()
    poisoned = [g.clone() for g in before]
    poisoned[0][0, 0] = bad
    with pytest.raises(StabilityError, match=r"\(after is not finite\)"):
        assert_direction_preserved(before, poisoned)
    with pytest.raises(StabilityError, match=r"\(before is not finite"):
        assert_direction_preserved(poisoned, [0.5 * g for g in before])


def test_clipped_norm_with_before_catches_one_tensor_off_the_common_factor() -> None:
    """Oracle: torch.nn.utils.clip_grad_norm_ in float64 (rtol 1e-7), then one tensor scaled by a
    further 1 - 5e-7: the total stays within max_norm, but the common factor does not hold."""
    params, before = with_grads("float64")
    torch.nn.utils.clip_grad_norm_(params, 0.1)
    assert_clipped_norm_bounded(params, 0.1, before=before)
    params[0].grad.mul_(1 - 5e-7)  # type: ignore[union-attr]
    with pytest.raises(StabilityError, match="Expected every gradient x c"):
        assert_clipped_norm_bounded(params, 0.1, before=before)


def test_a_clip_that_gives_zero_gradients_to_parameters_that_had_none_is_said() -> None:
    """A clip that turns missing gradients into zeros (which AdamW's decay then moves) made `before`,
    taken over the gradients that existed, read short, and the error blamed `before` alone (found by
    an audit of faulty clips). Oracle: torch's clip_grad_norm_ leaves a None gradient None, and the
    count of gradients before and after."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(4, 4)) for _ in range(3)]
    params[0].grad, params[1].grad = torch.randn(4, 4) * 10, torch.randn(4, 4) * 10
    before = [p.grad.detach().clone() for p in params if p.grad is not None]
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    assert params[2].grad is None
    assert_clipped_norm_bounded(params, 1.0, before=before)
    params[2].grad = torch.zeros(4, 4)  # the faulty clip's extra
    with pytest.raises(UsageError, match="gave a gradient to 1 parameters that had none"):
        assert_clipped_norm_bounded(params, 1.0, before=before)
    with pytest.raises(UsageError, match=r"pass \[p.grad") as caught:  # a short `before`, nothing made
        assert_clipped_norm_bounded(params[:2], 1.0, before=before[:1])
    assert "had none" not in str(caught.value)


@pytest.mark.parametrize(("norm_type", "over"), [(1.0, 2e-4), (2.0, 1e-4)])
def test_a_clip_just_over_torchs_rounding_on_a_million_float32_values_is_caught(
    norm_type: float, over: float
) -> None:
    """Oracle: torch.nn.utils.clip_grad_norm_ to max_norm x (1 + over). Its float32 total over 1e6
    values is off by about 2e-5 (L1) and 1e-5 (L2) relative, allowed twice over: a clip 2e-4 (L1) and
    1e-4 (L2) too weak is beyond that and caught."""
    grad = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0))
    p = nn.Parameter(torch.zeros(1_000_000))
    p.grad = grad.clone()
    torch.nn.utils.clip_grad_norm_([p], 1.0 + over, norm_type=norm_type)
    with pytest.raises(StabilityError, match="torch's own rounding of the total included"):
        assert_clipped_norm_bounded([p], 1.0, norm_type, before=[grad])


def test_bounded_growth_fails_each_nan_or_inf_on_its_own() -> None:
    """Oracle: assert_bounded_growth's definition (NaN and Inf count as over, never hidden; only 0 / 0
    is silent), on a measured Measurement with one figure set by hand (dataclasses.replace): a NaN
    growth with finite gains, NaN gains beside a NaN middle activation gradient with a finite growth,
    and an Inf gain out of a zero gradient (1 / 0, not 0 / 0) each fail alone."""
    import dataclasses

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    m = probe_module(net, torch.ones(1, 2), lambda o, _: o.sum())
    assert_bounded_growth(m, 1e6)
    acts, gains = list(m.activation_grad_norms), list(m.gains)
    assert len(acts) == len(gains) + 1 >= 3 and all(0 < a < math.inf for a in acts)
    with pytest.raises(StabilityError, match="Overall growth: nan"):
        assert_bounded_growth(dataclasses.replace(m, growth=math.nan), 1e6)
    nan_mid = dataclasses.replace(
        m,
        activation_grad_norms=(acts[0], math.nan, *acts[2:]),
        gains=(math.nan, math.nan, *gains[2:]),
    )
    with pytest.raises(StabilityError, match=r"Layers over bound: 2 / "):
        assert_bounded_growth(nan_mid, 1e6)
    from_nothing = dataclasses.replace(
        m, activation_grad_norms=(acts[0], 0.0, *acts[2:]), gains=(math.inf, 0.0, *gains[2:])
    )
    with pytest.raises(StabilityError, match=r"Layers over bound: 1 / "):
        assert_bounded_growth(from_nothing, 1e6)


class _NoBackoffScaler(torch.amp.GradScaler):
    """torch's GradScaler that skips non-finite steps but keeps its scale (never backs off)."""

    def update(self, new_scale: float | torch.Tensor | None = None) -> None:
        before = self.get_scale()
        super().update(new_scale)
        super().update(max(before, self.get_scale()))


class _ScalesFivePercentOverScaler(torch.amp.GradScaler):
    """torch's GradScaler whose loss scale is 5% more than it unscales by: clean steps 5% too long."""

    def scale(self, outputs: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().scale(outputs) * 1.05


def test_gradscaler_guards_catch_no_backoff_and_a_five_percent_wrong_unscale() -> None:
    """Oracle: torch.amp.GradScaler (passes) and one plain SGD step on the unscaled gradients: a scaler
    that skips but never backs off its scale, and one whose clean step is 5% too long (5x CLEAN_RTOL),
    are caught."""
    b = build(Config.of("mlp", depth=3, width=8, batch_size=4))
    assert_gradscaler_guards(b.model, b.inputs, b.loss_fn, torch.amp.GradScaler("cpu"))
    with pytest.raises(StabilityError, match="did not back off its scale"):
        assert_gradscaler_guards(b.model, b.inputs, b.loss_fn, _NoBackoffScaler("cpu"))
    with pytest.raises(StabilityError, match="clean step did not update the weights"):
        assert_gradscaler_guards(b.model, b.inputs, b.loss_fn, _ScalesFivePercentOverScaler("cpu"))


@pytest.mark.parametrize("backoff", [0.75, 0.5])
def test_gradscaler_guards_pass_torchs_scaler_at_a_scale_no_power_of_two_beside_a_batchnorm(
    backoff: float,
) -> None:
    """A bias before a BatchNorm has gradient 0 in exact arithmetic: its computed one is rounding,
    which a loss scale that is no power of two (backoff 0.75: 2^16 x 0.75^22) rounds to other noise,
    its Adam moments unlike the plain step's; torch's own GradScaler failed 8 of 8 seeds (a trial).
    Such tensors are left out of the clean step's comparison where the scale is no power of two;
    a scaler 5% off or one unscaling twice is still caught there. Oracle: torch's GradScaler is
    correct; the float64 gradient of that bias is ~1e-14 of the weight's."""
    y = torch.arange(8) % 4
    loss = lambda out, _: nn.functional.cross_entropy(out, y)  # noqa: E731
    adam = lambda ps: torch.optim.Adam(ps, lr=1e-3)  # noqa: E731
    for seed in range(3):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
        x = torch.randn(8, 16)
        scaler = torch.amp.GradScaler("cpu", backoff_factor=backoff)
        assert_gradscaler_guards(model, x, loss, scaler, optimizer=adam)
        for wrong in (_ScalesFivePercentOverScaler, _UnscalesTwice):
            with pytest.raises(StabilityError, match="within 1% of it"):
                assert_gradscaler_guards(model, x, loss, wrong("cpu", backoff_factor=backoff), optimizer=adam)


@pytest.mark.parametrize("over", [2e-6, 3e-6, 5e-6, 1e-5])
def test_torch_clipping_a_total_just_over_max_norm_passes(over: float) -> None:
    """Oracle: torch's own clip_grad_norm_ must pass. A float32 total a few rounding steps over
    max_norm is clipped by a coefficient just under 1: the gradients change, and the check that they
    must not (for a total at or under max_norm) must leave that case alone."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.zeros(10)) for _ in range(100)]
    for p in params:
        p.grad = torch.randn(10)
    scale = (1 + over) / float(torch.linalg.vector_norm(torch.cat([p.grad for p in params]).double()))
    for p in params:
        p.grad.mul_(scale)
    before = [p.grad.clone() for p in params]
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    assert any(not torch.equal(p.grad, b) for p, b in zip(params, before, strict=True))
    assert_clipped_norm_bounded(params, 1.0, before=before)


class _UnscalesTwice(torch.amp.GradScaler):
    """torch's GradScaler with a manual unscale before its step, which unscales again."""

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.div_(self.get_scale())
        return super().step(optimizer, *args, **kwargs)


def test_gradscaler_guards_judge_the_clean_step_away_from_a_scale_of_1() -> None:
    """Each skipped step halves the scale: on a model of 6 trainable tensors the 16 skipped steps took
    torch's 2^16 to 1, where a scaler that unscales twice moves the update by a factor of 1, and it
    passed (found by a trial as a user; with 5 or 7 tensors it failed). A torch GradScaler is set
    away from 1 for the clean step; another scaler at 1 is refused in one line. torch's own passes."""
    torch.manual_seed(0)
    model = nn.Sequential(*(m for _ in range(3) for m in (nn.Linear(4, 4), nn.Tanh())))
    x = torch.randn(3, 4)

    def loss(out: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        return out.square().mean()

    assert_gradscaler_guards(model, x, loss, torch.amp.GradScaler("cpu"))
    with pytest.raises(StabilityError, match="within 1% of it"):
        assert_gradscaler_guards(model, x, loss, _UnscalesTwice("cpu"))
    with pytest.raises(UsageError, match="scale is 1 after the 16 skipped steps"):
        assert_gradscaler_guards(model, x, loss, broken.UnscalesTwiceScaler())  # type: ignore[arg-type]


class _ClipsTheScaledGradients(torch.amp.GradScaler):
    """A GradScaler whose step clips, clip_grad_norm_(params, 1.0), as a training loop does between
    backward and scaler.step, after the unscale_(opt) torch's AMP recipe puts first only where
    `unscales` (the fault: without it the clip judges the scaled gradients)."""

    def __init__(self, unscales: bool) -> None:
        super().__init__("cpu")
        self.unscales = unscales

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        if self.unscales:
            self.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        return super().step(optimizer, *args, **kwargs)


def test_gradscaler_guards_catch_a_clip_of_the_scaled_gradients_with_torchs_default_scale() -> None:
    """On a model of 14 tensors the 24 skipped steps take torch's default 2^16 to 2^-8, where the
    scaled gradients are smaller than the unscaled ones and a clip before unscale_ never fires: it
    passed (found by an audit). The clean step runs at 2^8 instead, where it clips a gradient of
    norm < 1 that a plain step leaves alone. Oracle: torch's AMP recipe, unscale_ before the clip,
    passes."""
    torch.manual_seed(0)
    model = nn.Sequential(*(m for _ in range(6) for m in (nn.Linear(16, 16), nn.Tanh())), nn.Linear(16, 2))
    x = torch.randn(8, 16)

    def loss(out: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        return out.square().mean()

    model(x).square().mean().backward()  # the unscaled gradient is within the clip: a plain step's
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)
    model.zero_grad(set_to_none=True)
    assert norm < 1.0 < norm * 2.0**8
    assert_gradscaler_guards(model, x, loss, _ClipsTheScaledGradients(unscales=True))
    with pytest.raises(StabilityError, match="within 1% of it"):
        assert_gradscaler_guards(model, x, loss, _ClipsTheScaledGradients(unscales=False))


def test_the_rtol_override_of_the_clip_and_direction_checks_is_applied() -> None:
    """rtol= of assert_clipped_norm_bounded and assert_direction_preserved, passed by no test before
    (found by a code review): a clip leaving the norm 1e-4 over max_norm, and one tensor's direction
    1e-4 off, fail at the default float32 tolerance (1.3e-6) and pass at rtol=1e-3. Oracle: the
    construction."""
    params, before = with_grads()
    torch.nn.utils.clip_grad_norm_(params, 0.05)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(1 + 1e-4)  # the clipped norm 1e-4 over max_norm
    with pytest.raises(StabilityError):
        assert_clipped_norm_bounded(params, 0.05)
    assert_clipped_norm_bounded(params, 0.05, rtol=1e-3)
    after = [b.clone() * 0.5 for b in before]
    after[0][0] *= 1 + 1e-4  # one entry of one tensor off the common factor
    with pytest.raises(StabilityError):
        assert_direction_preserved(before, after)
    assert assert_direction_preserved(before, after, rtol=1e-3) == pytest.approx(0.5, rel=1e-3)


def test_the_rtol_override_of_the_rescaling_check_is_applied() -> None:
    """rtol= of assert_rescaling_equivariant, passed by no test before (found by a code review): a
    gradient hook adding a constant 1e-4 of each gradient's mean magnitude (the same at every scale,
    so 4x the loss gives 4g + o, not 4(g + o): 3e-4 off) fails at the default tolerance and passes at
    rtol=1e-2. Oracle: the construction."""
    b = zoo("mlp")
    b.loss_fn(b.model(b.inputs), b.inputs).backward()
    for p in b.model.parameters():
        assert p.grad is not None
        offset = 1e-4 * float(p.grad.abs().mean())
        p.register_hook(lambda g, o=offset: g + o)
        p.grad = None
    with pytest.raises(StabilityError, match="did not scale every gradient by 4"):
        assert_rescaling_equivariant(b.model, b.inputs, b.loss_fn, 4.0)
    assert_rescaling_equivariant(b.model, b.inputs, b.loss_fn, 4.0, rtol=1e-2)


def test_the_rtol_override_of_the_clip_norm_check_is_applied(monkeypatch: pytest.MonkeyPatch) -> None:
    """rtol= of check_clip_grad_norm, passed by no test before: a clip_grad_norm_ whose
    total is 1e-4 off fails at the default tolerance (float32's, plus torch's own rounding of the
    total) and passes at rtol=1e-3; a looser override never hides a total 1e-2 off at rtol=1e-3.
    Oracle: the construction."""
    params = _layer_grads([(64, 64), (64,)])
    clip = torch.nn.utils.clip_grad_norm_
    for factor in (1 + 1e-4, 1 + 1e-2):
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda ps, m, f=factor: clip(ps, m) * f)
        with pytest.raises(StabilityError, match="full-model gradient norm"):
            check_clip_grad_norm(params)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda ps, m: clip(ps, m) * (1 + 1e-4))
    exact = math.sqrt(sum(float(p.grad.double().square().sum()) for p in params))  # type: ignore[union-attr]
    assert check_clip_grad_norm(params, rtol=1e-3) == pytest.approx(exact * (1 + 1e-4), rel=1e-6)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda ps, m: clip(ps, m) * (1 + 1e-2))
    with pytest.raises(StabilityError, match="full-model gradient norm"):
        check_clip_grad_norm(params, rtol=1e-3)


class _PartialScaler:
    """A broken loss scaler: checks only the entries `reads` of each gradient (flattened) for Inf/NaN
    before stepping (every other one, or all but the last: off-by-ones torch's GradScaler, which reads
    every entry, does not make). Otherwise a correct static-then-backoff scaler."""

    def __init__(self, reads: slice) -> None:
        self.s, self.reads = 2.0**16, reads

    def get_scale(self) -> float:
        return self.s

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.s

    def step(self, opt: torch.optim.Optimizer) -> None:
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        for g in grads:
            g.div_(self.s)
        if any(not bool(g.view(-1)[self.reads].isfinite().all()) for g in grads):
            self.s /= 2
            return
        opt.step()

    def update(self) -> None:
        pass


def test_gradscaler_guards_catch_a_scaler_checking_every_other_entry() -> None:
    """IT1: the 'inside' poison sits at an odd entry, so a scaler reading only even entries steps on it.
    Every parameter here has 5 or 1 entries, so the end poisons (first and last entry) are even ones,
    and numel // 2 is even: only the odd inside entry, (numel // 2) | 1, can catch this scaler."""
    from torch import nn

    from stabilitycheck import StabilityError
    from stabilitycheck.invariants_gradscaler import assert_gradscaler_guards

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 5), nn.Tanh(), nn.Linear(5, 1))  # 5, 5, 5, 1 entries
    x = torch.randn(4, 1)
    with pytest.raises(StabilityError):
        assert_gradscaler_guards(
            model, x, lambda out, _: (out**2).mean(), _PartialScaler(slice(None, None, 2))
        )


def test_rescaling_runs_the_model_under_its_seed_not_the_global_random_state() -> None:
    """IR3: every forward the check compares runs under `seed` (a dropout in training mode drops the
    same units in each, whatever the caller's random state): the first number each forward draws is
    torch's first draw after torch.manual_seed(seed), and the same after the global state moved."""
    from stabilitycheck.invariants_rescaling import assert_rescaling_equivariant

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 64), torch.nn.Dropout(0.5), torch.nn.Linear(64, 4)
    ).train()
    inputs = torch.randn(8, 16)
    draws: list[float] = []

    def loss_fn(out: torch.Tensor, _inputs: Any) -> torch.Tensor:
        return out.pow(2).mean()

    def drawing(module: torch.nn.Module, args: Any) -> None:
        draws.append(float(torch.rand(())))

    model[0].register_forward_pre_hook(drawing)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        expected = float(torch.rand(()))
    for state in (1, 2):
        torch.manual_seed(state)
        assert_rescaling_equivariant(model, inputs, loss_fn, 3.7, seed=5)
    assert len(draws) >= 4 and all(d == expected for d in draws)

    # --- invariants_training.py ------------------------------------------------------------------------

    def update(self) -> None:
        pass


def _square_mean(out: torch.Tensor, _inputs: Any) -> torch.Tensor:
    return (out**2).mean()


def test_gradscaler_guards_poison_the_last_entry_of_the_last_gradient() -> None:
    """IT4: the end poison of the last gradient sits at its last entry (the first gradient's at its
    first), so a scaler that never reads a tensor's last entry steps on it. The last parameter here is
    a bias of 3 entries: its inside poison, (3 // 2) | 1 = 1, is read by that scaler, as are every
    other gradient's poisons (first entries, and odd middle ones short of the end): only the last
    entry of the last gradient can catch it. torch's GradScaler passes the same model."""
    from stabilitycheck import StabilityError
    from stabilitycheck.invariants_gradscaler import assert_gradscaler_guards

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    assert [p.numel() for p in model.parameters()] == [5, 5, 15, 3]
    x = torch.randn(4, 1)
    assert_gradscaler_guards(model, x, _square_mean, torch.amp.GradScaler("cpu"))
    with pytest.raises(StabilityError):
        assert_gradscaler_guards(model, x, _square_mean, _PartialScaler(slice(None, -1)))


def _hypot(t: torch.Tensor) -> float:
    """Brute-force exact L2 norm: Python's math.hypot scales internally, correct for any finite values."""
    return math.hypot(*t.double().flatten().tolist())


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


def _linear_grads(dtype: torch.dtype = torch.float32) -> list[nn.Parameter]:
    """A Linear(8, 4)'s weight and bias with gradients of total 2-norm ~ 10 (well above 1)."""
    torch.manual_seed(0)
    layer = nn.Linear(8, 4).to(dtype)
    (layer(torch.randn(16, 8, dtype=dtype)) * 10).square().mean().backward()
    return list(layer.parameters())


def test_a_norm_clip_scaling_by_the_wrong_common_factor_is_caught_with_before() -> None:
    """assert_clipped_norm_bounded's docstring: with `before`, clipping scaled every gradient by one
    coefficient between torch's max_norm / (total + 1e-6) and the exact max_norm / total. A clip to
    half of max_norm keeps the direction and the bound, but its factor is half torch's: caught.
    Oracle: torch's clip_grad_norm_ passes the same check; the factor by hand."""
    params = _linear_grads()
    before = [p.grad.detach().clone() for p in params]
    total = float(torch.linalg.vector_norm(torch.stack([g.double().norm() for g in before])))
    assert total > 2.0
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    assert_clipped_norm_bounded(params, 1.0, before=before)
    for p, b in zip(params, before, strict=True):
        p.grad = b * (0.5 / total)  # every gradient x half the right factor
    with pytest.raises(StabilityError):
        assert_clipped_norm_bounded(params, 1.0, before=before)


def test_value_clipping_to_a_clip_value_that_rounds_up_in_the_gradient_dtype_passes() -> None:
    """assert_clipped_value_bounded's bound: clip_value itself rounds to the gradient dtype (in float16,
    1e-7 is a subnormal and rounds to 2 x 2^-24 = 1.19e-7), and torch's clamp clamps to that. Oracle:
    torch's clip_grad_value_ is correct; its result is before.clamp(...) entry for entry."""
    params = _linear_grads(torch.float16)
    before = [p.grad.detach().clone() for p in params]
    torch.nn.utils.clip_grad_value_(params, 1e-7)
    peak = max(float(p.grad.abs().max()) for p in params)
    assert peak == 2 * 2.0**-24  # the rounded clip value, above 1e-7 by 19%
    assert_clipped_value_bounded(params, 1e-7, before=before)


def _clipped(grad: torch.Tensor, max_norm: float) -> tuple[nn.Parameter, list[torch.Tensor], torch.Tensor]:
    """A parameter holding `grad`, clipped by torch: (parameter, before, what the clip returned)."""
    p = nn.Parameter(torch.zeros_like(grad))
    p.grad = grad.clone()
    before = [p.grad.detach().clone()]
    return p, before, torch.nn.utils.clip_grad_norm_([p], max_norm)


def test_a_clip_returning_inf_for_a_finite_total_is_caught() -> None:
    """The returned norm may be inf only where the total before clipping is past the dtype's range
    (torch sums it in that dtype); a total of 1.5 in float32 returned as inf is a wrong return value.
    Oracle: torch's own clip, whose return value passes."""
    p, before, returned = _clipped(torch.tensor([1.0, 0.5, 1.0]), 0.5)
    assert float(returned) == pytest.approx(1.5)
    assert_clipped_norm_bounded([p], 0.5, before=before, returned=returned)
    with pytest.raises(AssertionError, match="returned another value"):
        assert_clipped_norm_bounded([p], 0.5, before=before, returned=math.inf)


@pytest.mark.parametrize("value,max_norm", [(15.4765625, 0.5106287598609924), (46.59375, 0.2504548728466034)])
def test_torchs_float16_clip_over_max_norm_by_more_than_rtol_passes(value: float, max_norm: float) -> None:
    """torch rounds max_norm / (total + 1e-6) and the product to float16: one value clipped ends up to
    1.2e-3 over max_norm, more than float16's rtol (1e-3) alone, within its documented allowance of
    up to 5 roundings of eps / 2. Oracle: torch's own clip_grad_norm_, whose answer must pass."""
    p, before, returned = _clipped(torch.tensor([value], dtype=torch.float16), max_norm)
    assert float(p.grad.double().norm()) / max_norm - 1 > 1.1e-3  # over rtol: the case meant
    assert_clipped_norm_bounded([p], max_norm, before=before, returned=returned)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torchs_clip_of_a_total_exactly_at_max_norm_scales_by_its_coefficient_and_passes(
    dtype: torch.dtype,
) -> None:
    """At total == max_norm torch still multiplies by max_norm / (total + 1e-6) < 1 (its clamp is at 1
    only from above): the gradients change, by 1e-6 relative, and that is torch's contract, not a
    clip of a gradient within max_norm. Oracle: torch's own clip and its coefficient by hand."""
    grad = torch.tensor([0.6, 0.8], dtype=dtype)  # total norm 1 (exactly, in float64)
    p, before, returned = _clipped(grad, 1.0)
    coef = 1.0 / (float(grad.double().norm()) + 1e-6)
    assert coef < 1.0
    if dtype == torch.float64:
        assert not torch.equal(p.grad, before[0])
        torch.testing.assert_close(p.grad, before[0] * coef, rtol=1e-12, atol=0)
    assert_clipped_norm_bounded([p], 1.0, before=before, returned=returned)


def test_torchs_float16_clip_with_a_subnormal_coefficient_passes() -> None:
    """max_norm / (total + 1e-6) = 0.0017 / 3358 = 5.1e-7 is a float16 subnormal (spacing 6e-8): torch
    rounds it by up to 6%, and its clip of 3358 lands 4.5% over max_norm. That rounding is allowed (one
    spacing x the total before). Oracle: torch's own clip and float16's spacing."""
    max_norm = 0.0017232964038848878
    p, before, returned = _clipped(torch.tensor([3358.0], dtype=torch.float16), max_norm)
    f16 = torch.finfo(torch.float16)
    assert max_norm / 3358.0 < f16.smallest_normal
    assert float(p.grad.double().norm()) / max_norm - 1 > 0.04  # the case meant
    assert_clipped_norm_bounded([p], max_norm, before=before, returned=returned)


class _RoundsInBackward(torch.autograd.Function):
    """y = s * a whose backward rounds like a float32 kernel with a large intermediate: (g a + 2^24) -
    2^24, exact in float64 (the re-run) and off by up to one float32 spacing of 2^24 (2) otherwise."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a)
        return s * a

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        (a,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return (g * a + 2.0**24) - 2.0**24, None


class _Float32WithAFloat64Buffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.ones(1))
        self.register_buffer("calibration", torch.ones(1, dtype=torch.float64))

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return _RoundsInBackward.apply(self.s, a).sum()


def test_a_float32_model_with_one_float64_buffer_still_has_its_rounding_measured() -> None:
    """The float64 re-run is skipped only where every tensor is float64 already. Here the float32
    gradient at c=1 is fl(10000.5 + 2^24) - 2^24 = 10000 (0.5 off the float64 re-run's 10000.5) and at
    c=3 fl(30001.5 + 2^24) - 2^24 = 30002, 2 off 3 x 10000: within c x 4 x 0.5 = 6 of rounding allowed,
    far beyond rtol alone (0.08). Oracle: the float32 arithmetic above, done by hand."""
    a = torch.tensor([10000.5])
    assert float(torch.tensor(10000.5 + 2.0**24, dtype=torch.float32)) - 2.0**24 == 10000.0
    assert float(torch.tensor(30001.5 + 2.0**24, dtype=torch.float32)) - 2.0**24 == 30002.0
    assert_rescaling_equivariant(_Float32WithAFloat64Buffer(), a, lambda out, _: out, 3.0)


class _Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * y


@pytest.mark.parametrize("packed", ["dict", "tuple", "list"])
def test_the_float64_rerun_takes_inputs_packed_in_a_dict_tuple_or_list(packed: str) -> None:
    """The rounding error is measured on a float64 re-run with every floating input in float64, however
    the inputs are packed (a dict is passed by keyword, a tuple/list positionally). A float32 input left
    beside float64 weights fails in F.linear. Oracle: torch's own dtype rule (linear takes one dtype)."""
    torch.manual_seed(0)
    x, y = torch.randn(5, 4), torch.randn(5, 3)
    with pytest.raises(RuntimeError):
        nn.Linear(4, 3, dtype=torch.float64)(x)  # what a float32 input left behind meets
    inputs = {"x": x, "y": y} if packed == "dict" else (x, y) if packed == "tuple" else [x, y]
    assert_rescaling_equivariant(_Pair(), inputs, lambda out, _: out.square().sum(), 3.0)


class _ThreeVectors(nn.Module):
    """float64 parameters a, b, w with gradients u (norm 4), 0 and v (norm 3): a total norm of 5."""

    def __init__(self, delta: float) -> None:
        super().__init__()
        self.a, self.b, self.w = (nn.Parameter(torch.zeros(2, dtype=torch.float64)) for _ in range(3))
        self.b.register_hook(lambda g: g + delta)  # the same shift at any c: off by (c - 1) delta
        self.u = torch.tensor([4.0, 0.0], dtype=torch.float64)
        self.v = torch.tensor([0.0, 3.0], dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.a * self.u).sum() + (self.b * 0.0).sum() + (self.w * self.v).sum() + x


@pytest.mark.parametrize("fraction,passes", [(0.9, True), (1.1, False)])
def test_every_tensor_may_be_off_by_rtol_of_the_total_gradient_norm(fraction: float, passes: bool) -> None:
    """Each tensor may be off by c x rtol of the TOTAL gradient norm (sqrt(4^2 + 3^2) = 5 here, not
    the largest tensor's 4) beside rtol of its own: float64 (rtol 1e-7, nothing to round) at c = 2,
    b's gradient shifted by a constant delta is off by delta, allowed 2 x 1e-7 x (5 + |delta|).
    Oracle: the documented tolerance, by hand."""
    allowed = 2 * 1e-7 * 5.0
    delta = fraction * allowed / math.sqrt(2)  # per entry: the shift's norm is fraction x allowed
    run = lambda: assert_rescaling_equivariant(  # noqa: E731
        _ThreeVectors(delta), torch.zeros((), dtype=torch.float64), lambda out, _: out, 2.0
    )
    if passes:
        run()
    else:
        with pytest.raises(AssertionError, match="did not scale every gradient"):
            run()


def _measured(acts: tuple[float, ...], gains: tuple[float, ...], growth: float) -> Measurement:
    names = ("(input)", *(f"layers.{i}" for i in range(len(acts) - 1)))
    return Measurement(
        layer_names=names[1:],
        activation_names=names,
        loss=(1.0,),
        grad_norm=(1.0,),
        layer_grad_norms=(1.0,) * (len(acts) - 1),
        activation_norms=(1.0,) * len(acts),
        activation_grad_norms=acts,
        gains=gains,
        growth=growth,
        weight_norms=(),
        first_nonfinite=None,
        steps_run=0,
    )


def test_a_saturated_loss_is_named_as_such_not_as_a_zero_head() -> None:
    """The zoo's readout cross-entropy on one sample of a ReLU stack at sigma_w 4 is exactly 0: no
    gradient at all, at any step, so 'probe with steps=1' would not help (found by a review): the
    failure says the loss is 0 and what to change."""
    m = probe(Config.of("mlp", depth=8, width=16, init_scale=4.0, batch_size=1, activation="relu"))
    assert m.loss[0] == 0.0 and all(a == 0.0 for a in m.activation_grad_norms)
    with pytest.raises(StabilityError, match=r"the loss is exactly 0, saturated.*more than one sample") as e:
        assert_bounded_growth(m, 1e3)
    assert "steps=1" not in str(e.value)


def test_a_nan_growth_is_never_hidden_and_no_gradient_at_all_is_no_pass() -> None:
    """assert_bounded_growth: NaN counts as over. A NaN growth whose input-side norm is 0 but whose
    output-side norm is 1 fails; so does one where no gradient reached any block output (every norm 0:
    nothing measured), which passed before (an audit: a zero-initialised head passed any limit), saying
    why. Oracle: the documented rule, by hand."""
    with pytest.raises(AssertionError, match="Overall growth: nan"):
        assert_bounded_growth(_measured((0.0, 1.0, 1.0), (0.0, 1.0), math.nan), 100)
    with pytest.raises(AssertionError, match="unmeasured: no gradient reached any block output"):
        assert_bounded_growth(_measured((0.0, 0.0, 0.0), (math.nan, math.nan), math.nan), 100)


def _linear_mlp(**knobs: Any) -> Config:
    return Config.of("mlp", **{"width": 16, "activation": "linear", "batch_size": 4, "seeds": 1, **knobs})


def test_assert_stable_judges_a_config_on_the_limits_given() -> None:
    """A linear stack at sigma = 4 grows ~4^6 over 6 blocks: over the default growth limit 100, so
    Unstable, whose message carries the culprit and the remedies it tried; with every criterion
    switched off (Limits(None...)) nothing can fail. Oracle: mean field (growth sigma^depth) and the
    documented message and Limits."""
    config = _linear_mlp(depth=6, init_scale=4.0)
    with pytest.raises(Unstable) as caught:
        assert_stable(config)
    lines = str(caught.value).splitlines()
    assert lines[0].startswith("mlp explodes:") and "growth" in lines[0]
    assert any(line.startswith("Culprit: ") for line in lines)
    remedies = caught.value.stability_counterexample.remedies
    assert remedies and f"Remedies: {remedies[0].describe()}" in str(caught.value)
    assert_stable(config, Limits(grad_norm=None, growth=None, divergence=None, nonfinite=False))


def test_assert_stable_on_a_space_raises_at_its_smallest_exploding_point_with_its_knobs() -> None:
    """A Space of linear stacks (depth 1..6, sigma 1 or 4): growth ~sigma^depth passes the limit 100 first
    at depth 4 (4^3 = 64, 4^4 = 256); the error carries that point and the Space's knob names (what
    the plugin's summary lists). Oracle: mean field's sigma^depth and the documented error."""
    space = Space("mlp", _linear_mlp(depth=2), (Axis.range("depth", 1, 6), Axis("init_scale", (1.0, 4.0))))
    with pytest.raises(Unstable) as caught:
        assert_stable(space, max_examples=10)
    assert caught.value.stability_knobs == ("depth", "init_scale")
    assert dict(caught.value.stability_counterexample.config.values)["depth"] == 4


@pytest.mark.parametrize("c", [0.3, 3.0, 7.0])
def test_an_exactly_linear_float32_model_whose_terms_cancel_passes_at_any_c(c: float) -> None:
    """loss = (s * A).sum() - (s * B).sum() with A ~ 1000 and B = A (1 - 1e-3), float32: its backward
    is linear (the float64 gradients scale by c exactly), but at c = 1 the gradient A - B is exact
    while at c = 3 autograd rounds 3A and 3B apart before they cancel: 6.8e-4 of the norm off, over an
    allowance of 6.2e-5 that assumed the run at c rounds as the run at 1 (found by a mutation round).
    The run at c is measured against its own float64 re-run; a clamping hook still fails (below)."""

    class Cancelling(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.s = nn.Parameter(torch.ones(64))

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return (self.s * a).sum() - (self.s * b).sum()

    gen = torch.Generator().manual_seed(0)
    a = (1000 + torch.rand(64, generator=gen, dtype=torch.float64)).float()
    b = (a.double() * (1 - 1e-3)).float()
    model = Cancelling()
    assert_rescaling_equivariant(model, (a, b), lambda out, _: out, c)
    model.s.register_hook(lambda g: g.clamp(max=1.0))  # the bug the invariant names
    with pytest.raises(AssertionError):
        assert_rescaling_equivariant(model, (a, b), lambda out, _: out, c)


def test_the_poison_inside_a_gradient_is_found_near_its_middle_at_any_size() -> None:
    """_inside walked every entry from the middle on into two lists (13.8 s for a 38.6M-entry
    embedding, the whole guard 6x slower; found by a review): the entry is within a few of the middle,
    no stride from 2 to 7 reaches it from the first entry, nor one from 3 to 7 from the last."""
    from stabilitycheck.invariants_gradscaler import _inside

    for n in (64, 4096, 38_597_376, 10**15):
        i = _inside(n)
        assert n // 2 <= i < n // 2 + 100
        assert all(i % k for k in range(2, 8)) and all((n - 1 - i) % k for k in range(3, 8))


def _mixed_grads() -> tuple[nn.Module, list[torch.Tensor]]:
    """A float32 MLP whose last Linear is bfloat16, its gradients set by one backward; and a copy of
    them taken before any clip."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
    model[-1].to(torch.bfloat16)
    h = model[:-1](torch.randn(32, 8))
    model[-1](h.to(torch.bfloat16)).float().pow(2).mean().backward()
    return model, [p.grad.detach().clone() for p in model.parameters()]  # type: ignore[union-attr]


@pytest.mark.parametrize("off", [1.0, 1.02, 0.98])
def test_a_bfloat16_tensor_loosens_no_float32_ones_check(off: float) -> None:
    """One bfloat16 Linear among float32 ones held every tensor to bfloat16's rtol (1.6%): float32
    gradients 2-3% off the clip's common factor passed both checks, caught at 0.2% on an all-float32
    model (an audit with faults of its own). Each tensor is now held to its own dtype's, the common
    factor fitted on the finest tensors first (unweighted, a bfloat16 bias's own rounding pulled it
    off the float32 tensors': torch's own clip then failed). Oracle: torch's clip_grad_norm_, then
    the float32 gradients scaled by `off` (1: torch's clip as it is, which passes)."""
    model, before = _mixed_grads()
    params = list(model.parameters())
    returned = torch.nn.utils.clip_grad_norm_(params, 0.1)
    for p in params:
        if p.grad is not None and p.grad.dtype == torch.float32:
            p.grad.mul_(off)
    checks = (
        lambda: assert_clipped_norm_bounded(model, 0.1, before=before, returned=returned),
        lambda: assert_direction_preserved(before, [p.grad for p in params]),  # type: ignore[misc]
    )
    for check in checks:
        if off == 1.0:
            check()
        else:
            with pytest.raises(StabilityError, match="Tensors off the common factor"):
                check()


def test_a_before_of_another_shape_or_a_sparse_tensor_is_a_usage_error() -> None:
    """before= of the wrong shape raised torch's own size error from inside the check (clip active)
    or read as a clip that changed a gradient (inactive); a sparse tensor given to the direction
    check raised NotImplementedError (an audit). Each is a one-line UsageError."""
    p = nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    for max_norm in (0.1, 1e9):
        with pytest.raises(UsageError, match=r"before\[0\] is \(4,\), but the gradient of .* is \(3,\)"):
            assert_clipped_norm_bounded([p], max_norm, before=[torch.ones(4)])
    with pytest.raises(UsageError, match=r"before\[0\] is \(4,\)"):
        assert_clipped_value_bounded([p], 1.0, before=[torch.ones(4)])
    sparse = torch.ones(3).to_sparse()
    with pytest.raises(UsageError, match="is sparse"):
        assert_direction_preserved([sparse], [sparse])


def test_a_float32_total_past_its_squares_range_is_said_to_overflow() -> None:
    """torch's clip_grad_norm_ squares float32 values: a total past ~1.8e19 reads inf (far below
    float32's max 3.4e38), and the clip zeroes every gradient. The returned= check read that inf as 'a
    clip returning the norm after it', check_clip_grad_norm as 'a local-shard norm?' (an audit). Oracle:
    the float64 total of the gradients (1e19 x sqrt(8), finite), torch's own returned inf."""
    from stabilitycheck.invariants import check_clip_grad_norm

    p = nn.Parameter(torch.zeros(8))
    p.grad = torch.full((8,), 1e19)
    assert not math.isfinite(float(torch.linalg.vector_norm(p.grad)))  # the case: torch's squares overflow
    with pytest.raises(StabilityError, match=r"clip_grad_norm_ returned inf .* torch's total overflowed"):
        check_clip_grad_norm([p])
    before = [p.grad.clone()]
    returned = torch.nn.utils.clip_grad_norm_([p], 1.0)
    assert math.isinf(float(returned))
    with pytest.raises(StabilityError, match="Every gradient is zero after clipping") as raised:
        assert_clipped_norm_bounded([p], 1.0, before=before, returned=returned)
    assert "returned another value" not in str(raised.value)


class _Wrapped:
    """A user's step object around a torch GradScaler (no subclass): torch's recipe, unscale_ then
    clip_grad_norm_ at `max_norm`, or, `twice`, unscaling twice (a fault) before it."""

    def __init__(self, max_norm: float, twice: bool = False, double_step: bool = False) -> None:
        self.inner = torch.amp.GradScaler("cpu", init_scale=2.0**24)
        self.max_norm, self.twice, self.double_step = max_norm, twice, double_step

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.inner.scale(loss)

    def get_scale(self) -> float:
        return self.inner.get_scale()

    def update(self) -> None:
        self.inner.update()

    def step(self, opt: torch.optim.Optimizer) -> None:
        params = [p for g in opt.param_groups for p in g["params"]]
        self.inner.unscale_(opt)
        if self.twice:
            for p in params:
                if p.grad is not None:
                    p.grad.div_(self.inner.get_scale())
        torch.nn.utils.clip_grad_norm_(params, self.max_norm)
        if self.double_step and all(p.grad is None or bool(p.grad.isfinite().all()) for p in params):
            opt.step()  # a fault of another kind: the update taken twice
        self.inner.step(opt)


def test_a_wrapped_scaler_whose_step_shrinks_the_gradients_is_told_what_the_check_cannot_tell() -> None:
    """torch's recipe (unscale_, then an active clip) in a user's wrapper failed as 'must unscale
    once', as a clip before unscale_ does, with no word of why (an audit): only a GradScaler's scale
    can be set to take the step again at another. The failure now says so where the step shrank the
    gradients; a wrapper unscaling twice (its step 2^24 too short, a factor the check can name), or
    stepping twice on the unscaled gradients (no shrink), gets no such line; the clip inactive, the
    recipe passes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(3))

    def loss(out: torch.Tensor, _: object) -> torch.Tensor:
        return out.square().mean()

    with pytest.raises(StabilityError, match="cannot tell that from a wrong unscale"):
        assert_gradscaler_guards(model, x, loss, _Wrapped(1e-3))
    for fault in ({"twice": True}, {"double_step": True}):  # no shrink the line is about (a review)
        with pytest.raises(StabilityError, match="must unscale") as raised:
            assert_gradscaler_guards(model, x, loss, _Wrapped(1e3, **fault))
        assert "cannot tell" not in str(raised.value)
    assert_gradscaler_guards(model, x, loss, _Wrapped(1e3))


def _torch_clip_cases(n: int) -> list[tuple[list[torch.Tensor], float, float]]:
    """n seeded mixes of dtypes (float32, bfloat16, float16, float64), sizes (1-1000), magnitudes
    (1e-8-1e8; 1e-3-1e3 with float16), zero tensors and norm types: (gradients, max_norm, norm_type)."""
    rng = random.Random(0)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    cases = []
    for trial in range(n):
        gen = torch.Generator().manual_seed(trial)
        chosen = [rng.choice(dtypes) for _ in range(rng.choice([1, 2, 3, 5]))]
        mag = 10 ** (rng.uniform(-3, 3) if torch.float16 in chosen else rng.uniform(-8, 8))
        grads = [
            (
                torch.zeros(n)
                if rng.random() < 0.1
                else torch.randn(n, generator=gen) * mag * 10 ** rng.uniform(-2, 2)
            ).to(d)
            for d, n in ((d, rng.choice([1, 3, 50, 1000])) for d in chosen)
        ]
        total = float(torch.linalg.vector_norm(torch.stack([g.double().norm() for g in grads])))
        cases.append(
            (grads, max(total, 1e-30) * 10 ** rng.uniform(-2, 0.5), rng.choice([1.0, 2.0, 3.0, math.inf]))
        )
    return cases


@pytest.mark.parametrize(("grads", "max_norm", "norm_type"), _torch_clip_cases(40))
def test_torch_s_own_clip_passes_both_checks_whatever_its_dtypes(
    grads: list[torch.Tensor], max_norm: float, norm_type: float
) -> None:
    """Held to its own dtype's tolerance each, a float32 bias of 0.1 beside a bfloat16 weight of 10
    failed the direction check on torch's own clip (12 of 100 seeds), the common factor pulled onto
    the bfloat16 tensor's rounded ratio; mixes of float16, float32 and float64 failed both checks
    (a review). The factor is now each tensor's ratio weighted by how finely it tells it. Oracle:
    torch's clip_grad_norm_ itself, on 40 seeded mixes of dtypes, sizes, magnitudes and norm types."""
    params = [nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    returned = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
    if not all(bool(p.grad.isfinite().all()) for p in params if p.grad is not None):
        pytest.skip("torch's clip made a non-finite gradient: a finding of its own, not this test's case")
    if any(bool(g.any()) for g in grads) and not any(
        bool(p.grad.any()) for p in params if p.grad is not None
    ):
        pytest.skip(
            "torch's clip zeroed every gradient (its total overflowed or underflowed): its own finding"
        )
    assert_clipped_norm_bounded(params, max_norm, norm_type, before=grads, returned=returned)
    assert_direction_preserved(grads, [p.grad for p in params])  # type: ignore[misc]


def test_a_bfloat16_weight_beside_a_small_float32_bias_passes_torch_s_clip() -> None:
    """The review's case, over 30 seeds: a bfloat16 weight of 1000 values ~10 beside a float32 bias
    of 10 values ~0.1, torch's clip at max_norm 1."""
    for seed in range(30):
        gen = torch.Generator().manual_seed(seed)
        weight = nn.Parameter(torch.zeros(1000, dtype=torch.bfloat16))
        bias = nn.Parameter(torch.zeros(10))
        weight.grad = (torch.randn(1000, generator=gen) * 10).to(torch.bfloat16)
        bias.grad = torch.randn(10, generator=gen) * 0.1
        before = [weight.grad.clone(), bias.grad.clone()]
        returned = torch.nn.utils.clip_grad_norm_([weight, bias], 1.0)
        assert_clipped_norm_bounded([weight, bias], 1.0, before=before, returned=returned)
        assert_direction_preserved(before, [weight.grad, bias.grad])


def test_a_clip_whose_right_answer_underflows_to_zero_passes_the_clip_check() -> None:
    """float32 gradients of 1e-30 clipped to max_norm 1e-30: torch's float32 total underflows (its
    squares, 1e-60) and its coefficient 1e-24 takes the gradients to 1e-54, below float32's smallest
    subnormal: 0, the right answer in float32. The band the common factor is fitted in went below 0
    and the check failed ('a factor of 0'); beside a float64 tensor, scaled exactly, the zeroed float32
    one pulled the fit off it (a review). Oracle: torch's clip_grad_norm_ itself."""
    tiny = nn.Parameter(torch.zeros(4))
    wide = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    for params in ([tiny], [tiny, wide]):
        for p in params:
            p.grad = torch.full((4,), 1e-30, dtype=p.dtype)
        before = [p.grad.clone() for p in params]  # type: ignore[union-attr]
        returned = torch.nn.utils.clip_grad_norm_(params, 1e-30)
        assert not bool(tiny.grad.any())  # type: ignore[union-attr]  # the case: float32's answer is 0
        assert_clipped_norm_bounded(params, 1e-30, before=before, returned=returned)


@pytest.mark.parametrize("mag", [1e160, 1e-170])
def test_direction_holds_for_float64_values_whose_squares_leave_the_range(mag: float) -> None:
    """float64 values past 1e154 (or below 1e-162) overflow (underflow) their squares: the factor
    read NaN and any after passed, a sign flip and a x3 tensor too (a review). Each pair is taken in
    units of before's largest entry. Oracle: exact rescalings pass, faults fail."""
    gen = torch.Generator().manual_seed(0)
    b = [
        torch.randn(100, dtype=torch.float64, generator=gen) * mag,
        torch.randn(10, dtype=torch.float64, generator=gen) * mag,
    ]
    assert assert_direction_preserved(b, [0.5 * t for t in b]) == 0.5
    for wrong in ([-t for t in b], [b[0], 3 * b[1]], [torch.randn_like(t) * mag for t in b]):
        with pytest.raises(StabilityError):
            assert_direction_preserved(b, wrong)


@pytest.mark.parametrize("rtol", [0.0, 1e-160])
def test_an_rtol_of_zero_or_tiny_is_exact_not_a_crash(rtol: float) -> None:
    """rtol=0 raised ZeroDivisionError, rtol=1e-160 made the factor NaN and let a sign flip pass (a
    review): the fit's weights are scale-free. Oracle: an exact x0.5 returns 0.5; faults fail."""
    b = [
        torch.randn(50, dtype=torch.float64, generator=torch.Generator().manual_seed(1)),
        torch.ones(3, dtype=torch.float64),
    ]
    assert assert_direction_preserved(b, [0.5 * t for t in b], rtol=rtol) == 0.5
    for wrong in ([-t for t in b], [b[0], 3 * b[1]]):
        with pytest.raises(StabilityError):
            assert_direction_preserved(b, wrong, rtol=rtol)


def test_a_bfloat16_gradient_three_percent_off_the_clip_fails_the_clip_check() -> None:
    """Each bfloat16 tensor was allowed rtol + 2.5 eps (3.55%), though torch rounds each product once
    (the coefficient's roundings are common, in the band): 3% off passed the clip check while the
    direction check caught it (a review). Oracle: torch's clip, then the bfloat16 gradient between two
    float32 ones x1.03."""
    gen = torch.Generator().manual_seed(2)
    dtypes = (torch.float32, torch.bfloat16, torch.float32)
    params = [nn.Parameter(torch.zeros(64, dtype=d)) for d in dtypes]
    for p in params:
        p.grad = torch.randn(64, generator=gen).to(p.dtype)
    before = [p.grad.clone() for p in params]  # type: ignore[union-attr]
    returned = torch.nn.utils.clip_grad_norm_(params, 0.5)
    assert_clipped_norm_bounded(params, 0.5, before=before, returned=returned)  # torch's own passes
    params[1].grad.mul_(1.03)  # type: ignore[union-attr]
    with pytest.raises(StabilityError, match="Tensors off the common factor"):
        assert_clipped_norm_bounded(params, 0.5, before=before, returned=returned)


def test_a_float16_gradient_among_its_subnormals_beside_bfloat16_passes_torch_s_clip() -> None:
    """The bound's absolute slack was the subnormal spacing of the coarsest dtype by rtol (bfloat16's,
    9e-41), not float16's (6e-8): torch's clip of a float16 gradient into float16's subnormals failed
    beside a bfloat16 one, and passed alone (a review). Oracle: torch's clip_grad_norm_."""
    params = [
        nn.Parameter(torch.zeros(1, dtype=torch.float16)),
        nn.Parameter(torch.zeros(1, dtype=torch.bfloat16)),
    ]
    params[0].grad = torch.tensor([1.0], dtype=torch.float16)
    params[1].grad = torch.tensor([0.01], dtype=torch.bfloat16)
    before = [p.grad.clone() for p in params]  # type: ignore[union-attr]
    returned = torch.nn.utils.clip_grad_norm_(params, 5e-8)
    assert_clipped_norm_bounded(params, 5e-8, before=before, returned=returned)


def test_rescaling_through_a_float16_layer_whose_gradient_underflows_passes() -> None:
    """A float32 -> float16 -> float32 MLP at c = 2^-20: the first layer's gradient underflows to 0
    through the float16 layer, and held to float32's spacing it failed (a review). Each gradient may
    carry the coarsest layer's subnormal spacing. Oracle: the backward is exactly linear in c."""
    from stabilitycheck.invariants import assert_rescaling_equivariant

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(8, 16), nn.Linear(16, 16).half(), nn.Linear(16, 16)])
            self.head = nn.Linear(16, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = torch.tanh(layer(x.to(layer.weight.dtype)))
            return self.head(x.to(self.head.weight.dtype))  # type: ignore[no-any-return]

    torch.manual_seed(0)
    x = torch.randn(32, 8) * 1e-3
    assert_rescaling_equivariant(Mixed(), (x,), lambda out, _: out.float().square().mean(), 2.0**-20)


def test_a_float16_module_elsewhere_hides_no_fault_on_a_float32_gradient() -> None:
    """The rescaling check's allowance for underflow through a float16 layer was the float16 spacing
    for every gradient of the model: with an unused float16 module beside it, a hook halving a float32
    head's small gradients passed at c = 2^-30 and 2^-20 (a review). The allowance is now what the
    float64 re-run measures, up to that spacing. Oracle: the hook's own fault, the model linear."""
    from stabilitycheck.invariants import assert_rescaling_equivariant

    class WithAux(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1, self.head = nn.Linear(8, 16), nn.Linear(16, 1)
            self.aux = nn.Linear(4, 4).half()  # never called: an auxiliary head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.l1(x)))  # type: ignore[no-any-return]

    torch.manual_seed(0)
    model, x = WithAux(), torch.randn(32, 8)
    model.head.weight.register_hook(lambda g: g * 0.5 if g.abs().max() < 1e-6 else g)
    for c in (2.0**-30, 2.0**-20):
        with pytest.raises(StabilityError, match=r"head\.weight"):
            assert_rescaling_equivariant(model, (x,), lambda out, _: out.square().mean(), c)


class _NegatingScaler(torch.amp.GradScaler):
    """A GradScaler whose unscale_ also flips every gradient's sign: gradient ascent."""

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        super().unscale_(optimizer)
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.neg_()


def test_gradscaler_guards_catch_an_unscale_that_flips_the_gradients() -> None:
    """A flipped gradient has the plain step's magnitudes, so a check of magnitudes alone reads it as
    a clip of the unscaled gradients and passes the ascent (a mutant no test killed): each entry must
    keep the plain step's sign too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    with pytest.raises(StabilityError, match="did not update the weights as a step on the unscaled"):
        assert_gradscaler_guards(
            model, torch.randn(16, 8), lambda out, _: out.square().mean(), _NegatingScaler("cpu")
        )


def _float64_grads(total: float) -> list[torch.Tensor]:
    """Two float64 gradients of total 2-norm `total` (3-4-5 shaped: exact)."""
    return [torch.full((1,), share * total, dtype=torch.float64) for share in (0.6, 0.8)]


def _holding(grads: list[torch.Tensor]) -> list[nn.Parameter]:
    """Parameters whose .grad are `grads`."""
    params = [nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    return params


def test_a_clip_that_scales_gradients_just_below_max_norm_fails() -> None:
    """A total 2e-6 below max_norm must leave every gradient as it was: scaled by 0.99 there, the
    clip keeps the direction and the bound, and only the unchanged check catches it (read from 40 x
    the float64 tolerance, 4e-6, a mutant no test killed, it was skipped there)."""
    before = _float64_grads(1.0 - 2e-6)
    with pytest.raises(StabilityError, match="unchanged"):
        assert_clipped_norm_bounded(_holding([g * 0.99 for g in before]), 1.0, before=before)


def test_a_clip_returning_a_total_off_by_5x_its_tolerance_fails() -> None:
    """The returned total norm is the one before clipping within the dtype's tolerance (float64's
    1e-7 here): 5e-7 off fails (read within 10 x that, a mutant no test killed, it passed)."""
    before = _float64_grads(10.0)
    after = _holding([g / 10.0 for g in before])  # clipped to max_norm 1, exactly
    assert_clipped_norm_bounded(after, 1.0, before=before, returned=10.0)
    with pytest.raises(StabilityError, match="returned another value than the total norm before"):
        assert_clipped_norm_bounded(after, 1.0, before=before, returned=10.0 * (1 + 5e-7))
