"""`WatchCallback` for Lightning (extra `lightning`): the watcher on `Trainer.fit`, closed at the end.

The loss comes from `on_before_backward`, the step is closed in `on_before_optimizer_step` (after
the closure's backward, before the update), so the norms are those the optimizer is about to use.
With bundle= (or skip= on a model with buffers), each micro-batch is told to the watcher as the
strategy's training_step begins
(training_step reaches the model through its own modules, not the LightningModule's forward; told at
the callback's `on_train_batch_start`, the module's own hook ran after it, and weights or a batch it
changed there were missing from the bundle: replays off by 0.995) and passed with its loss; without
compute_loss the bundle replays the module's own training_step (`training_step_loss`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, MutableMapping
from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature

from stabilitycheck.errors import UsageError
from stabilitycheck.watching import Watcher, watch
from stabilitycheck.watchlog import Report


class StepBatch(NamedTuple):
    """A bundle's batch where its compute_loss is `training_step_loss`: training_step's arguments."""

    batch: Any
    batch_idx: int


def training_step_loss(model: pl.LightningModule, batch: StepBatch) -> torch.Tensor:
    """The default compute_loss of a bundle: the module's own training_step on the batch, given its
    index where training_step takes one, as Lightning calls it; its loss (a dict's 'loss')."""
    takes_index = is_param_in_hook_signature(model.training_step, "batch_idx", min_args=2)  # as Lightning
    try:
        output = model.training_step(*((batch.batch, batch.batch_idx) if takes_index else (batch.batch,)))
    except Exception as exc:  # a step reading self.trainer, which a replay has none of
        raise UsageError(
            f"replay: the module's training_step raised {type(exc).__name__} outside its Trainer ({exc}); "
            "write the bundle with WatchCallback(compute_loss=fn), fn(model, batch) -> the loss"
        ) from None
    loss = output["loss"] if isinstance(output, Mapping) else output
    if not isinstance(loss, torch.Tensor):
        raise UsageError(
            f"replay: training_step returned {type(output).__name__}, no loss tensor; pass "
            "WatchCallback(compute_loss=fn) with fn(model, batch) -> the loss, a module-level function"
        )
    return loss


def _kept(batch: Any) -> Any:
    """A copy of the batch as training_step gets it, which may edit it, in place too (`data["x"] +=
    noise`, in a dict or a UserDict such as a BatchEncoding: a reference replayed the noise twice, 21
    of 28 norms off): each tensor's own elements (a deepcopy of a view copied the whole dataset it
    views, 100 MB a step), its containers of their own type, anything else as it is."""
    if isinstance(batch, torch.Tensor):
        return batch.detach().clone()
    if isinstance(batch, MutableMapping):
        kept = copy.copy(batch)  # its own type: a UserDict, a BatchEncoding
        for key in list(kept):
            kept[key] = _kept(batch[key])
        return kept
    if isinstance(batch, tuple | list):
        items = [_kept(item) for item in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)  # a namedtuple
    return batch


class WatchCallback(pl.Callback):
    """`Trainer(callbacks=[WatchCallback(log="watch.jsonl")])`; takes `watch`'s options (with bundle=,
    compute_loss defaults to the module's training_step)."""

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.watcher: Watcher | None = None
        self.report: Report | None = None
        self._batch: Any = None  # this micro-batch, for a bundle
        self._strategy: Any = None  # the strategy whose training_step tells the micro-batches (bundle=)
        self._own: Any = None  # what its instance held as training_step before, put back at the end
        self._told: Any = None  # the wrapper this run put there

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        if len(trainer.optimizers) > 1:  # its rows would mix the others' losses and stale gradients
            raise UsageError(
                f"WatchCallback watches one optimizer's steps and the trainer has {len(trainer.optimizers)} "
                "(manual optimization); watch one of them in your module instead: open "
                "stabilitycheck.watch(self.generator, opt_g) in on_train_start and close() it in on_train_end"
            )
        # its precision plugin's GradScaler ('16-mixed'), given: the callback closes each step before
        # the scaler's step(), where a scaler found would come a step late
        options = {"scaler": getattr(trainer.precision_plugin, "scaler", None), **self.options}
        if options.get("clip_grad_norm") is not None:
            raise UsageError(
                "WatchCallback reads the gradients before Lightning clips them (gradient_clip_val), so a "
                "replay must not clip: drop clip_grad_norm="
            )
        if options.get("bundle") is not None and is_param_in_hook_signature(
            pl_module.training_step, "dataloader_iter", explicit=True
        ):  # it draws its own batches, which no callback sees
            raise UsageError(
                "WatchCallback(bundle=...) keeps each micro-batch, and a training_step(dataloader_iter) "
                "draws its own, out of the callback's sight; take batches as training_step(batch, "
                "batch_idx), or drop bundle="
            )
        if options.get("bundle") is not None and options.get("compute_loss") is None:
            if not pl_module.automatic_optimization:  # its training_step steps the optimizer itself
                raise UsageError(
                    "WatchCallback(bundle=...) under manual optimization needs compute_loss=fn, "
                    "fn(model, batch) -> the loss (a module-level function): training_step steps the "
                    "optimizer itself, which a replay must not"
                )
            options["compute_loss"] = training_step_loss
        self.watcher = watch(pl_module, optimizer, hook_optimizer=False, **options).__enter__()
        context = getattr(trainer.precision_plugin, "autocast_context_manager", None)
        if self.watcher.snapshot is not None and context is not None:
            # training_step runs under the precision plugin's autocast, opened after each batch is told
            self.watcher.snapshot.run_under(context().fast_dtype)
        if self.watcher.snapshot is not None or self.watcher.buffers:  # bundle=, or skip= with buffers
            self._strategy = trainer.strategy
            self._own = vars(self._strategy).get("training_step")  # a wrapper of the user's, kept
            step = self._strategy.training_step

            def told(*args: Any, **kwargs: Any) -> Any:
                if self._told is told:  # this run's: one left inside another's wrapper says nothing
                    self._tell(*args, **kwargs)
                return step(*args, **kwargs)

            self._strategy.training_step = self._told = told  # on this instance, for the run

    def _tell(self, batch: Any = None, batch_idx: int = 0, *_: Any, **kwargs: Any) -> None:
        """A micro-batch begins: training_step's batch and index (Lightning passes them by position),
        after every hook of the batch, the module's own on_train_batch_start too."""
        if self.watcher is not None and (self.watcher.snapshot is not None or self.watcher.buffers):
            self.watcher.batch_start()  # the state a skipped step's buffers are put back to, too
        if self.watcher is not None and self.watcher.snapshot is not None:
            batch = _kept(kwargs.get("batch", batch))
            default = self.watcher.snapshot.compute_loss is training_step_loss
            self._batch = StepBatch(batch, kwargs.get("batch_idx", batch_idx)) if default else batch

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any) -> None:
        if self.watcher is not None:
            # at 16-mixed Lightning hands the loss scaled by its GradScaler: the loss is that / the scale
            scaler = self.watcher.scaler
            unscaled = loss if scaler is None else loss / scaler._get_scale_async()
            self.watcher.loss(unscaled, batch=self._batch)
            self._batch = None

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if self.watcher is not None:
            self.watcher.before_step()

    def _close(self) -> None:
        if self._strategy is not None:
            # wrapped again since (another callback's), ours stays inside it, inert
            if vars(self._strategy).get("training_step") is self._told:
                if self._own is None:
                    vars(self._strategy).pop("training_step", None)
                else:
                    self._strategy.training_step = self._own
            self._strategy = self._own = self._told = None
        if self.watcher is not None:
            self.report = self.watcher.close()
            self.watcher = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._close()  # an interrupted run still writes what it found
