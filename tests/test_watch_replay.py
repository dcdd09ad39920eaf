"""Replay bundles: `stabilitycheck replay DIR` re-runs the first flagged step and reproduces its norms.
Also a bundle's step check and the model state it replays from (watchstate)."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from watch_models import (
    MLP,
    BatchNormed,
    Dropped,
    Fault,
    PreNorm,
    batch,
    compute_loss,
    masked_loss,
    report_of,
    train,
)

from stabilitycheck import watchstate
from stabilitycheck.cli import main
from stabilitycheck.errors import UsageError
from stabilitycheck.replay import Replayed, _as_passed, replay
from stabilitycheck.watching import Watcher, watch


def _bundle(path: Path) -> int:
    torch.manual_seed(0)
    w = train(
        PreNorm(depth=3), 52, bad_batch=(48, 50.0), bundle=path, compute_loss=compute_loss, flush_every=16
    )
    first = report_of(w).first_spike
    assert first is not None and (first.step, first.block) == (48, "blocks.0")
    return first.step


def test_replay_reproduces_the_flagged_steps_norms(tmp_path: Path, capsys: object) -> None:
    step = _bundle(tmp_path / "bundle")
    result = replay(tmp_path / "bundle")
    assert result.step == step and result.mismatches(1e-6) == []
    assert sum(math.isfinite(v) and v > 0 for v in result.replayed) > 10  # real norms were compared
    assert main(["replay", str(tmp_path / "bundle")]) == 0


def test_a_replay_takes_the_users_blocks_by_their_module_names(tmp_path: Path) -> None:
    """The user's blocks on a flat Sequential, its Linears '0', '2' and '4', share their names with the
    watcher's own layers (each Linear with the Tanh after it): the replay took those, whose outputs
    follow the Tanh, and 4 of the norms differed, block '0''s output 22.3 for 654.5 (found by
    mutation testing). Oracle: the norms recorded in training, within 1e-6."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1), nn.Flatten(0)
    )
    blocks = [(name, model[int(name)]) for name in ("0", "2", "4")]
    w = train(
        model,
        40,
        bad_batch=(36, 50.0),
        blocks=blocks,
        bundle=tmp_path / "bundle",
        compute_loss=compute_loss,
        flush_every=8,
    )
    first = report_of(w).first_spike
    assert first is not None and first.step == 36
    result = replay(tmp_path / "bundle")
    assert result.mismatches(1e-6) == []
    assert sum(math.isfinite(v) and v > 0 for v in result.replayed) > 6


