"""Watch mode across batch sizes: block outputs and their gradients are read at each block's first
step's element count, so a correct loop whose batch size changes (a ramp, an epoch's short last batch)
is no spike, while a loss summed over the batch still is; a step of fewer samples leaves its loss and
weight gradients unjudged, a non-finite one still flagged."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from watch_models import MLP, batch, compute_loss, report_of

from stabilitycheck.replay import replay
from stabilitycheck.watching import watch

CHANGE = 60  # the step whose batch size differs


def _loop(sizes: Any, reduction: str = "mean", skip: bool = False, log: Path | None = None) -> Any:
    """80 SGD steps of a 4-block tanh MLP on i.i.d. inputs, batch size sizes(step); its report."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(4)], nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2 if reduction == "mean" else 1e-4)
    gen = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with watch(model, opt, report=None, skip=skip, log=log) as w:
            for step in range(80):
                x = torch.randn(sizes(step), 16, generator=gen)
                loss = nn.functional.mse_loss(model(x).squeeze(-1), x.sum(-1).sin(), reduction=reduction)
                w.loss(loss)
                opt.zero_grad()
                loss.backward()
                opt.step()
    return report_of(w)


@pytest.mark.parametrize("after", [128, 512])
def test_a_batch_size_ramp_of_a_correct_loop_is_not_flagged_nor_skipped(after: int) -> None:
    """Oracle: the samples are i.i.d., so every block's output per sample, and under a mean loss the
    gradient per sample times the batch size, keep their distribution across the ramp; the norm over
    the batch moves by sqrt(after / 32), x2-x4, which the rule read as a spike (flagged and, under
    skip=True, skipped: steps 60-61 at 128, 60-64 at 512, found by an audit)."""
    report = _loop(lambda step: 32 if step < CHANGE else after, skip=True)
    assert report.flagged_steps == [] and report.skipped_steps == []


def test_a_loss_summed_over_a_growing_batch_is_still_flagged_at_the_ramp() -> None:
    """A sum over the batch (the fault the ramp above must not hide) multiplies every output gradient
    per sample by the batch size: x16 at 32 -> 512, a spike read at the reference too."""
    report = _loop(lambda step: 32 if step < CHANGE else 512, reduction="sum")
    assert CHANGE in report.flagged_steps


def test_an_epochs_short_last_batch_is_neither_flagged_nor_skipped() -> None:
    """Batches of 512, then one of 8 (drop_last=False): its weight gradients, a mean over 8 samples,
    read x6.6 the geometric mean of their last 128 on block 0 (the noise of a mean grows as
    1/sqrt(n)), and the step was flagged and skipped; its loss and weight gradients are now logged,
    not judged."""
    report = _loop(lambda step: 8 if step == CHANGE else 512, skip=True)
    assert report.flagged_steps == [] and report.skipped_steps == []


def test_a_non_finite_loss_on_a_short_batch_is_still_flagged() -> None:
    """The short batch's loss is left unjudged as a spike, not as a non-finite value: a NaN added to
    the loss alone (the gradients stay finite: it is a constant) is the step's finding, flagged and,
    under skip=True, skipped."""
    torch.manual_seed(0)
    model = MLP(depth=3)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, fused=True)
    gen = torch.Generator().manual_seed(0)
    with watch(model, opt, report=None, skip=True) as w:
        for step in range(CHANGE + 4):
            x, y = batch(gen, model, 8 if step == CHANGE else 64)
            loss = compute_loss(model, (x, y))
            loss = loss + torch.tensor(math.nan) if step == CHANGE else loss
            w.loss(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
    report = report_of(w)
    found = report.first_nonfinite
    assert found is not None and found.step == CHANGE and found.tensor == "loss"
    assert report.flagged_steps == report.skipped_steps == [CHANGE]


def test_norms_of_a_step_of_another_size_are_read_at_the_reference(tmp_path: Path) -> None:
    """Oracle: torch.linalg.vector_norm of each block's output and of its gradient (hooks of the test's
    own), times sqrt(n0 / n) for the output and sqrt(n / n0) for the gradient, n0 the first step's
    element count; the loss and the total gradient norm (torch.nn.utils.get_total_norm) as they are.
    Steps of the first step's size read torch's norms unscaled."""
    torch.manual_seed(0)
    model = MLP(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    outputs: list[torch.Tensor] = []
    hooks = [block.register_forward_hook(lambda m, a, out: outputs.append(out)) for block in model.blocks]
    sizes, log, expected = [16, 16, 4, 64, 16], tmp_path / "w.jsonl", []
    with watch(model, opt, log=log, report=None) as w:
        for size in sizes:
            opt.zero_grad()
            outputs.clear()
            loss = compute_loss(model, batch(gen, model, size))
            w.loss(loss)
            for out in outputs:
                out.retain_grad()
            loss.backward()
            r = size / sizes[0]
            acts = [float(torch.linalg.vector_norm(o.detach())) / math.sqrt(r) for o in outputs]
            grads = [float(torch.linalg.vector_norm(o.grad)) * math.sqrt(r) for o in outputs]
            total = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))
            expected.append((float(loss.detach()), total, acts, grads))
            opt.step()
    for h in hooks:
        h.remove()
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    got = [(row["loss"], row["grad_norm"], row["activation"], row["activation_grad"]) for row in rows]
    assert len(got) == len(sizes)
    for (loss, total, acts, grads), (want_loss, want_total, want_acts, want_grads) in zip(
        got, expected, strict=True
    ):
        assert loss == pytest.approx(want_loss, rel=1e-6)
        assert total == pytest.approx(want_total, rel=1e-6)
        assert acts == pytest.approx(want_acts, rel=1e-6)
        assert grads == pytest.approx(want_grads, rel=1e-6)


def test_a_flagged_step_of_another_size_replays_its_logged_norms(tmp_path: Path) -> None:
    """A x50 input on a short batch of 8 after batches of 32 is flagged; its bundle replays the norms
    read at the run's reference sizes within 1e-6 (replayed alone, the step's own sizes would be the
    reference: its output norms x2 off)."""
    torch.manual_seed(0)
    model = MLP(depth=3)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    with watch(model, opt, bundle=tmp_path / "b", compute_loss=compute_loss, report=None) as w:
        for step in range(44):
            x, y = batch(gen, model, 8 if step == 40 else 32)
            x = x * 50 if step == 40 else x
            loss = compute_loss(model, (x, y))
            w.loss(loss, batch=(x, y))
            opt.zero_grad()
            loss.backward()
            opt.step()
    first = report_of(w).first_spike
    assert first is not None and first.step == 40
    assert replay(tmp_path / "b").mismatches(1e-6) == []
