"""watch() on real training loops: planted faults named at the right step and block, norms equal to
torch's own, no flag on a clean run, skipped steps bit-identical, host reads counted."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from probe_models import NanBackward
from signalled import stopped_when_marked
from test_watch_rule import reference_steps
from torch import nn
from torch.overrides import TorchFunctionMode
from watch_models import (
    MLP,
    WIDTH,
    BatchNormed,
    Fault,
    Interleaved,
    PreNorm,
    Reversed,
    batch,
    compute_loss,
    report_of,
    squared_steps,
    train,
)

from stabilitycheck import norms
from stabilitycheck.errors import UsageError
from stabilitycheck.hooking import GRAPH_BREAK
from stabilitycheck.measurement import AFTER_LAST_SAID
from stabilitycheck.spikes import SpikeRule
from stabilitycheck.watching import watch
from stabilitycheck.watchlog import Finding, Log

PLANTED = [  # (model, block, step, kind): x50 at varied steps and blocks, a NaN and an Inf
    ("mlp", 0, 40, "scale"),
    ("mlp", 2, 57, "scale"),
    ("mlp", 3, 71, "scale"),
    ("mlp", 5, 90, "scale"),
    ("mlp", 4, 64, "nan"),
    ("prenorm", 0, 45, "scale"),
    ("prenorm", 1, 83, "scale"),
    ("prenorm", 2, 60, "scale"),
    ("prenorm", 3, 52, "scale"),
    ("prenorm", 1, 66, "inf"),
]


class _WeightSet:
    """An optimizer wrapper that, after step `at - 1`, sets one weight of block `b` to 1e4 (a corrupted
    load, a bit flip): step `at` runs on it."""

    def __init__(self, opt: torch.optim.Optimizer, weight: torch.Tensor, at: int) -> None:
        self.opt, self.weight, self.at, self.steps = opt, weight, at, 0

    def step(self) -> None:
        self.opt.step()
        self.steps += 1
        if self.steps == self.at:
            with torch.no_grad():
                self.weight[0, 0] = 1e4


@pytest.mark.parametrize(("every", "named"), [(1, (40, "weight", "blocks.3")), (None, None)])
def test_a_weight_spike_is_named_where_weights_are_judged(every: int | None, named: Any) -> None:
    """The README's weight-series warm-up: 32 reads. Read at every step, a weight set to 1e4 before
    step 40 is named at step 40, `weight`, its block; read once per flush (the default), its series
    has not warmed up by step 60 and, behind a tanh that saturates, nothing else shows it (found in
    an audit: the default named a later step and another block, or nothing). Oracle: the fault as
    planted."""
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    wrapped = _WeightSet(opt, model.blocks[3][0].weight, at=40)
    options = {} if every is None else {"weights_every": every}
    gen = torch.Generator().manual_seed(0)
    with watch(model, opt, report=None, **options) as w:
        for _ in range(60):
            loss = compute_loss(model, batch(gen, model, 32))
            w.loss(loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            wrapped.step()
    first = w.report.first_spike
    got = None if first is None or first.tensor != "weight" else (first.step, first.tensor, first.block)
    assert got == named


@pytest.mark.parametrize(("family", "block", "step", "kind"), PLANTED)
def test_a_planted_fault_is_named_at_its_step_and_block(
    family: str, block: int, step: int, kind: str
) -> None:
    torch.manual_seed(block + step)
    model = MLP() if family == "mlp" else PreNorm()
    report = report_of(train(model, step + 2, {block: Fault(step, kind)}, seed=step))
    first = report.first_spike
    assert first is not None, report.text()
    assert (first.step, first.tensor, first.block) == (step, "activation", f"blocks.{block}")
    assert report.flagged_steps[0] == step
    if kind != "scale":
        assert report.first_nonfinite is not None and report.first_nonfinite.block == f"blocks.{block}"
        assert (math.isnan if kind == "nan" else math.isinf)(report.first_nonfinite.value)


def test_weight_gradients_going_inf_name_the_block_whose_backward_made_the_first() -> None:
    """A step whose block inputs are ~1e30 (float32) and whose float64 loss hands each output a
    gradient of 1e10: every output gradient is finite, every weight gradient g^T x overflows. The
    backward makes the last block's first, yet watch named block 0 (weight gradients were ordered
    input side first after every output gradient; block 2 for 4 in a user's fp16 run). Oracle: the
    order in which torch accumulates them (post-accumulate-grad hooks), and finite output gradients."""

    class Linear3(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(4, 4, bias=False) for _ in range(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                x = block(x)
            return x

    torch.manual_seed(0)
    model = Linear3()
    with torch.no_grad():
        for block in model.blocks:
            block.weight.copy_(torch.eye(4))  # x passes unchanged: ~1e30 at every block
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    made: list[int] = []
    for b, block in enumerate(model.blocks):
        block.weight.register_post_accumulate_grad_hook(
            lambda p, b=b: made.append(b) if not torch.isfinite(p.grad).all() else None
        )
    with watch(model, opt, report=None) as w:
        for step in range(3):
            x = torch.full((2, 4), 1e30 if step == 2 else 1.0)
            loss = (model(x).double() * 1e10).sum()  # finite in float64: 1e10 per output element
            w.loss(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert made == [2, 1, 0]  # the backward's order: output side first
    found = report_of(w).first_nonfinite
    assert found is not None and (found.step, found.tensor, found.block) == (2, "gradient", "blocks.2")


def test_a_heads_gradient_going_inf_first_is_named_before_the_blocks() -> None:
    """A head outside the blocks (registered after them) whose weight gradient the backward makes Inf
    first, block 0's last, every output gradient finite: the outside slot came after every block, so
    watch named blocks.0's (a review). Oracle: the order torch accumulates the weight gradients."""

    class Headed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
            self.head = nn.Linear(8, 1)
            with torch.no_grad():
                self.blocks[0].weight.mul_(1e-31)  # input 1e32 to a normal output: its weight gradient Inf
                self.head.weight.fill_(1e-30)  # the blocks' output gradients stay small, finite

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                x = block(x)
            return self.head(x.abs() + 1).squeeze(-1)

    torch.manual_seed(0)
    model = Headed()
    made: list[str] = []
    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(
            lambda p, name=name: made.append(name) if not torch.isfinite(p.grad).all() else None
        )
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with watch(model, opt, report=None) as w:
        loss = (model(torch.full((8, 8), 1e32)).double() * (1e38 / 8 * 3)).sum()
        w.loss(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert made[0] == "head.weight" and made[-1] == "blocks.0.weight"
    found = report_of(w).first_nonfinite
    assert found is not None and (found.tensor, found.block) == ("gradient", "(outside blocks)")


def test_the_norms_are_torchs_own() -> None:
    """One step's logged norms against torch.linalg.vector_norm of what the model computes."""
    torch.manual_seed(0)
    model = MLP(depth=3)
    data = batch(torch.Generator().manual_seed(0), model)  # what train(seed=0) draws first
    w = train(model, 1, flush_every=1)  # one step: the norms of the initial weights on `data`
    values = dict(zip(w.out.names, w.out.last_values, strict=True))
    torch.manual_seed(0)
    fresh = MLP(depth=3)
    x, y = data
    outs = []
    h = x
    for block in fresh.blocks:
        h = block(h)
        outs.append(h)
    loss = ((fresh.head(h).squeeze(-1) - y) ** 2).mean()
    grads = torch.autograd.grad(loss, outs + list(fresh.parameters()))
    out_grads, param_grads = grads[: len(outs)], grads[len(outs) :]
    expect = {("loss", "(loss)"): loss.item()}
    for b, (out, g) in enumerate(zip(outs, out_grads, strict=True)):
        expect[("activation", f"blocks.{b}")] = torch.linalg.vector_norm(out).item()
        expect[("activation_grad", f"blocks.{b}")] = torch.linalg.vector_norm(g).item()
    owners = [
        f"blocks.{n.split('.')[1]}" if n.startswith("blocks") else "(outside blocks)"
        for n, _ in fresh.named_parameters()
    ]
    for kind, tensors in (("gradient", param_grads), ("weight", list(fresh.parameters()))):
        for name in sorted(set(owners)):
            squares = sum(
                t.detach().double().pow(2).sum() for t, o in zip(tensors, owners, strict=True) if o == name
            )
            expect[(kind, name)] = math.sqrt(float(squares))
    expect[("grad_norm", "(all)")] = torch.nn.utils.get_total_norm(param_grads).item()
    assert values.keys() == expect.keys()
    for key, value in expect.items():
        assert values[key] == pytest.approx(value, rel=1e-6), key


@pytest.mark.slow
def test_a_clean_2000_step_run_raises_no_flag() -> None:
    """Batches of 128: at 32 the per-batch loss of this model once reached 3.05x its window mean
    (7.3 sigma, step 1523), a real excursion of a heavy-tailed series, which the rule flags."""
    torch.manual_seed(0)
    report = report_of(train(MLP(), 2000, batch_size=128))
    assert report.flagged_steps == [], report.text()


def fused_adam(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)


def test_after_a_skipped_nan_one_step_is_flagged_and_a_x3_spike_50_steps_later_is_caught() -> None:
    torch.manual_seed(0)
    model = MLP()
    faults = {2: Fault(60, "nan"), 4: Fault(110, "scale", 3.0)}
    report = report_of(train(model, 115, faults, optimizer=fused_adam(model), skip=True))
    assert report.flagged_steps == [60, 110] == report.skipped_steps, report.text()
    assert report.first_nonfinite is not None and report.first_nonfinite.step == 60
    assert all(math.isfinite(float(p.detach().sum())) for p in model.parameters())


def _state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    tensors = [p.detach().clone() for p in model.parameters()]
    for s in opt.state.values():
        tensors += [v.clone() for v in s.values() if isinstance(v, torch.Tensor)]
    return tensors


@pytest.mark.parametrize("skip", [True, False])
def test_a_skipped_step_leaves_parameters_and_optimizer_state_bit_identical(skip: bool) -> None:
    torch.manual_seed(0)
    model = MLP(depth=3)
    opt = fused_adam(model)
    seen: list[list[torch.Tensor]] = []
    opt.register_step_pre_hook(lambda *_: seen.append(_state(model, opt)) if len(seen) == 40 else None)
    opt.register_step_post_hook(lambda *_: seen.append(_state(model, opt)) if len(seen) == 41 else None)
    opt.register_step_pre_hook(lambda *_: seen.append([]) if len(seen) < 40 else None)
    report_of(train(model, 42, {1: Fault(40, "nan")}, optimizer=opt, skip=skip))
    before, after = seen[40], seen[41]
    same = all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert same == skip  # without skip the NaN step changes them: the check can fail


@pytest.mark.parametrize(("nesterov", "dampening"), [(False, 0.0), (True, 0.0), (False, 0.5)])
def test_a_skipped_first_step_of_a_fused_sgd_leaves_no_unfilled_momentum(
    nesterov: bool, dampening: float
) -> None:
    """A NaN at step 0 under a fused SGD with momentum: torch's kernel, skipping on found_inf, leaves the
    momentum buffers its first step allocated with empty_like unfilled, and the next steps took that
    memory as momentum (weights at 1e32 two steps later; found in an audit). The watcher makes them
    zero before the step (no dampening: the same first step, bit for bit) or takes them off after it
    (dampening: one host read on that step). Oracle: a run whose step 0 is left out altogether, which
    the skipped run must equal bit for bit."""

    def sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            model.parameters(), lr=1e-2, momentum=0.9, nesterov=nesterov, dampening=dampening, fused=True
        )

    torch.manual_seed(0)
    model = MLP(depth=3)
    opt = sgd(model)
    seen: list[list[float]] = []
    opt.register_step_pre_hook(
        lambda *_: seen.append([float(s["momentum_buffer"].abs().max()) for s in opt.state.values()])
    )
    w = train(model, 6, {1: Fault(0, "nan")}, optimizer=opt, skip=True)
    assert report_of(w).skipped_steps == [0]
    assert seen[1] == ([0.0] * len(list(model.parameters())) if dampening == 0 else [])  # before step 1
    torch.manual_seed(0)
    reference = MLP(depth=3)
    opt = sgd(reference)
    gen = torch.Generator().manual_seed(0)
    for step in range(6):
        loss = compute_loss(reference, batch(gen, reference, 32))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step:  # step 0's batch drawn, nothing stepped
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters(), strict=True))


