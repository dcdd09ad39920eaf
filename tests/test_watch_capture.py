"""The watcher's lazy capture (stabilitycheck.watchcapture): norms taken late or in batches equal
torch's own, and an output changed in place before its norm is taken is caught, not misreported.
Also the element counts a capture reads across batch sizes, micro-batches and no-grad passes."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from watch_models import MLP, batch, train

from stabilitycheck import norms, watchcapture
from stabilitycheck.spikes import SpikeRule
from stabilitycheck.watching import watch


def reference(model: MLP, data: tuple[torch.Tensor, torch.Tensor]) -> tuple[list[float], list[float]]:
    """Block output norms and their gradients' norms on `data`, with autograd.grad (no hooks)."""
    x, y = data
    outs, h = [], x
    for block in model.blocks:
        h = block(h)
        outs.append(h)
    loss = ((model.head(h).squeeze(-1) - y) ** 2).mean()
    grads = torch.autograd.grad(loss, outs)
    norms = [float(torch.linalg.vector_norm(t.detach())) for t in outs]
    return norms, [float(torch.linalg.vector_norm(g)) for g in grads]


@pytest.mark.parametrize(("cap", "eager"), [(1, 1 << 13), (1 << 22, 1 << 13), (1 << 22, 0)])
def test_norms_taken_at_once_or_at_the_step_end_are_torchs_own(
    cap: int, eager: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cap 1: every kept tensor is normed as soon as it is kept; eager 0: no tensor is kept, each
    is normed in its hook; the defaults: these small captures are normed at the step's end."""
    monkeypatch.setattr(watchcapture, "PENDING_CAP", cap)
    monkeypatch.setattr(watchcapture, "EAGER_NUMEL", eager)
    torch.manual_seed(0)
    model = MLP(depth=4)
    data = batch(torch.Generator().manual_seed(0), model)  # what train(seed=0) draws first
    w = train(model, 1, flush_every=1)
    values = dict(zip(w.out.names, w.out.last_values, strict=True))
    torch.manual_seed(0)
    outs, grads = reference(MLP(depth=4), data)
    for b in range(4):
        assert values[("activation", f"blocks.{b}")] == pytest.approx(outs[b], rel=1e-6)
        assert values[("activation_grad", f"blocks.{b}")] == pytest.approx(grads[b], rel=1e-6)


class Doubling(nn.Module):
    """Linear blocks whose outputs the model doubles in place after each block returns."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
            x.mul_(2.0)
        return self.head(x).squeeze(-1)


def test_an_output_changed_in_place_is_caught_and_later_steps_are_exact(tmp_path: Path) -> None:
    """Step 0 norms the doubled outputs (kept until the step's end) and warns, at the loop's
    opt.step() line (it pointed into this package); from step 1 on the norms are taken at each block
    call, so they are the outputs as the blocks returned them."""
    torch.manual_seed(0)
    model = Doubling()
    x = torch.randn(8, 16)
    log = tmp_path / "watch.jsonl"
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the same weights at both steps
    said = pytest.warns(UserWarning, match="modified in place")
    with said as caught, watch(model, opt, log=log, report=None):
        for _ in range(2):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    assert [w.filename for w in caught if "in place" in str(w.message)] == [__file__]
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    with torch.no_grad():
        h, returned = x, []
        for block in model.blocks:
            h = block(h)
            returned.append(float(torch.linalg.vector_norm(h)))
            h = 2.0 * h
    assert rows[0]["activation"] == pytest.approx([2.0 * v for v in returned], rel=1e-6)
    assert rows[1]["activation"] == pytest.approx(returned, rel=1e-6)


class Unrolled(nn.Module):
    """One block called 70 times a step (more than STACK_MIN): a recurrent cell, or a linear map
    applied to pieces of varying lengths (whose captures cannot be stacked)."""

    def __init__(self, ragged: bool) -> None:
        super().__init__()
        self.ragged = ragged
        self.cell = nn.Linear(4, 4) if ragged else nn.RNNCell(4, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The loss and the block's outputs."""
        outs: list[torch.Tensor] = []
        hs: list[torch.Tensor] = []
        h = torch.zeros(3, 4)
        for t in range(x.shape[0]):
            y = self.cell(x[t, : 1 + t % 3]) if self.ragged else self.cell(x[t], h)
            h = y.tanh() if self.ragged else y
            outs.append(y)
            hs.append(h)
        return torch.cat([h.reshape(-1) for h in hs]).sin().sum(), outs


@pytest.mark.parametrize("ragged", [False, True])
def test_a_block_called_70_times_has_the_norm_of_all_its_calls(ragged: bool) -> None:
    assert watchcapture.STACK_MIN < 70
    torch.manual_seed(0)
    model = Unrolled(ragged)
    x = torch.randn(70, 3, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with watch(model, opt, blocks=[("cell", model.cell)], flush_every=1, report=None) as w:
        opt.zero_grad()
        model(x)[0].backward()
        opt.step()
    values = dict(zip(w.out.names, w.out.last_values, strict=True))
    loss, outs = model(x)
    grads = torch.autograd.grad(loss, outs)
    expect = torch.linalg.vector_norm(torch.cat([o.detach().reshape(-1) for o in outs]))
    expect_grad = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads]))
    assert values[("activation", "cell")] == pytest.approx(float(expect), rel=1e-6)
    assert values[("activation_grad", "cell")] == pytest.approx(float(expect_grad), rel=1e-6)


