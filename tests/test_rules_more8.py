"""Round-8 mutation-testing additions (spikes, the watcher's element-count rescaling and step
wrapping, seeds' curtailment, mean field's fixed point, the GradScaler and clipping checks). Each
test's oracle is theory, brute force, torch's own functions or the documented rule spelt out by hand
(never a number the code printed). Fast and deterministic."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from stabilitycheck.errors import StabilityError
from stabilitycheck.invariants import assert_clipped_norm_bounded, assert_clipped_value_bounded
from stabilitycheck.norms import CHUNK, accumulated, norm
from stabilitycheck.probing import probe_module
from stabilitycheck.spikes import SpikeRule, noisier, unmeasured
from stabilitycheck.watching import watch

NAN, INF = math.nan, math.inf


# ---------------------------------------------------------------- spikes.py


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal entries, NaN equal to NaN."""
    return bool(torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)))


def test_noisier_zeroes_the_finite_values_of_its_columns_and_keeps_the_non_finite_ones() -> None:
    """noisier's docstring: the finite values of `cols` set to 0, a non-finite one still flagged (kept
    as it is); other columns untouched; the input not modified. Oracle: the rule by hand."""
    series = torch.tensor([[1.0, 2.0, NAN, INF, -INF, 5.0, 6.0]], dtype=torch.float64)
    kept = series.clone()
    got = noisier(series, [slice(0, 1), slice(2, 6)])
    want = torch.tensor([[0.0, 2.0, NAN, INF, -INF, 0.0, 6.0]], dtype=torch.float64)
    assert _same(got, want)
    assert _same(series, kept)


def test_unmeasured_zeroes_every_value_of_its_columns_non_finite_ones_too() -> None:
    """unmeasured's docstring: `cols` set to 0, no measurement (not 'finite values': a value that was
    not measured is no finding either). Oracle: the rule by hand."""
    series = torch.tensor([[1.0, NAN, INF, 4.0]], dtype=torch.float64)
    got = unmeasured(series, slice(1, 3))
    assert _same(got, torch.tensor([[1.0, 0.0, 0.0, 4.0]], dtype=torch.float64))


def test_the_rows_masked_are_the_only_rows_left_unjudged() -> None:
    """With `rows` (steps x series), only the masked steps' `cols` are set to 0, by unmeasured and by
    noisier alike; the other steps keep every value. Oracle: the rule by hand, row by row."""
    series = torch.arange(1.0, 13.0, dtype=torch.float64).reshape(4, 3)
    rows = torch.tensor([True, False, True, False])
    want = series.clone()
    want[0, 1:] = 0.0
    want[2, 1:] = 0.0
    assert torch.equal(unmeasured(series, slice(1, 3), rows), want)
    assert torch.equal(noisier(series, [slice(1, 2), slice(2, 3)], rows), want)


# ---------------------------------------------------------------- invariants_clip.py


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


# ---------------------------------------------------------------- watching.py


def test_the_host_rule_leaves_a_short_batchs_loss_and_weight_gradients_unjudged_too() -> None:
    """README: a step of fewer samples than the reference (an epoch's short last batch) leaves its
    loss and weight gradients logged, not judged. skip=True judges on the device, skip=False at the
    flush on the host: both read the step as fewer. Oracle: the documented rule; the same loop under
    skip=True, which flags nothing either (batches of 256, then one of 2 at step 20, a quick rule)."""
    flagged = []
    for skip in (True, False):
        torch.manual_seed(0)
        blocks = [nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(4)]
        model = nn.Sequential(*blocks, nn.Linear(16, 1))
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(0)
        rule = SpikeRule(window=16, warmup=8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with watch(model, opt, report=None, skip=skip, rule=rule) as w:
                for step in range(22):
                    x = torch.randn(2 if step == 20 else 256, 16, generator=gen)
                    loss = nn.functional.mse_loss(model(x).squeeze(-1), x.sum(-1).sin())
                    w.loss(loss)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        assert w.report is not None
        flagged.append(w.report.flagged_steps)
    assert flagged == [[], []]


# ---------------------------------------------------------------- watchcapture.py


class _Blocks(nn.Module):
    """Two Linear-Tanh blocks in a ModuleList (the blocks watch finds) and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(2))
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _logged_and_torchs(
    path: Path, steps: list[tuple[list[int], int]]
) -> list[tuple[list[float], list[float], list[float], list[float]]]:
    """Per step (the micro-batch sizes, then the batch of a validation pass run with gradients on and
    never backpropagated, 0 for none): the watcher's logged block output and output-gradient norms,
    and torch's, read at the first step's sample count by the documented rule (an output's norm x
    sqrt(n0 / n), its gradient's x sqrt(n / n0), n the samples the step backpropagated)."""
    torch.manual_seed(0)
    model = _Blocks()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    kept: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda _m, _a, out: kept.append(out)) for b in model.blocks]
    want = []
    with watch(model, opt, log=path, report=None) as w:
        for sizes, val in steps:
            opt.zero_grad()
            if val:
                model(torch.randn(val, 16))  # a validation pass with gradients on: not in the row
            kept.clear()
            for n in sizes:
                loss = model(torch.randn(n, 16)).square().mean()
                for out in kept[-2:]:
                    out.retain_grad()
                w.loss(loss)
                loss.backward()
            outs = kept[-2 * len(sizes) :]
            r = sum(sizes) / sum(steps[0][0])
            acts = [
                math.hypot(*(float(o.detach().norm()) for o in outs[b::2])) / math.sqrt(r) for b in (0, 1)
            ]
            grads = [math.hypot(*(float(o.grad.norm()) for o in outs[b::2])) * math.sqrt(r) for b in (0, 1)]
            want.append((acts, grads))
            opt.step()
    for h in hooks:
        h.remove()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [(row["activation"], row["activation_grad"], a, g) for row, (a, g) in zip(rows, want, strict=True)]