def test_a_replay_says_where_the_users_own_hooks_were_not_replayed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A x50 planted by a forward hook is not in the bundle (hooks are not saved): the replay differs
    and said nothing of why (found by a user's trial). It names the hooked block. Oracle: the fault
    as planted, on blocks.1 by the test's own hook; the watcher's hooks are not the user's."""
    torch.manual_seed(0)
    w = train(
        MLP(depth=3), 40, {1: Fault(36)}, bundle=tmp_path / "bundle", compute_loss=compute_loss, flush_every=8
    )
    assert report_of(w).first_spike is not None
    meta = json.loads((tmp_path / "bundle" / "meta.json").read_text())
    assert meta["user_hooks"] == ["blocks.1"]
    assert main(["replay", str(tmp_path / "bundle")]) == 1
    out = capsys.readouterr().out
    assert "blocks.1 had hooks of your own" in out


def test_a_bundle_whose_norms_differ_is_exit_1(tmp_path: Path) -> None:
    _bundle(tmp_path / "bundle")
    meta_path = tmp_path / "bundle" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["values"][2] *= 1 + 1e-5  # one block's output norm, off by 1e-5
    meta_path.write_text(json.dumps(meta))
    assert main(["replay", str(tmp_path / "bundle")]) == 1


def test_an_rtol_of_1_or_more_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The difference is |recorded - replayed| / the larger, at most 1: --rtol 1 or 5 read a bundle
    whose norms were off by x2600 (the model's tanh edited to relu) as agreeing, exit 0 (a new user's
    trial). Oracle: a norm doubled differs by 0.5, refused at 0.4, accepted at 0.6; rtol 1 is a usage
    error, one line, exit 2."""
    _bundle(tmp_path / "bundle")
    meta_path = tmp_path / "bundle" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["values"][2] *= 2
    meta_path.write_text(json.dumps(meta))
    argv = ["replay", str(tmp_path / "bundle"), "--rtol"]
    assert main([*argv, "0.4"]) == 1 and main([*argv, "0.6"]) == 0
    capsys.readouterr()
    for rtol in ("1", "5"):
        assert main([*argv, rtol]) == 2
        err = capsys.readouterr().err
        assert "--rtol: must be below 1" in err and err.count("\n") == 1


def test_a_missing_bundle_is_a_one_line_usage_error(tmp_path: Path, capsys: object) -> None:
    assert main(["replay", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err  # type: ignore[attr-defined]
    assert err.startswith("stabilitycheck: error: replay") and err.count("\n") == 1


def test_a_compute_loss_replay_cannot_load_is_refused_at_the_start(tmp_path: Path) -> None:
    """A lambda (not picklable by name) or a function of the script run as __main__ (not importable by
    replay) is a usage error when watch() starts, before any training step."""
    closs = lambda model, batch: compute_loss(model, batch)  # noqa: E731
    main_fn = compute_loss.__class__(compute_loss.__code__, {"__name__": "__main__"}, "closs")
    main_fn.__module__ = "__main__"
    for fn, why in ((closs, "cannot be pickled"), (main_fn, "__main__")):
        with pytest.raises(UsageError, match=why):
            train(PreNorm(depth=2), 1, bundle=tmp_path / "b", compute_loss=fn)
        assert not (tmp_path / "b").exists()


def test_a_bundle_that_cannot_be_written_warns_and_training_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writing fails (the bundle path is a file; torch.save dies half-way): a warning, the run finishes
    every step, and no data.pt is left for replay to choke on."""
    blocked = tmp_path / "blocked"
    blocked.write_text("a file, not a directory")

    def dies_half_way(obj: object, f: Path) -> None:
        Path(f).write_bytes(b"PK half a zip")
        raise OSError("disk full")

    for path in (blocked, tmp_path / "bundle"):
        if path.name == "bundle":
            monkeypatch.setattr(watchstate.torch, "save", dies_half_way)
        with pytest.warns(UserWarning, match="could not be written"):
            options = {"bundle": path, "compute_loss": compute_loss, "flush_every": 16}
            w = train(PreNorm(depth=3), 52, bad_batch=(48, 50.0), **options)
        assert w.report is not None and w.report.steps == 52
        assert not (path / "data.pt").exists() if path.is_dir() else path.read_text().startswith("a file")


@pytest.mark.parametrize(
    ("micro", "divide", "amp"),
    [(2, True, False), (3, True, False), (2, False, False), (1, True, True), (2, True, True)],
)
def test_a_step_of_micro_batches_is_replayed_whole(
    tmp_path: Path, micro: int, divide: bool, amp: bool
) -> None:
    """Gradient accumulation: `micro` micro-batches a step, each w.loss(loss / micro) (or the undivided
    loss), the first micro-batch of step 40 x50. The replay runs every micro-batch, scaled as they
    were passed, and reproduces every norm the training step measured (within 1e-6). With `amp`, the
    loop opens torch.autocast around compute_loss, the usual idiom: the replay ran it without, every
    norm off by ~1e-3 (exit 1), and over 2 micro-batches the loss no longer matched compute_loss / 2
    to 1e-6, so it was not divided: 2x (found by a user's trial); it now runs under it."""
    torch.manual_seed(0)
    model = PreNorm(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    with watch(
        model, opt, bundle=tmp_path / "b", compute_loss=compute_loss, flush_every=16, report=None
    ) as w:
        for step in range(44):
            opt.zero_grad()
            for k in range(micro):
                x, y = batch(gen, model, 8)
                x = x * 50.0 if (step, k) == (40, 0) else x
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                    loss = compute_loss(model, (x, y))
                loss = loss / micro if divide else loss
                w.loss(loss, batch=(x, y))
                loss.backward()
            opt.step()
    first = report_of(w).first_spike
    assert first is not None and first.step == 40
    meta = json.loads((tmp_path / "b" / "meta.json").read_text())
    assert meta["step"] == 40 and meta["micro_batches"] == micro
    result = replay(tmp_path / "b")
    assert result.mismatches(1e-6) == []
    assert sum(math.isfinite(v) and v > 0 for v in result.replayed) > 10
    assert main(["replay", str(tmp_path / "b")]) == 0


def test_micro_batches_drawn_with_the_global_rng_replay_with_dropout(tmp_path: Path) -> None:
    """Oracle: the training step's own norms. Dropout, 4 micro-batches a step, each drawn with the
    global RNG between the forwards (torch.randn in the loop): each micro-batch's forward is replayed
    from the RNG state it began with (the step's first alone gave differences of 0.7)."""
    torch.manual_seed(0)
    model = Dropped()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with watch(model, opt, bundle=tmp_path / "b", compute_loss=compute_loss, report=None) as w:
        for step in range(44):
            opt.zero_grad()
            for k in range(4):
                x, y = torch.randn(8, 16), torch.randn(8)
                x = x * 1000.0 if (step, k) == (40, 2) else x
                loss = compute_loss(model, (x, y)) / 4
                w.loss(loss, batch=(x, y))
                loss.backward()
            opt.step()
    first = report_of(w).first_spike
    assert first is not None and first.step == 40
    result = replay(tmp_path / "b")
    assert result.mismatches(1e-6) == []


class Local(nn.Module):
    """Stands for a model class of the training script: its __module__ is set to __main__ below."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(16, 16)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[0](x).sum(-1)


def test_a_model_class_replay_cannot_load_is_refused_at_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model (or a block of it) whose class is defined in the script run as __main__, or inside a
    function (not picklable by name), could be saved but never loaded by replay: a usage error when
    watch() starts, naming the class, before any step; the same model from a module is accepted."""

    class Inner(nn.Linear):
        pass

    monkeypatch.setattr(Local, "__module__", "__main__")
    wrapped = PreNorm(depth=2)
    wrapped.head = Local()  # type: ignore[assignment]
    inner = PreNorm(depth=2)
    inner.head = Inner(16, 1)
    for model, why in (
        (Local(), "'Local' is defined in the script run as __main__"),
        (wrapped, "'Local'"),
        (inner, "'Inner' cannot be pickled by name"),
    ):
        with pytest.raises(UsageError, match=f"model cannot be replayed: its class {why}") as caught:
            train(model, 1, bundle=tmp_path / "b", compute_loss=compute_loss)
        assert "\n" not in str(caught.value)
        assert not (tmp_path / "b").exists()
    monkeypatch.undo()
    train(PreNorm(depth=2), 1, bundle=tmp_path / "b", compute_loss=compute_loss)


def test_an_edited_meta_json_or_a_negative_rtol_is_a_one_line_usage_error(
    tmp_path: Path, capsys: object
) -> None:
    """meta.json without `step`, with a step that is not an integer, with fewer values than the step
    measures, with a value that is not a number, or not an object; --rtol below 0 or NaN; a data.pt
    that is garbage, empty or cut short: exit 2 and one line, never the internal error (exit 3)."""
    _bundle(tmp_path / "bundle")
    meta = json.loads((tmp_path / "bundle" / "meta.json").read_text())
    edits = [
        {k: v for k, v in meta.items() if k != "step"},
        {**meta, "step": "48"},
        {**meta, "values": meta["values"][:-1]},
        {**meta, "values": [*meta["values"][:-1], "1.0"]},
        [meta],
    ]
    for i, edited in enumerate(edits):
        bundle = tmp_path / f"edit{i}"
        shutil.copytree(tmp_path / "bundle", bundle)
        (bundle / "meta.json").write_text(json.dumps(edited))
        assert main(["replay", str(bundle)]) == 2
        err = capsys.readouterr().err  # type: ignore[attr-defined]
        assert err.startswith("stabilitycheck: error: replay") and err.count("\n") == 1
    for rtol in ("-1", "nan"):
        assert main(["replay", str(tmp_path / "bundle"), "--rtol", rtol]) == 2
        err = capsys.readouterr().err  # type: ignore[attr-defined]
        assert err.startswith("stabilitycheck: error:") and "--rtol" in err and err.count("\n") == 1
    assert main(["replay", str(tmp_path / "bundle"), "--rtol", "0"]) in (0, 1)
    for i, data in enumerate([b"garbage\n", b"", (tmp_path / "bundle" / "data.pt").read_bytes()[:40]]):
        bundle = tmp_path / f"data{i}"  # data.pt garbage, empty, truncated: exit 2 (garbage was 3)
        shutil.copytree(tmp_path / "bundle", bundle)
        (bundle / "data.pt").write_bytes(data)
        assert main(["replay", str(bundle)]) == 2
        err = capsys.readouterr().err  # type: ignore[attr-defined]
        assert err.startswith("stabilitycheck: error: replay") and err.count("\n") == 1


def test_a_bundle_of_a_nan_step_is_strict_json_and_replays(tmp_path: Path) -> None:
    """A step whose batch makes the model's norms NaN (a NaN in the inputs): meta.json writes the NaN
    as null (it held a bare NaN token, which strict parsers refuse), and replay reads it back as NaN
    and reproduces the step, NaN for NaN."""
    torch.manual_seed(0)
    w = train(
        PreNorm(depth=3), 52, bad_batch=(48, math.nan), bundle=tmp_path / "b", compute_loss=compute_loss
    )
    assert report_of(w).first_spike is not None and report_of(w).first_spike.step == 48  # type: ignore[union-attr]
    refuse = lambda token: pytest.fail(f"{token} in meta.json")  # noqa: E731
    meta = json.loads((tmp_path / "b" / "meta.json").read_text(), parse_constant=refuse)
    assert None in meta["values"]
    result = replay(tmp_path / "b")
    assert any(math.isnan(v) for v in result.replayed) and result.mismatches(1e-6) == []


def _flag_step_40(
    path: Path, model: nn.Module, opt: torch.optim.Optimizer, loss_fn: Any, factor: float, after: Any = None
) -> None:
    """44 steps on batches from their own generator, step 40's inputs x `factor`, `after(model)` after
    each update; the bundle of the flagged step 40 replays every norm within 1e-6."""
    gen = torch.Generator().manual_seed(0)
    with watch(model, opt, bundle=path, compute_loss=loss_fn, report=None) as w:
        for step in range(44):
            opt.zero_grad()
            x, y = batch(gen, model, 8)
            x = x * factor if step == 40 else x
            loss = loss_fn(model, (x, y))
            w.loss(loss, batch=(x, y))
            loss.backward()
            opt.step()
            if after is not None:
                after(model)
    first = report_of(w).first_spike
    assert first is not None and first.step == 40
    assert replay(path).mismatches(1e-6) == []


def test_a_state_edited_after_the_optimizer_step_is_the_one_replayed(tmp_path: Path) -> None:
    """Oracle: the training step's own norms. Weight clipping (every parameter clamped to +-0.05 after
    each update, as in WGAN) edits the state between the optimizer's step and the next forward: the
    bundle kept the state of the optimizer's step and replayed norms 1e-3 off; it keeps the state the
    flagged step's forward began with."""

    def clamp(model: nn.Module) -> None:
        with torch.no_grad():
            for p in model.parameters():
                p.clamp_(-0.05, 0.05)

    torch.manual_seed(0)
    model = PreNorm(depth=2)
    adam = torch.optim.Adam(model.parameters(), lr=0.01)
    _flag_step_40(tmp_path / "b", model, adam, compute_loss, 60.0, clamp)


def test_a_loss_that_differs_on_replay_is_a_mismatch(tmp_path: Path) -> None:
    """The replay's loss is compared, not made to agree: a recomputed loss 15% off the one passed was
    divided by their ratio (whatever it was) and read equal, its gradients rescaled to match. Only a
    whole number of micro-batches (loss / accumulation steps) is divided out."""
    _bundle(tmp_path / "bundle")
    data = torch.load(tmp_path / "bundle" / "data.pt", weights_only=False)
    data["losses"] = [loss * 1.15 for loss in data["losses"]]  # training passed and logged a loss 15%
    torch.save(data, tmp_path / "bundle" / "data.pt")  # higher than compute_loss gives on replay
    meta_path = tmp_path / "bundle" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["values"][0] *= 1.15
    meta_path.write_text(json.dumps(meta))
    result = replay(tmp_path / "bundle")
    assert result.names[0] == ("loss", "(loss)") and 0 in result.mismatches(1e-6)
    assert main(["replay", str(tmp_path / "bundle")]) == 1


def test_draws_a_loss_makes_before_calling_the_model_are_replayed(tmp_path: Path) -> None:
    """Oracle: the training step's own norms. A masking loss draws its mask from the global RNG, then
    calls a model with dropout; the batches come from their own generator. The replay restored the
    forward's RNG state before the loss, so the mask came from it and every norm differed (0.3 off);
    it restores the state at the end of the update before, and the forward's at the first model call."""
    torch.manual_seed(0)
    model = Dropped()
    _flag_step_40(tmp_path / "b", model, torch.optim.SGD(model.parameters(), lr=0.01), masked_loss, 1000.0)


def test_mismatches_are_relative_to_the_norm_at_any_scale_and_nan_matches_nan_only() -> None:
    """Oracle: the definition, |a - b| > rtol x max(|a|, |b|), by hand. A norm of 1e-3 off by 1e-5
    of itself differs (an absolute floor of 1 would hide every difference in a small norm); one of 1e3
    off by 1e-7 of itself agrees; NaN matches NaN, Inf the same Inf, and nothing else."""
    recorded = [1e-3, 1e3, 1e-30, math.nan, math.inf, math.nan, math.inf, 2.0]
    replayed = [1e-3 * (1 + 1e-5), 1e3 * (1 + 1e-7), 1e-30 * (1 + 1e-5), math.nan, math.inf, 1.0]
    replayed += [-math.inf, 2.0]
    result = Replayed(0, [("activation", "b")] * len(recorded), recorded, replayed)
    assert result.mismatches(1e-6) == [0, 2, 5, 6]
    assert result.mismatches(1e-4) == [5, 6]


def test_the_bundle_keeps_the_state_at_the_first_model_call_of_the_first_flagged_step(tmp_path: Path) -> None:
    """Oracle: copies of the parameters taken by hand. The state is taken at a step's first model
    call, not at a later one (a loop that edits the weights between two forwards, as sharpness-aware
    minimisation does) nor when the step closes; the first flagged step's state is kept over a later
    flagged step's."""
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    snapshot = watchstate.Snapshot(model, compute_loss, tmp_path / "b")

    def state() -> list[torch.Tensor]:
        return [t.detach().clone() for t in (*model.parameters(), *model.buffers())]

    def edit() -> None:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)

    begun = state()
    snapshot.on_call()  # the step's first forward
    edit()
    snapshot.on_call()  # a second forward of the same step, on edited weights
    edit()
    snapshot.on_flag(torch.tensor(True))
    snapshot.after_update()
    snapshot.on_call()  # the next step, flagged too
    snapshot.on_flag(torch.tensor(True))
    assert all(torch.equal(kept, want) for kept, want in zip(snapshot.kept, begun, strict=True))


def test_the_batches_of_flushed_steps_are_let_go(tmp_path: Path) -> None:
    """The batches (device tensors, often) of every step a flush has read are dropped there: after
    10 steps at flush_every=4 and the closing flush, none is held; before the close, only those of
    the steps after the last flush (8 and 9). A flagged step's are written to the bundle first."""
    torch.manual_seed(0)
    model = MLP(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    with watch(model, opt, bundle=tmp_path / "b", compute_loss=compute_loss, flush_every=4, report=None) as w:
        for _ in range(10):
            opt.zero_grad()
            data = batch(gen, model, 8)
            loss = compute_loss(model, data)
            w.loss(loss, batch=data)
            loss.backward()
            opt.step()
        assert w.snapshot is not None and sorted(w.snapshot.batches) == [8, 9]
    assert w.snapshot.batches == {}


def _dropped() -> tuple[Dropped, torch.optim.Optimizer, torch.Generator]:
    """A 2-block model with dropout, its SGD optimizer and a data generator, all seeded."""
    torch.manual_seed(0)
    model = Dropped(depth=2)
    return model, torch.optim.SGD(model.parameters(), lr=0.01), torch.Generator().manual_seed(0)


def test_a_masking_loss_over_micro_batches_replays_each_mask(tmp_path: Path) -> None:
    """Oracle: the training step's own norms. A masking loss draws its mask before calling the model,
    two micro-batches a step: the second micro-batch's mask is drawn from the RNG state at the end of
    the first micro-batch, not at the end of the update before (that replays the first mask twice;
    step 33's two masks differ, as they do on all but one of these 36 steps)."""
    model, opt, gen = _dropped()
    with watch(model, opt, bundle=tmp_path / "b", compute_loss=masked_loss, report=None) as w:
        for step in range(36):
            opt.zero_grad()
            for k in range(2):
                x, y = batch(gen, model, 8)
                y = y * 50.0 if (step, k) == (33, 1) else y  # the loss is flagged
                loss = masked_loss(model, (x, y)) / 2
                w.loss(loss, batch=(x, y))
                loss.backward()
            opt.step()
    first = report_of(w).first_spike
    assert first is not None and first.step == 33
    assert replay(tmp_path / "b").mismatches(1e-6) == []


def test_a_loss_is_divided_only_by_a_whole_number_of_micro_batches_to_1e_6() -> None:
    """Oracle: _as_passed's rule by hand. compute_loss's loss over the one passed: 2 (or 4 to 1e-7) is
    `loss / accumulation_steps`, divided back; 1.15, 1 or 2.01 (0.5% off a whole number) is a loss that
    differs, left as it is so the replay shows it."""
    for loss, passed, want in (
        (2.0, 1.0, 1.0),
        (4.0, 1.0 + 1e-7, 1.0),
        (2.01, 1.0, 2.01),
        (1.15, 1.0, 1.15),
        (3.0, 3.0, 3.0),
    ):
        got = _as_passed(torch.tensor(loss, dtype=torch.float64), torch.tensor(passed))
        assert float(got) == pytest.approx(want, rel=1e-12)


def test_a_bundle_written_after_the_loop_switched_to_eval_replays_in_training_mode(tmp_path: Path) -> None:
    """Oracle: the training step's own norms. The flagged step is in the last flush interval, so the
    bundle is written when the watcher closes, after the loop put the model (with dropout) in eval mode
    for a final evaluation: the model is saved in eval mode, and the step, trained in training mode,
    replays in training mode (in eval mode dropout is off and every norm differs)."""
    model, opt, gen = _dropped()

    def evaluate() -> None:
        model.eval()
        assert not (tmp_path / "b").exists()  # not flushed yet: written at the close, in eval mode

    first = report_of(_flagged_at_33(model, opt, gen, tmp_path / "b", after=evaluate)).first_spike
    assert first is not None and first.step == 33
    assert replay(tmp_path / "b").mismatches(1e-6) == []


def _flagged_at_33(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
    path: Path,
    each: Callable[[], None] = lambda: None,
    after: Callable[[], None] = lambda: None,
    between: Callable[[], None] = lambda: None,
) -> Watcher:
    """36 steps under watch with a bundle at `path`, the targets x50 at step 33 (its loss flagged);
    `each` runs before every step, `between` between its forward and w.loss, `after` after the last
    step, the watcher still open."""
    with watch(model, opt, bundle=path, compute_loss=compute_loss, report=None) as w:
        for step in range(36):
            each()
            opt.zero_grad()
            x, y = batch(gen, model, 8)
            y = y * 50.0 if step == 33 else y  # the loss is flagged
            loss = compute_loss(model, (x, y))
            between()
            w.loss(loss, batch=(x, y))
            loss.backward()
            opt.step()
        after()
    return w


def test_a_block_kept_in_eval_mode_in_a_training_run_replays_in_eval_mode(tmp_path: Path) -> None:
    """Oracle: the training step's own norms. A frozen block kept in eval mode while the rest trains
    (a frozen BatchNorm backbone in fine-tuning): replay put the whole model in training mode, and
    block 0's BatchNorm normalised by the batch's statistics, not its running ones: its output norm
    63.4 for 18.9 in the audit's model, exit 1 (found by an audit). Each module's mode at the
    micro-batch's forward is in the bundle and replayed."""
    torch.manual_seed(0)
    model = BatchNormed()
    for p in model.blocks[0].parameters():
        p.requires_grad_(False)
    with torch.no_grad():  # running statistics far from a batch's own
        model.blocks[0][1].running_mean.fill_(0.5)
        model.blocks[0][1].running_var.fill_(4.0)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    gen = torch.Generator().manual_seed(0)

    def modes() -> None:
        model.train()
        model.blocks[0].eval()

    first = report_of(_flagged_at_33(model, opt, gen, tmp_path / "b", each=modes)).first_spike
    assert first is not None and first.step == 33
    result = replay(tmp_path / "b")
    assert result.mismatches(1e-6) == []


@pytest.mark.parametrize("where", ["before", "before, then a draw", "after"])
def test_a_validation_pass_in_the_flagged_step_leaves_its_replay_alone(tmp_path: Path, where: str) -> None:
    """Oracle: the training step's own norms. At the flagged step the loop validates in eval mode
    with gradients on (model.eval(), a forward, model.train()) before the training forward (then
    draws an augmentation from the global RNG, or not), or after it, before w.loss; the step trains
    with dropout on. Read at the step's first model call, the modes and RNG state were the
    validation's where it came first; read at the last call, the modes were where it came after:
    dropout replayed off, 9 of 12 norms off (found in two reviews). They are now the call's whose
    output the loss is computed from."""
    model, opt, gen = _dropped()
    steps: list[int] = []

    def validate() -> None:
        model.eval()
        compute_loss(model, batch(torch.Generator().manual_seed(99), model, 8))
        model.train()
        if where == "before, then a draw":
            torch.rand(3)  # an augmentation of the training batch, from the global RNG

    def each() -> None:
        steps.append(len(steps))
        if steps[-1] == 33 and where != "after":
            validate()

    def between() -> None:
        if steps[-1] == 33 and where == "after":
            validate()

    found = _flagged_at_33(model, opt, gen, tmp_path / "b", each=each, between=between)
    first = report_of(found).first_spike
    assert first is not None and first.step == 33
    assert replay(tmp_path / "b").mismatches(1e-6) == []


def test_a_bundle_of_the_previous_format_still_replays(tmp_path: Path) -> None:
    """A format-3 bundle (no modes, no loss scale: written before they were kept) was refused as an
    unknown format once format 4 came (found in review); it replays in training mode, unscaled, as
    it was written for. Oracle: the training step's own norms."""
    _bundle(tmp_path / "bundle")
    data_path, meta_path = tmp_path / "bundle" / "data.pt", tmp_path / "bundle" / "meta.json"
    data = torch.load(data_path, weights_only=False)
    del data["modes"], data["scales"]
    torch.save(data, data_path)
    meta = json.loads(meta_path.read_text())
    meta["format"] = "stabilitycheck-watch-bundle/3"
    meta_path.write_text(json.dumps(meta))
    assert replay(tmp_path / "bundle").mismatches(1e-6) == []
    meta["format"] = "stabilitycheck-watch-bundle/2"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UsageError, match="unknown bundle format"):
        replay(tmp_path / "bundle")


NET = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x.sum(-1)


def loss_fn(model, data):
    x, y = data
    return ((model(x) - y) ** 2).mean()
"""


def test_replay_says_which_code_changed_since_the_bundle(tmp_path: Path) -> None:
    """A model file edited after the bundle was written (its forward x1.5): replay reported norms
    that differ, read as a step that does not reproduce, with no word of the edit (found by an
    audit). The bundle keeps a digest of the source of compute_loss and the model's classes; replay
    names those that changed. Oracle: the edit made, replayed in a fresh process as a user does."""
    import importlib
    import subprocess
    import sys

    (tmp_path / "chgnet.py").write_text(NET)
    sys.path.insert(0, str(tmp_path))
    try:
        chgnet = importlib.import_module("chgnet")
        torch.manual_seed(0)
        model = chgnet.Net()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        gen = torch.Generator().manual_seed(0)
        with watch(
            model, opt, bundle=tmp_path / "b", compute_loss=chgnet.loss_fn, flush_every=8, report=None
        ) as w:
            for step in range(45):
                x = torch.randn(32, 8, generator=gen) * (50.0 if step == 40 else 1.0)
                data = (x, torch.sin(x.sum(-1)))
                loss = chgnet.loss_fn(model, data)
                w.loss(loss, batch=data)
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("chgnet", None)

    def replayed() -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "stabilitycheck", "replay", str(tmp_path / "b")]
        return subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)

    same = replayed()
    assert same.returncode == 0 and "changed" not in same.stdout, same.stdout + same.stderr
    (tmp_path / "chgnet.py").write_text(NET.replace("x = b(x)", "x = b(x) * 1.5"))
    edited = replayed()
    assert edited.returncode == 1 and "note: the code of chgnet.Net changed" in edited.stdout
    assert "chgnet.loss_fn" not in edited.stdout


def test_a_model_file_that_does_not_parse_leaves_its_digest_out_not_the_bundle(tmp_path: Path) -> None:
    """A model file being edited when the bundle is written (a syntax error): inspect.getsource raised
    SyntaxError, and the flagged step's bundle was not written (found in review). The file's classes
    get no digest; the others do."""
    import importlib
    import sys

    (tmp_path / "editing.py").write_text(NET)
    sys.path.insert(0, str(tmp_path))
    try:
        editing = importlib.import_module("editing")
        model = editing.Net()
        (tmp_path / "editing.py").write_text(NET + "\ndef broken(:\n")
        digests = watchstate.sources(model, compute_loss)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("editing", None)
    assert not any(name.startswith("editing.") for name in digests)
    assert any(name.endswith("compute_loss") for name in digests)


def test_a_bundle_of_the_first_step_has_a_valid_step(tmp_path: Path) -> None:
    """Step 0 (a model exploding on its first step) is a step a bundle is written for."""
    from stabilitycheck.replay import _check_meta

    meta = {"step": 0, "blocks": ["0"], "values": [1.0, None], "import_roots": [str(tmp_path)]}
    _check_meta(Path("b"), meta)  # no UsageError


def _loss_fn(model: torch.nn.Module, batch: object) -> torch.Tensor:  # importable: a bundle pickles it
    return model(batch).sum()


def _two_calls(tmp_path: object) -> tuple[object, torch.nn.Module, list[torch.Tensor], list[torch.Tensor]]:
    """A Snapshot that saw two model calls, torch drawing random numbers before each (dropout, a
    mask): the CPU RNG state at each call, read by torch itself, and each call's output."""
    from pathlib import Path

    from stabilitycheck.watchstate import Snapshot

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 3)
    snap = Snapshot(model, _loss_fn, Path(str(tmp_path)) / "bundle")
    states, outputs = [], []
    for mode in (True, False):  # the first call in training mode, the second in eval
        model.train(mode)
        torch.rand(5)  # a draw between the calls: each call starts from its own state
        states.append(torch.get_rng_state())
        snap.on_call()
        out = model(torch.ones(2, 3))
        snap.on_output(out)
        outputs.append(out)
    return snap, model, states, outputs


