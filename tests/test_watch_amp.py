"""watch with a GradScaler, passed as scaler= or found stepping the watched optimizer: a row per
iteration, also for one whose step the scaler skipped (its Inf gradients are the scaler's normal
overflow handling, not a finding), and norms divided by the loss scale, so the series are the
unscaled ones."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from watch_models import MLP, Fault, autocast_loss, batch, compute_loss, report_of

from stabilitycheck.replay import replay
from stabilitycheck.watching import Watcher, watch


def scaled_run(
    opt_of: str,
    steps: int,
    scaler: torch.amp.GradScaler | None,
    log: Path,
    half: bool,
    given: bool = True,
    **options: object,
) -> tuple[Watcher, list[float], list[bool]]:
    """`steps` iterations of the GradScaler recipe (float16 autocast when `half`), the scaler passed
    to watch when `given` (else the watcher finds it); returns the watcher, each iteration's loss
    and whether the scaler skipped it (its scale went down)."""
    torch.manual_seed(0)
    model = MLP(depth=4)
    opt = (
        torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        if opt_of == "fused"
        else torch.optim.SGD(model.parameters(), lr=0.01)
    )
    gen = torch.Generator().manual_seed(0)
    losses, skipped = [], []
    passed = scaler if given else None
    with watch(model, opt, scaler=passed, log=log, report=None, flush_every=7, **options) as w:
        for _ in range(steps):
            with torch.autocast("cpu", dtype=torch.float16, enabled=half):
                loss = compute_loss(model, batch(gen, model))
            w.loss(loss)
            losses.append(loss.item())
            opt.zero_grad()
            if scaler is None:
                loss.backward()
                opt.step()
                continue
            before = scaler.get_scale()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            skipped.append(scaler.get_scale() < before)  # the scaler's own record of a skip
    return w, losses, skipped


def test_two_watchers_closed_out_of_order_each_find_their_scaler_and_let_go() -> None:
    """Each watcher wrapped GradScaler.step and restored what it found: closed in the order they were
    opened, the first one's wrapper stayed installed for good, holding it and its model (found by a
    trial). Oracle: the class's own step() again, and each watcher adopting its own scaler."""
    original = vars(torch.amp.GradScaler)["step"]
    models = [MLP(depth=1), MLP(depth=1)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**4) for _ in models]
    watchers = [watch(m, o, report=None).__enter__() for m, o in zip(models, opts, strict=True)]
    gen = torch.Generator().manual_seed(0)
    for model, opt, scaler in zip(models, opts, scalers, strict=True):
        scaler.scale(compute_loss(model, batch(gen, model))).backward()
        scaler.step(opt)
        scaler.update()
    assert [w.scaler for w in watchers] == scalers
    watchers[0].close()
    assert vars(torch.amp.GradScaler)["step"] is not original  # the second is still looking
    watchers[1].close()
    assert vars(torch.amp.GradScaler)["step"] is original


