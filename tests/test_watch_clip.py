"""watch hears torch.nn.utils.clip_grad_norm_: the total norm it returns, the gradient's before
clipping, is logged and reported, where the watcher's own norms, read at the optimizer step, are the
clipped ones (a clipped run's grad_norm read max_norm at every step while the norm before it reached
4e8: a user's trial). Oracles: the norm computed by hand before the clip, and torch's own function
given back when the watchers close."""

from __future__ import annotations

import json
import math
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from watch_models import MLP, batch, compute_loss

from stabilitycheck import watch
from stabilitycheck.watchclip import Listening
from stabilitycheck.watching import Watcher
from stabilitycheck.watchlog import Report

SPIKE = 45


def _norm(params: list[torch.nn.Parameter]) -> float:
    """The total L2 norm of the parameters' gradients, by hand: the oracle."""
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])).item()


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
            by_hand.append(_norm(params))
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

    class Hears:
        def wants(self, clipped: list[torch.Tensor], max_norm: float) -> bool:
            return True

        def take(self, total: torch.Tensor, max_norm: float) -> None:
            heard.append((float(total), max_norm))

    for order in ((0, 1), (1, 0)):
        both = [Listening(Hears()) for _ in range(2)]
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
    listening = Listening(Hears())
    try:
        utils.clip_grad_norm_ = lambda *a, **k: torch.zeros(())  # someone else's, later
        listening.remove()
        assert utils.clip_grad_norm_ is not original and utils.clip_grads_with_norm_ is with_norm
    finally:
        utils.clip_grad_norm_ = original