@pytest.mark.parametrize("width", [16, 4096])
def test_micro_batches_of_unequal_sizes_are_read_at_the_reference_sample_count(
    tmp_path: Path, width: int
) -> None:
    """Gradient accumulation: a step's captures are every micro-batch's, its element count their sum
    (a step of 16 + 4 samples after steps of 16 + 16 reads x sqrt(32 / 20), not as its last micro-batch
    alone). Width 4096 x 16 elements puts each output over EAGER_NUMEL (normed at once). Oracle: torch's
    norms of the block outputs and of their gradients, rescaled by the documented rule by hand."""
    n = width
    steps = [([n, n], 0), ([n, n], 0), ([n, n // 4], 0), ([n // 4, n], 0)]
    for acts, grads, want_acts, want_grads in _logged_and_torchs(tmp_path / "w.jsonl", steps):
        assert acts == pytest.approx(want_acts, rel=1e-5)
        assert grads == pytest.approx(want_grads, rel=1e-5)


@pytest.mark.parametrize("width", [16, 4096])
def test_a_validation_pass_of_some_steps_is_not_counted_in_their_sample_count(
    tmp_path: Path, width: int
) -> None:
    """A forward run with gradients on and never backpropagated is not part of the step (watchcapture
    `_drop_unfed`): nor are its elements part of the step's element count, which a step with one and a
    step without would otherwise read x sqrt(2) apart. Oracle: torch's norms of the backpropagated
    pass's outputs and gradients, at the reference by the documented rule (here ratio 1)."""
    n = width
    steps = [([n], 0), ([n], n), ([n], 0), ([n], n)]
    for acts, grads, want_acts, want_grads in _logged_and_torchs(tmp_path / "w.jsonl", steps):
        assert acts == pytest.approx(want_acts, rel=1e-5)
        assert grads == pytest.approx(want_grads, rel=1e-5)


class _Twice(_Blocks):
    """_Blocks whose block 1 runs twice where `twice` is set (a looped block's extra call)."""

    twice = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks[1](self.blocks[0](x))
        return self.head(self.blocks[1](x) if self.twice else x)


def _loss_flags(path: Path, short: int | None = None, twice: int | None = None) -> list[list[str]]:
    """30 SGD steps of batches of 64 (8 at step `short`; block 1 called twice at step `twice`) under a
    quick rule (window 16, warm-up 4), the loss given to the watcher x100 at step 20 (its gradients
    as they are); the series flagged at each step, from the log."""
    torch.manual_seed(0)
    model = _Twice()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    with watch(model, opt, log=path, report=None, rule=SpikeRule(window=16, warmup=4)) as w:
        for step in range(30):
            model.twice = step == twice
            x = torch.randn(8 if step == short else 64, 16, generator=gen)
            loss = nn.functional.mse_loss(model(x).squeeze(-1), x.sum(-1).sin())
            w.loss(loss.detach() * 100 if step == 20 else loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return [json.loads(line)["flagged"] for line in path.read_text().splitlines()]


def _has_loss(flagged: list[str]) -> bool:
    return any(name.split(":")[0] == "loss" for name in flagged)


def test_a_loss_spike_after_an_epochs_short_batch_is_flagged(tmp_path: Path) -> None:
    """The short batch's loss and weight gradients are unjudged at that step alone (the step 'just
    closed', watchcapture.fewer); a x100 loss 10 steps later, at the reference size, is judged and
    flagged. Oracle: the documented rule (x100 is ln 100 = 4.6 above the window's mean on the
    logarithm, past its floor ln 2), and the same loop without the short batch."""
    for short in (None, 10):
        flags = _loss_flags(tmp_path / f"w{short}.jsonl", short=short)
        assert _has_loss(flags[20]), short
        assert not any(_has_loss(f) for i, f in enumerate(flags) if i != 20), short


def test_a_step_capturing_more_elements_somewhere_and_fewer_nowhere_judges_its_loss(tmp_path: Path) -> None:
    """fewer is 'fewer elements than a reference somewhere': a step where block 1 runs twice (more of
    its elements, as many of block 0's) is no short batch, and its x100 loss is flagged. Oracle: the
    documented rule; the same loop without the extra call."""
    for twice in (None, 20):
        flags = _loss_flags(tmp_path / f"w{twice}.jsonl", twice=twice)
        assert _has_loss(flags[20]), twice
        assert not any(_has_loss(f) for i, f in enumerate(flags) if i != 20), twice  # that step alone


@pytest.mark.parametrize("skip", [False, True])
def test_a_closure_stepped_under_no_grad_still_runs_its_backward(skip: bool) -> None:
    """torch's optimizers run step(closure)'s closure with gradients on (SGD: `with
    torch.enable_grad(): loss = closure()`), so a loop may call step under torch.no_grad(); the
    watcher, which runs the closure first, must too. Oracle: the same SGD step unwatched, parameters
    compared bit for bit."""

    def run(watched: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = _Blocks()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.randn(8, 16)

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = model(x).square().mean()
            loss.backward()
            return loss

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if watched:
                with watch(model, opt, report=None, skip=skip), torch.no_grad():
                    for _ in range(3):
                        opt.step(closure)
            else:
                with torch.no_grad():
                    for _ in range(3):
                        opt.step(closure)
        return [p.detach().clone() for p in model.parameters()]

    for got, want in zip(run(True), run(False), strict=True):
        assert torch.equal(got, want)


# ---------------------------------------------------------------- norms.py


@pytest.mark.parametrize("tail", [1, 2, 7])
def test_a_large_float32_norm_taken_in_pieces_counts_every_element_of_its_last_piece(tail: int) -> None:
    """A float32 CPU tensor of more than CHUNK elements is normed in CHUNK-element pieces and a last,
    shorter one: a last piece of one element counts as much as a longer one. Oracle: the norm in
    float64 by hand (every element 1 but the last, 1000)."""
    n = 2 * CHUNK + tail
    x = torch.ones(n)
    x[-1] = 1000.0
    want = math.sqrt(n - 1 + 1000.0**2)
    assert float(norm(x)) == pytest.approx(want, rel=1e-6)
    assert float(accumulated([x], False)[0]) == pytest.approx(want, rel=1e-6)


# ---------------------------------------------------------------- probing.py


class _InPlaceAfter(nn.Module):
    """Three float64 Linears, each output doubled in place after its block returned (the probe then
    runs the forward again, its buffers restored), plus a buffer made in inference mode or not."""

    def __init__(self, inference: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Linear(8, 8, dtype=torch.float64) for _ in range(3))
        with torch.inference_mode(inference):
            shift = torch.full((8,), 0.1, dtype=torch.float64)
        self.register_buffer("shift", shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            h = block(x)
            h.mul_(2.0)
            x = torch.tanh(h + self.shift)
        return x


def test_an_inference_tensor_buffer_is_left_alone_when_the_probe_runs_the_forward_again() -> None:
    """probing._buffers: an inference tensor, which no forward outside inference mode can update, is
    not kept for `_restore` (copying into it there raises). Oracle: the same model with the buffer an
    ordinary tensor, the same values, reads the same gains and growth."""
    x = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    read = []
    for inference in (True, False):
        model = _InPlaceAfter(inference)
        assert model.shift.is_inference() is inference
        blocks = [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)]
        m = probe_module(model, x, lambda out, _: out.square().sum(), blocks=blocks)
        read.append((m.gains, m.growth))
    assert read[0] == read[1]