def test_a_non_fused_optimizer_skips_with_one_counted_sync_per_step() -> None:
    torch.manual_seed(0)
    model = MLP(depth=3)
    with pytest.warns(UserWarning, match="one host sync per step"):
        w = train(model, 50, {1: Fault(40, "nan")}, skip=True, flush_every=25)
    assert report_of(w).skipped_steps == [40]
    assert report_of(w).host_reads == 50 + 2  # a sync per step, and one read per flush
    assert all(math.isfinite(float(p.detach().sum())) for p in model.parameters())


class HostReads(TorchFunctionMode):
    """Counts the calls that copy a tensor's values to the host (each one a sync on a GPU)."""

    NAMES = frozenset({"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"})

    def __init__(self) -> None:
        super().__init__()
        self.count, self.paused = 0, False

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if getattr(func, "__name__", "") in self.NAMES and not self.paused:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("options", [{}, {"skip": True}])
def test_host_reads_are_one_per_flush_interval(
    options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counted everywhere except in watchlog.Log, which works on the host copy the read made (on a
    GPU its tensors are CPU tensors; here everything is, so it is told apart by where it runs). Norms
    are summed in float64 as on CUDA (on the CPU they are summed in float32 and the few out of its
    range redone after a per-step read, which there is no sync)."""
    wide = norms.accumulator
    monkeypatch.setattr(
        norms, "accumulator", lambda d, exact, device=None: wide(d, exact, torch.device("cuda"))
    )
    with HostReads() as probe:  # the counter itself sees reads (the check can fail)
        t = torch.ones(2)
        t.sum().item()
        bool(t.any())
    assert probe.count == 2
    reads = HostReads()
    for name in ("add", "add_ranks"):
        original = getattr(Log, name)

        def paused(self: Log, *args: Any, _original: Any = original) -> Any:
            reads.paused = True
            try:
                return _original(self, *args)
            finally:
                reads.paused = False

        monkeypatch.setattr(Log, name, paused)
    torch.manual_seed(0)
    model = BatchNormed() if options else MLP()  # skip=True puts a flagged step's buffers back
    opt = fused_adam(model) if options else None
    with reads:
        w = train(model, 120, {3: Fault(70)}, optimizer=opt, flush_every=40, **options)
    assert report_of(w).first_spike is not None
    assert reads.count == 3 == report_of(w).host_reads


def test_the_log_has_a_row_per_step_with_non_finite_values_kept(tmp_path: Path) -> None:
    """Kept as strict JSON: NaN is null (a row read `"loss": NaN`, which strict parsers refuse and
    some turn into null silently), Inf 1e999, as --json writes them."""
    torch.manual_seed(0)
    log = tmp_path / "watch.jsonl"
    train(MLP(depth=3), 45, {1: Fault(40, "nan")}, log=log, flush_every=16)
    refuse = lambda token: pytest.fail(f"{token} in the log")  # noqa: E731
    rows = [json.loads(line, parse_constant=refuse) for line in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(45))
    assert rows[40]["activation"][1] is None and math.isfinite(rows[40]["activation"][0])
    assert rows[40]["first"]["block"] == "blocks.1" and rows[40]["flagged"][0] == "activation:blocks.1"
    assert rows[39]["flagged"] == [] and isinstance(rows[39]["loss"], float)
    assert [r["step"] for r in rows if r["weight"] is not None] == [0, 16, 32]  # weights_every=16


def test_the_report_is_written_at_exit_even_when_the_loop_raises(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MLP(depth=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    stream = tmp_path / "report.txt"
    with stream.open("w") as out, pytest.raises(KeyboardInterrupt), watch(model, opt, report=out) as w:
        for step in range(5):
            loss = compute_loss(model, batch(torch.Generator().manual_seed(step), model))
            w.loss(loss)
            loss.backward()
            opt.step()
        raise KeyboardInterrupt
    assert stream.read_text().startswith("stabilitycheck watch: 5 steps, 0 flagged")


def test_the_heatmap_shows_non_finite_cells(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cells drawn, against the fault planted: block 1's output NaN from step 40 (block 0's, made
    before it, finite then), nothing marked before it. (Counting magenta pixels passed with no cell
    marked: the legend's NaN patch is magenta.)"""
    pytest.importorskip("matplotlib")
    from stabilitycheck import watchplot

    drawn: list[Any] = []
    real = watchplot.heatmap
    monkeypatch.setattr(watchplot, "heatmap", lambda *args: drawn.append(real(*args)))
    torch.manual_seed(0)
    path = tmp_path / "heat.png"
    train(MLP(depth=3), 44, {1: Fault(40, "nan")}, heatmap=path)
    ((logs, marks), _) = drawn[0]  # the block outputs' panel
    assert path.stat().st_size > 0 and len(marks) == 3 and len(marks[0]) == 44
    assert all(math.isnan(m) for row in marks for m in row[:40])  # no mark before the fault
    assert all(math.isfinite(v) for row in logs for v in row[:40])
    assert marks[1][40] == 0.0 and math.isnan(logs[1][40])  # block 1's NaN: its colour, not blank
    assert math.isnan(marks[0][40]) and math.isfinite(logs[0][40])


def test_bad_options_are_one_line_usage_errors() -> None:
    model = MLP(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(UsageError, match="flush_every must be a whole number >= 1"):
        watch(model, opt, flush_every=0)
    with pytest.raises(UsageError, match="needs compute_loss"):
        watch(model, opt, bundle="somewhere")
    with pytest.raises(UsageError, match="skip=True needs the optimizer"):
        watch(model, None, skip=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        watch(model, opt).close()  # a plain watcher warns about nothing


BAD = [  # (arguments, options, what the message says)
    (("opt", "model"), {}, "first argument must be the model"),
    (("model", "adam"), {}, "second argument must be the torch.optim.Optimizer"),
    (("model", "opt"), {"flush_every": "5"}, "flush_every must be a whole number >= 1, got '5'"),
    (("model", "opt"), {"flush_every": 2.5}, "flush_every must be a whole number >= 1, got 2.5"),
    (("model", "opt"), {"flush_every": True}, "flush_every must be a whole number"),
    # 10**12 was a raw allocator error, 10**8 15 GB and 19 s taken before the first step
    (("model", "opt"), {"flush_every": 10**8}, "flush_every must be at most 10,000"),
    (("model", "opt"), {"weights_every": 0}, "weights_every must be a whole number >= 1, got 0"),
    (("model", "opt"), {"rule": {"window": 10}}, "rule must be a stabilitycheck.spikes.SpikeRule"),
    (("model", "opt"), {"report": "stderr"}, "report must be a text stream"),
    (("model", "opt"), {"scaler": 2.0**16}, "scaler must be a torch.amp.GradScaler"),
    (("model", "opt"), {"skip": "yes"}, "skip must be True or False, got 'yes'"),
    (("model", "opt"), {"blocks": ["blocks.0"]}, "blocks must be (name, module) pairs"),
    (("model", "opt"), {"flushevery": 10}, "no option 'flushevery' (did you mean 'flush_every'?)"),
    (("model", "opt"), {"blocks": [("x", torch.nn.Linear(2, 2))]}, "of the model's own submodules"),
    (
        ("model", "opt"),
        {"bundle": "b", "compute_loss": "compute_loss"},
        "compute_loss must be a function fn(model, batch) -> loss, got 'compute_loss'",
    ),
]


@pytest.mark.parametrize(("args", "options", "message"), BAD)
def test_wrong_arguments_are_one_line_usage_errors_when_watch_starts(
    args: tuple[str, str], options: dict[str, Any], message: str
) -> None:
    model = MLP(depth=2)
    given = {"model": model, "opt": torch.optim.SGD(model.parameters(), lr=0.01), "adam": "adam"}
    with pytest.raises(UsageError) as caught:
        watch(*(given[a] for a in args), **options)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_blocks_given_as_modules_alone_are_a_usage_error() -> None:
    """blocks=[module] (no names) raised 'too many values to unpack' from deep inside."""
    model = MLP(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(UsageError, match="blocks must be \\(name, module\\) pairs") as caught:
        watch(model, opt, blocks=[model.blocks[0]])  # type: ignore[list-item]
    assert "\n" not in str(caught.value)  # a module, not its repr over lines
    w = watch(model, opt, blocks=[["blocks.0", model.blocks[0]]], report=None)  # type: ignore[list-item]
    assert w.names == ["blocks.0"]
    w.close()


def test_a_bad_loss_and_a_second_run_of_a_watcher_are_usage_errors() -> None:
    torch.manual_seed(0)
    model = MLP(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = batch(torch.Generator().manual_seed(0), model)
    per_sample = (model(x) - y) ** 2
    with watch(model, opt, report=None) as w:
        with pytest.raises(UsageError, match=r"not loss.item\(\)"):
            w.loss(per_sample.mean().item())  # type: ignore[arg-type]
        with pytest.raises(
            UsageError, match=r"got dict; pass the tensor backward\(\) is called on, e.g. out\['loss'\]"
        ):
            w.loss({"loss": per_sample.mean()})  # type: ignore[arg-type]
        with pytest.raises(UsageError, match=r"the scalar loss, got shape \(32,\)"):
            w.loss(per_sample)
        for wrong in (torch.tensor(3), torch.tensor(True)):
            with pytest.raises(UsageError, match="takes the float loss that backward"):
                w.loss(wrong)
        w.loss(per_sample.mean())
        per_sample.mean().backward()
        opt.step()
    with pytest.raises(UsageError, match="a watcher runs once"), w:
        pass
    assert report_of(w).steps == 1


@pytest.mark.parametrize("bad", [{"sigmas": math.nan}, {"sigmas": math.inf}, {"floor": math.nan}])
def test_a_spike_rule_with_a_nan_or_inf_threshold_is_refused(bad: dict[str, float]) -> None:
    from stabilitycheck.spikes import SpikeRule

    with pytest.raises(UsageError, match="SpikeRule needs finite sigmas > 0"):
        SpikeRule(**bad)


def test_the_package_exposes_the_function_watch_even_after_its_module_is_imported() -> None:
    import stabilitycheck
    import stabilitycheck.watching  # a submodule import sets a package attribute of its name

    assert stabilitycheck.watch is watch and callable(stabilitycheck.watch)


def test_skip_with_a_non_fused_optimizer_keeps_working_under_an_lr_scheduler_made_inside() -> None:
    """torch's LRScheduler rebinds optimizer.step.__func__ to the optimizer: the watcher's step must
    be the optimizer's method. The scheduler's own schedule (x0.1 every 10 steps) is the oracle."""
    torch.manual_seed(0)
    model = MLP(depth=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    with pytest.warns(UserWarning, match="one host sync"), watch(model, opt, skip=True, report=None) as w:
        sched = torch.optim.lr_scheduler.StepLR(opt, 10, gamma=0.1)
        for _ in range(20):
            loss = compute_loss(model, batch(gen, model))
            w.loss(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    assert report_of(w).steps == 20
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.1**2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the scheduler still sees optimizer.step called first
        loss = compute_loss(model, batch(gen, model))
        loss.backward()
        opt.step()  # after the block: a plain step
        sched.step()


def test_unwritable_log_and_heatmap_paths_are_usage_errors_when_watch_starts(tmp_path: Path) -> None:
    model = MLP(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(UsageError, match="cannot write the log"):
        watch(model, opt, log=tmp_path / "missing" / "w.jsonl")
    if importlib.util.find_spec("matplotlib") is not None:
        with pytest.raises(UsageError, match="cannot write the heatmap"):
            watch(model, opt, heatmap=tmp_path / "missing" / "h.png")
        # a format matplotlib cannot write: accepted, then a ValueError out of the loop at its end
        with pytest.raises(UsageError, match=r"watch\(heatmap=...\) .*h.txt: matplotlib cannot write .txt"):
            watch(model, opt, heatmap=tmp_path / "h.txt")


def test_a_heatmap_that_cannot_be_written_at_exit_is_a_warning_after_the_report(tmp_path: Path) -> None:
    """The folder goes away during the run: the report is still written, w.report set, and the
    loop's own exception (in flight at exit) is the one that propagates."""
    pytest.importorskip("matplotlib")
    torch.manual_seed(0)
    model = MLP(depth=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    folder = tmp_path / "plots"
    folder.mkdir()
    stream = io.StringIO()
    with (
        pytest.warns(UserWarning, match="heatmap could not be written"),
        pytest.raises(KeyboardInterrupt),
        watch(model, opt, heatmap=folder / "h.png", report=stream) as w,
    ):
        for step in range(3):
            loss = compute_loss(model, batch(torch.Generator().manual_seed(step), model))
            loss.backward()
            opt.step()
        folder.rmdir()
        raise KeyboardInterrupt
    assert stream.getvalue().startswith("stabilitycheck watch: 3 steps, 0 flagged")
    assert w.report is not None and w.close() is w.report


class PoisonBackward(torch.nn.Module):
    """At its `at`-th training call, its backward makes a NaN gradient for its input."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at, self.calls = at, -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return NanBackward.apply(x) if self.calls == self.at else x


@pytest.mark.parametrize("where", [1, 3, "head"])
def test_a_nan_made_by_a_backward_names_the_block_whose_backward_made_it(where: int | str) -> None:
    """Theory: dL/d(output of block i) is made by the backward of block i + 1 (of the loss after
    the last block); the NaN is planted at the input of block `where`'s backward (or the head's)."""
    torch.manual_seed(0)
    model = MLP(depth=4)
    if where == "head":
        model.head = torch.nn.Sequential(PoisonBackward(8), model.head)
        expect, block = "the loss after the last block", "blocks.3"
    else:
        assert isinstance(where, int)
        model.blocks[where] = torch.nn.Sequential(PoisonBackward(8), *model.blocks[where])
        expect, block = f"blocks.{where}", f"blocks.{where - 1}"
    report = report_of(train(model, 10))
    found = report.first_nonfinite
    assert found is not None and found.step == 8, report.text()
    assert (found.tensor, found.block, found.made_by) == ("activation_grad", block, expect)
    assert f"made by the backward of {expect}" in report.text()


@pytest.mark.parametrize(
    ("made", "planted", "blocks"),
    [
        (Interleaved, "ffns.2", None),
        (Interleaved, "attns.1", None),
        (Reversed, "blocks.4", None),
        (Reversed, "blocks.0", None),
        (MLP, "blocks.1", "reversed"),
    ],
)
def test_a_fault_is_named_in_its_block_where_the_forward_calls_the_blocks_in_another_order(
    made: type[nn.Module], planted: str, blocks: str | None
) -> None:
    """Blocks located in the order the model registers them (or blocks= lists them) named a x50 on
    ffns.2's output, in a model calling attns.i then ffns.i, in attns.3, and one on blocks.4 of a
    model calling its blocks last first in blocks.0, 'the first block', 'what it took' (found by an
    audit). Located in the order the first step called them: the planted block, and a note."""
    torch.manual_seed(0)
    model = made()
    listed = [(f"blocks.{i}", b) for i, b in enumerate(getattr(model, "blocks", []))]
    given = listed[::-1] if blocks else None
    fault = Fault(40, count=True)
    model.get_submodule(planted).register_forward_hook(fault)
    if blocks:
        with pytest.warns(UserWarning, match="in another order than blocks= lists them") as said:
            report = report_of(train(model, 42, blocks=given))
        assert said[0].filename.endswith("watch_models.py")  # the loop's line, not the watcher's
    else:
        report = report_of(train(model, 42))
    first = report.first_spike
    assert first is not None, report.text()
    assert (first.step, first.tensor, first.block) == (40, "activation", planted)
    assert first.after is None  # it took the block called before it's output as it came
    order = "blocks= lists them" if blocks else "the model registers them"
    assert f"called the blocks in another order than {order}" in report.text()


def test_a_nan_made_by_a_backward_names_the_block_called_after_it_where_the_order_is_not_listed() -> None:
    """dL/d(attns.2's output) is made by the backward of ffns.2, the block the forward called after
    it (read in the registered order: by ffns.1's, and named in ffns.1)."""
    torch.manual_seed(0)
    model = Interleaved()
    model.ffns[2] = torch.nn.Sequential(PoisonBackward(8), *model.ffns[2])
    report = report_of(train(model, 10))
    found = report.first_nonfinite
    assert found is not None and found.step == 8, report.text()
    assert (found.tensor, found.block, found.made_by) == ("activation_grad", "attns.2", "ffns.2")


class _Three(nn.Module):
    """Three Linear + tanh Sequentials held as attributes `names`, called in the order `calls`."""

    def __init__(self, names: tuple[str, ...], calls: tuple[str, ...]) -> None:
        super().__init__()
        for name in names:
            self.add_module(name, nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh()))
        self.head = nn.Linear(WIDTH, 1)
        self.calls = calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.calls:
            x = self.get_submodule(name)(x)
        return self.head(x).squeeze(-1)


def test_the_report_names_the_blocks_watched_and_how_they_were_chosen() -> None:
    """A x50 on l3, outside the blocks found (l1's layers), was named 'loss of (loss)' with nothing
    saying l2 and l3 were never watched (found by an audit): the report names the blocks and the rule
    that chose them, and that blocks= watches others; given, it says so. Three Sequentials laid out
    alike are no one list's chain now: their leaf modules are watched, every layer's Linear."""
    torch.manual_seed(0)
    model = _Three(("l1", "l2", "l3"), ("l1", "l2", "l3"))
    found = report_of(train(model, 3)).text()
    said = "(as found, leaf modules with parameters (no repeated stack found); blocks= watches others)"
    assert f"  blocks watched: l1.0, l2.0, l3.0, head {said}" in found
    given = report_of(train(model, 3, blocks=[(n, model.get_submodule(n)) for n in ("l1", "l2", "l3")]))
    assert "  blocks watched: l1, l2, l3 (given by blocks=)" in given.text()


class _SkipsFirst(MLP):
    """The MLP with the blocks `skipped` left out of its first training call (LayerDrop's draw; with
    `then`, those left out of its second), and the first `frozen` blocks run under no_grad
    (fine-tuning the top of a stack)."""

    def __init__(self, skipped: tuple[int, ...] = (), frozen: int = 0, then: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.skipped, self.frozen, self.then, self.calls = skipped, frozen, then, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        for i, block in enumerate(self.blocks):
            if (self.calls == 1 and i in self.skipped) or (self.calls == 2 and i in self.then):
                continue
            if i < self.frozen:
                with torch.no_grad():
                    x = block(x)
            else:
                x = block(x)
        return self.head(x).squeeze(-1)


@pytest.mark.parametrize(("skipped", "planted"), [((2,), 2), ((0,), 1), ((0, 1), 0)])
def test_blocks_the_first_step_does_not_call_keep_their_place_in_the_order(
    skipped: tuple[int, ...], planted: int
) -> None:
    """Blocks left out of the first step were put after every block it called: a x50 on blocks.2,
    skipped there, was named in blocks.3, and blocks.1 was called 'the first block' for the whole run
    where blocks.0 was skipped (found by a review). Each keeps its registered place."""
    torch.manual_seed(0)
    model = _SkipsFirst(skipped)
    report = report_of(train(model, 42, {planted: Fault(40)}))
    first = report.first_spike
    assert first is not None and (first.step, first.block) == (40, f"blocks.{planted}"), report.text()
    assert first.after is None or planted == 0
    assert "another order" not in report.text()


class _InterleavedSkipsFirst(Interleaved):
    """Interleaved with ffns.0 left out of its first training call (LayerDrop's draw)."""

    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        for i, (a, f) in enumerate(zip(self.attns, self.ffns, strict=True)):
            x = a(x) if self.calls == 1 and i == 0 else f(a(x))
        return self.head(x).squeeze(-1)


class _InterleavedSkips(Interleaved):
    """Interleaved (3 of each) with attns.1 left out of its first training call and ffns.0 and
    ffns.1 out of its second (LayerDrop's draws)."""

    calls = 0

    def __init__(self) -> None:
        super().__init__(depth=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        skipped = {1: {"attns.1"}, 2: {"ffns.0", "ffns.1"}}.get(self.calls, set())
        for i, (a, f) in enumerate(zip(self.attns, self.ffns, strict=True)):
            x = x if f"attns.{i}" in skipped else a(x)
            x = x if f"ffns.{i}" in skipped else f(x)
        return self.head(x).squeeze(-1)


@pytest.mark.parametrize("flush_every", [1, 50])
def test_two_lists_skipping_different_blocks_take_the_order_of_a_step_calling_all(flush_every: int) -> None:
    """Merged, the first two steps' calls placed attns.1 among the ffns skipped beside it, for good
    (a0 a1 f0 f1 ...): a x50 on ffns.0's output was named in attns.1 (a fourth review). A step that
    calls every block gives the order whole."""
    torch.manual_seed(0)
    model = _InterleavedSkips()
    model.ffns[0].register_forward_hook(Fault(39, count=True))  # its 40th call (skipped once): step 40
    report = report_of(train(model, 42, flush_every=flush_every))
    first = report.first_spike
    assert first is not None and (first.step, first.block) == (40, "ffns.0"), report.text()


@pytest.mark.parametrize("flush_every", [1, 50])
def test_a_block_the_first_step_skips_takes_its_place_from_the_step_that_calls_it(flush_every: int) -> None:
    """Put at its registered place, ffns.0 of two lists called in turn landed after attns.3, and a x50
    on its output was named in attns.1 (a review): the order is merged over the steps before the
    first flush, each block placed after the one called before it."""
    torch.manual_seed(0)
    model = _InterleavedSkipsFirst()
    model.ffns[0].register_forward_hook(Fault(39, count=True))  # its 40th call: step 40
    report = report_of(train(model, 42, flush_every=flush_every))
    first = report.first_spike
    assert first is not None and (first.step, first.block) == (40, "ffns.0"), report.text()


@pytest.mark.parametrize("flush_every", [1, 50])
def test_blocks_skipped_on_different_steps_and_an_early_flush_keep_the_order(flush_every: int) -> None:
    """Blocks 2 then 1 left out of the first two steps: each placed right after the block its step
    called before it, the order read 0, 2, 1, 3, ... and a NaN made by blocks.2's backward was
    blocks.3's; with a flush every step the order was final before blocks.2 was ever called (a third
    review). Oracle: the construction (the NaN enters dL/d blocks.1's output in blocks.2's backward)."""
    torch.manual_seed(0)
    model = _SkipsFirst((2,), then=(1,))
    model.blocks[2] = torch.nn.Sequential(PoisonBackward(8), *model.blocks[2])
    report = report_of(train(model, 10, flush_every=flush_every))
    found = report.first_nonfinite
    assert found is not None, report.text()
    assert (found.tensor, found.block, found.made_by) == ("activation_grad", "blocks.1", "blocks.2")
    assert "another order" not in report.text()


def test_a_nan_made_on_a_step_that_skipped_blocks_names_the_backward_that_ran() -> None:
    """Blocks 1-3 left out of step 1: the NaN blocks.4's backward makes enters blocks.0's output
    gradient, and was said made by blocks.1's, next in the order but not run that step (a fourth
    review). Oracle: the construction."""
    torch.manual_seed(0)
    model = _SkipsFirst(then=(1, 2, 3))
    model.blocks[4] = torch.nn.Sequential(PoisonBackward(1), *model.blocks[4])
    report = report_of(train(model, 4))
    found = report.first_nonfinite
    assert found is not None and found.step == 1, report.text()
    assert (found.tensor, found.block, found.made_by) == ("activation_grad", "blocks.0", "blocks.4")


def test_blocks_run_without_gradients_keep_their_place_in_the_order() -> None:
    """Frozen first blocks run under no_grad were put last: a NaN the head's backward made in
    blocks.5's output gradient was said to be made by blocks.0's backward (a review); it is the
    loss's, after the last block."""
    torch.manual_seed(0)
    model = _SkipsFirst(frozen=2)
    model.head = torch.nn.Sequential(PoisonBackward(8), model.head)
    report = report_of(train(model, 10))
    found = report.first_nonfinite
    assert found is not None and found.step == 8, report.text()
    assert (found.tensor, found.block, found.made_by) == ("activation_grad", "blocks.5", AFTER_LAST_SAID)


def test_a_run_that_closes_no_step_says_how_steps_are_closed() -> None:
    """watch(model) without an optimizer: the loop trains, nothing closes a step; with
    w.before_step() each step is measured (its loss the one recorded)."""
    torch.manual_seed(0)
    model = MLP(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    for closes in (False, True):
        stream = io.StringIO()
        with warnings.catch_warnings(record=True) as seen, watch(model, report=stream) as w:
            warnings.simplefilter("always")
            losses = []
            for _ in range(3):
                loss = compute_loss(model, batch(gen, model))
                w.loss(loss)
                losses.append(loss.item())
                opt.zero_grad()
                loss.backward()
                if closes:
                    w.before_step()
                opt.step()
        said = [str(m.message) for m in seen if "no step was closed" in str(m.message)]
        if closes:
            assert said == [] and "note" not in stream.getvalue()
            assert report_of(w).steps == 3 and w.out.last_values[0] == pytest.approx(losses[-1])
        else:
            assert len(said) == 1 and "watch(model, optimizer)" in said[0]
            assert "note: no step was closed" in stream.getvalue() and report_of(w).steps == 0


def test_a_hand_written_update_that_clears_grad_and_closes_no_step_is_warned_of() -> None:
    """Manual SGD, p -= lr * p.grad then p.grad = None, no loss recorded, no step closed: the loop
    trained, the weights changed, and no warning said that nothing was measured (a new user's trial);
    a loop that only runs the model, its weights unchanged, gets the report's note alone."""
    torch.manual_seed(0)
    model = MLP(depth=2)
    gen = torch.Generator().manual_seed(0)
    for trains in (True, False):
        before = [p.detach().clone() for p in model.parameters()]
        with warnings.catch_warnings(record=True) as seen, watch(model, report=io.StringIO()) as w:
            warnings.simplefilter("always")
            for _ in range(3):
                loss = compute_loss(model, batch(gen, model))
                if trains:
                    loss.backward()
                    with torch.no_grad():
                        for p in model.parameters():
                            p -= 0.01 * p.grad
                            p.grad = None
        changed = any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
        assert changed == trains
        said = [str(m.message) for m in seen if "no step was closed" in str(m.message)]
        assert len(said) == trains and report_of(w).steps == 0
    # an evaluation loop whose forward changes a weight in place, with no backward (nn.Embedding's
    # max_norm renormalises its rows under no_grad): no training, no warning (a review)
    embedded = nn.Sequential(nn.Embedding(10, 8, max_norm=0.5), nn.Linear(8, 2))
    with warnings.catch_warnings(record=True) as seen, watch(embedded, report=io.StringIO()):
        warnings.simplefilter("always")
        version = embedded[0].weight._version
        with torch.no_grad():
            embedded(torch.arange(10))
        assert embedded[0].weight._version != version
    assert not [m for m in seen if "no step was closed" in str(m.message)]


def test_a_frozen_blocks_weight_norm_is_its_own_and_the_log_names_the_columns(tmp_path: Path) -> None:
    """Block 1 frozen: its logged weight norm is torch's norm of its parameters (not 0), its weight
    gradient is 0 (it has none); the first row maps each list entry to a block."""
    torch.manual_seed(0)
    model = MLP(depth=3)
    model.blocks[1].requires_grad_(False)
    log = tmp_path / "w.jsonl"
    train(model, 3, log=log, weights_every=1)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    columns = rows[0]["columns"]
    assert columns["activation"] == ["blocks.0", "blocks.1", "blocks.2"]
    assert columns["weight"] == columns["gradient"] == [*columns["activation"], "(outside blocks)"]
    assert all("columns" not in r for r in rows[1:])
    frozen = columns["weight"].index("blocks.1")
    expect = torch.linalg.vector_norm(torch.cat([p.flatten() for p in model.blocks[1].parameters()]))
    assert rows[-1]["weight"][frozen] == pytest.approx(float(expect), rel=1e-6)
    assert rows[-1]["gradient"][frozen] == 0.0 and rows[-1]["gradient"][0] > 0


def test_a_finding_says_its_value_is_an_l2_norm_except_the_loss() -> None:
    """The report's value is what the series holds: an L2 norm for activations, their gradients and the
    weights and their gradients; the loss itself for the loss."""
    norm = Finding(step=70, tensor="activation", block="5", value=232.7).describe()
    assert norm == "step 70: activation of '5', L2 norm 232.7"  # a Sequential's child, quoted
    loss = Finding(step=3, tensor="loss", block="(model)", value=4.5).describe()
    assert "L2 norm" not in loss and loss.endswith(", 4.5")


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_a_loss_spike_is_judged_on_its_logarithm_where_the_loss_is_positive(
    sign: float, tmp_path: Path
) -> None:
    """A spike of the loss passed at step 45 alone: a positive loss (x10) is judged on its logarithm,
    a negative one (-loss, then +20) on its values, what its trend expected beside the threshold.
    Oracle: the rule written out in plain Python over the logged losses, in its mode."""
    torch.manual_seed(0)
    model, log = MLP(), tmp_path / "w.jsonl"
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    with watch(model, opt, log=log, report=None) as w:
        for step in range(60):
            loss = compute_loss(model, batch(gen, model, 32))
            value = sign * loss.detach()  # x10 at step 45 where positive; where negative, +20
            w.loss(value * 10.0 if step == 45 and sign > 0 else value + 20.0 if step == 45 else value)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    first = report_of(w).first_spike
    assert first is not None and (first.step, first.tensor) == (45, "loss")
    series = [json.loads(line)["loss"] for line in log.read_text().splitlines()]
    flagged, expected, threshold = reference_steps(SpikeRule(), series, logged=sign > 0)[45]
    assert flagged and first.threshold == pytest.approx(threshold, rel=1e-9)
    assert first.expected == pytest.approx(expected, rel=1e-9)
    assert f"(its trend expected {first.expected:.4g})" in first.describe()


@pytest.mark.parametrize("skip", [False, True])
def test_a_spike_is_reported_with_the_threshold_and_expected_value_it_was_judged_on(
    skip: bool, tmp_path: Path
) -> None:
    """The threshold and expected value beside a flagged value are those of the spike rule written
    out in plain Python (test_watch_rule.reference_steps) over the logged series, in both places the
    rule runs: on the host at each flush (default) and on the device per step (skip=True)."""
    torch.manual_seed(3)
    log, model = tmp_path / "w.jsonl", MLP()
    opt = fused_adam(model) if skip else None
    report = report_of(train(model, 60, {2: Fault(45, "scale")}, opt, seed=3, log=log, skip=skip))
    first = report.first_spike
    assert first is not None and (first.step, first.block) == (45, "blocks.2")
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    column = rows[0]["columns"]["activation"].index("blocks.2")
    series = [row["activation"][column] for row in rows]
    flagged, expected, threshold = reference_steps(SpikeRule(), series, logged=True)[45]
    assert flagged and first.value == series[45] > threshold
    assert first.threshold == pytest.approx(threshold, rel=1e-9)
    assert first.expected == pytest.approx(expected, rel=1e-9)
    assert f"> threshold {threshold:.4g} (its trend expected {expected:.4g})" in report.text()


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile's CPU backend (inductor) needs g++")
# torch's own warnings while compiling (inductor's, dynamo's), turned into errors by the test settings
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
def test_a_compiled_model_is_watched_without_a_false_in_place_warning() -> None:
    """Under model.compile() the hooks were traced: the version counter read at trace time (0) differed
    from the compiled output's (1), so every step warned of an in-place change that never happened and
    fell back to eager norms. The hooks now run outside the graph (a graph break per block): no warning,
    and every norm equals the uncompiled run's."""
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = MLP()
        if compiled:
            model.compile()
        runs.append(train(model, 4, flush_every=2))  # the false warning would fail the test
    eager, compiled_run = (w.out.last_values for w in runs)
    assert not runs[1].capture.eager
    assert compiled_run == pytest.approx(eager, rel=1e-5)


@pytest.mark.parametrize("where", ["after the step", "before the step", "both"])
def test_a_forward_pass_that_is_never_backpropagated_is_not_in_the_row(where: str, tmp_path: Path) -> None:
    """A validation forward with gradients on (no torch.no_grad()) between training steps made no
    backward; its block outputs were added into the next row's activation norms. Every row must equal
    the same run's without it; two forward passes backpropagated together (a contrastive loss) both count."""
    rows = []
    for validate in (False, True):
        torch.manual_seed(0)
        model = MLP()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        gen, val = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
        log = tmp_path / f"{validate}.jsonl"
        with watch(model, opt, report=None, flush_every=3, log=log):
            for _ in range(5):
                data = batch(gen, model)
                loss = compute_loss(model, data)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if validate and where in ("before the step", "both"):
                    model(batch(val, model)[0])
                opt.step()
                if validate and where in ("after the step", "both"):
                    model(batch(val, model)[0])
        rows.append([json.loads(line) for line in log.read_text().splitlines()])
    assert len(rows[1]) == 5 and rows[1] == rows[0]


def test_two_forward_passes_backpropagated_together_both_count() -> None:
    """The counterpart: two passes, one backward of their summed loss (as a contrastive loss does);
    a block's activation norm is over both passes' outputs (their squares add)."""
    torch.manual_seed(0)
    model = MLP(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    a, b = batch(gen, model), batch(gen, model)
    with torch.no_grad():  # the outputs of block 0 on both batches, before the step changes the weights
        expected = math.hypot(*(float(torch.linalg.vector_norm(model.blocks[0](x))) for x in (a[0], b[0])))
    with watch(model, opt, report=None, flush_every=1) as w:
        loss = compute_loss(model, a) + compute_loss(model, b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    values = dict(zip(w.out.names, w.out.last_values, strict=True))
    assert values[("activation", "blocks.0")] == pytest.approx(expected, rel=1e-6)


def test_a_null_loss_in_the_log_says_whether_one_was_passed(tmp_path: Path) -> None:
    """Strict JSON writes a NaN loss as null, as it writes a step no loss was passed for: the row's
    loss_passed tells them apart. Oracle: what the loop passed."""
    torch.manual_seed(0)
    model = MLP(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    with watch(model, opt, log=tmp_path / "w.jsonl", report=None) as w:
        for step in range(6):
            opt.zero_grad()
            loss = compute_loss(model, batch(gen, model))
            if step == 5:
                w.loss(torch.tensor(math.nan))
            elif step != 3:
                w.loss(loss)
            loss.backward()
            opt.step()
    rows = [json.loads(line) for line in (tmp_path / "w.jsonl").read_text().splitlines()]
    assert [r["loss_passed"] for r in rows] == [True, True, True, False, True, True]
    assert rows[3]["loss"] is None and rows[5]["loss"] is None and rows[0]["loss"] is not None


def test_a_step_with_no_gradient_and_no_capture_is_a_row_of_zeros(tmp_path: Path) -> None:
    """optimizer.step() before any backward (nothing captured, no gradient) was an index_add_ with a
    float index at the flush (its empty slot list was made a float tensor). Oracle: torch's norms of
    the gradients of the step after it."""
    torch.manual_seed(0)
    model = MLP(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x, y = batch(torch.Generator().manual_seed(0), model)
    with watch(model, opt, log=tmp_path / "w.jsonl", flush_every=2, report=None):
        opt.step()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    rows = [json.loads(line) for line in (tmp_path / "w.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    assert rows[0]["gradient"] == [0.0] * 3 and rows[0]["activation"] == [0.0] * 2
    expect = [
        float(torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in b.parameters()])))
        for b in (*model.blocks, model.head)
    ]
    assert rows[1]["gradient"] == pytest.approx(expect, rel=1e-6)


def test_skip_with_a_scheduler_made_before_the_watcher_warns_nothing() -> None:
    """skip=True on a non-fused optimizer wraps optimizer.step; an LR scheduler made before watch()
    then warned 'optimizer.step() has been overridden after learning rate scheduler initialization',
    though the wrapper calls the scheduler's own. The schedule still advances (oracle: the lr torch's
    StepLR gives after 4 steps)."""
    torch.manual_seed(0)
    model = MLP(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    gen = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message="watch: skip=True with a non-fused")  # said at start
        with watch(model, opt, skip=True, report=None):
            for _ in range(4):
                opt.zero_grad()
                compute_loss(model, batch(gen, model)).backward()
                opt.step()
                scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2)


def test_a_watcher_not_open_refuses_a_loss_or_a_step_in_one_line() -> None:
    """w.loss() and w.before_step() on a watcher never entered, or after it closed, measured nothing
    and said nothing."""
    model = MLP(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = model(torch.randn(4, 16)).pow(2).mean()
    w = watch(model, opt, report=None)
    for call in (lambda: w.loss(loss), w.before_step):
        with pytest.raises(UsageError, match="before it was entered"):
            call()
    with w:
        w.loss(loss)
        loss.backward()
        opt.step()
    with pytest.raises(UsageError, match="after it closed") as caught:
        w.loss(loss)
    assert "\n" not in str(caught.value)


def test_a_watcher_refusing_a_block_leaves_no_hook_and_no_signal_handler() -> None:
    """A block torch cannot hook (a scripted module) is a one-line UsageError at entry; the hooks put
    on the blocks before it and the SIGTERM handler were left on the process before."""
    from probe_models import _Tanh, scripted_tanh

    model = nn.Sequential(_Tanh(), scripted_tanh())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    handler = signal.getsignal(signal.SIGTERM)
    w = watch(model, opt, blocks=[("0", model[0]), ("1", model[1])], report=None)
    with pytest.raises(UsageError, match=r"block '1' cannot be hooked"):
        w.__enter__()
    assert not model[0]._forward_hooks and not model._forward_pre_hooks
    assert signal.getsignal(signal.SIGTERM) == handler


def _steps(w: Any, model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    """Plain SGD steps of `model` under the open watcher `w`."""
    for step in steps:
        loss = compute_loss(model, batch(torch.Generator().manual_seed(step), model))
        w.loss(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_the_log_holds_whole_rows_up_to_the_last_flush_while_the_run_goes_on(tmp_path: Path) -> None:
    """A run killed between flushes leaves every flushed row on disk, none cut (rows sat in the file's
    buffer, written out 8 KiB at a time, mid-row)."""
    torch.manual_seed(0)
    model = MLP(depth=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    log = tmp_path / "watch.jsonl"
    with watch(model, opt, log=log, flush_every=10, report=None) as w:
        _steps(w, model, opt, range(25))
        text = log.read_text()
        assert text.endswith("\n")
        assert [json.loads(line)["step"] for line in text.splitlines()] == list(range(20))


@pytest.mark.skipif(
    signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL, reason="a harness handles SIGTERM"
)
def test_sigterm_is_handled_only_while_watching_and_only_where_no_handler_is_installed() -> None:
    model = MLP(depth=2)
    with watch(model, report=None):
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    theirs = lambda *_: None  # noqa: E731
    previous = signal.signal(signal.SIGTERM, theirs)
    try:
        with watch(model, report=None):
            assert signal.getsignal(signal.SIGTERM) is theirs
        assert signal.getsignal(signal.SIGTERM) is theirs
    finally:
        signal.signal(signal.SIGTERM, previous)


RUN_UNTIL_KILLED = """
import os, signal, sys, types, torch
from pathlib import Path
import stabilitycheck.watchcapture as wc
from watch_models import MLP, batch, compute_loss
from stabilitycheck import watch
torch.manual_seed(0)
model = MLP(depth=3)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
log, marker, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3]

class KillsOnDelete:  # a SIGTERM landing in a __del__: its exception is printed and dropped there
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)

def term_inside_the_watcher():  # SIGTERM once the capture took the step, before the row is counted
    def close_step(self, row, loss, close=wc.Capture.close_step):
        close(self, row, loss)
        wc.Capture.close_step = close
        os.kill(os.getpid(), signal.SIGTERM)
    own = {**vars(wc), "os": os, "signal": signal, "wc": wc}  # the frame the signal lands in is the watcher's
    code, defaults = close_step.__code__, close_step.__defaults__
    wc.Capture.close_step = types.FunctionType(code, own, "close_step", defaults)

def loop():
    with watch(model, opt, log=log, flush_every=10, report=sys.stderr) as w:
        step = 0
        try:
            while True:
                try:
                    loss = compute_loss(model, batch(torch.Generator().manual_seed(step), model))
                    w.loss(loss)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                except Exception:  # a loop that goes on after any error of its own
                    pass
                step += 1
                if step == 35:
                    if mode == "del":
                        KillsOnDelete()
                    elif mode == "inside":
                        term_inside_the_watcher()
                    else:
                        marker.touch()
        finally:
            print("the loop's finally ran", file=sys.stderr, flush=True)

if mode == "caught":  # as pytest does with a test that raises SystemExit
    try:
        loop()
    except SystemExit:
        print("caught: the run went on", file=sys.stderr, flush=True)
else:
    loop()
"""


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("mode", ["plain", "caught", "del", "inside"])
def test_a_watched_run_stopped_by_sigterm_writes_its_log_and_report_then_dies_by_it(
    mode: str, tmp_path: Path
) -> None:
    """SIGTERM (a scheduler's stop, a CI timeout) killed a watched run at once: no report, the log cut
    mid-row. It now unwinds the loop to the watcher (its finally clauses run; `except Exception`
    lets it by), which writes every step and the report, then dies by SIGTERM as before: a caller
    catching SystemExit (pytest) cannot keep the run going, and a SIGTERM whose exception was dropped
    in a __del__ is raised at the next step (both found in review). One landing in the watcher's own
    code is raised once that code is done: raised there, it had left a step taken but not counted,
    and the final flush failed, losing the report (seen once in CI)."""
    script, log, marker = tmp_path / "run.py", tmp_path / "watch.jsonl", tmp_path / "started"
    script.write_text(RUN_UNTIL_KILLED)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(log), str(marker), mode],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    _, err = stopped_when_marked(proc, marker if mode in ("plain", "caught") else None)
    assert proc.returncode == -signal.SIGTERM, err
    assert "the loop's finally ran" in err and "caught: the run went on" not in err
    said = re.search(r"stabilitycheck watch: (\d+) steps", err)
    assert said is not None, err
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(int(said.group(1)))) and len(rows) >= 35


STOPPED_WITH_A_REPORT_FILE = """
import os, signal, sys, torch
from watch_models import MLP, batch, compute_loss
from stabilitycheck import watch
torch.manual_seed(0)
model = MLP(depth=2)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
report = open(sys.argv[1], "w")  # the caller's own file, never closed
with watch(model, opt, log=sys.argv[1] + ".jsonl", report=report) as w:
    for step in range(100):
        if step == 7:
            if sys.argv[2] == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                raise KeyboardInterrupt
        loss = compute_loss(model, batch(torch.Generator().manual_seed(step), model))
        w.loss(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
"""


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("stop", ["sigterm", "interrupt"])
def test_a_report_written_to_a_file_of_the_callers_survives_a_sigterm_or_an_interrupt(
    stop: str, tmp_path: Path
) -> None:
    """The report went to the caller's file unflushed: a SIGTERM (whose default end flushes no Python
    file) left it 0 bytes, the log complete (a user's trial; a Ctrl-C did too in their script, where
    what was left at exit depended on its objects: that case is kept here as a guard). Oracle: the
    file holds the report's first line with the steps taken, 7."""
    script, report = tmp_path / "run.py", tmp_path / "report.txt"
    script.write_text(STOPPED_WITH_A_REPORT_FILE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    proc = subprocess.run(
        [sys.executable, str(script), str(report), stop],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        timeout=300,
    )
    assert proc.returncode == (-signal.SIGTERM if stop == "sigterm" else 1), proc.stderr
    said = report.read_text().splitlines()
    assert said[0].startswith("stabilitycheck watch: 7 steps"), proc.stderr
    # and that the run did not end on its own (it read '7 steps, 0 flagged' alone: an audit)
    stopper = "SIGTERM" if stop == "sigterm" else "KeyboardInterrupt"
    assert said[1] == f"  stopped early by {stopper}: what follows is of the steps closed before it"


def test_a_run_ending_on_its_own_says_nothing_of_stopping(tmp_path: Path) -> None:
    model = MLP(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with watch(model, opt, report=None) as w:
        _steps(w, model, opt, range(2))
    assert w.report is not None and w.report.stopped is None and "stopped" not in w.report.text()


def test_a_watcher_closed_from_another_thread_closes(tmp_path: Path) -> None:
    """Closing gave SIGTERM its handler back with signal.signal, which raises off the main thread: the
    report was out, but close() raised ValueError (found in review)."""
    import threading

    model = MLP(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    w = watch(model, opt, report=None).__enter__()
    _steps(w, model, opt, range(2))
    failed: list[BaseException] = []

    def close() -> None:
        try:
            w.close()
        except BaseException as exc:  # whatever it was, the test reports it
            failed.append(exc)

    thread = threading.Thread(target=close)
    thread.start()
    thread.join()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # left installed, inert, by a close off the main thread
    assert not failed and w.report is not None and w.report.steps == 2


def test_ctrl_c_during_a_flush_waits_until_its_rows_are_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C landing while a flush wrote its rows cut it: the report counted a step the log did not
    hold (found by a trial). Oracle: the report's step count against the log's rows."""
    from stabilitycheck import watchlog

    real, calls = watchlog.strict_json, [0]

    def interrupted(*args: Any, **kwargs: Any) -> str:
        calls[0] += 1
        if calls[0] == 3:  # inside the first flush, rows 0 and 1 written
            signal.raise_signal(signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(watchlog, "strict_json", interrupted)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a plain python run
    try:
        reported, logged = _interrupted_run(tmp_path, flush_every=5)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert reported == 5 and logged == list(range(5))


def _interrupted_run(tmp_path: Path, flush_every: int) -> tuple[int, list[int]]:
    """Up to 20 steps of a watched MLP that a KeyboardInterrupt stops: the steps its report counts
    and the step of each row its log holds."""
    torch.manual_seed(0)
    model = MLP(depth=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    log, stream = tmp_path / "watch.jsonl", io.StringIO()
    with (
        pytest.raises(KeyboardInterrupt),
        watch(model, opt, log=log, flush_every=flush_every, report=stream) as w,
    ):
        _steps(w, model, opt, range(20))
    said = re.search(r"stabilitycheck watch: (\d+) steps", stream.getvalue())
    assert said is not None
    return int(said.group(1)), [json.loads(line)["step"] for line in log.read_text().splitlines()]


def test_the_default_report_goes_to_stderr_as_it_is_when_watch_is_called(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The default was bound to sys.stderr when the module was imported: under a test's capture that
    stream was closed later, and the report raised 'I/O operation on closed file'."""
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    model = MLP(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with watch(model, opt) as w:
        _steps(w, model, opt, range(2))
    assert stream.getvalue().startswith("stabilitycheck watch: 2 steps")


def test_a_step_cut_short_by_a_signal_leaves_the_log_numbered_from_0(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A signal landing in a step's bookkeeping after the step count rose but before the buffered
    row was counted made the flush number its rows from 1, and the close failed on mismatched
    sizes (a likely cause of the SIGTERM test's rare failure on a loaded machine). Oracle: the
    report's step count against the log's rows, the interrupt placed right after the count is stored."""
    from stabilitycheck.watching import Watcher

    def get(self: Watcher) -> int:
        return int(self.__dict__["step"])

    def put(self: Watcher, value: int) -> None:
        self.__dict__["step"] = value
        if value == 6:
            raise KeyboardInterrupt  # the signal, one bytecode after the store

    monkeypatch.setattr(Watcher, "step", property(get, put), raising=False)
    reported, logged = _interrupted_run(tmp_path, flush_every=10)
    assert logged == list(range(reported)) and reported >= 5


def test_a_model_compiled_with_fullgraph_says_why_the_watch_cannot_run() -> None:
    """Under fullgraph=True torch's error named a disabled function of the watcher's and hinted to remove
    it; it now gives the reason: each block is recorded outside the graph, compile without fullgraph."""
    torch._dynamo.reset()
    model = MLP()
    model.compile(backend="eager", fullgraph=True)
    with pytest.raises(torch._dynamo.exc.Unsupported) as caught:
        train(model, 1)
    assert GRAPH_BREAK in str(caught.value)


def test_a_validation_pass_is_left_out_when_every_block_is_frozen(tmp_path: Path) -> None:
    """A linear probe (every block frozen, the head trained) with a validation forward under eval()
    and gradients on: no block output wanted a gradient, so nothing told the validation pass from the
    training one and its block outputs were added into the next row (found by a trial). Oracle: the
    same run without the validation pass."""
    rows = []
    for validate in (False, True):
        torch.manual_seed(0)
        model = MLP()
        model.blocks.requires_grad_(False)
        opt = torch.optim.SGD(model.head.parameters(), lr=0.01)
        gen, val = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
        log = tmp_path / f"{validate}.jsonl"
        with watch(model, opt, report=None, flush_every=2, log=log):
            for _ in range(4):
                model.train()
                loss = compute_loss(model, batch(gen, model))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if validate:
                    model.eval()
                    model(batch(val, model)[0])
        rows.append([json.loads(line) for line in log.read_text().splitlines()])
    assert len(rows[1]) == 4 and rows[1] == rows[0]
    assert any(v for v in rows[0][1]["activation"])  # the blocks are measured: the check is not vacuous


class TwoHeads(MLP):
    """The MLP returning (head_a, head_b) or (features, logits): two outputs, one of which the loss
    takes."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind, self.other = kind, nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        for block in self.blocks:
            x = block(x)
        first = self.other(x).squeeze(-1) if self.kind == "heads" else x
        return first, self.head(x).squeeze(-1)


@pytest.mark.parametrize("kind", ["heads", "features"])
def test_a_pass_is_told_by_a_gradient_reaching_any_of_the_models_outputs(kind: str, tmp_path: Path) -> None:
    """Frozen blocks and a tuple output: only the first output was hooked, so a loss on the second
    head dropped every training pass (activations read 0 for 4.92; a reviewer's case), and where the
    first output was frozen features a validation pass was still counted (9.74 for 4.92). Oracle: the
    same run without the validation pass, and the blocks' outputs measured."""
    rows = []
    for validate in (False, True):
        torch.manual_seed(0)
        model = TwoHeads(kind)
        model.blocks.requires_grad_(False)
        opt = torch.optim.SGD([*model.head.parameters(), *model.other.parameters()], lr=0.01)
        gen, val = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
        log = tmp_path / f"{validate}.jsonl"
        with watch(model, opt, report=None, flush_every=2, log=log):
            for _ in range(4):
                x, y = batch(gen, model)
                loss = ((model(x)[1] - y) ** 2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if validate:
                    model(batch(val, model)[0])
        rows.append([json.loads(line) for line in log.read_text().splitlines()])
    assert len(rows[1]) == 4 and rows[1] == rows[0]
    with torch.no_grad():
        torch.manual_seed(0)
        fresh = TwoHeads(kind)
        h = batch(torch.Generator().manual_seed(0), fresh)[0]
        for block in fresh.blocks:
            h = block(h)
    assert rows[0][0]["activation"][-1] == pytest.approx(float(torch.linalg.vector_norm(h)), rel=1e-5)


RUN_THEN_EVALUATE = """
import os, signal, sys, types, torch
import stabilitycheck.watchcapture as wc
from watch_models import MLP, batch, compute_loss
from stabilitycheck import watch
torch.manual_seed(0)
model = MLP(depth=3)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
log = sys.argv[1]
armed = [False]

def term_in_the_forward_hook():  # SIGTERM in the watcher's forward hook, on the evaluation's first call
    def _forward_hook(self, b, hook_of=wc.Capture._forward_hook):
        hook = hook_of(self, b)
        def on_forward(module, args, output):
            if armed[0] and not torch.is_grad_enabled():
                armed[0] = False
                os.kill(os.getpid(), signal.SIGTERM)
            return hook(module, args, output)
        return on_forward
    own = {**vars(wc), "os": os, "signal": signal, "torch": torch, "armed": armed}
    code, defaults = _forward_hook.__code__, _forward_hook.__defaults__
    wc.Capture._forward_hook = types.FunctionType(code, own, "_forward_hook", defaults)

term_in_the_forward_hook()
with watch(model, opt, log=log, flush_every=10, report=sys.stderr) as w:
    for epoch in range(2):
        for step in range(15):
            loss = compute_loss(model, batch(torch.Generator().manual_seed(step), model))
            w.loss(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
        armed[0] = epoch == 0
        with torch.no_grad():  # an evaluation: forwards, no optimizer step
            for k in range(200):
                compute_loss(model, batch(torch.Generator().manual_seed(1000 + k), model))
        print("the evaluation ran to its end", file=sys.stderr, flush=True)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or sys.platform == "win32", reason="POSIX signals")
def test_a_sigterm_landing_in_a_hook_during_an_evaluation_stops_the_evaluation(tmp_path: Path) -> None:
    """A SIGTERM that lands in the watcher's forward hook is held until the hook is done, not until
    the loop's next optimizer step: an evaluation between two epochs (forwards under no_grad, no step)
    would run to its end first, past a scheduler's grace period, which then kills the run with
    SIGKILL before the watcher writes its log and report. The run stops in the evaluation, writes
    every step taken and the report, and dies by SIGTERM."""
    script, log = tmp_path / "run.py", tmp_path / "watch.jsonl"
    script.write_text(RUN_THEN_EVALUATE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    proc = subprocess.run(
        [sys.executable, str(script), str(log)], env=env, stderr=subprocess.PIPE, text=True, timeout=300
    )
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    assert "the evaluation ran to its end" not in proc.stderr
    said = re.search(r"stabilitycheck watch: (\d+) steps", proc.stderr)
    assert said is not None and int(said.group(1)) == 15, proc.stderr
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(15))


def test_blocks_no_hook_sees_are_said_and_a_nan_they_make_is_not_silently_the_losss() -> None:
    """A forward calling each block's `.forward(x)` runs no module hook: every block output and its
    gradient read 0 (no measurement) and a NaN put on block 2's output was reported as the loss's, with
    nothing said. The report and a warning now say so; with the blocks called, the same NaN is first
    in layers.3's output (oracle: where the test put it, after layers.2 returned)."""

    class Direct(nn.Module):
        def __init__(self, called: bool) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(4)])
            self.called, self.poison = called, False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for i, layer in enumerate(self.layers):
                x = torch.tanh(layer(x) if self.called else layer.forward(x))
                if self.poison and i == 2:
                    x = x * math.nan
            return x

    for called in (False, True):
        torch.manual_seed(0)
        model = Direct(called)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        stream = io.StringIO()
        with warnings.catch_warnings(record=True) as seen, watch(model, opt, report=stream) as w:
            warnings.simplefilter("always")
            for step in range(3):
                model.poison = step == 2
                loss = model(torch.randn(4, 8)).square().mean()
                w.loss(loss)
                opt.zero_grad()
                loss.backward()
                opt.step()
        said = [str(m.message) for m in seen if "no watched block ran through its __call__" in str(m.message)]
        first = report_of(w).first_nonfinite
        assert first is not None and first.step == 2
        if called:
            assert said == [] and (first.tensor, first.block) == ("activation", "layers.3")
        else:
            assert len(said) == 1 and "block.forward(x)" in said[0] and "layers.0, layers.1" in said[0]
            assert "note: no watched block ran" in stream.getvalue()


@pytest.mark.parametrize("reentrant", [True, False])
def test_blocks_that_ran_only_with_gradients_off_are_said(reentrant: bool) -> None:
    """Blocks run inside a reentrant torch.utils.checkpoint on data that does not require grad run
    their forward under no_grad, and the checkpoint's backward never runs: they get no gradient and
    never train, and every block output and its gradient read 0 (no measurement), with nothing said
    (found by an audit of faulty loops). The report and a warning now say so; the non-reentrant
    checkpoint trains the blocks and is measured, with nothing said. Oracle: torch, whether block 0's
    weight moved."""
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3)])
            self.head = nn.Linear(8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = checkpoint(layer, x, use_reentrant=reentrant)
            return self.head(x)

    torch.manual_seed(0)
    model = Checkpointed()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.layers[0][0].weight.detach().clone()
    stream = io.StringIO()
    with warnings.catch_warnings(record=True) as seen, watch(model, opt, report=stream) as w:
        warnings.simplefilter("always")
        squared_steps(model, opt, w, 3, (4, 8))
    trained = not torch.equal(before, model.layers[0][0].weight)
    assert trained is not reentrant
    said = [str(m.message) for m in seen if "ran only with gradients off" in str(m.message)]
    if reentrant:
        assert len(said) == 1 and "layers.0, layers.1" in said[0] and "use_reentrant=False" in said[0]
        assert "note: the watched blocks ran only with gradients off in 3 steps" in stream.getvalue()
    else:
        assert said == [] and report_of(w).note is None


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("misplaced", [True, False])
def test_a_loop_stepping_on_no_gradient_is_said(misplaced: bool, set_to_none: bool) -> None:
    """A loop calling zero_grad() between backward() and step() steps on no gradient: the model never
    trains, every total gradient norm read 0 (no measurement) and nothing was said (found by an audit
    of faulty loops). The report and a warning now say so; the loop in the right order, nothing.
    Oracle: torch, whether any weight moved under plain SGD."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    stream = io.StringIO()
    with warnings.catch_warnings(record=True) as seen, watch(model, opt, report=stream) as w:
        warnings.simplefilter("always")
        for _ in range(4):
            loss = model(torch.randn(4, 8)).square().mean()
            w.loss(loss)
            if not misplaced:
                opt.zero_grad(set_to_none=set_to_none)
            loss.backward()
            if misplaced:
                opt.zero_grad(set_to_none=set_to_none)
            opt.step()
    trained = any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    assert trained is not misplaced
    said = [str(m.message) for m in seen if "no step had a gradient" in str(m.message)]
    if misplaced:
        assert (
            len(said) == 1 and "4 steps" in said[0] and "zero_grad() between backward() and step()" in said[0]
        )
        assert "note: no step had a gradient" in stream.getvalue()
    else:
        assert said == [] and report_of(w).note is None


@pytest.mark.parametrize("stepped", [True, False])
@pytest.mark.parametrize("closed_by", ["with", "close"])
def test_a_closing_note_warns_at_the_callers_line(closed_by: str, stepped: bool) -> None:
    """The warnings of close() (no gradient at any step; no step closed) name the caller's line: under
    `with` they named watching.py's __exit__, one frame short, so a filter by module or the line shown
    pointed into the library. Oracle: the warning's filename is this file, for either way of closing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        w = watch(model, opt, report=None)
        if closed_by == "with":
            with w:
                model(torch.randn(4, 8)).square().mean().backward()
                if stepped:
                    opt.zero_grad()
                    opt.step()
        else:
            w.__enter__()
            model(torch.randn(4, 8)).square().mean().backward()
            if stepped:
                opt.zero_grad()
                opt.step()
            w.close()
    said = [m for m in seen if str(m.message).startswith("watch: ")]
    expected = "no step had a gradient" if stepped else "no step was closed"
    assert len(said) == 1 and expected in str(said[0].message), [str(m.message) for m in seen]
    assert Path(said[0].filename).resolve() == Path(__file__).resolve()


@pytest.mark.parametrize("skip", [False, True])
def test_the_logged_weight_norms_are_torchs_norms_of_that_steps_weights(skip: bool, tmp_path: Path) -> None:
    """Oracle: torch.linalg.vector_norm of each block's parameters (the head is outside the blocks),
    taken by hand before each update. Weights measured every 3rd step, flushed every 4 (the two
    intervals cross): a measured row holds its own step's norms, not the last measured row's or an
    unmeasured row's zeros; an unmeasured row holds null."""
    torch.manual_seed(0)
    model = MLP(depth=2)
    opt = fused_adam(model) if skip else torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    log, expected = tmp_path / "w.jsonl", []
    with watch(model, opt, log=log, weights_every=3, flush_every=4, skip=skip, report=None) as w:
        for _ in range(10):
            opt.zero_grad()
            x, y = batch(gen, model, 8)
            loss = compute_loss(model, (x, y))
            w.loss(loss)
            loss.backward()
            owners = [*model.blocks, model.head]
            with torch.no_grad():
                flat = [torch.cat([p.flatten() for p in m.parameters()]) for m in owners]
            expected.append([float(torch.linalg.vector_norm(f)) for f in flat])
            opt.step()
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert rows[0]["columns"]["weight"] == ["blocks.0", "blocks.1", "(outside blocks)"]
    for step, row in enumerate(rows):
        if step % 3:
            assert row["weight"] is None
        else:
            assert row["weight"] == pytest.approx(expected[step], rel=1e-6)
    assert expected[0] != pytest.approx(expected[3], rel=1e-6)  # the weights did change between them


@pytest.mark.parametrize(("skip", "planted"), [(False, 108), (True, 108), (False, 60), (True, 60)])
def test_a_weight_norm_is_judged_at_the_steps_it_is_measured_alone(
    skip: bool, planted: int, tmp_path: Path
) -> None:
    """Oracle: the rule written out in plain Python (test_watch_rule.reference_steps) over the logged
    weight norms of block 0 at the steps they were measured (the others are null). Weights measured
    every 3rd step, block 0's weights x10 before a measured step: at step 108 the weight series,
    warm since its 32nd measurement (step 93), flags it first, on the host rule and on the device
    rule (skip=True) alike, with what its trend expected and the threshold; at step 60, its 21st
    measurement, it is not warm and not flagged (block 0's tanh output, saturated, grows x1.98, under
    the floor of x2). Judged as the last measured norm repeated, the stand-ins counted: warm at step
    32, flagged at 60 (and a clean run flagged, see
    test_weight_norms_between_their_measurements_raise_no_flag)."""
    torch.manual_seed(0)
    model = MLP(depth=2)
    opt = fused_adam(model) if skip else torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    log = tmp_path / "w.jsonl"
    with watch(model, opt, log=log, weights_every=3, flush_every=8, skip=skip, report=None) as w:
        for step in range(planted + 4):
            if step == planted:
                with torch.no_grad():
                    model.blocks[0][0].weight.mul_(10.0)
            opt.zero_grad()
            x, y = batch(gen, model, 8)
            loss = compute_loss(model, (x, y))
            w.loss(loss)
            loss.backward()
            opt.step()
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [row["step"] for row in rows if row["weight"] is not None] == list(range(0, planted + 4, 3))
    series = [row["weight"][0] for row in rows if row["weight"] is not None]
    flagged, expected, threshold = reference_steps(SpikeRule(), series, logged=True)[planted // 3]
    first = report_of(w).first_spike
    assert flagged == (planted == 108)
    if not flagged:  # not warm: nothing flags the weight (block 0's tanh output, saturated, only x1.98)
        assert first is None or first.tensor != "weight"
        return
    assert first is not None and (first.step, first.block, first.tensor) == (planted, "blocks.0", "weight")
    assert first.threshold == pytest.approx(threshold, rel=1e-9)
    assert first.expected == pytest.approx(expected, rel=1e-9)


def test_the_logged_loss_of_a_step_is_the_sum_of_its_micro_batches_losses(tmp_path: Path) -> None:
    """Oracle: the losses passed to w.loss, summed by hand. Gradient accumulation, three micro-batches
    a step, each w.loss(loss / 3): the step's loss is their sum, not the last one passed."""
    torch.manual_seed(0)
    model = MLP(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    log, sums = tmp_path / "w.jsonl", []
    with watch(model, opt, log=log, report=None) as w:
        for _ in range(4):
            opt.zero_grad()
            total = 0.0
            for _ in range(3):
                loss = compute_loss(model, batch(gen, model, 8)) / 3
                w.loss(loss)
                total += float(loss.detach())
                loss.backward()
            sums.append(total)
            opt.step()
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [row["loss"] for row in rows] == pytest.approx(sums, rel=1e-6)


@pytest.mark.parametrize("skip", [False, True])
def test_the_norms_of_every_step_across_flushes_are_torchs_own(skip: bool, tmp_path: Path) -> None:
    """Oracle: torch.linalg.vector_norm of each block's output (a forward hook of the test's own), the
    loss and the total gradient norm (torch.nn.utils.get_total_norm), taken by hand every step. Seven
    steps flushed every 3: the rows of the second and third flush hold their own steps' values, not
    those added onto the rows of the flush before."""
    torch.manual_seed(0)
    model = MLP(depth=2)
    opt = fused_adam(model) if skip else torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    outputs: list[float] = []
    hooks = [
        block.register_forward_hook(
            lambda m, a, out: outputs.append(float(torch.linalg.vector_norm(out.detach())))
        )
        for block in model.blocks
    ]
    log, expected = tmp_path / "w.jsonl", []
    with watch(model, opt, log=log, flush_every=3, skip=skip, report=None) as w:
        for _ in range(7):
            opt.zero_grad()
            outputs.clear()
            loss = compute_loss(model, batch(gen, model, 8))
            w.loss(loss)
            loss.backward()
            grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))
            expected.append((float(loss.detach()), grad_norm, list(outputs)))
            opt.step()
    for h in hooks:
        h.remove()
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    got = [(row["loss"], row["grad_norm"], row["activation"]) for row in rows]
    assert len(got) == 7
    for (loss_value, grad_norm, acts), (want_loss, want_grad, want_acts) in zip(got, expected, strict=True):
        assert loss_value == pytest.approx(want_loss, rel=1e-6)
        assert grad_norm == pytest.approx(want_grad, rel=1e-6)
        assert acts == pytest.approx(want_acts, rel=1e-6)


def test_weight_norms_between_their_measurements_raise_no_flag() -> None:
    """Weight norms are measured every weights_every steps (default: flush_every, 50); the last
    measured ones stood in for the steps between and were judged: the window held 50 copies of step
    0's value, no spread, and a weight norm that doubled over 50 clean SGD steps with momentum was
    flagged at steps 50 and 51, skipped under skip=True (found by an audit). Between measurements
    the weights are not judged; measured every step, the same run flags nothing either."""
    for every in (None, 1):
        torch.manual_seed(0)
        model = MLP(depth=3)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        report = report_of(train(model, 120, optimizer=opt, batch_size=128, weights_every=every))
        assert report.flagged_steps == [], report.text()


def test_a_sparse_embedding_gradient_is_normed_as_its_dense_gradient() -> None:
    """nn.Embedding(sparse=True) gives a sparse .grad, which torch's norm cannot take: the watcher's
    norm call raised inside the optimizer's pre-hook and stopped the user's training (found by an
    audit). Its values are normed, coalesced, as the probe does. Oracle: the norm of the dense
    gradient, torch's own."""
    torch.manual_seed(0)

    class Bag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(20, 8, sparse=True)
            self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            h = self.emb(tokens)
            for block in self.blocks:
                h = torch.tanh(block(h))
            return h.square().mean()

    model, tokens = Bag(), torch.tensor([[1, 2, 2, 3], [3, 4, 1, 1]])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with watch(model, opt, report=None, flush_every=1) as w:
        loss = model(tokens)
        w.loss(loss)
        opt.zero_grad()
        loss.backward()
        grads = [p.grad.to_dense() if p.grad.is_sparse else p.grad.clone() for p in model.parameters()]
        opt.step()
    values = dict(zip(w.out.names, w.out.last_values, strict=True))
    assert values[("grad_norm", "(all)")] == pytest.approx(
        torch.nn.utils.get_total_norm(grads).item(), rel=1e-6
    )
    assert values[("gradient", "(outside blocks)")] == pytest.approx(grads[0].norm().item(), rel=1e-6)


def _closure_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(4)], nn.Linear(16, 1))


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("make", [lambda p: torch.optim.SGD(p, 0.01, momentum=0.9), torch.optim.Adam])
def test_a_step_given_a_closure_is_closed_after_its_passes(make: Any, skip: bool) -> None:
    """optimizer.step(closure) runs the forward and backward inside step(): the watcher closed the
    step before they ran, so each row held the previous step's passes, a x50 at step 50 was named at
    51, and with skip=True the faulty update went through while the clean step 51 was skipped (found
    by a user's trial). The closure now runs first, once, its loss handed to the optimizer. Oracle:
    the step planted, and the parameters compared bit for bit around each step."""
    model = _closure_net()
    opt = make(model.parameters())
    step = -1
    model[2].register_forward_hook(lambda mod, a, o: o * 50 if step == 50 else None)
    changed, calls = {}, [0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # skip=True on a non-fused one: a host sync a step
        with watch(model, opt, skip=skip, report=None) as w:
            for step in range(70):
                x = torch.randn(32, 16)

                def closure(x: torch.Tensor = x) -> torch.Tensor:
                    calls[0] += 1
                    opt.zero_grad()
                    loss = nn.functional.mse_loss(model(x), x.sum(-1, keepdim=True).sin())
                    loss.backward()
                    return loss

                before = [p.detach().clone() for p in model.parameters()]
                assert opt.step(closure) is not None  # the closure's loss, as step() returns it
                after = model.parameters()
                changed[step] = any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    found = w.report.first_spike
    assert found is not None and (found.step, found.block) == (50, "2")
    assert calls[0] == 70  # once a step
    assert changed[51] and changed[50] is not skip
    if skip:
        assert w.report.skipped_steps == [50]


@pytest.mark.parametrize("skip", [False, True])
def test_a_step_given_its_closure_and_more_arguments_gets_them_all(skip: bool) -> None:
    """A step taking more than the closure, step(closure, scale), gets each argument as the loop gave
    it, whether the watcher's step pre-hook or its skip=True step wrapper takes the closure out (the
    wrapper dropped every positional argument after the closure). Oracle: what step() received."""

    got: list[float] = []

    class Scaled(torch.optim.SGD):
        def step(self, closure: Any = None, scale: float = 1.0) -> Any:  # type: ignore[override]
            got.append(scale)
            return super().step(closure)

    model = _closure_net()
    opt = Scaled(model.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # skip=True on a non-fused one: a host sync a step
        with watch(model, opt, skip=skip, report=None):
            for _ in range(3):
                x = torch.randn(8, 16)

                def closure(x: torch.Tensor = x) -> torch.Tensor:
                    opt.zero_grad()
                    loss = nn.functional.mse_loss(model(x), x.sum(-1, keepdim=True).sin())
                    loss.backward()
                    return loss

                opt.step(closure, 0.5)
    assert got == [0.5, 0.5, 0.5]


def test_the_optimizer_of_another_model_is_refused_and_a_split_one_said() -> None:
    """watch(model, another model's optimizer) was accepted: its steps closed the rows and skip=True
    'skipped' an update the model never had (found by a user's trial); with skip=True, parameters
    another optimizer steps are updated on a flagged step, which is said at start."""
    model, other = _closure_net(), _closure_net()
    with pytest.raises(UsageError, match="holds none of the model's parameters"):
        watch(model, torch.optim.SGD(other.parameters(), 0.1), report=None)
    first = torch.optim.SGD(model[:2].parameters(), 0.1)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        watch(model, first, skip=True, report=None).__enter__().close()
    assert any("skips the SGD's step only, and 6 of the model's 10" in str(x.message) for x in said)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        watch(model, first, report=None).__enter__().close()  # without skip, nothing to say


class _AuxBlock(nn.Module):
    """A block returning (aux_loss, h), an MoE layer's shape: a 0-d tensor before its output."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = torch.tanh(self.linear(h))
        return out.square().mean(), out


class _AuxNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_AuxBlock() for _ in range(2))

    def forward(self, x: torch.Tensor, kept: list[torch.Tensor] | None = None) -> torch.Tensor:
        aux = x.new_zeros(())
        for block in self.blocks:
            loss, x = block(x)
            aux = aux + loss
            if kept is not None:
                kept.append(x)
        return x.sum() + aux


def test_a_block_returning_a_scalar_before_its_output_is_read_on_its_output(tmp_path: Path) -> None:
    """(aux_loss, h): the block's output is h, the 0-d aux loss before it is no block output (a mutant
    taking 0-d tensors passed every test, found by mutation testing). Oracle: torch's norm of each
    block's h, step by step."""
    torch.manual_seed(0)
    model, log = _AuxNet(), tmp_path / "w.jsonl"
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    want = []
    with watch(
        model, opt, blocks=[(f"blocks.{i}", b) for i, b in enumerate(model.blocks)], log=log, report=None
    ) as w:
        for _ in range(3):
            kept: list[torch.Tensor] = []
            loss = model(torch.randn(4, 8), kept)
            want.append([float(h.detach().norm()) for h in kept])
            w.loss(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    for row, norms_of in zip(rows, want, strict=True):
        assert row["activation"] == pytest.approx(norms_of, rel=1e-6)


class _Glued(nn.Module):
    """Tanh blocks; the forward multiplies what it hands block `at` by `factor` at step `when` (NaN:
    a NaN made between blocks), the step counted by the forward."""

    def __init__(self, at: int, factor: float, when: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(6))
        self.at, self.factor, self.when, self.step = at, factor, when, -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.step += 1
        for i, block in enumerate(self.blocks):
            if self.step == self.when and i == self.at:
                x = x * self.factor  # the model's own code between blocks at-1 and at
            x = block(x)
        return x


@pytest.mark.parametrize("at", [3, 0])
@pytest.mark.parametrize("factor", [50.0, math.nan])
def test_a_value_made_between_blocks_is_said_to_be_maybe_theirs(factor: float, at: int) -> None:
    """The model's code between blocks 2 and 3 multiplies x by 50 (or makes a NaN): watch named
    blocks.3, which only received it, where the probe says 'outside blocks, before blocks.3' (found by
    a user's trial). The finding says blocks.3 took what the code made of blocks.2's output. Before
    block 0 (a NaN in the batch) it blamed blocks.0 without a word (a new user's trial): the first
    block's finding says what it took may hold the value. A block taking its predecessor's output as
    it came gets no such word."""
    torch.manual_seed(0)
    model = _Glued(at=at, factor=factor, when=60)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with watch(model, opt, report=None) as w:
        squared_steps(model, opt, w, 70, (8, 16))
    assert w.report is not None
    found = w.report.first_nonfinite if math.isnan(factor) else w.report.first_spike
    assert found is not None and (found.step, found.tensor, found.block) == (60, "activation", f"blocks.{at}")
    said = (
        "blocks.0 is the first block: what it took, the batch or the model's code before it, may hold"
        if at == 0
        else "blocks.3 took what the model's code made of blocks.2's output"
    )
    assert found.after == ("(input)" if at == 0 else "blocks.2") and said in found.describe()
    torch.manual_seed(0)
    clean = train(MLP(depth=4), 60, {2: Fault(40)})  # x50 on blocks.2's output, by a forward hook
    assert clean.report is not None and clean.report.first_spike is not None
    assert clean.report.first_spike.block == "blocks.2" and clean.report.first_spike.after is None


def test_a_watch_report_marks_a_cut_list_of_steps_only_where_it_cut_it() -> None:
    """Up to 10 steps are listed whole; ' ...' and how many in all follow only where more were cut (11
    here; the count was missing: 29 steps a GradScaler skipped read as 10 and '...', an audit)."""
    from stabilitycheck.watchlog import Report

    ten = Report(steps=20, skipped_steps=list(range(10))).text()
    assert "  skipped steps: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9\n" in ten
    eleven = Report(steps=20, skipped_steps=list(range(11))).text()
    assert "  skipped steps: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9 ... (11 in all)\n" in eleven
    scaled = Report(steps=40, scaler_skipped_steps=list(range(0, 58, 2))).text()
    assert "(Inf/NaN gradients): 0, 2, 4, 6, 8, 10, 12, 14, 16, 18 ... (29 in all)\n" in scaled


def test_a_report_with_nothing_flagged_says_what_the_warm_up_leaves_unjudged() -> None:
    """A x50 fault at step 20 of 60, inside the rule's 32-value warm-up, read '60 steps, 0 flagged'
    and nothing else (found by a new user's trial): the report says from which value each series is
    judged; the same fault at step 40 is flagged, and that line is not there."""
    early = train(MLP(depth=4), 60, {2: Fault(20)})
    assert early.report is not None and early.report.first_spike is None
    assert (
        "  warm-up: each series is judged from its value 33 on (SpikeRule(warmup=32))" in early.report.text()
    )
    custom = train(MLP(depth=4), 60, {2: Fault(20)}, rule=SpikeRule(warmup=10))
    assert custom.report is not None and custom.report.first_spike is not None
    assert custom.report.first_spike.step == 20 and "warm-up" not in custom.report.text()


def _loss_fn(model: torch.nn.Module, batch: object) -> torch.Tensor:  # importable: a bundle pickles it
    return model(batch).sum()


def _watched_rows(tmp_path: object, **options: object) -> list[dict[str, object]]:
    from pathlib import Path

    from stabilitycheck import watch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    Path(str(tmp_path)).mkdir(parents=True, exist_ok=True)
    log = Path(str(tmp_path)) / "w.jsonl"
    with watch(model, opt, log=log, flush_every=4, report=None, **options) as w:  # type: ignore[arg-type]
        for _ in range(6):
            opt.zero_grad()
            loss = _loss_fn(model, torch.randn(8, 4))
            w.loss(loss)
            loss.backward()
            opt.step()
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_with_a_replay_bundle_the_weight_norms_are_measured_every_step(tmp_path: object) -> None:
    """watch's weights_every defaults to once per flush, and to every step with a bundle (README:
    'default: once per flush; every step with a bundle'): a replay re-runs any step, so each step's
    weights are kept. Oracle: that documented default, read off the log (null: not measured)."""
    from pathlib import Path

    plain = _watched_rows(Path(str(tmp_path)) / "a")
    assert [r["weight"] is not None for r in plain] == [True, False, False, False, True, False]
    bundled = _watched_rows(
        Path(str(tmp_path)) / "b", bundle=Path(str(tmp_path)) / "bundle", compute_loss=_loss_fn
    )
    assert all(r["weight"] is not None for r in bundled)


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


def test_an_optimizer_evaluating_its_closure_again_is_said_once_at_the_callers_step() -> None:
    """LBFGS evaluates its closure several times in one step(): the passes after the first are counted
    in the next step's row, said once by a warning, which pointed into torch's own wrappers
    (torch/utils/_contextlib.py), not at the loop's opt.step(closure) line. Oracle: the step count
    (one row per step() call) and the warning's file."""
    torch.manual_seed(0)
    model = MLP(depth=2)
    opt = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=3)
    data = batch(torch.Generator().manual_seed(0), model)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = compute_loss(model, data)
        loss.backward()
        return loss

    said_once = pytest.warns(UserWarning, match="evaluates the closure more than once")
    with said_once as caught, watch(model, opt, report=None) as w:
        for _ in range(3):
            opt.step(closure)
    said = [c for c in caught if "closure" in str(c.message)]
    assert len(said) == 1 and said[0].filename == __file__
    assert report_of(w).steps == 3


def test_the_heatmap_legend_says_where_a_first_flag_it_cannot_circle_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first flag on a weight (or the total norm) is in neither panel: the legend named a 'first
    flagged value' no circle showed (a user's trial). It now says which value it is; a circled one
    keeps the plain label, and with none flagged the legend has no such entry."""
    import matplotlib.axes

    from stabilitycheck import watchplot
    from stabilitycheck.watchlog import Finding

    labels: list[str] = []
    real = matplotlib.axes.Axes.legend

    def legend(self: Any, *args: Any, handles: Any = (), **kwargs: Any) -> Any:
        labels[:] = [h.get_label() for h in handles]
        return real(self, *args, handles=handles, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "legend", legend)
    columns, blocks = [[1.0] * 6 for _ in range(10)], ["0", "1", "2"]
    watchplot.heatmap(columns, blocks, Finding(5, "weight", "1", 9.0), tmp_path / "h.png")
    assert labels[-1] == "first flagged: weight of '1' at step 5 (in neither panel)"  # a digit name, quoted
    watchplot.heatmap(columns, blocks, Finding(5, "activation", "1", 9.0), tmp_path / "h.png")
    assert labels[-1] == "first flagged value"
    watchplot.heatmap(columns, blocks, None, tmp_path / "h.png")
    assert labels == ["NaN", "Inf"]


class _Classifier(nn.Module):
    """An input layer, `depth` Linear + ReLU blocks and a 10-way head: trained with Adam on a
    teacher's labels, the gradients of its first blocks' outputs rise x100 and more over the first
    80 steps of training."""

    def __init__(self, depth: int = 6, width: int = 64) -> None:
        super().__init__()
        self.inp = nn.Linear(32, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(depth))
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


@pytest.mark.parametrize("seed", range(3))
def test_a_x50_output_gradient_while_the_gradients_still_rise_early_in_training_is_named(seed: int) -> None:
    """x50 on the gradient of blocks.1's output at step 100 (made in the backward between blocks.2
    and blocks.1), while the output gradients of blocks 0 and 1 still rise x100 or more from their
    first values: the window's mean and std held that rise, the x50 passed under their threshold
    and nothing was flagged in 105 steps (each seed, before this change); the trend's rule names it
    at its step."""
    torch.manual_seed(seed)
    model = _Classifier()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(32, 10, generator=gen)
    planted = 100

    def fault(grad: torch.Tensor) -> torch.Tensor:
        return grad * 50.0

    with watch(model, opt, report=None) as w:
        for step in range(planted + 5):
            x = torch.randn(64, 32, generator=gen)
            hook = (
                model.blocks[1].register_forward_hook(lambda m, a, out: out.register_hook(fault) and None)
                if step == planted
                else None
            )
            loss = nn.functional.cross_entropy(model(x), (x @ teacher).argmax(-1))
            if hook is not None:
                hook.remove()
            w.loss(loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    first = report_of(w).first_spike
    assert first is not None
    assert (first.step, first.tensor, first.block) == (planted, "activation_grad", "blocks.1")


@pytest.mark.parametrize("seed", [1, 2])
def test_the_readme_examples_model_trained_clean_for_1000_steps_raises_no_flag(seed: int) -> None:
    """The README's watch example without its planted spike, 1,000 steps: its head's output norm
    wanders slowly (each step's ln x 0.93-0.99 correlated with the last), and with the noise read
    from successive differences alone its climbs back from dips were flagged (seed 1: steps 130,
    213, 560, ...; seed 2: 720, 721, ...: a review). The spread about the trend's line counts too."""
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(32, 32), nn.Tanh()) for _ in range(8)], nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with watch(model, opt, report=None) as w:
        for _ in range(1000):
            x = torch.randn(64, 32)
            loss = nn.functional.mse_loss(model(x).squeeze(-1), x.sum(-1).sin())
            w.loss(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert report_of(w).flagged_steps == []