def test_the_replay_state_is_the_first_model_call_the_loss_is_computed_from(tmp_path: object) -> None:
    """Snapshot._made_by: the RNG state, modes and autocast dtype of the FIRST model call the loss is
    computed from (a loss over two calls replays from the first: starting at the second's state
    draws other dropout masks). Oracle: torch.get_rng_state() read at each call, and the modes set."""
    snap, _, states, outputs = _two_calls(tmp_path)
    rng, modes, amp = snap._made_by(outputs[0].sum() + outputs[1].sum())  # type: ignore[attr-defined]
    assert torch.equal(rng["cpu"], states[0]) and not torch.equal(rng["cpu"], states[1])
    assert modes == [True] and amp is None  # the Linear's mode at the first call
    rng, modes, _ = snap._made_by(outputs[1].sum())  # type: ignore[attr-defined]
    assert torch.equal(rng["cpu"], states[1]) and modes == [False]


def test_a_loss_with_no_graph_replays_from_the_first_calls_state_and_the_last_calls_modes(
    tmp_path: object,
) -> None:
    """Snapshot._made_by without a graph to follow (a loss passed detached or as a number): the first
    call's RNG state and the last call's modes (docstring). Oracle: torch.get_rng_state() at each call."""
    snap, _, states, outputs = _two_calls(tmp_path)
    rng, modes, _ = snap._made_by(float(outputs[1].detach().sum()))  # type: ignore[attr-defined]
    assert torch.equal(rng["cpu"], states[0]) and not torch.equal(rng["cpu"], states[1])
    assert modes == [False]


