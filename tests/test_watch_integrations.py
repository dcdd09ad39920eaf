"""The Lightning callback and the Hugging Face TrainerCallback: a short real fit()/train() with a
planted x50 fault, named at its step and block by the same watcher."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from torch import nn
from watch_models import MLP, Fault, batch

STEPS, AT, BLOCK = 60, 45, 2


def _data(n: int = STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    xs, ys = zip(*(batch(gen, MLP(), 32) for _ in range(n)), strict=True)
    return torch.cat(xs), torch.cat(ys)


def _regression(lightning: Any) -> Any:
    """A LightningModule fitting the MLP to a squared error with SGD (lightning: the imported package)."""

    class Module(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = MLP()

        def training_step(self, data: Any, index: int) -> torch.Tensor:
            x, y = data
            return ((self.net(x) - y) ** 2).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    return Module()


def _trainer(lightning: Any, tmp_path: Any, *callbacks: Any, **arguments: Any) -> Any:
    """A quiet CPU Lightning Trainer with `callbacks` (no logger, checkpoints, bars or summary)."""
    return lightning.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        default_root_dir=tmp_path,
        **arguments,
    )


# lightning's own pytree code uses a torch API that torch 2.13 deprecates: not ours to fix
@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")
def test_lightning_fit_names_the_planted_fault(tmp_path: Any) -> None:
    lightning = pytest.importorskip("lightning.pytorch")
    from stabilitycheck.integrations.lightning import WatchCallback

    torch.manual_seed(0)
    module = _regression(lightning)
    module.net.blocks[BLOCK].register_forward_hook(Fault(AT, count=True))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_data()), batch_size=32)
    callback = WatchCallback(report=None, log=tmp_path / "watch.jsonl")
    _trainer(lightning, tmp_path, callback, max_steps=STEPS).fit(module, loader)
    assert callback.report is not None and callback.report.steps == STEPS
    first = callback.report.first_spike
    assert first is not None, callback.report.text()
    assert (first.step, first.tensor, first.block) == (AT, "activation", f"net.blocks.{BLOCK}")


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")
def test_lightning_skip_puts_back_the_batchnorm_statistics_of_a_skipped_step(tmp_path: Any) -> None:
    """WatchCallback(skip=True) with a fused optimizer: training_step reaches the net through its own
    modules, so the callback tells each batch's start, where the buffers are taken; a NaN at step 45
    is skipped and the BatchNorm statistics stay what they were before it (without the tell they went
    NaN). Oracle: the buffers read by a step pre-hook at step 45 and at step 46, bit for bit."""
    lightning = pytest.importorskip("lightning.pytorch")
    from watch_models import BatchNormed

    from stabilitycheck.integrations.lightning import WatchCallback

    torch.manual_seed(0)
    module = _regression(lightning)
    module.net = BatchNormed()
    module.configure_optimizers = lambda: torch.optim.AdamW(module.parameters(), lr=1e-3, fused=True)
    module.net.blocks[1].register_forward_hook(Fault(AT, "nan", count=True))
    seen: list[list[torch.Tensor]] = []
    module.on_train_batch_start = lambda *_: seen.append([b.clone() for b in module.net.buffers()])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_data()), batch_size=32)
    callback = WatchCallback(report=None, skip=True)
    _trainer(lightning, tmp_path, callback, max_steps=STEPS).fit(module, loader)
    assert callback.report is not None and callback.report.skipped_steps == [AT]
    assert all(torch.equal(a, b) for a, b in zip(seen[AT], seen[AT + 1], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(seen[AT - 1], seen[AT], strict=True))  # can fail


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")
@pytest.mark.parametrize(("frozen", "edits"), [(False, False), (True, False), (False, True)])
def test_lightning_clips_after_the_step_closes_so_its_norms_are_before_clipping(
    tmp_path: Any, frozen: bool, edits: bool
) -> None:
    """gradient_clip_val: Lightning clips after on_before_optimizer_step, where the callback closes
    the step, so the watcher's own norms are the gradient's before clipping, and the clip it hears
    then is that step's, no later one's: no row takes it, also where the blocks are frozen and only
    the head trains (no gradient reaches a block output: each clip landed a row late, a review), or
    the module edits its gradients in place after the close (a row late too: a second review).
    Oracle: the grad_norm logged passes the clip value (a clipped norm could not)."""
    lightning = pytest.importorskip("lightning.pytorch")
    from stabilitycheck.integrations.lightning import WatchCallback

    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_data()), batch_size=32)
    callback = WatchCallback(report=None, log=tmp_path / "watch.jsonl")
    trainer = _trainer(lightning, tmp_path, callback, max_steps=STEPS, gradient_clip_val=0.01)
    module = _regression(lightning)
    if frozen:
        module.net.blocks.requires_grad_(False)
    if edits:  # gradients changed in place after the close, before Lightning's clip (noise, a rescale)
        module.on_before_optimizer_step = lambda optimizer: [p.grad.mul_(1.0) for p in module.parameters()]
    trainer.fit(module, loader)
    rows = [json.loads(line) for line in (tmp_path / "watch.jsonl").read_text().splitlines()]
    assert len(rows) == STEPS and all(row["grad_norm_before_clip"] is None for row in rows)
    assert min(row["grad_norm"] for row in rows) > 0.01


def test_hf_trainer_clips_before_the_step_closes_and_the_norm_before_it_is_logged(tmp_path: Any) -> None:
    """The Trainer clips to max_grad_norm (its default 1.0) before on_pre_optimizer_step closes the
    step: the watcher's norms are the clipped ones, the norm before clipping is heard and logged.
    Oracle, clip_grad_norm_'s own rule: where the norm before it is at most 1 the gradient is as it
    was (the logged grad_norm equals it), above 1 it is scaled to 1."""
    pytest.importorskip("transformers")
    from stabilitycheck.integrations.hf import WatchCallback

    torch.manual_seed(0)
    model = HFModel()
    model.net.blocks[BLOCK].register_forward_hook(Fault(AT, count=True))  # x50: a norm past 1
    callback = WatchCallback(report=None, log=str(tmp_path / "watch.jsonl"))
    _hf_trainer(model, callback, tmp_path).train()
    rows = [json.loads(line) for line in (tmp_path / "watch.jsonl").read_text().splitlines()]
    assert len(rows) == STEPS
    before = [row["grad_norm_before_clip"] for row in rows]
    assert all(b is not None for b in before) and max(before) > 1.0
    for row, b in zip(rows, before, strict=True):
        assert row["grad_norm"] == pytest.approx(min(b, 1.0), rel=1e-5)


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")
@pytest.mark.parametrize(
    ("accumulate", "precision", "own_loss"), [(1, "32-true", False), (2, "16-mixed", True)]
)
def test_a_lightning_bundle_replays_the_flagged_step(
    tmp_path: Any, accumulate: int, precision: str, own_loss: bool
) -> None:
    """training_step calls self.net, not the module's forward, adds noise from the global RNG and runs
    under the precision plugin's autocast: the bundle has each micro-batch, the weights the flagged
    step began with, its RNG state and autocast dtype, and replays the step's norms exactly, with
    the module's own training_step or a compute_loss given; at 16-mixed (float16 on CPU, its
    GradScaler at 2^8) the replay scales and autocasts as the step did."""
    lightning = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.plugins import MixedPrecision
    from lightning_models import NoisyRegression, squared_error

    from stabilitycheck.integrations.lightning import WatchCallback
    from stabilitycheck.replay import replay

    torch.manual_seed(0)
    x, y = _data(STEPS * accumulate)
    y[AT * accumulate * 32 : (AT * accumulate + 1) * 32] *= 50  # the flagged step's first micro-batch
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    given = {"compute_loss": squared_error} if own_loss else {}
    callback = WatchCallback(report=None, bundle=tmp_path / "bundle", **given)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    plugins = [MixedPrecision(precision, "cpu", scaler=scaler)] if precision == "16-mixed" else []
    trainer = _trainer(
        lightning, tmp_path, callback, max_steps=STEPS, accumulate_grad_batches=accumulate, plugins=plugins
    )
    trainer.fit(NoisyRegression(), loader)
    assert callback.report is not None and callback.report.first_spike is not None
    assert callback.report.first_spike.step == AT
    meta = json.loads((tmp_path / "bundle" / "meta.json").read_text())
    assert (meta["step"], meta["micro_batches"], meta["has_batch"]) == (AT, accumulate, True)
    replayed = replay(tmp_path / "bundle")
    assert replayed.step == AT and replayed.mismatches() == [], replayed.largest_difference()


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")
@pytest.mark.filterwarnings("ignore:`training_step` returned `None`:UserWarning")  # as meant here
def test_a_lightning_bundle_after_a_batch_training_step_skipped_replays(tmp_path: Any) -> None:
    """training_step returns None at batch 45 after drawing its noise (Lightning runs no backward, and
    at 16-mixed no optimizer step either, but counts it in global_step, as the watcher's rows do);
    batch 46, step 46, is flagged: its replay starts from the RNG state of its own training_step, not
    of the skipped one (the model call told at the skipped batch's start paired with the next loss:
    19 of 28 norms up to 0.22% off)."""
    lightning = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.plugins import MixedPrecision
    from lightning_models import SkipsABatch

    from stabilitycheck.integrations.lightning import WatchCallback
    from stabilitycheck.replay import replay

    torch.manual_seed(0)
    x, y = _data(STEPS + 1)
    y[(AT + 1) * 32 : (AT + 2) * 32] *= 50
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    callback = WatchCallback(report=None, bundle=tmp_path / "bundle")
    plugins = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8))]
    _trainer(lightning, tmp_path, callback, max_steps=STEPS, plugins=plugins).fit(SkipsABatch(), loader)
    assert callback.report is not None and callback.report.steps == STEPS
    assert callback.report.first_spike is not None and callback.report.first_spike.step == AT + 1
    replayed = replay(tmp_path / "bundle")
    assert replayed.step == AT + 1 and replayed.mismatches() == [], replayed.largest_difference()


class _DictLoader(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """The MLP's data as dicts {'x', 'y'}, one sample each, targets x50 at `spiked`."""

    def __init__(self, n: int, spiked: range) -> None:
        self.x, self.y = _data(n)
        self.y[spiked.start * 32 : spiked.stop * 32] *= 50

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i]}


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")
@pytest.mark.parametrize("module", ["EditsItsBatch", "EditsInPlace", "TakesKeywords"])
def test_a_lightning_bundle_replays_a_step_that_edits_its_batch_or_takes_keywords(
    tmp_path: Any, module: str
) -> None:
    """A training_step writing its noisy input back into a dict batch: the bundle kept the dict it
    edited, and the replay added the noise twice (21 of 28 norms off; a copy of the dict alone missed
    a tensor edited in place); one declared
    training_step(self, batch, **kwargs) was passed the index and raised. Found by a review."""
    lightning = pytest.importorskip("lightning.pytorch")
    import lightning_models

    from stabilitycheck.integrations.lightning import WatchCallback
    from stabilitycheck.replay import replay

    torch.manual_seed(0)
    data = _DictLoader(STEPS, range(AT, AT + 1))
    loader = torch.utils.data.DataLoader(data, batch_size=32)
    callback = WatchCallback(report=None, bundle=tmp_path / "bundle")
    if module == "TakesKeywords":  # its batches as (x, y), as squared_error reads them
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.x, data.y), batch_size=32)
    _trainer(lightning, tmp_path, callback, max_steps=STEPS).fit(getattr(lightning_models, module)(), loader)
    assert callback.report is not None and callback.report.first_spike is not None
    replayed = replay(tmp_path / "bundle")
    assert replayed.step == AT and replayed.mismatches() == [], replayed.largest_difference()


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")
@pytest.mark.parametrize("what", ["weight", "batch"])
def test_a_lightning_bundle_holds_what_the_modules_batch_start_hook_changed(tmp_path: Any, what: str) -> None:
    """The module's own on_train_batch_start runs after the callback's: a weight x50 (or a batch x100
    in place) there was missing from the bundle, taken at the callback's hook, and its replay was off
    by 0.995 (found by an audit). The micro-batch is told as the strategy's training_step begins."""
    lightning = pytest.importorskip("lightning.pytorch")
    from lightning_models import ChangesAtBatchStart

    from stabilitycheck.integrations.lightning import WatchCallback
    from stabilitycheck.replay import replay

    torch.manual_seed(0)
    x, y = _data(STEPS)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    module = ChangesAtBatchStart()
    module.at, module.what = AT, what
    callback = WatchCallback(report=None, bundle=tmp_path / "bundle")
    _trainer(lightning, tmp_path, callback, max_steps=STEPS).fit(module, loader)
    assert callback.report is not None and callback.report.first_spike is not None
    assert callback.report.first_spike.step == AT
    assert vars(module.trainer.strategy).get("training_step") is None  # the strategy as it was
    replayed = replay(tmp_path / "bundle")
    assert replayed.step == AT and replayed.mismatches() == [], replayed.largest_difference()


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")
def test_a_strategys_training_step_wrapped_by_the_user_is_called_and_kept(tmp_path: Any) -> None:
    """The callback wrapped the strategy class's training_step, bypassing a wrapper the user had put
    on the strategy instance (called 0 times in 50 steps), and removed it at the end (a review)."""
    lightning = pytest.importorskip("lightning.pytorch")
    from lightning_models import NoisyRegression

    from stabilitycheck.integrations.lightning import WatchCallback

    torch.manual_seed(0)
    x, y = _data(STEPS)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    trainer = _trainer(lightning, tmp_path, WatchCallback(report=None, bundle=tmp_path / "b"), max_steps=10)
    calls: list[int] = []
    own = trainer.strategy.training_step

    def mine(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return own(*args, **kwargs)

    trainer.strategy.training_step = mine
    trainer.fit(NoisyRegression(), loader)
    assert len(calls) == 10 and vars(trainer.strategy)["training_step"] is mine


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")
def test_two_bundle_callbacks_each_tell_every_micro_batch_once(tmp_path: Any) -> None:
    """Two WatchCallbacks with bundle= wrap the strategy in turn; the first, closed under the
    second's wrapper, left its own inside it, and reused on that trainer it told each micro-batch
    twice (100 tells in 50 steps: a second review). A wrapper of an ended run now tells nothing."""
    lightning = pytest.importorskip("lightning.pytorch")
    from lightning_models import NoisyRegression

    from stabilitycheck.integrations.lightning import WatchCallback

    torch.manual_seed(0)
    x, y = _data(STEPS)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    first, second = (WatchCallback(report=None, bundle=tmp_path / name) for name in ("b1", "b2"))
    trainer = _trainer(lightning, tmp_path, first, second, max_steps=5)
    module = NoisyRegression()
    trainer.fit(module, loader)
    told: list[int] = []
    tell = first._tell
    first._tell = lambda *a, **k: (told.append(1), tell(*a, **k))[1]  # type: ignore[method-assign]
    trainer.fit_loop.epoch_loop.max_steps = 10
    trainer.fit(module, loader)
    assert len(told) == 5 and first.report is not None and first.report.steps == 5


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")
@pytest.mark.filterwarnings("ignore:You are using the `dataloader_iter` step flavor")
@pytest.mark.filterwarnings("ignore:Found `dataloader_iter` argument")
def test_a_bundle_of_a_training_step_drawing_its_own_batches_is_refused_in_one_line(tmp_path: Any) -> None:
    """training_step(self, dataloader_iter) draws its batches out of the callback's sight: the bundle
    kept the iterator, and writing it failed on a closure of the callback's (a review)."""
    lightning = pytest.importorskip("lightning.pytorch")
    from lightning_models import DrawsItsOwn

    from stabilitycheck.errors import UsageError
    from stabilitycheck.integrations.lightning import WatchCallback

    x, y = _data(STEPS)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    trainer = _trainer(lightning, tmp_path, WatchCallback(report=None, bundle=tmp_path / "b"), max_steps=3)
    with pytest.raises(UsageError, match=r"training_step\(dataloader_iter\) draws its own") as caught:
        trainer.fit(DrawsItsOwn(), loader)
    assert "\n" not in str(caught.value)


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")
def test_a_lightning_bundle_that_cannot_replay_its_training_step_is_one_line(tmp_path: Any) -> None:
    """Manual optimization (training_step steps the optimizer) is refused with a bundle and no
    compute_loss when training starts; a training_step reading self.trainer fails its replay in one
    line naming compute_loss= (it was 'internal error: RuntimeError ... not attached to a Trainer').
    clip_grad_norm= is refused: the callback reads the gradients before Lightning clips them."""
    lightning = pytest.importorskip("lightning.pytorch")
    import lightning_models

    from stabilitycheck.errors import UsageError
    from stabilitycheck.integrations.lightning import WatchCallback
    from stabilitycheck.replay import replay

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_data(STEPS)), batch_size=32)
    for options, expected in (
        ({"bundle": tmp_path / "m"}, "under manual optimization needs compute_loss=fn"),
        ({"clip_grad_norm": 1.0}, "drop clip_grad_norm="),
    ):
        refused = _trainer(lightning, tmp_path, WatchCallback(report=None, **options), max_steps=2)
        module = lightning_models.Manual() if "bundle" in options else lightning_models.NoisyRegression()
        with pytest.raises(UsageError, match=expected) as caught:
            refused.fit(module, loader)
        assert "\n" not in str(caught.value)
    torch.manual_seed(0)
    x, y = _data(STEPS)
    y[AT * 32 : (AT + 1) * 32] *= 50
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    callback = WatchCallback(report=None, bundle=tmp_path / "b")
    _trainer(lightning, tmp_path, callback, max_steps=STEPS).fit(lightning_models.ReadsItsTrainer(), loader)
    with pytest.raises(UsageError, match="training_step raised RuntimeError outside its Trainer") as caught:
        replay(tmp_path / "b")
    assert "\n" not in str(caught.value) and "compute_loss=fn" in str(caught.value)