def _two_block_run(log: Path, clip: Callable[[MLP, MLP], None], steps: int = 4) -> tuple[list[float], Report]:
    """`steps` SGD steps of a 2-block MLP under watch, `clip(model, other)` between backward and the
    step (`other`: an unwatched model with gradients of its own); the norm before any clip by hand."""
    torch.manual_seed(0)
    model, other = MLP(depth=2), MLP(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    by_hand = []
    w: Watcher
    with watch(model, opt, log=log, report=None) as w:
        for step in range(steps):
            data = batch(torch.Generator().manual_seed(step), model)
            loss = compute_loss(model, data) * 100
            w.loss(loss)
            opt.zero_grad()
            loss.backward()
            other.zero_grad()
            (compute_loss(other, data) * 1e4).backward()
            by_hand.append(_norm(list(model.parameters())))
            clip(model, other)
            opt.step()
    assert w.report is not None
    return by_hand, w.report


def _logged(log: Path) -> list[float | None]:
    return [json.loads(line)["grad_norm_before_clip"] for line in log.read_text().splitlines()]


def test_a_clip_of_another_model_of_a_part_or_of_no_limit_is_not_the_steps(
    tmp_path: Path,
) -> None:
    """Reviews' cases, each call taken for the step's norm before: a second call logging the clipped
    norm read 1.0 (max_norm inf, then 1e6: max_norm for a spike), another model's clip 1.99e4, a clip
    per submodule a part's norm. A clip after the first of a step's gradients sees its result: not
    taken (two clips, 1 then 0.5: null, the measured norm is neither's).
    Now only a clip over all the watched model's trainable parameters is taken; max_norm inf clips
    nothing and is never taken, nor a clip in another norm than L2 (the watcher's norms are L2: its
    total is no norm the log names). Oracle: the norm by hand before any clip."""
    utils = torch.nn.utils

    def then_logged(model: MLP, other: MLP) -> None:
        utils.clip_grad_norm_(model.parameters(), 1.0)
        utils.clip_grad_norm_(model.parameters(), math.inf)  # logging the clipped norm

    def other_first(model: MLP, other: MLP) -> None:
        utils.clip_grad_norm_(other.parameters(), 1.0)  # a critic's, say
        utils.clip_grad_norm_(model.parameters(), 1.0)

    def per_part(model: MLP, other: MLP) -> None:
        for part in (model.blocks, model.head):
            utils.clip_grad_norm_(part.parameters(), 1.0)

    def measured_only(model: MLP, other: MLP) -> None:
        utils.clip_grad_norm_(model.parameters(), math.inf)

    def measured_first(model: MLP, other: MLP) -> None:  # a tensor inf: clips nothing either
        utils.clip_grad_norm_(model.parameters(), torch.tensor(math.inf))
        utils.clip_grad_norm_(model.parameters(), 1.0)

    def per_group_given(model: MLP, other: MLP) -> None:  # each group's own total: a part's norm
        for part in (model.blocks, model.head):
            grads = [p.grad for p in part.parameters()]
            utils.clip_grads_with_norm_(part.parameters(), 1.0, utils.get_total_norm(grads))

    def max_norm_clip(model: MLP, other: MLP) -> None:
        utils.clip_grad_norm_(model.parameters(), 1.0, norm_type=math.inf)

    def l2_given_positionally(model: MLP, other: MLP) -> None:
        utils.clip_grad_norm_(model.parameters(), 1.0, 2.0)

    def then_read(model: MLP, other: MLP) -> None:  # the clipped norm read with a large max_norm
        utils.clip_grad_norm_(model.parameters(), 1.0)
        utils.clip_grad_norm_(model.parameters(), 1e6)

    def clipped_twice(model: MLP, other: MLP) -> None:  # the second clip sees the first's result
        utils.clip_grad_norm_(model.parameters(), 1.0)
        utils.clip_grad_norm_(model.parameters(), 0.5)

    def then_a_saliency_pass(model: MLP, other: MLP) -> None:  # a gradient pass moving no .grad
        utils.clip_grad_norm_(model.parameters(), 1.0)
        x = batch(torch.Generator().manual_seed(9), model)[0].requires_grad_()
        torch.autograd.grad(model(x).sum(), x)
        utils.clip_grad_norm_(model.parameters(), 1e6)

    cases = (
        (then_read, True),
        (then_a_saliency_pass, True),
        (clipped_twice, False),
        (max_norm_clip, False),
        (l2_given_positionally, True),
        (then_logged, True),
        (other_first, True),
        (per_part, False),
        (measured_only, False),
        (measured_first, True),
        (per_group_given, False),
    )
    for clip, taken in cases:
        by_hand, report = _two_block_run(tmp_path / f"{clip.__name__}.jsonl", clip)
        logged = _logged(tmp_path / f"{clip.__name__}.jsonl")
        if taken:
            assert logged == pytest.approx(by_hand, rel=1e-6), clip.__name__
            assert report.clip_steps == 4 and report.clipped_steps == sum(n > 1.0 for n in by_hand)
        else:
            assert logged == [None] * 4 and report.clip_steps == 0, clip.__name__


def test_a_tensor_max_norm_is_read_as_it_was_at_the_clip(tmp_path: Path) -> None:
    """A schedule changing a tensor max_norm in place after the clip: the report read the value at
    the flush (a review). Oracle: the schedule's values, step by step."""
    limit = torch.tensor(0.5)

    def scheduled(model: MLP, other: MLP) -> None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), limit)
        limit.add_(1.0)  # 0.5, 1.5, 2.5, 3.5 at the clips

    by_hand, report = _two_block_run(tmp_path / "w.jsonl", scheduled)
    assert report.clipped_steps == sum(n > 0.5 + k for k, n in enumerate(by_hand))
    assert report.clip_peak is not None
    step = report.clip_peak[0]
    assert report.clip_peak[1:] == (pytest.approx(max(by_hand), rel=1e-6), 0.5 + step)


