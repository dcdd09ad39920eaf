"""`WatchCallback` for Lightning (extra `lightning`): the watcher on `Trainer.fit`, closed at the end.

The loss comes from `on_before_backward`, the step is closed in `on_before_optimizer_step` (after
the closure's backward, before the update), so the norms are those the optimizer is about to use.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from stabilitycheck.errors import UsageError
from stabilitycheck.watching import Watcher, watch
from stabilitycheck.watchlog import Report


class WatchCallback(pl.Callback):
    """`Trainer(callbacks=[WatchCallback(log="watch.jsonl")])`; takes `watch`'s options."""

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.watcher: Watcher | None = None
        self.report: Report | None = None

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
        self.watcher = watch(pl_module, optimizer, hook_optimizer=False, **options).__enter__()

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any) -> None:
        if self.watcher is not None:
            # at 16-mixed Lightning hands the loss scaled by its GradScaler: the loss is that / the scale
            scaler = self.watcher.scaler
            self.watcher.loss(loss if scaler is None else loss / scaler._get_scale_async())

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if self.watcher is not None:
            self.watcher.before_step()

    def _close(self) -> None:
        if self.watcher is not None:
            self.report = self.watcher.close()
            self.watcher = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._close()  # an interrupted run still writes what it found