class HFModel(nn.Module):
    """A plain module shaped like a Hugging Face model: forward(x, labels) -> {'loss', 'logits'}."""

    def __init__(self) -> None:
        super().__init__()
        self.net = MLP()

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out = self.net(x)
        result = {"logits": out}
        if labels is not None:
            result["loss"] = ((out - labels) ** 2).mean()
        return result


def _hf_trainer(model: nn.Module, callback: Any, tmp_path: Any, spikes: int = 0, **arguments: Any) -> Any:
    """A Trainer fitting `model` to the MLP's data; `spikes` samples' targets x50."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    x, y = _data()
    y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))[:spikes]] *= 50
    dataset = [{"x": x[i], "labels": y[i]} for i in range(len(x))]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=STEPS,
        per_device_train_batch_size=32,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=True,
        **arguments,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=dataset, callbacks=[callback])


def test_hf_trainer_names_the_planted_fault(tmp_path: Any) -> None:
    pytest.importorskip("transformers")
    from stabilitycheck.integrations.hf import WatchCallback

    torch.manual_seed(0)
    model = HFModel()
    model.net.blocks[BLOCK].register_forward_hook(Fault(AT, count=True))
    callback = WatchCallback(report=None)
    _hf_trainer(model, callback, tmp_path).train()
    assert callback.report is not None and callback.report.steps == STEPS
    first = callback.report.first_spike
    assert first is not None, callback.report.text()
    assert (first.step, first.tensor, first.block) == (AT, "activation", f"net.blocks.{BLOCK}")


@pytest.mark.parametrize(("accumulation", "bf16"), [(1, False), (2, False), (2, True)])
def test_an_hf_trainer_bundle_replays_the_flagged_step(tmp_path: Any, accumulation: int, bf16: bool) -> None:
    """Trainer's callbacks see no batch: the callback passes each micro-batch's loss as its backward
    reached it with the inputs the model was called with, and the bundle replays the model on them
    (no compute_loss given): the first flagged step's norms exactly, each micro-batch's loss divided
    as Trainer divided it. In bf16, accelerate opens its autocast inside the model's forward: the
    bundle had none, and the replay in float32 read 20 of 28 norms off (found by a review)."""
    pytest.importorskip("transformers")
    from stabilitycheck.integrations.hf import WatchCallback
    from stabilitycheck.replay import replay
    from stabilitycheck.spikes import SpikeRule

    torch.manual_seed(0)
    # where Trainer's shuffle puts the 2 samples is its own: a short warm-up lets either be flagged
    callback = WatchCallback(report=None, bundle=tmp_path / "bundle", rule=SpikeRule(warmup=8))
    trainer = _hf_trainer(
        HFModel(), callback, tmp_path, spikes=2, gradient_accumulation_steps=accumulation, bf16=bf16
    )
    trainer.train()
    first = callback.report.first_spike if callback.report is not None else None
    assert first is not None
    meta = json.loads((tmp_path / "bundle" / "meta.json").read_text())
    assert (meta["step"], meta["micro_batches"], meta["has_batch"]) == (first.step, accumulation, True)
    replayed = replay(tmp_path / "bundle")
    assert replayed.step == first.step and replayed.mismatches() == [], replayed.largest_difference()


class _Dropped(HFModel):
    """HFModel with dropout on its input: each call draws from the global RNG."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return super().forward(self.drop(x), labels)