def test_a_wrapper_left_behind_is_not_wrapped_again_and_pickles(tmp_path: Path) -> None:
    """A mock.patch opened inside a watcher and restored after it closed left the wrapper installed:
    the next watcher heard every clip twice and never gave torch's function back (a review). Now it
    takes the wrapper for torch's own, hears once, and gives torch's back; the function pickles while
    a watcher is open (functools.wraps had it claim torch's name: 'not the same object')."""
    utils = torch.nn.utils
    original = utils.clip_grad_norm_
    left: list[object] = []

    def leaves_it(model: MLP, other: MLP) -> None:
        left.append(utils.clip_grad_norm_)
        assert pickle.loads(pickle.dumps(utils.clip_grad_norm_)) is utils.clip_grad_norm_
        utils.clip_grad_norm_(model.parameters(), 1.0)

    _two_block_run(tmp_path / "a.jsonl", leaves_it, steps=1)
    try:
        utils.clip_grad_norm_ = left[0]  # type: ignore[assignment]  # as a mock.patch restores it
        by_hand, report = _two_block_run(tmp_path / "b.jsonl", leaves_it, steps=2)
        assert report.clip_steps == 2 and _logged(tmp_path / "b.jsonl") == pytest.approx(by_hand, rel=1e-6)
        assert utils.clip_grad_norm_ is original
    finally:
        utils.clip_grad_norm_ = original


def test_frozen_blocks_and_gradients_held_from_the_last_step_still_take_each_clip(tmp_path: Path) -> None:
    """Blocks frozen under a trained head (no gradient reaches a block output, so whether a backward
    came since the close is read on a gradient's identity and version) and a loop holding on to the
    last step's gradients (zero_grad(set_to_none=True)): the held one stood for 'no backward since',
    null on 11 of 12 steps (a review). Oracle: the norm by hand before the clip."""
    torch.manual_seed(0)
    model = MLP(depth=2)
    model.blocks.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    by_hand, held = [], []
    with watch(model, opt, log=tmp_path / "w.jsonl", report=None) as w:
        for step in range(6):
            loss = compute_loss(model, batch(torch.Generator().manual_seed(step), model))
            w.loss(loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            held.append(grads)  # kept alive
            by_hand.append(_norm(list(model.parameters())))
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
            opt.step()
    assert _logged(tmp_path / "w.jsonl") == pytest.approx(by_hand, rel=1e-6)


def test_a_wrapper_left_behind_and_wrapped_by_another_tool_does_not_recurse(tmp_path: Path) -> None:
    """Ours left behind by a restored mock.patch, then wrapped by another tool whose wrapper calls it:
    the next watcher's wrapper called theirs, theirs ours, ours theirs, until RecursionError ended the
    training run (a review). Oracle: the norm by hand, heard once, and theirs called once a clip."""
    utils = torch.nn.utils
    original = utils.clip_grad_norm_
    left: list[Any] = []

    def leaves_it(model: MLP, other: MLP) -> None:
        left.append(utils.clip_grad_norm_)
        utils.clip_grad_norm_(model.parameters(), 1.0)

    _two_block_run(tmp_path / "a.jsonl", leaves_it, steps=1)
    theirs_called: list[int] = []

    def theirs(*args: Any, **kwargs: Any) -> Any:
        theirs_called.append(1)
        return left[0](*args, **kwargs)

    try:
        utils.clip_grad_norm_ = theirs  # type: ignore[assignment]
        by_hand, report = _two_block_run(
            tmp_path / "b.jsonl", lambda m, o: utils.clip_grad_norm_(m.parameters(), 1.0)
        )
        assert _logged(tmp_path / "b.jsonl") == pytest.approx(by_hand, rel=1e-6) and report.clip_steps == 4
        assert len(theirs_called) == 4 and utils.clip_grad_norm_ is theirs
    finally:
        utils.clip_grad_norm_ = original


def test_a_clip_inside_a_compiled_function_is_heard(tmp_path: Path) -> None:
    """torch.compile traces the wrapper: a threading.local guard in it raised InternalTorchDynamoError
    out of the user's compiled step (a review). Oracle: the norm by hand before the clip."""
    clip = torch.compile(
        lambda model: torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0), backend="eager"
    )
    by_hand, report = _two_block_run(tmp_path / "w.jsonl", lambda model, other: clip(model))
    assert _logged(tmp_path / "w.jsonl") == pytest.approx(by_hand, rel=1e-6) and report.clip_steps == 4