@pytest.mark.parametrize("given", [True, False])
@pytest.mark.parametrize(("opt_of", "skip"), [("sgd", False), ("fused", False), ("fused", True)])
@pytest.mark.parametrize("init_scale", [2.0**20, 2.0**40])
def test_a_step_the_scaler_skips_is_its_own_row_marked_skipped(
    opt_of: str, skip: bool, init_scale: float, given: bool, tmp_path: Path
) -> None:
    """With skip=True a fused optimizer skips on the scaler's found_inf or the watcher's flag. Not
    given, the scaler is found on its first step(), the first iteration, which it skips at 2^40."""
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=4)
    log = tmp_path / "w.jsonl"
    w, losses, skipped = scaled_run(opt_of, 12, scaler, log, half=True, given=given, skip=skip)
    rows = [json.loads(line) for line in (tmp_path / "w.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(12))
    assert [r["loss"] for r in rows] == pytest.approx(losses, rel=1e-6)
    assert any(skipped) and (not all(skipped) or init_scale == 2.0**40)  # both kinds of step occur
    assert [r["skipped_by"] == "scaler" for r in rows] == skipped
    assert [r["skipped"] for r in rows] == skipped
    report = report_of(w)
    assert report.scaler_skipped_steps == [i for i, s in enumerate(skipped) if s]
    assert report.steps == 12 and report.flagged_steps == [] and report.first_nonfinite is None
    assert all(math.isfinite(float(p.detach().sum())) for p in w.model.parameters())


@pytest.mark.parametrize("given", [True, False])
@pytest.mark.parametrize(("opt_of", "skip"), [("sgd", False), ("fused", False), ("fused", True)])
def test_norms_are_divided_by_the_loss_scale(opt_of: str, skip: bool, given: bool, tmp_path: Path) -> None:
    """float32 with a power-of-two scale is exact (no overflow, nothing skipped): every series
    equals that of the same run without a scaler, while the scale grows x4 every 10 steps."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_factor=4.0, growth_interval=10)
    log = tmp_path / "a.jsonl"
    w, _, skipped = scaled_run(opt_of, 25, scaler, log, half=False, given=given, skip=skip)
    assert scaler.get_scale() == 2.0**12 and not any(skipped)
    bare, _, _ = scaled_run(opt_of, 25, None, tmp_path / "b.jsonl", half=False, skip=skip)
    scaled = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    plain = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    for a, b in zip(scaled, plain, strict=True):
        for kind in ("grad_norm", "activation_grad", "gradient", "activation", "loss"):
            assert a[kind] == pytest.approx(b[kind], rel=1e-6), (a["step"], kind)
    assert report_of(w).flagged_steps == [] == report_of(bare).flagged_steps
    assert math.isfinite(scaled[-1]["grad_norm"])


def test_a_found_scaler_is_let_go_when_the_watcher_closes(tmp_path: Path) -> None:
    """GradScaler.step is wrapped only while the watcher is open; another optimizer's steps pass
    through untouched, and the scaler's own update() is restored."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    original = vars(torch.amp.GradScaler)["step"]
    w, _, _ = scaled_run("sgd", 3, scaler, tmp_path / "w.jsonl", half=False, given=False)
    assert w.scaler is scaler
    assert vars(torch.amp.GradScaler)["step"] is original and "update" not in vars(scaler)
    model = MLP(depth=1)
    other = torch.optim.SGD(model.parameters(), lr=0.1)  # not the watched optimizer: not adopted
    watched = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="no step was closed"), watch(model, watched, report=None) as w2:
        scaler.scale(compute_loss(model, batch(torch.Generator().manual_seed(0), model))).backward()
        scaler.step(other)
        scaler.update()
    assert w2.scaler is None and "update" not in vars(scaler)


@pytest.mark.parametrize("given", [True, False])
@pytest.mark.parametrize(("opt_of", "skip"), [("sgd", False), ("fused", False), ("fused", True)])
def test_a_nan_in_the_forward_of_a_step_the_scaler_skips_is_found(
    opt_of: str, skip: bool, given: bool, tmp_path: Path
) -> None:
    """Oracle, the planted fault: a NaN written into block 2's Linear output at iteration 8 (so block
    2's output holds it). Its loss is NaN,
    so the scaler skips the step on Inf/NaN gradients; its gradients are not judged (the scaler's
    handling), but the block outputs are the model's own values: the step is flagged and the first
    non-finite value is block 2's output there (it was 'flagged: []', never reported)."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    calls = {"n": 0}

    def poison(module: torch.nn.Module, args: object, out: torch.Tensor) -> torch.Tensor | None:
        calls["n"] += 1
        return out.clone().index_fill_(-1, torch.tensor([0]), math.nan) if calls["n"] == 9 else None

    handle = torch.nn.Module.register_forward_hook  # the model is built inside scaled_run
    hooked: list[torch.utils.hooks.RemovableHandle] = []

    def build_hook(module: torch.nn.Module, *_: object) -> None:
        if isinstance(module, MLP) and not hooked:
            hooked.append(handle(module.blocks[2][0], poison))  # its Linear: block 2's output is NaN

    registration = torch.nn.modules.module.register_module_forward_pre_hook(build_hook)
    try:
        w, _, skipped = scaled_run(
            opt_of, 12, scaler, tmp_path / "w.jsonl", half=True, given=given, skip=skip
        )
    finally:
        registration.remove()
    report = report_of(w)
    assert skipped[8] and 8 in report.scaler_skipped_steps
    assert report.first_nonfinite is not None
    first = report.first_nonfinite
    assert (first.step, first.tensor, first.block) == (8, "activation", "blocks.2") and math.isnan(
        first.value
    )
    assert 8 in report.flagged_steps and report.first_spike is not None and report.first_spike.step == 8
    row = json.loads((tmp_path / "w.jsonl").read_text().splitlines()[8])
    assert row["flagged"][0] == "activation:blocks.2" and row["skipped_by"] == "scaler"


def test_a_bundle_of_a_scaled_step_replays_its_norms(tmp_path: Path) -> None:
    """Oracle: the training step's own norms. Under float16 autocast with a GradScaler the step's
    backward ran on the scaled loss; replay ran the unscaled one, whose float16 gradients round
    otherwise: weight-gradient norms off by up to 6.6e-6, exit 1 (found by an audit). The bundle
    keeps the loss scale; replay backpropagates the loss scaled alike, unscales the weight gradients
    as scaler.step did, and the watcher divides the scale out as it did."""
    torch.manual_seed(0)
    model = MLP(depth=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    gen = torch.Generator().manual_seed(0)
    with watch(
        model, opt, bundle=tmp_path / "b", compute_loss=autocast_loss, flush_every=16, report=None
    ) as w:
        for step in range(43):
            if step == 40:
                with torch.no_grad():
                    model.blocks[1][0].weight.mul_(50.0)
            data = batch(gen, model)
            loss = autocast_loss(model, data)
            w.loss(loss, batch=data)
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    first = report_of(w).first_spike
    assert first is not None and (first.step, first.block) == (40, "blocks.1")
    assert replay(tmp_path / "b").mismatches(1e-6) == []


def caller_closed_run(
    steps: int,
    scaler: torch.amp.GradScaler | None,
    log: Path,
    half: bool,
    given: bool,
    unscale: bool = True,
    fused: bool = False,
    **options: object,
) -> tuple[Watcher, list[bool]]:
    """`steps` iterations with the step closed by the caller (hook_optimizer=False), in the Lightning
    callback's order: backward, unscale_ (where `unscale`), before_step(), then scaler.step() and
    update(); the scaler passed when `given`, else found at its first step(); SGD, or a fused AdamW
    where `fused`; `options` for watch.
    Returns the watcher and whether the scaler skipped each iteration (its scale went down)."""
    torch.manual_seed(0)
    model = MLP(depth=4)
    opt = (
        torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        if fused
        else torch.optim.SGD(model.parameters(), lr=0.01)
    )
    gen = torch.Generator().manual_seed(0)
    skipped = []
    passed = scaler if given else None
    with watch(
        model, opt, scaler=passed, hook_optimizer=False, log=log, report=None, flush_every=7, **options
    ) as w:
        for _ in range(steps):
            with torch.autocast("cpu", dtype=torch.float16, enabled=half):
                loss = compute_loss(model, batch(gen, model))
            w.loss(loss)
            opt.zero_grad()
            if scaler is None:
                loss.backward()
                w.before_step()
                opt.step()
                continue
            before = scaler.get_scale()
            scaler.scale(loss).backward()
            if unscale:
                scaler.unscale_(opt)
            w.before_step()
            scaler.step(opt)
            scaler.update()
            skipped.append(scaler.get_scale() < before)
    return w, skipped


@pytest.mark.parametrize(("given", "unscale"), [(True, True), (False, True), (True, False)])
def test_a_step_the_caller_closes_before_the_scaler_steps_is_one_row_divided_by_the_scale(
    given: bool, unscale: bool, tmp_path: Path
) -> None:
    """The step closed by the caller before scaler.step() (the Lightning callback's order): a scaler
    found at that step() reset the watcher's record of the closed step, so update() closed a second
    row the scaler never skipped (26 steps for 25, every later row one step late), and the first row
    was not divided by the loss scale (x256); closed with no unscale_(), the weight gradients were
    still scaled and read x256 on every row. Oracle: the same run without a scaler (float32 and a
    power-of-two scale: exact)."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_factor=4.0, growth_interval=10)
    w, skipped = caller_closed_run(25, scaler, tmp_path / "a.jsonl", half=False, given=given, unscale=unscale)
    assert scaler.get_scale() == 2.0**12 and not any(skipped)
    bare, _ = caller_closed_run(25, None, tmp_path / "b.jsonl", half=False, given=True)
    scaled = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    plain = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert report_of(w).steps == 25 == len(scaled) == len(plain)
    for a, b in zip(scaled, plain, strict=True):
        assert a["skipped_by"] is None
        for kind in ("grad_norm", "activation_grad", "gradient", "activation", "loss"):
            assert a[kind] == pytest.approx(b[kind], rel=1e-6), (a["step"], kind)
    assert report_of(w).flagged_steps == [] == report_of(bare).flagged_steps


@pytest.mark.parametrize("given", [True, False])
def test_a_step_the_scaler_skips_after_the_caller_closed_it_is_marked_skipped(
    given: bool, tmp_path: Path
) -> None:
    """Closed by the caller after unscale_(), a step whose gradients overflowed float16 is one the
    scaler then skips: its row says so, and its Inf gradients (the scaler's handling) are no finding;
    they were flagged as the first non-finite value. Oracle: the scaler's own record of each skip."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20, growth_interval=4)
    w, skipped = caller_closed_run(12, scaler, tmp_path / "w.jsonl", half=True, given=given)
    rows = [json.loads(line) for line in (tmp_path / "w.jsonl").read_text().splitlines()]
    assert any(skipped) and not all(skipped)
    assert [r["step"] for r in rows] == list(range(12))
    assert [r["skipped_by"] == "scaler" for r in rows] == skipped
    report = report_of(w)
    assert report.scaler_skipped_steps == [i for i, s in enumerate(skipped) if s]
    assert report.flagged_steps == [] and report.first_nonfinite is None


def test_a_scaler_found_after_a_judged_step_says_to_pass_it(tmp_path: Path) -> None:
    """With a bundle the rule judges each step as it closes: a scaler found at its first step(),
    after the caller closed that step, cannot give it its scale any more, and a warning says so
    (at the caller's scaler.step() line) rather than leaving a row x256 unsaid."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    with pytest.warns(UserWarning, match="found at its first step.*pass scaler=") as caught:
        caller_closed_run(
            2, scaler, tmp_path / "w.jsonl", False, False, bundle=tmp_path / "b", compute_loss=compute_loss
        )
    assert [w.filename for w in caught] == [__file__]


@pytest.mark.parametrize("given", [True, False])
@pytest.mark.parametrize("opt_of", ["sgd", "fused"])
def test_a_step_closed_before_any_unscale_is_marked_skipped_where_the_scaler_skips_it(
    opt_of: str, given: bool, tmp_path: Path
) -> None:
    """Closed before scaler.step() and any unscale_() (Lightning leaves a fused optimizer's gradients
    to its step), the scaler had not looked at the gradients: the steps it then skipped on float16
    overflow were flagged as Inf gradients, the first non-finite value. Oracle: the scaler's own
    record of each skip."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20, growth_interval=4)
    w, skipped = caller_closed_run(
        12, scaler, tmp_path / "w.jsonl", half=True, given=given, unscale=False, fused=opt_of == "fused"
    )
    rows = [json.loads(line) for line in (tmp_path / "w.jsonl").read_text().splitlines()]
    assert any(skipped) and not all(skipped)
    assert [r["skipped_by"] == "scaler" for r in rows] == skipped
    report = report_of(w)
    assert report.scaler_skipped_steps == [i for i, s in enumerate(skipped) if s]
    assert report.flagged_steps == [] and report.first_nonfinite is None


def test_a_flagged_fused_step_the_caller_closed_is_skipped_though_the_scaler_sets_its_found_inf() -> None:
    """skip=True on a fused optimizer, the step closed by the caller before scaler.step(): the flag
    went into the optimizer's found_inf, which scaler.step() then set to its own, so a flagged step
    was reported skipped and updated the weights. Oracle: the weights before and after that step,
    bit for bit, and the steps around it moving them."""
    torch.manual_seed(0)
    model = MLP(depth=4)
    fault = Fault(50, count=True)
    model.blocks[2].register_forward_hook(fault)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    gen = torch.Generator().manual_seed(0)
    moved = []
    with watch(model, opt, scaler=scaler, hook_optimizer=False, skip=True, report=None) as w:
        for _ in range(54):
            loss = compute_loss(model, batch(gen, model))
            w.loss(loss)
            opt.zero_grad()
            scaler.scale(loss).backward()
            before = [p.detach().clone() for p in model.parameters()]
            w.before_step()
            scaler.step(opt)
            scaler.update()
            moved.append(any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True)))
    report = report_of(w)
    assert 50 in report.flagged_steps and 50 in report.skipped_steps
    assert not moved[50] and moved[49] and moved[51]


def test_a_gradient_the_optimizer_does_not_step_is_no_skip_of_the_scaler(tmp_path: Path) -> None:
    """Closed before any unscale_(), a step is the scaler's to skip where one of the optimizer's
    gradients is not finite, as the scaler checks them: an Inf in the gradient of a model parameter
    the optimizer does not step (block 0, frozen out of it) was read as the scaler's skip, and the
    Inf went unreported. Oracle: the scaler's scale (unchanged: it did not skip) and the planted Inf."""
    torch.manual_seed(0)
    model = MLP(depth=4)
    first = set(model.blocks[0].parameters())
    opt = torch.optim.SGD([p for p in model.parameters() if p not in first], lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    gen = torch.Generator().manual_seed(0)
    with watch(model, opt, scaler=scaler, hook_optimizer=False, report=None) as w:
        for step in range(6):
            loss = compute_loss(model, batch(gen, model))
            w.loss(loss)
            model.zero_grad()
            scaler.scale(loss).backward()
            if step == 3:
                model.blocks[0][0].weight.grad[0, 0] = math.inf
            w.before_step()
            scaler.step(opt)
            scaler.update()
    assert scaler.get_scale() == 2.0**8  # the scaler skipped nothing
    report = report_of(w)
    assert report.scaler_skipped_steps == [] and report.first_nonfinite is not None
    assert (report.first_nonfinite.step, report.first_nonfinite.block) == (3, "blocks.0")