def test_a_micro_batch_replays_from_its_own_calls_not_an_earlier_micro_batchs(tmp_path: object) -> None:
    """Snapshot: the calls it pairs a loss with are those since the last micro-batch (on_batch starts
    afresh): a second micro-batch whose loss has no graph to follow replays from ITS first call's
    RNG state, not the first micro-batch's. Oracle: torch.get_rng_state() read at each call."""
    from pathlib import Path

    from stabilitycheck.watchstate import Snapshot

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 3)
    snap = Snapshot(model, _loss_fn, Path(str(tmp_path)) / "bundle")
    states = []
    for micro in range(2):
        torch.rand(5)
        states.append(torch.get_rng_state())
        snap.on_call()
        out = model(torch.ones(2, 3))
        snap.on_output(out)
        loss = out.sum()
        snap.on_batch(0, None, loss.detach(), None, loss if micro == 0 else None)
    (_, _, first, _, _, _), (_, _, second, _, _, _) = snap.batches[0]
    assert torch.equal(first["cpu"], states[0]) and torch.equal(second["cpu"], states[1])


def test_a_bundle_of_a_step_between_weight_measurements_keeps_the_last_measured_weight_norms(
    tmp_path: object,
) -> None:
    """With weights_every=2, the weight norms of an unmeasured step are the last measured ones,
    standing in (watching: 'the last measured weight norms stand in for this step's in its row'), as
    the host rule's rows do: a replay bundle written for such a step keeps them, not zeros. Oracle:
    torch.linalg.vector_norm of each block's weights at the last measured step (before its update)."""
    from pathlib import Path

    from stabilitycheck import watch
    from stabilitycheck.spikes import SpikeRule

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    blocks = [("a", model[0]), ("b", model[2])]
    bundle = Path(str(tmp_path)) / "bundle"
    norms = []
    with watch(
        model,
        opt,
        blocks=blocks,
        bundle=bundle,
        compute_loss=_loss_fn,
        weights_every=2,
        rule=SpikeRule(window=8, warmup=2),
        report=None,
    ) as w:
        for step in range(5):
            opt.zero_grad()
            with torch.no_grad():
                norms.append(
                    [
                        float(torch.linalg.vector_norm(torch.cat([p.flatten() for p in m.parameters()])))
                        for _, m in blocks
                    ]
                )
            loss = _loss_fn(model, torch.ones(8, 4)) * (1e6 if step == 3 else 1.0)  # step 3: a spike
            w.loss(loss)
            loss.backward()
            opt.step()
    meta = json.loads((bundle / "meta.json").read_text())
    assert meta["step"] == 3  # flagged first at step 3, whose weights were not measured (3 % 2)
    from stabilitycheck.distributed import Layout

    weight = Layout(len(blocks)).parts()["weight"]
    got = meta["values"][weight]
    assert got[:2] == pytest.approx(norms[2], rel=1e-6)  # step 2's: the last measured before step 3


