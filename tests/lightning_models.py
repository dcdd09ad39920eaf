"""A LightningModule defined at the top level of a module, so that a replay bundle can load its
class by name (lightning is imported here: import this module after pytest.importorskip)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from watch_models import MLP


class NoisyRegression(pl.LightningModule):
    """The watch tests' MLP fitted to a squared error with SGD; training_step adds noise to the input
    from the global RNG and calls self.net, never the module's own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.net = MLP()

    def training_step(self, data: Any, index: int) -> torch.Tensor:
        return squared_error(self, data)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def squared_error(model: NoisyRegression, data: Any) -> torch.Tensor:
    """The module's loss on one batch (x, y), as a user's own compute_loss for a bundle."""
    x, y = data
    return ((model.net(x + 0.01 * torch.randn_like(x)) - y) ** 2).mean()


class SkipsABatch(NoisyRegression):
    """NoisyRegression whose training_step returns None at batch `skipped`: Lightning then runs no
    backward and no optimizer step for it, after its noise was drawn."""

    skipped = 45

    def training_step(self, data: Any, index: int) -> torch.Tensor | None:
        loss = super().training_step(data, index)
        return None if index == self.skipped else loss


class EditsItsBatch(NoisyRegression):
    """training_step takes a dict batch and writes the noisy input back into it."""

    def training_step(self, data: Any, index: int) -> torch.Tensor:
        data["x"] = data["x"] + 0.01 * torch.randn_like(data["x"])
        return ((self.net(data["x"]) - data["y"]) ** 2).mean()


class TakesKeywords(NoisyRegression):
    """training_step(self, batch, **kwargs): Lightning passes the batch alone."""

    def training_step(self, data: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        return squared_error(self, data)


class ReadsItsTrainer(NoisyRegression):
    """training_step reads self.trainer, which a replay has none of."""

    def training_step(self, data: Any, index: int) -> torch.Tensor:
        assert self.trainer.optimizers
        return squared_error(self, data)


class Manual(NoisyRegression):
    """Manual optimization: training_step steps the optimizer itself."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, data: Any, index: int) -> torch.Tensor:
        opt = self.optimizers()
        loss = squared_error(self, data)
        opt.zero_grad()  # type: ignore[union-attr]
        self.manual_backward(loss)
        opt.step()  # type: ignore[union-attr]
        return loss


class EditsInPlace(NoisyRegression):
    """training_step adds its noise to the batch's input tensor in place."""

    def training_step(self, data: Any, index: int) -> torch.Tensor:
        data["x"] += 0.01 * torch.randn_like(data["x"])
        return ((self.net(data["x"]) - data["y"]) ** 2).mean()


class ChangesAtBatchStart(NoisyRegression):
    """Its own on_train_batch_start, at batch `at`, scales block 1's weight x50 (`what` 'weight') or
    its batch's inputs x100 in place ('batch'); Lightning runs it after the callbacks' hook of the
    same name."""

    at, what = 45, "weight"

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.at and self.what == "weight":
            with torch.no_grad():
                self.net.blocks[1][0].weight.mul_(50.0)
        if batch_idx == self.at and self.what == "batch":
            batch[0].mul_(100.0)


class DrawsItsOwn(NoisyRegression):
    """training_step(self, dataloader_iter): it draws its batch itself."""

    def training_step(self, dataloader_iter: Any) -> torch.Tensor:  # type: ignore[override]
        data, _, _ = next(dataloader_iter)
        return squared_error(self, data)
