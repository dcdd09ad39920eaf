"""watch hears torch.nn.utils.clip_grad_norm_: the total norm it returns, the gradient's before
clipping, is logged and reported, where the watcher's own norms, read at the optimizer step, are the
clipped ones (a clipped run's grad_norm read max_norm at every step while the norm before it reached
4e8: a user's trial). Oracles: the norm computed by hand before the clip, and torch's own function
given back when the watchers close."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from watch_models import MLP, batch, compute_loss

from stabilitycheck import watch
from stabilitycheck.watchclip import Listening
from stabilitycheck.watching import Watcher
from stabilitycheck.watchlog import Report

SPIKE = 45


def _clipped_run(log: Path, clip: float | None) -> tuple[list[float], Report]:
    """60 SGD steps of the MLP, the loss x1e6 at step SPIKE, clipped to `clip` (None: not clipped);
    the total gradient norm before the clip by hand at every step, and the watcher."""
    torch.manual_seed(0)
    model = MLP(depth=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    params = list(model.parameters())
    by_hand = []
    w: Watcher
    with watch(model, opt, log=log, report=None) as w:
        for step in range(60):
            loss = compute_loss(model, batch(torch.Generator().manual_seed(step), model))
            loss = loss * 1e6 if step == SPIKE else loss
            w.loss(loss)
            opt.zero_grad()
            loss.backward()
            by_hand.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item())
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
    assert w.report is not None
    return by_hand, w.report


def test_the_norm_before_clipping_is_logged_and_reported(tmp_path: Path) -> None:
    by_hand, report = _clipped_run(tmp_path / "w.jsonl", 1.0)
    rows = [json.loads(line) for line in (tmp_path / "w.jsonl").read_text().splitlines()]
    for row, norm in zip(rows, by_hand, strict=True):
        assert math.isclose(row["grad_norm_before_clip"], norm, rel_tol=1e-6)
        assert row["grad_norm"] <= 1.0 + 1e-6  # what the watcher measures: the clipped gradient
    above = sum(n > 1.0 for n in by_hand)
    assert report.clip_steps == 60 and report.clipped_steps == above and above >= 1
    assert report.clip_peak is not None and report.clip_peak[0] == SPIKE == by_hand.index(max(by_hand))
    assert (
        f"largest {max(by_hand):.4g} at step {SPIKE}; above max_norm at {above} of the 60 steps"
        in report.text()
    )


def test_an_unclipped_run_logs_no_norm_before_clipping(tmp_path: Path) -> None:
    _, report = _clipped_run(tmp_path / "w.jsonl", None)
    rows = [json.loads(line) for line in (tmp_path / "w.jsonl").read_text().splitlines()]
    assert all(row["grad_norm_before_clip"] is None for row in rows)
    assert report.clip_steps == 0 and "before clipping" not in report.text()


def test_torchs_functions_are_given_back_whatever_order_the_watchers_close_in() -> None:
    """One wrapper of each serves every open listener, put back when the last one goes; one that
    something else replaced meanwhile is left as it is. clip_grads_with_norm_ (accelerate's way,
    after get_total_norm) is heard with the total it is given."""
    utils = torch.nn.utils
    original, with_norm = utils.clip_grad_norm_, utils.clip_grads_with_norm_
    heard: list[tuple[float, float]] = []
    for order in ((0, 1), (1, 0)):
        both = [Listening(lambda t, m: heard.append((float(t), m))) for _ in range(2)]
        assert utils.clip_grad_norm_ is not original and utils.clip_grads_with_norm_ is not with_norm
        p = torch.nn.Parameter(torch.ones(4))
        p.grad = torch.full((4,), 3.0)
        assert float(utils.clip_grad_norm_([p], 1.0)) == 6.0  # its return, unchanged
        assert heard[-2:] == [(6.0, 1.0)] * 2 and torch.allclose(p.grad, torch.full((4,), 0.5))
        p.grad = torch.full((4,), 2.0)
        utils.clip_grads_with_norm_([p], 2.0, utils.get_total_norm([p.grad]))
        assert heard[-2:] == [(4.0, 2.0)] * 2 and torch.allclose(p.grad, torch.full((4,), 1.0))
        for i in order:
            both[i].remove()
            both[i].remove()  # twice is once
        assert utils.clip_grad_norm_ is original and utils.clip_grads_with_norm_ is with_norm
    listening = Listening(lambda t, m: None)
    try:
        utils.clip_grad_norm_ = lambda *a, **k: torch.zeros(())  # someone else's, later
        listening.remove()
        assert utils.clip_grad_norm_ is not original and utils.clip_grads_with_norm_ is with_norm
    finally:
        utils.clip_grad_norm_ = original