@pytest.mark.filterwarnings("ignore:watch. LBFGS.step.closure. evaluates the closure:UserWarning")
@pytest.mark.parametrize("loop", ["skips_a_spike", "two_optimizers", "clips_each_micro_batch", "lbfgs"])
def test_each_step_logs_the_clip_its_update_went_through(loop: str, tmp_path: Path) -> None:
    """A third review's loops, where a clip not the step's own was taken (the first call of a step
    stood, and a clip after the close went to the next row): an update skipped after its clip (the
    spike's norm logged on the next step), a second optimizer clipping the whole model after the
    watched one (the previous phase's norm on 9 of 10 rows), a clip after each micro-batch (the first
    one's partial norm), LBFGS clipping in its closure (the line search's last clip on the next row).
    Now the last call before the update stands, kept only where the gradient the step measured is what
    it left. Oracle: the norm by hand before the clip the update went through."""
    torch.manual_seed(0)
    model = MLP(depth=2)
    params = list(model.parameters())
    opt: torch.optim.Optimizer = (
        torch.optim.LBFGS(params, lr=0.1, max_iter=4) if loop == "lbfgs" else torch.optim.SGD(params, lr=0.05)
    )
    other = torch.optim.SGD(params, lr=0.05)
    expected: list[float] = []

    def clip(parameters: Any, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)  # looked up at the call, as loops do

    def data(i: int, k: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return batch(torch.Generator().manual_seed(100 * i + k), model)

    with watch(model, opt, log=tmp_path / "w.jsonl", report=None) as w:
        for i in range(10):
            if loop == "lbfgs":
                first: list[float] = []

                def closure(i: int = i, first: list[float] = first) -> torch.Tensor:
                    opt.zero_grad()
                    loss = compute_loss(model, data(i))
                    loss.backward()
                    first.append(_norm(params))
                    clip(model.parameters(), 0.5)
                    return loss

                opt.step(closure)  # type: ignore[arg-type]
                expected.append(first[0])
                continue
            opt.zero_grad()
            for k in range(3 if loop == "clips_each_micro_batch" else 1):
                loss = compute_loss(model, data(i, k)) * (100.0 if i == 5 else 1.0)  # a spike at step 5
                w.loss(loss)
                loss.backward()
                before = _norm(params)
                total = clip(model.parameters(), 0.5)
            if loop == "skips_a_spike" and total > 5.0:
                opt.zero_grad()
                continue  # the update is skipped: no step
            expected.append(before)
            opt.step()
            if loop == "two_optimizers":  # a generator's phase over the same model, clipped whole
                other.zero_grad()
                (-compute_loss(model, data(i, 1))).backward()
                clip(model.parameters(), 0.5)
                other.step()
    logged = _logged(tmp_path / "w.jsonl")
    assert len(logged) == len(expected) and logged == pytest.approx(expected, rel=1e-5), loop
    assert len(expected) == (9 if loop == "skips_a_spike" else 10)  # the spike's update alone skipped


def test_bfloat16_parameters_are_checked_at_their_own_precision(tmp_path: Path) -> None:
    """Parameters in bfloat16 (not autocast): torch clips on a bfloat16 total, 0.2% off the watcher's
    float64 norm, and half the rows were nulled at a 1e-3 tolerance (a review); the check's tolerance
    is the gradients' precision. Oracle: the float32 norm by hand, within bfloat16's precision."""
    torch.manual_seed(0)
    model = MLP(depth=2).to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    by_hand = []
    with watch(model, opt, log=tmp_path / "w.jsonl", report=None) as w:
        for step in range(8):
            x, y = batch(torch.Generator().manual_seed(step), model)
            loss = compute_loss(model, (x.bfloat16(), y.bfloat16()))
            w.loss(loss)
            opt.zero_grad()
            loss.backward()
            by_hand.append(
                torch.linalg.vector_norm(
                    torch.stack([p.grad.float().norm() for p in model.parameters()])
                ).item()
            )
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            opt.step()
    logged = _logged(tmp_path / "w.jsonl")
    assert None not in logged and logged == pytest.approx(by_hand, rel=2 * torch.finfo(torch.bfloat16).eps)