def _clipped_run(path: Path, clips: bool = True, **options: Any) -> int:
    """44 steps of a loop clipping the gradient norm to 1.0 before each step, step 40's targets x50;
    the flagged step (40)."""
    torch.manual_seed(0)
    model, gen = MLP(), torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with watch(model, opt, bundle=path, compute_loss=compute_loss, report=None, **options) as w:
        for step in range(44):
            x, y = batch(gen, model)
            opt.zero_grad()
            loss = compute_loss(model, (x, y if step != 40 else 50 * y))
            w.loss(loss, batch=(x, y if step != 40 else 50 * y))
            loss.backward()
            if clips:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    first = report_of(w).first_spike
    assert first is not None
    return first.step


def test_a_loop_that_clips_replays_with_clip_grad_norm_and_is_named_without(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The watcher reads the gradients at the optimizer's step, after the loop's clip_grad_norm_; a
    replay, which never clipped, read every weight gradient of the flagged step x4.13 (its loss x2500
    passes the clip). Told clip_grad_norm=1.0, the bundle says so and the replay clips alike: every
    norm equal to the step's own. Not told, the replay differs (exit 1) and says that every weight
    gradient reads one factor below 1 and all else agrees, as clipping leaves them."""
    assert _clipped_run(tmp_path / "told", clip_grad_norm=1.0) == 40
    assert json.loads((tmp_path / "told" / "meta.json").read_text())["clip_grad_norm"] == 1.0
    told = replay(tmp_path / "told")
    assert told.step == 40 and told.mismatches(1e-6) == [] and told.gradient_factor() is None
    assert main(["replay", str(tmp_path / "told")]) == 0

    assert _clipped_run(tmp_path / "untold") == 40
    untold = replay(tmp_path / "untold")
    kinds = {untold.names[i][0] for i in untold.mismatches()}
    assert kinds == {"gradient", "grad_norm"}
    factor = untold.gradient_factor()
    assert factor is not None and factor < 1
    total = untold.names.index(("grad_norm", "(all)"))  # the recorded total is the clip's max_norm
    assert untold.recorded[total] == pytest.approx(1.0, rel=1e-5)
    assert factor == pytest.approx(1.0 / untold.replayed[total], rel=1e-5)
    capsys.readouterr()
    assert main(["replay", str(tmp_path / "untold")]) == 1
    assert "clip_grad_norm=max_norm" in capsys.readouterr().out


def test_clip_grad_norm_told_for_a_loop_that_does_not_clip_is_named_by_the_replay(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Told clip_grad_norm=1.0 by a loop that does not clip, the replay clipped and differed with no
    word of why (found by a review): the step's recorded total gradient norm is above the clip, which
    the replay names."""
    assert _clipped_run(tmp_path / "b", clips=False, clip_grad_norm=1.0) == 40
    result = replay(tmp_path / "b")
    total = result.recorded[result.names.index(("grad_norm", "(all)"))]
    assert result.mismatches() and total > 1.0 and result.over_the_clip() == total
    capsys.readouterr()
    assert main(["replay", str(tmp_path / "b")]) == 1
    assert f"total gradient norm was {total:.6g}, above clip_grad_norm=1" in capsys.readouterr().out
    assert _clipped_run(tmp_path / "c", clip_grad_norm=1.0) == 40
    assert replay(tmp_path / "c").over_the_clip() is None  # clipped: the total is the clip's
    names = [("grad_norm", "(all)")]  # bfloat16 gradients clipped to 1.0 read up to 1.0049: clipped
    assert Replayed(0, names, [1.0049], [1.0], clip=1.0).over_the_clip() is None
    assert Replayed(0, names, [1.02], [1.0], clip=1.0).over_the_clip() == 1.02


def test_a_differing_loss_is_no_gradient_factor() -> None:
    """gradient_factor names clipping only where the weight gradients alone differ, each by one
    factor below 1: not where the loss differs too, nor where the factors differ, nor above 1."""
    names = [("loss", "(loss)"), ("gradient", "a"), ("gradient", "b"), ("grad_norm", "(all)")]

    def factor(recorded: list[float], replayed: list[float]) -> float | None:
        return Replayed(0, names, recorded, replayed).gradient_factor()

    assert factor([1.0, 0.5, 0.25, 0.6], [1.0, 1.0, 0.5, 1.2]) == 0.5
    assert factor([2.0, 0.5, 0.25, 0.6], [1.0, 1.0, 0.5, 1.2]) is None  # the loss differs
    assert factor([1.0, 0.5, 0.3, 0.6], [1.0, 1.0, 0.5, 1.2]) is None  # two factors
    assert factor([1.0, 2.0, 1.0, 2.4], [1.0, 1.0, 0.5, 1.2]) is None  # above 1
    clipped = Replayed(0, names, [1.0, 0.5, 0.25, 0.6], [1.0, 1.0, 0.5, 1.2], clip=1.0)
    assert clipped.gradient_factor() is None  # the replay clipped already


@pytest.mark.parametrize("max_norm", [0, -1.0, math.inf, math.nan, "1.0", True])
def test_a_clip_grad_norm_that_is_no_positive_number_is_a_one_line_usage_error(max_norm: Any) -> None:
    with pytest.raises(UsageError, match="clip_grad_norm must be the max_norm") as caught:
        watch(MLP(), None, clip_grad_norm=max_norm)
    assert "\n" not in str(caught.value)