CUDA = torch.device("cuda")
DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    ),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("wide", [False, True])
def test_norms_of_finite_tensors_are_finite_and_exact_at_any_scale(
    device: str, wide: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Float32 and bfloat16 values (uniform in +-scale) whose squares overflow float32 (norms from
    1.8e19 up to the largest float32) or are subnormal (norms below 1e-19), float16 and float64 among
    them, in one fused call and one at a time: each norm equals float64 torch.linalg.vector_norm.
    `wide`: summed in float64 from the start, as on CUDA."""
    if wide:
        choice = norms.accumulator
        monkeypatch.setattr(norms, "accumulator", lambda d, exact, _=None: choice(d, exact, CUDA))
    gen = torch.Generator().manual_seed(0)
    tensors = [
        ((2 * torch.rand(n, generator=gen, dtype=torch.float64) - 1) * scale).to(dtype)
        for n, scale, dtype in [
            (1000, 1e20, torch.float32),
            (1 << 16, 1e35, torch.float32),
            (4, 3e38, torch.float32),
            (1000, 1e-22, torch.float32),
            (100, 1e-40, torch.float32),  # subnormal values
            (1000, 1e-19, torch.float32),
            (1000, 0.0, torch.float32),
            (1000, 1.0, torch.float32),
            (1000, 1e25, torch.bfloat16),
            (1000, 1e-25, torch.bfloat16),
            (1000, 6e4, torch.float16),
            (1000, 1e-6, torch.float16),
            (1000, 1e100, torch.float64),
        ]
    ]
    tensors = [t.to(device) for t in tensors]
    assert all(bool(t.isfinite().all()) for t in tensors)
    expect = [float(torch.linalg.vector_norm(t.double())) for t in tensors]
    fused = [float(v) for v in norms.fused_norms(tensors, False)]
    alone = [float(norms.norm(t)) for t in tensors]
    same = [
        [float(v) for v in norms.fused_norms([t for t in tensors if t.dtype == d], False)]
        for d in (torch.float32, torch.bfloat16)
    ]
    assert fused == pytest.approx(expect, rel=1e-6, abs=0)
    assert alone == pytest.approx(expect, rel=1e-6, abs=0)
    assert [*same[0], *same[1]] == pytest.approx(
        [e for t, e in zip(tensors, expect, strict=True) if t.dtype == torch.float32]
        + [e for t, e in zip(tensors, expect, strict=True) if t.dtype == torch.bfloat16],
        rel=1e-6,
        abs=0,
    )
    assert math.isinf(float(norms.norm(torch.tensor([1.0, math.inf], device=device))))
    assert math.isnan(float(norms.norm(torch.tensor([1e30, math.nan], device=device))))


@pytest.mark.parametrize(("factor", "loss_scale"), [(1e20, 1e22), (1e-22, 1e-25)])
def test_the_watch_logs_huge_and_tiny_finite_norms_exactly(factor: float, loss_scale: float) -> None:
    """Block 1's output x1e20 and the loss x1e22 (finite values whose float32 squares overflow), or
    x1e-22 and x1e-25 (subnormal squares): every logged norm equals the float64 norm of the tensor."""
    torch.manual_seed(0)
    model = MLP(depth=3)
    model.blocks[1].register_forward_hook(lambda module, args, out: out * factor)
    x, y = batch(torch.Generator().manual_seed(0), model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with watch(model, opt, flush_every=1, report=None) as w:
        opt.zero_grad()
        loss = loss_scale * ((model(x) - y) ** 2).mean()
        w.loss(loss)
        loss.backward()
        opt.step()
    values = dict(zip(w.out.names, w.out.last_values, strict=True))
    outs, h = [], x
    for block in model.blocks:
        h = block(h)
        outs.append(h)
    grads = torch.autograd.grad(loss_scale * ((model.head(h).squeeze(-1) - y) ** 2).mean(), outs)
    for b in range(3):
        expect_out = float(torch.linalg.vector_norm(outs[b].detach().double()))
        expect_grad = float(torch.linalg.vector_norm(grads[b].double()))
        weight_grads = torch.cat([p.grad.double().reshape(-1) for p in model.blocks[b].parameters()])
        assert values[("activation", f"blocks.{b}")] == pytest.approx(expect_out, rel=1e-6, abs=0)
        assert values[("activation_grad", f"blocks.{b}")] == pytest.approx(expect_grad, rel=1e-6, abs=0)
        assert values[("gradient", f"blocks.{b}")] == pytest.approx(
            float(weight_grads.norm()), rel=1e-6, abs=0
        )
    extreme = [v for v in values.values() if v > 1.8e19 or 0 < v < 1e-19]
    assert len(extreme) >= 2  # the ranges float32 squares cannot hold were measured


def test_a_no_grad_evaluation_pass_is_not_in_the_steps_block_output_norms() -> None:
    """A forward under torch.no_grad between training steps is no part of the step: each block's output
    norm is that of the training pass alone (torch.linalg.vector_norm of the outputs seen by a hook)."""
    from stabilitycheck.watching import watch

    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(3)))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    seen: list[float] = []
    model[1].register_forward_hook(
        lambda m, a, out: seen.append(float(torch.linalg.vector_norm(out.detach())))
    )
    x = torch.randn(8, 4)
    with watch(model, opt, report=None, flush_every=1) as w:
        loss = model(x).square().mean()
        loss.backward()
        with torch.no_grad():
            model(10 * x)  # an evaluation pass on other data
        opt.step()
    assert len(seen) == 2
    parts = w.layout.parts()["activation"]
    assert math.isclose(w.out.last_values[parts][1], seen[0], rel_tol=1e-5)


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
