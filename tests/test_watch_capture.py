"""The watcher's lazy capture (stabilitycheck.watchcapture): norms taken late or in batches equal
torch's own, and an output changed in place before its norm is taken is caught, not misreported."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from watch_models import MLP, batch, train

from stabilitycheck import norms, watchcapture
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
    """Step 0 norms the doubled outputs (kept until the step's end) and warns; from step 1 on the
    norms are taken at each block call, so they are the outputs as the blocks returned them."""
    torch.manual_seed(0)
    model = Doubling()
    x = torch.randn(8, 16)
    log = tmp_path / "watch.jsonl"
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the same weights at both steps
    with pytest.warns(UserWarning, match="modified in place"), watch(model, opt, log=log, report=None):
        for _ in range(2):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
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