def two_calls(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """An R-Drop-style loss: the model called twice on the batch (two dropout masks), the second's loss."""
    first = model(x=batch["x"])["logits"]
    out = model(**batch)
    return out["loss"] + 0.0 * ((first - out["logits"]) ** 2).mean()


def test_an_hf_bundle_of_a_loss_calling_the_model_twice_replays(tmp_path: Any) -> None:
    """A Trainer whose compute_loss calls a dropout model twice per micro-batch: the callback told the
    watcher a new micro-batch at every model call, which dropped the first call's RNG state, and the
    replay drew other masks (20 of 28 norms off; found by a review). The autocast is told once."""
    transformers = pytest.importorskip("transformers")
    from stabilitycheck.integrations.hf import WatchCallback
    from stabilitycheck.replay import replay
    from stabilitycheck.spikes import SpikeRule

    class TwoCalls(transformers.Trainer):  # type: ignore[misc]
        def compute_loss(self, model: nn.Module, inputs: Any, return_outputs: bool = False, **kw: Any) -> Any:
            return two_calls(model, inputs)

    torch.manual_seed(0)
    callback = WatchCallback(
        report=None, bundle=tmp_path / "b", rule=SpikeRule(warmup=8), compute_loss=two_calls
    )
    plain = _hf_trainer(_Dropped(), callback, tmp_path, spikes=2)
    TwoCalls(
        model=plain.model, args=plain.args, train_dataset=plain.train_dataset, callbacks=[callback]
    ).train()
    assert callback.report is not None and callback.report.first_spike is not None
    replayed = replay(tmp_path / "b")
    assert replayed.mismatches() == [], replayed.largest_difference()


def test_an_hf_bundle_with_a_model_call_between_steps_replays(tmp_path: Any) -> None:
    """A callback calling the model with gradients on after each step (a metric): the loss, which
    carries no graph to its call, was paired with that call's RNG state, and the replay drew other
    dropout masks (20 norms off; found by a review). The callback pairs each loss with its own call."""
    transformers = pytest.importorskip("transformers")
    from stabilitycheck.integrations.hf import WatchCallback
    from stabilitycheck.replay import replay
    from stabilitycheck.spikes import SpikeRule

    class Metric(transformers.TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            with torch.enable_grad():
                model(x=torch.randn(4, 16))["logits"].sum()

    torch.manual_seed(0)
    callback = WatchCallback(report=None, bundle=tmp_path / "b", rule=SpikeRule(warmup=8))
    trainer = _hf_trainer(_Dropped(), callback, tmp_path, spikes=2)
    trainer.add_callback(Metric())
    trainer.train()
    assert callback.report is not None and callback.report.first_spike is not None
    replayed = replay(tmp_path / "b")
    assert replayed.mismatches() == [], replayed.largest_difference()


def test_a_lightning_batch_is_kept_as_its_own_elements_and_containers() -> None:
    """The batch a bundle keeps: each tensor's own elements (a deepcopy of a 64-element view copied the
    100 MB it views; found by a review), unchanged by an edit in place, its containers of their own
    type (a UserDict stays one), anything deepcopy refuses (a lock) kept as it is beside."""
    pytest.importorskip("lightning.pytorch")
    import threading
    from collections import UserDict

    from stabilitycheck.integrations.lightning import _kept

    big, lock = torch.zeros(1000, 64), threading.Lock()
    batch = UserDict({"x": big[3:4], "extra": lock, "pair": (big[5:6], 2)})
    kept = _kept(batch)
    batch["x"] += 1
    assert type(kept) is UserDict and kept["extra"] is lock and kept["pair"][1] == 2
    assert kept["x"].untyped_storage().nbytes() == 64 * 4 and float(kept["x"].abs().sum()) == 0.0


@pytest.mark.parametrize("accumulation", [1, 2])
def test_hf_trainer_losses_are_what_went_into_backward(tmp_path: Any, accumulation: int) -> None:
    """Oracle: Trainer's own training_loss, the mean over steps of each step's loss as backward got
    it (each micro-batch's divided by the accumulation steps). The log's losses average to it; with 2
    micro-batches a step they were each micro-batch's undivided loss summed (2x)."""
    pytest.importorskip("transformers")
    import json

    from stabilitycheck.integrations.hf import WatchCallback

    torch.manual_seed(0)
    callback = WatchCallback(report=None, log=tmp_path / "w.jsonl")
    trainer = _hf_trainer(HFModel(), callback, tmp_path, gradient_accumulation_steps=accumulation)
    out = trainer.train()
    losses = [json.loads(line)["loss"] for line in (tmp_path / "w.jsonl").read_text().splitlines()]
    assert len(losses) == STEPS
    assert sum(losses) / STEPS == pytest.approx(out.training_loss, rel=1e-5)


def test_hf_train_that_raises_is_closed_by_the_callback_as_a_context_manager(tmp_path: Any) -> None:
    """Trainer has no failure event: `with callback: trainer.train()` closes the watcher when the
    model raises at step 20: the 20 steps before are reported and logged, no hook is left."""
    pytest.importorskip("transformers")
    import json

    from stabilitycheck.integrations.hf import WatchCallback

    calls: list[int] = []

    def fail_at_20(module: nn.Module, args: Any, output: Any) -> None:
        calls.append(1)
        if len(calls) == 21:
            raise RuntimeError("planted failure")

    torch.manual_seed(0)
    model = HFModel()
    model.net.blocks[BLOCK].register_forward_hook(fail_at_20)
    hooks = [len(m._forward_hooks) for m in model.modules()]
    callback = WatchCallback(report=None, log=tmp_path / "watch.jsonl", flush_every=8)
    trainer = _hf_trainer(model, callback, tmp_path)
    with pytest.raises(RuntimeError, match="planted failure"), callback:
        trainer.train()
    assert callback.report is not None and callback.report.steps == 20
    rows = (tmp_path / "watch.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == list(range(20))
    assert [len(m._forward_hooks) for m in model.modules()] == hooks


def test_a_misspelled_callback_option_is_a_one_line_usage_error() -> None:
    """The callbacks build their watcher through watch(), which names an unknown option with a
    did-you-mean; they built it directly and raised a TypeError naming an internal class."""
    pytest.importorskip("lightning.pytorch")
    from types import SimpleNamespace

    from stabilitycheck.errors import UsageError
    from stabilitycheck.integrations.lightning import WatchCallback

    model = MLP()
    optimizers = [torch.optim.SGD(model.parameters(), lr=0.01)]
    trainer = SimpleNamespace(optimizers=optimizers, precision_plugin=SimpleNamespace(scaler=None))
    with pytest.raises(UsageError, match="no option 'flushevery' \\(did you mean 'flush_every'\\?\\)"):
        WatchCallback(flushevery=10).on_train_start(trainer, model)  # type: ignore[arg-type]


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")
def test_lightning_with_two_optimizers_is_refused_in_one_line(tmp_path: Any) -> None:
    """Manual optimization with two optimizers (a GAN's): every optimizer step closed a row, rows
    alternated between the two models, and with skip=True the second's steps read 'skipped' though
    its weights changed (found by a trial); closing rows on the first's steps alone still mixed the
    second's loss and stale gradients into them (a reviewer). The callback now refuses, in one line."""
    lightning = pytest.importorskip("lightning.pytorch")
    from stabilitycheck.errors import UsageError
    from stabilitycheck.integrations.lightning import WatchCallback

    class Two(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.first, self.second = MLP(depth=2), MLP(depth=2)

        def training_step(self, data: Any, index: int) -> None:
            x, y = data
            for net, opt in zip((self.first, self.second), self.optimizers(), strict=True):
                opt.zero_grad()
                self.manual_backward(((net(x) - y) ** 2).mean())
                opt.step()

        def configure_optimizers(self) -> list[torch.optim.Optimizer]:
            return [
                torch.optim.SGD(self.first.parameters(), lr=0.01),
                torch.optim.SGD(self.second.parameters(), lr=0.01),
            ]

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_data(2)), batch_size=32)
    trainer = _trainer(lightning, tmp_path, WatchCallback(report=None), max_epochs=1)
    with pytest.raises(UsageError, match="watches one optimizer's steps and the trainer has 2") as caught:
        trainer.fit(Two(), loader)
    assert "\n" not in str(caught.value)


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")
def test_lightning_16_mixed_passes_its_scaler_and_marks_the_steps_it_skips(tmp_path: Any) -> None:
    """Lightning's 16-mixed precision closes each step (on_before_optimizer_step) before its
    GradScaler's step(): found there, the scaler came a step late (an extra row, the first one not
    divided by the scale), and the steps it skipped on float16 overflow were flagged as non-finite
    gradients; the loss logged was the scaled one Lightning hands on_before_backward (x2^20). The
    callback passes the precision plugin's scaler and divides the loss by its scale. Oracle: the
    scaler's own record, its scale after each batch (down where it skipped), and each batch's loss
    as training_step returned it."""
    lightning = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.plugins import MixedPrecision

    from stabilitycheck.integrations.lightning import WatchCallback

    class Scales(lightning.Callback):
        def __init__(self) -> None:
            self.scales: list[float] = []
            self.losses: list[float] = []

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, *_: Any) -> None:
            self.scales.append(trainer.precision_plugin.scaler.get_scale())
            self.losses.append(float(outputs["loss"]))

    torch.manual_seed(0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20, growth_interval=4)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_data(12)), batch_size=32)
    callback, scales = WatchCallback(report=None, log=tmp_path / "watch.jsonl"), Scales()
    plugins = [MixedPrecision("16-mixed", "cpu", scaler=scaler)]
    trainer = _trainer(lightning, tmp_path, callback, scales, max_steps=12, plugins=plugins)
    trainer.fit(_regression(lightning), loader)
    skipped = [now < before for before, now in zip([2.0**20, *scales.scales], scales.scales, strict=False)]
    assert len(skipped) == 12 and any(skipped) and not all(skipped)
    report = callback.report
    assert report is not None and report.steps == 12
    assert report.scaler_skipped_steps == [i for i, s in enumerate(skipped) if s]
    assert report.flagged_steps == [] and report.first_nonfinite is None
    rows = [json.loads(line) for line in (tmp_path / "watch.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == pytest.approx(scales.losses, rel=1e-6)  # not x the loss scale
