"""`watch(model, optimizer)`: the probe's instruments on a user's own training loop.

Per step, on the device: the norm of every block output and of its gradient, the per-block and
total weight-gradient norms, the per-block weight norms and the loss, as squared norms in one
float64 row (stabilitycheck.watchcapture: the hooks, and the norms in a few fused calls).
Single-process, the spike rule (stabilitycheck.spikes) runs on the device too, so `skip=True` can
skip a flagged step without a host sync. Rows are buffered on the device and read every
`flush_every` steps (one read; under torch.distributed one all_gather before it);
stabilitycheck.watchlog turns them into the log, the report and the heatmap.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

import torch
from torch import nn

from stabilitycheck import distributed
from stabilitycheck.distributed import Layout
from stabilitycheck.errors import UsageError
from stabilitycheck.recording import block_of
from stabilitycheck.spikes import SpikeRule
from stabilitycheck.subject import find_blocks
from stabilitycheck.watchcapture import Capture
from stabilitycheck.watchlog import Log, Report
from stabilitycheck.watchstate import Snapshot, check_replayable

FLUSH_EVERY = 50  # one host read per 50 steps: < 1 us/step amortised, and a finding is out within 50 steps


class Watcher:
    """The context manager `watch` returns; see `watch` for the arguments."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        *,
        blocks: Sequence[tuple[str, nn.Module]] | None = None,
        rule: SpikeRule | None = None,
        flush_every: int = FLUSH_EVERY,
        weights_every: int | None = None,
        log: str | Path | None = None,
        heatmap: str | Path | None = None,
        bundle: str | Path | None = None,
        compute_loss: Any = None,
        skip: bool = False,
        report: TextIO | None = sys.stderr,
        hook_optimizer: bool = True,
    ) -> None:
        if flush_every < 1:
            raise UsageError(f"watch: flush_every must be >= 1, got {flush_every}")
        # weight norms cost a pass over every parameter, as much as the gradient norms: by default
        # they are measured once per flush interval (every step for a replay bundle, which replays them)
        self.weights_every = weights_every or (1 if bundle is not None else flush_every)
        if self.weights_every < 1:
            raise UsageError(f"watch: weights_every must be >= 1, got {weights_every}")
        self.model, self.optimizer, self.rule = model, optimizer, rule or SpikeRule()
        self.blocks = tuple(blocks) if blocks is not None else find_blocks(model)[0]
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise UsageError("watch: the model has no parameters that require grad: nothing to watch")
        self.layout = Layout(len(self.blocks))
        self.device = self.params[0].device
        self.rank, self.world = distributed.world()
        self.flush_every, self.skip, self.hook_optimizer = flush_every, skip, hook_optimizer
        n = len(self.blocks)
        self.owner = [b if b >= 0 else n for b in block_of(self.params, self.blocks)]
        copies = [distributed.local(p)[1] for p in self.params]
        grad_slots = [self.layout.parts()["gradient"].start + b for b in self.owner]
        weight_slots = [self.layout.parts()["weight"].start + b for b in self.owner]
        scale = [1.0 / c for c in copies] * 2  # gradients, then weights
        self.capture = Capture(self.blocks, self.params, self.layout.width, grad_slots + weight_slots, scale)
        self.fused = bool(optimizer is not None and optimizer.defaults.get("fused"))
        self._check_options(bundle, compute_loss)
        # skip= and bundle= need each step's flag on the device: the rule runs there, per step; else
        # it runs at the flush on the host, vectorised over the flushed steps (spikes.update_many)
        on_device = self.skip or bundle is not None
        width = self.layout.n_series * 2 if on_device else self.layout.width
        self.buffer = torch.zeros(flush_every, width, dtype=torch.float64, device=self.device)
        self.state = self.rule.state(self.layout.n_series, self.device) if on_device else None
        self.names = [name for name, _ in self.blocks]
        self.out = Log(self.layout, self.names, self.rule, log, heatmap, report, self.rank, self.world, skip)
        self.snapshot = Snapshot(model, compute_loss, Path(bundle)) if bundle is not None else None
        self.step = 0  # optimizer steps seen
        self.host_reads = 0
        self._filled = 0
        self._loss: torch.Tensor | None = None
        self._loss_seen = False
        self.weights_measured = True
        self._last_weights = torch.zeros(0)
        self._handles: list[Any] = []
        self._original_step: Any = None
        self.report: Report | None = None

    def _check_options(self, bundle: Any, compute_loss: Any) -> None:
        if self.world > 1 and (self.skip or bundle is not None):
            raise UsageError(
                "watch: skip= and bundle= are single-process only (under torch.distributed the rule "
                "runs at each flush, on every rank's rows); drop them, or watch a single-process run"
            )
        if bundle is not None and compute_loss is None:
            raise UsageError(
                "watch: bundle= needs compute_loss=fn(model, batch) -> loss (a module-level function) "
                "and w.loss(loss, batch=batch) each step, so `stabilitycheck replay` can re-run the step"
            )
        if bundle is not None:
            check_replayable(self.model, compute_loss)
        if self.skip and self.optimizer is None:
            raise UsageError("watch: skip=True needs the optimizer whose steps it skips")
        if self.skip and not self.fused:
            if not self.hook_optimizer:
                raise UsageError(
                    "watch: skip=True through a callback needs a fused optimizer (e.g. "
                    "torch.optim.AdamW(..., fused=True)): its found_inf input skips a step on the device"
                )
            warnings.warn(
                f"watch: skip=True with a non-fused {type(self.optimizer).__name__}: deciding costs one host "
                "sync per step (counted in host_reads); pass fused=True to skip on the device",
                stacklevel=3,
            )

    # ------------------------------------------------------------------------------------ hooks

    def __enter__(self) -> Watcher:
        self._handles += self.capture.attach()
        if self.snapshot is not None:
            self._handles.append(self.model.register_forward_pre_hook(self._on_model_call))
        if self.optimizer is not None:
            if self.hook_optimizer and self.skip and not self.fused:
                self._original_step = self.optimizer.step
                self.optimizer.step = self._synced_step  # type: ignore[method-assign]
            elif self.hook_optimizer:
                self._handles.append(self.optimizer.register_step_pre_hook(self._pre_hook))
            if self.snapshot is not None:
                self._handles.append(self.optimizer.register_step_post_hook(lambda *_: self.after_step()))
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> Report:
        """Remove the hooks, flush what is buffered, write the report and the heatmap; idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._original_step is not None and self.optimizer is not None:
            self.optimizer.step = self._original_step  # type: ignore[method-assign]
            self._original_step = None
        if self.fused and self.skip and self.optimizer is not None:
            self.optimizer.__dict__.pop("found_inf", None)
        self.flush()
        if self.report is None:
            self.report = self.out.finish(self.host_reads)
        return self.report

    def _on_model_call(self, module: nn.Module, args: Any) -> None:
        if torch.is_grad_enabled() and self.snapshot is not None:
            self.snapshot.on_call(self.step)

    def loss(self, loss: torch.Tensor, batch: Any = None) -> None:
        """Record this step's loss (summed over micro-batches) and, for a replay bundle, its batch."""
        value = loss.detach().reshape(())
        value = value if value.dtype in (torch.float32, torch.float64) else value.float()
        self._loss = value if self._loss is None else self._loss + value
        if self.snapshot is not None:
            self.snapshot.on_batch(self.step, batch, value)

    # ----------------------------------------------------------------------------------- a step

    def _close(self, row: torch.Tensor) -> None:
        """Close this step's measurements (see Capture); `row` is its zeroed row (see Layout)."""
        self.capture.close_step(row, self._loss, self.weights_measured)
        self._loss_seen, self._loss = self._loss is not None, None

    def before_step(self) -> torch.Tensor | None:
        """Close the step: measure, apply the rule on the device (single process), buffer the row.
        Returns the device flag 'this step is flagged' (single process), else None."""
        self.weights_measured = self.step % self.weights_every == 0
        flagged = None
        slot = self._filled
        if self.state is None:
            self._close(self.buffer[slot])  # zeroed at the last flush; written at the next
        else:
            row = torch.zeros(self.layout.width, dtype=torch.float64, device=self.device)
            self._close(row)
            self.capture.settle(row.unsqueeze(0))
            series = distributed.to_series(row.unsqueeze(0), self.layout).squeeze(0)
            weight = self.layout.parts()["weight"]
            if self.weights_measured:
                self._last_weights = series[weight].clone()
            else:  # the last measured weight norms stand in for this step's
                series[weight] = self._last_weights
            flags = self.rule.update(self.state, series)
            self.buffer[slot].copy_(torch.cat([series, flags.double()]))
            flagged = flags.any()
            if self.skip and self.fused and self.optimizer is not None:
                self.optimizer.found_inf = flagged.float()  # type: ignore[attr-defined]
            if self.snapshot is not None:
                self.snapshot.on_flag(flagged)
        self.out.on_step(self._loss_seen, self.weights_measured)
        self._loss_seen = False
        self.step += 1
        self._filled += 1
        if self._filled == self.flush_every:
            self.flush()
        return flagged

    def _pre_hook(self, *_: Any) -> None:
        self.before_step()

    def after_step(self) -> None:
        """After the optimizer's update: the bundle's copy of 'the state before the next step'."""
        if self.snapshot is not None:
            self.snapshot.after_update()

    def _synced_step(self, *args: Any, **kwargs: Any) -> Any:
        """optimizer.step for skip=True on a non-fused optimizer: one host sync to decide."""
        flagged = self.before_step()
        self.host_reads += 1
        if flagged is not None and bool(flagged):
            return None
        return self._original_step(*args, **kwargs)

    def flush(self) -> None:
        """Read the buffered steps (one host read; one all_gather first under torch.distributed)."""
        n, self._filled = self._filled, 0
        if n == 0:
            return
        data = self.buffer[:n]
        if self.state is None:
            self.capture.settle(data)
            data = distributed.gather(data)
        self.host_reads += 1
        host = data.tolist()  # the one host read of this flush
        if self.state is None:
            self.buffer.zero_()  # before_step adds each step's squares into its zeroed row
        first = self.step - n
        if self.state is None:
            self.out.add_ranks(first, host)
        else:
            self.out.add(first, host)
        if self.snapshot is not None:
            self.snapshot.write_if_flagged(
                self.out.first_flag, first, n, self.out.first_flag_values, self.names
            )


def watch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    **options: Any,
) -> Watcher:
    """Watch a training loop: `with watch(model, opt, log="watch.jsonl") as w: ... w.loss(loss) ...`.

    Options: blocks (default: found like the probe finds them), rule (a SpikeRule), flush_every (50),
    weights_every (steps between weight-norm measurements; default flush_every, 1 with a bundle),
    log (JSONL path, a row per step), heatmap (PNG path; needs the `plot` extra), bundle (a replay
    bundle path, written for the first flagged step; needs compute_loss), skip (skip flagged steps;
    on the device for fused optimizers), report (a stream for the report at exit; None for none),
    hook_optimizer (False when a callback calls before_step, as the Lightning and HF adapters do).
    """
    return Watcher(model, optimizer, **options)
