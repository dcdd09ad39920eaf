"""`WatchCallback` for the Hugging Face Trainer (extra `hf`): the watcher from `on_train_begin` to
`on_train_end`. The loss is the model's output (`output.loss`, as Trainer computes it when the batch
has labels) as it went into backward(): times the gradient that reaches it, so Trainer's division
by the accumulation steps (or not, where the model normalises over the accumulated batch) is
followed, the GradScaler's loss scale divided out, and a forward that no backward follows (an
evaluation with labels) adds nothing. The step is closed in `on_pre_optimizer_step`, which Trainer
calls after its gradient clipping, so the weight-gradient norms are the clipped ones (the activation norms and
their gradients are not affected by clipping); the norm before clipping is heard from the clip call
(watchclip) and logged beside them. Each micro-batch's loss is passed as its backward
reaches it, with the inputs the model was called with as its batch (a replay bundle's; without
compute_loss the bundle replays the model on them, `output_loss`).

Trainer has no callback event for a failed train() (transformers' TrainerCallback has none), so a
run that raises never reaches `on_train_end`: use the callback as a context manager around
`train()` (or call `close()` in a `finally:`), which closes the watcher, removes its hooks and
writes the log and the report of what it saw.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from stabilitycheck.watching import Watcher, watch
from stabilitycheck.watchlog import Report


def _loss_of(output: Any) -> Any:
    """The loss a model's output holds (a ModelOutput's or a dict's 'loss'), else None."""
    return output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)


def output_loss(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The default compute_loss of a bundle: the model called on the inputs as Trainer calls it
    (`model(**inputs)`), its output's loss."""
    loss: torch.Tensor = _loss_of(model(**batch))
    return loss


class WatchCallback(TrainerCallback):  # type: ignore[misc, unused-ignore]  # untyped before transformers 5
    """`Trainer(..., callbacks=[cb := WatchCallback(log="watch.jsonl")])`, then `with cb: trainer.train()`
    (so a failed run is closed too); takes `watch`'s options."""

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.watcher: Watcher | None = None
        self.report: Report | None = None
        self._handles: list[Any] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model: nn.Module = kwargs["model"]
        wrapper = kwargs.get("optimizer")
        optimizer = getattr(wrapper, "optimizer", wrapper)  # accelerate's wrapper holds the torch one
        options = {"scaler": getattr(wrapper, "scaler", None), **self.options}  # accelerate's, if any
        if options.get("bundle") is not None and options.get("compute_loss") is None:
            options["compute_loss"] = output_loss
        if args.max_grad_norm is not None and args.max_grad_norm > 0:  # Trainer clips before the step
            options.setdefault("clip_grad_norm", args.max_grad_norm)
        self.watcher = watch(model, optimizer, hook_optimizer=False, **options).__enter__()
        self._handles.append(model.register_forward_hook(self._on_output, with_kwargs=True))
        if self.watcher.snapshot is not None and (args.bf16 or args.fp16):
            # accelerate opens its autocast inside the model's forward, after any hook: the bundle is
            # told the dtype (a bf16 step replayed in float32 read 20 of 28 norms off)
            self.watcher.snapshot.run_under(torch.bfloat16 if args.bf16 else torch.float16)

    def _on_output(self, module: nn.Module, args: Any, inputs: dict[str, Any], output: Any) -> None:
        loss = _loss_of(output)
        if self.watcher is not None and isinstance(loss, torch.Tensor) and loss.requires_grad:
            value, batch = loss.detach(), None if args else dict(inputs)
            loss.register_hook(lambda grad: self._passed(value * grad, batch))  # type: ignore[no-untyped-call]

    def _passed(self, loss: torch.Tensor, batch: dict[str, Any] | None) -> None:
        """A micro-batch's loss as its backward reached it, the loss scale divided out."""
        if self.watcher is not None:
            scaler = self.watcher.scaler
            scale = scaler._get_scale_async() if scaler is not None else None
            self.watcher.loss(loss if scale is None else loss / scale, batch=batch)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._between()

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._between()

    def _between(self) -> None:
        """A micro-batch begins: the loss passed carries no graph to its model call, so the bundle
        takes the first call since here (not one made between steps, a metric's with gradients)."""
        if self.watcher is not None and self.watcher.snapshot is not None:
            self.watcher.snapshot.between()

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.watcher is not None:
            self.watcher.before_step()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.close()

    def close(self) -> Report | None:
        """Close the watcher (its hooks off, the log and report written); idempotent. Returns the
        report (None if training never began)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.watcher is not None:
            self.report = self.watcher.close()
            self.watcher = None
        return self.report

    def __enter__(self) -> WatchCallback:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
