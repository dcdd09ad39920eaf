"""watch() on real training loops: planted faults named at the right step and block, norms equal to
torch's own, no flag on a clean run, skipped steps bit-identical, host reads counted."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode
from watch_models import MLP, Fault, PreNorm, batch, compute_loss, report_of, train

from stabilitycheck import recording
from stabilitycheck.errors import UsageError
from stabilitycheck.watching import watch
from stabilitycheck.watchlog import Log

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
    wide = recording.accumulator
    monkeypatch.setattr(
        recording, "accumulator", lambda d, exact, device=None: wide(d, exact, torch.device("cuda"))
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
    model = MLP()
    opt = fused_adam(model) if options else None
    with reads:
        w = train(model, 120, {3: Fault(70)}, optimizer=opt, flush_every=40, **options)
    assert report_of(w).first_spike is not None
    assert reads.count == 3 == report_of(w).host_reads


def test_the_log_has_a_row_per_step_with_non_finite_values_kept(tmp_path: Path) -> None:
    torch.manual_seed(0)
    log = tmp_path / "watch.jsonl"
    train(MLP(depth=3), 45, {1: Fault(40, "nan")}, log=log, flush_every=16)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(45))
    assert math.isnan(rows[40]["activation"][1]) and math.isfinite(rows[40]["activation"][0])
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


def test_the_heatmap_shows_non_finite_cells(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.image

    torch.manual_seed(0)
    path = tmp_path / "heat.png"
    train(MLP(depth=3), 44, {1: Fault(40, "nan")}, heatmap=path)
    pixels = matplotlib.image.imread(path)
    magenta = (pixels[..., 0] > 0.9) & (pixels[..., 1] < 0.1) & (pixels[..., 2] > 0.9)
    assert magenta.sum() > 0  # the NaN cells are drawn, not dropped


def test_bad_options_are_one_line_usage_errors() -> None:
    model = MLP(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(UsageError, match="flush_every must be >= 1"):
        watch(model, opt, flush_every=0)
    with pytest.raises(UsageError, match="needs compute_loss"):
        watch(model, opt, bundle="somewhere")
    with pytest.raises(UsageError, match="skip=True needs the optimizer"):
        watch(model, None, skip=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        watch(model, opt).close()  # a plain watcher warns about nothing


def test_the_package_exposes_the_function_watch_even_after_its_module_is_imported() -> None:
    import stabilitycheck
    import stabilitycheck.watching  # a submodule import sets a package attribute of its name

    assert stabilitycheck.watch is watch and callable(stabilitycheck.watch)
