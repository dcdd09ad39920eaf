"""`watch(model, optimizer)`: the probe's instruments on a user's own training loop.

Per step, on the device: the norm of every block output and of its gradient, the per-block and
total weight-gradient norms, the per-block weight norms and the loss, as squared norms in one
float64 row (stabilitycheck.watchcapture: the hooks, and the norms in a few fused calls).
Single-process, the spike rule (stabilitycheck.spikes) runs on the device too, so `skip=True` can
skip a flagged step without a host sync. Rows are buffered on the device and read every
`flush_every` steps (one read; under torch.distributed one all_gather before it);
stabilitycheck.watchlog turns them into the log, the report and the heatmap; stabilitycheck.watchpatch
closes each step from the user's optimizer and GradScaler.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

import torch
from torch import nn
from torch.amp.grad_scaler import OptState

from stabilitycheck import distributed
from stabilitycheck._validation import describe
from stabilitycheck.alarms import Terminated, Termination, signals_held
from stabilitycheck.blocks import BYPASSED, find_blocks, own_blocks, shown_blocks
from stabilitycheck.carrying import version_of
from stabilitycheck.distributed import Layout
from stabilitycheck.errors import UsageError, did_you_mean, no_trainable
from stabilitycheck.hooking import callers_level
from stabilitycheck.layout import block_of
from stabilitycheck.nesting import refusing_inside
from stabilitycheck.norms import dense
from stabilitycheck.spikes import SpikeRule, noisier, unmeasured
from stabilitycheck.watchbuffers import Buffers
from stabilitycheck.watchcapture import Capture
from stabilitycheck.watchclip import ClipLog, Listening
from stabilitycheck.watchlog import Log, Report, in_call_order, merged_calls
from stabilitycheck.watchoptions import (
    MAX_FLUSH_EVERY,
    check_arguments,
    check_clip,
    check_loss,
    check_modes,
    check_optimizer_params,
    check_skip,
    count,
)
from stabilitycheck.watchpatch import StepHooks
from stabilitycheck.watchstate import Snapshot

FLUSH_EVERY = 50  # one host read per 50 steps: < 1 us/step amortised, and a finding is out within 50 steps


class _Stderr:
    """The default report stream: sys.stderr as it is when watch() is called."""

    def __repr__(self) -> str:
        return "sys.stderr"


STDERR = _Stderr()


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
        report: TextIO | _Stderr | None = STDERR,
        hook_optimizer: bool = True,
        scaler: torch.amp.GradScaler | None = None,
        clip_grad_norm: float | None = None,
    ) -> None:
        if isinstance(report, _Stderr):  # sys.stderr when watch is called, not when this module was
            report = sys.stderr  # imported (a test's captured stream then, closed since)
        check_arguments(model, optimizer, rule, report, scaler)
        flush_every = count("flush_every", flush_every, MAX_FLUSH_EVERY)
        # weight norms cost a pass over every parameter, as much as the gradient norms: by default
        # they are measured once per flush interval (every step for a replay bundle, which replays them)
        default = 1 if bundle is not None else flush_every
        self.weights_every = default if weights_every is None else count("weights_every", weights_every)
        self.model, self.optimizer, self.rule = model, optimizer, rule or SpikeRule()
        if blocks is not None:
            self.blocks, chosen = own_blocks(model, blocks, "watch"), "given by blocks="
        else:
            self.blocks, found = find_blocks(model)
            chosen = f"as found, {found.removeprefix('blocks: ')}; blocks= watches others"
        self._blocks_given = blocks is not None
        self._calls: list[int] = []  # the blocks' first calls, merged over the steps (merged_calls)
        self._flushes = 0  # flushes while the order is not final
        self._complete = False  # a step called every block: `_calls` is its order
        # frozen parameters too: they have no gradient, but their weights count in their block's
        # weight norm (a frozen block's is its real norm, not 0)
        self.params = list(model.parameters())
        if not any(p.requires_grad for p in self.params):
            raise no_trainable("watch")
        n = len(self.blocks)
        self.owner = [b if b >= 0 else n for b in block_of(self.params, self.blocks)]
        self.layout = Layout(n, head=_a_head(self.owner, [p.requires_grad for p in self.params], n))
        self.device = self.params[0].device
        self.rank, self.world = distributed.world()
        self.flush_every, self.skip, self.hook_optimizer = flush_every, check_skip(skip), hook_optimizer
        copies = [distributed.local(p)[1] for p in self.params]
        grad_slots = [self.layout.parts()["gradient"].start + b for b in self.owner]
        weight_slots = [self.layout.parts()["weight"].start + b for b in self.owner]
        scale = [1.0 / c for c in copies] * 2  # gradients, then weights
        self._termination = Termination()  # SIGTERM unwinds to the watcher, which writes, then dies
        slots, check = grad_slots + weight_slots, self._termination.check
        self.capture = Capture(self.blocks, self.params, self.layout.width, slots, scale, check)
        # fused, and its step takes found_inf as GradScaler hands it (torch marks those): a hand-written
        # optimizer keeping torch's fused keyword in its defaults stepped on a flagged step, 'skipped'
        self.fused = bool(
            optimizer is not None
            and optimizer.defaults.get("fused")
            and getattr(optimizer, "_step_supports_amp_scaling", False)
        )
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        check_modes(model, self.world, skip, bundle, compute_loss, optimizer, self.fused, hook_optimizer)
        clip = check_clip(clip_grad_norm)
        check_optimizer_params(self.params, optimizer, self.skip)
        # skip= and bundle= need each step's flag on the device: the rule runs there, per step; else
        # it runs at the flush on the host, vectorised over the flushed steps (spikes.update_many)
        on_device = self.skip or bundle is not None
        # a row: the series, their flags, what each one's trend expected and the threshold it was judged
        # against (on the device), or the squared norms and 1.0 if a loss was passed (the mean loss is
        # over the ranks that passed one); then 1.0 if the scaler skipped it
        width = (self.layout.n_series * 4 if on_device else self.layout.width + 1) + 1
        self.buffer = torch.zeros(flush_every, width, dtype=torch.float64, device=self.device)
        self._passed = [0.0] * flush_every  # per buffered step, 1.0 if a loss was passed (host rule)
        # with a scaler, each step's factors on its squared norms (applied once they are settled)
        self.factors: torch.Tensor | None = None  # allocated when a scaler is adopted (adopt)
        self._not_skipped = torch.zeros(1, dtype=torch.float64, device=self.device)
        self._scaled = torch.tensor(self.layout.scaled(), device=self.device)  # Layout.scaled
        logged = self.layout.logged()
        self.state = self.rule.state(self.layout.n_series, self.device, logged) if on_device else None
        self.names = [name for name, _ in self.blocks]
        self.out = Log(self.layout, self.names, self.rule, log, heatmap, report, self.rank, self.world, skip)
        self.out.glued = self.capture.glued  # one set: the capture fills it, the log reads it
        self.out.result.blocks = f"{shown_blocks(self.names, most=6)} ({chosen})"
        self.snapshot = (
            Snapshot(model, compute_loss, Path(bundle), blocks is not None, clip)
            if bundle is not None
            else None
        )
        self.step = 0  # optimizer steps seen
        self.host_reads = 0
        self._filled = 0
        # the norm before clipping, per step; `fed`: gradients that reached block outputs so far (None:
        # none ever did)
        self.clips = ClipLog(
            self.params, len(self.buffer), lambda: self.capture.fed if self.capture.backward else None
        )
        self._loss: torch.Tensor | None = None
        self._loss_seen = False
        self.weights_measured = True
        self._last_weights = torch.zeros(0)
        self._handles: list[Any] = []
        self._open = False
        self.report: Report | None = None
        self._versions: list[int] | None = None  # the parameters' version counters when the run began
        self.hooks = StepHooks(self, optimizer, self.skip, self.fused)  # on the optimizer and scaler
        self.buffers = Buffers(model) if self.skip else None  # what a skipped step's forward wrote

    # ------------------------------------------------------------------------------------ hooks

    def __enter__(self) -> Watcher:
        if self._open or self.report is not None:
            raise UsageError("watch: a watcher runs once; make a new one with watch(...) for another run")
        self._handles += self.capture.attach(self.model)  # first: a block it cannot hook leaves nothing
        self._handles += refusing_inside(self.blocks, "watch")
        self._handles.append(Listening(self.clips))
        self._open = True
        self._versions = [version_of(p) for p in self.params]  # an update changes them: `_no_step`
        if self.world == 1:  # under torch.distributed a rank stopping alone would hang the others' flush
            self._termination.open()
        if self.snapshot is not None or self.buffers:
            self._handles.append(self.model.register_forward_pre_hook(self._on_model_call))
        if self.snapshot is not None:
            self._handles.append(self.model.register_forward_hook(self._on_model_output))
        after = self.after_step if self.snapshot is not None else None
        self._handles += self.hooks.attach(self.hook_optimizer, after)
        if self.buffers and self.optimizer is not None:  # model calls inside step() are this step's
            self._handles.append(self.optimizer.register_step_post_hook(self._after_update))
        if self.scaler is not None:
            self.adopt(self.scaler)
        elif self.optimizer is not None:
            self.hooks.seek_scaler()
        return self

    def adopt(self, scaler: torch.amp.GradScaler) -> None:
        """Watch through `scaler` (passed as scaler=, or found stepping the watched optimizer): its
        update() ends every iteration, so it closes one whose optimizer step it skipped, and every
        step's norms are divided by its loss scale."""
        self.scaler = scaler
        if self.state is None and self.factors is None:
            self.factors = torch.ones(
                self.flush_every, self.layout.width, dtype=torch.float64, device=self.device
            )
        closed = self.hooks.wrap_update(scaler)
        if closed and self._filled > 0 and self.factors is not None:
            # found at scaler.step() after the caller closed this iteration's step (before_step()
            # first, as the Lightning callback does): that row's factors and skip, from this scaler
            amp = self._loss_scale(scaler_skipped=False)
            assert amp is not None  # the scaler is enabled: it was adopted
            self.factors[self._filled - 1].copy_(amp[0])
            self.buffer[self._filled - 1, -1].copy_(amp[1])
        elif closed:
            warnings.warn(
                "watch: the GradScaler was found at its first step(), after that iteration's step was "
                "closed and judged: that step's norms are not divided by its loss scale; pass scaler=",
                stacklevel=4,
            )

    @property
    def is_open(self) -> bool:
        """Entered and not closed yet: its hooks measure the steps."""
        return self._open

    def close_skipped(self) -> None:
        """Close the step the scaler skipped (its update() came with no optimizer step)."""
        self._close_step(scaler_skipped=True)

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None and self.report is None:  # the report says the run did not end on its own
            self.out.result.stopped = "SIGTERM" if isinstance(exc, Terminated) else describe(exc)
        self._shut()  # as deep as close()'s: a warning of _shut points at the with block

    def close(self) -> Report:
        """Remove the hooks, flush what is buffered, write the report and the heatmap; idempotent."""
        return self._shut()

    def _shut(self) -> Report:
        """close() and __exit__ alike, one frame below the caller's code (the warnings' stacklevel)."""
        self._open = False
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.hooks.detach()
        try:
            self.flush()
            if self.report is None:
                if self.step == 0:
                    self._no_step()
                elif self.capture.called and not self.capture.seen:
                    self._no_block_seen()
                elif self.capture.called and not self.capture.measured:
                    self._no_block_measured()
                elif not self.out.graded:
                    self._no_gradient()
                self.report = self.out.finish(self.host_reads)
                self._draw(self.report)
        finally:
            self._termination.close()
        return self.report

    def _draw(self, report: Report) -> None:
        """The heatmap, last: a failure to draw it is a warning, never a crash of the training run."""
        if self.out.heatmap is None or not self.out.columns:
            return
        from stabilitycheck.watchplot import heatmap

        try:
            heatmap(self.out.columns, self.out.blocks, report.first_spike, self.out.heatmap)
        except Exception as error:  # whatever drawing raised
            warnings.warn(f"watch: the heatmap could not be written ({error})", stacklevel=4)

    def _no_step(self) -> None:
        """No step was closed: say how steps are closed (in the report, and as a warning when the
        loop did train: a loss was recorded, a parameter has a gradient, or, a backward having run,
        one changed in place, as a hand-written update that clears .grad does; not an evaluation
        loop's in-place change without a backward, nn.Embedding's max_norm or load_state_dict)."""
        how = "the optimizer's step() closes each step: pass it, watch(model, optimizer)"
        if self.optimizer is not None:
            how = "optimizer.step() was never called on the watched optimizer"
            if self.scaler is None:
                how += " (a GradScaler skips it on Inf gradients: pass scaler=)"
        note = f"no step was closed: {how}, or call w.before_step() once per step"
        self.out.result.note = note
        versions = self._versions
        updated = (
            self.capture.backward
            and versions is not None
            and [version_of(p) for p in self.params] != versions
        )
        if self._loss is not None or updated or any(p.grad is not None for p in self.params):
            warnings.warn(f"watch: {note}", stacklevel=4)

    def _no_block_seen(self) -> None:
        """Steps were closed and the model was called, but no block's forward hook ran (a forward
        calling `block.forward(x)`): every block output and its gradient read 0, no measurement, so a
        NaN a block made was named as the loss's. Said in the report and as a warning."""
        shown = shown_blocks([name for name, _ in self.blocks])
        note = (
            f"no watched block ran through its __call__ in {self.step} steps ({shown}), so their outputs "
            f"and output gradients were never measured: {BYPASSED}, or pass the blocks the forward runs "
            "(blocks=...)"
        )
        self._say(note)

    def _no_block_measured(self) -> None:
        """Steps were closed and the model was called with gradients on, but its blocks ran only with
        gradients off (`torch.no_grad()` inside the forward, or a reentrant `torch.utils.checkpoint` on
        an input that does not require grad, whose backward never runs: the blocks get no gradient).
        Their outputs and gradients were never measured, every one logged 0; said in the report and as
        a warning, as for blocks no hook saw."""
        shown = shown_blocks([name for name, _ in self.blocks])
        note = (
            f"the watched blocks ran only with gradients off in {self.step} steps ({shown}), so their "
            "outputs and output gradients were never measured: a forward under torch.no_grad(), or a "
            "reentrant torch.utils.checkpoint whose inputs do not require grad (its backward never "
            "runs, and the blocks get no gradient: use_reentrant=False)"
        )
        self._say(note)

    def _no_gradient(self) -> None:
        """Every step closed found no gradient: each parameter's .grad None or zero when the optimizer
        stepped (its norm, every step, 0: no measurement), so the model never trained and nothing was
        flagged. A loop calling zero_grad() between backward() and step() does it."""
        self._say(
            f"no step had a gradient in .grad ({self.step} steps: every parameter's was None or zero when "
            "the step closed), so nothing was measured and, unless the gradients live elsewhere (DeepSpeed "
            "ZeRO keeps its own), the model did not train: a zero_grad() between backward() and step()?"
        )

    def _say(self, note: str, stacklevel: int = 5) -> None:
        """`note` in the report and as a warning pointing at the caller's close() or with block
        (`stacklevel`)."""
        self._note(note)
        warnings.warn(f"watch: {note}", stacklevel=stacklevel)

    def _note(self, note: str) -> None:
        """`note` in the report, after any before it."""
        before = self.out.result.note
        self.out.result.note = note if before is None else f"{before}; {note}"

    def _after_update(self, *_: Any) -> None:
        if self.buffers is not None:
            self.buffers.forget()

    def _on_model_call(self, module: nn.Module, args: Any) -> None:
        # with gradients on, as the bundle's: a pass under no_grad after the update (a metric in train
        # mode) is not the next step's
        if self.buffers and torch.is_grad_enabled():
            self.buffers.take()
        if torch.is_grad_enabled() and self.snapshot is not None:
            self.snapshot.on_call()

    def _on_model_output(self, module: nn.Module, args: Any, output: Any) -> None:
        if torch.is_grad_enabled() and self.snapshot is not None:
            self.snapshot.on_output(output)

    def batch_start(self) -> None:
        """A micro-batch begins: for a loop that reaches the model by another way than the watched
        module's forward (the Lightning callback calls it: training_step calls self.net), or whose step
        begins with a pass under no_grad: a replay bundle takes the state before the step and the RNG
        state and modes the micro-batch began with, and skip=True the buffers a skipped step puts back."""
        self._check_open("batch_start")
        if self.buffers:
            self.buffers.take()
        if self.snapshot is not None:
            self.snapshot.on_start()

    def loss(self, loss: torch.Tensor, batch: Any = None) -> None:
        """Record this step's loss (summed over micro-batches) and, for a replay bundle, its batch."""
        self._check_open("loss")
        value = check_loss(loss).detach()
        value = value.reshape(()) if value.dim() else value  # a 0-d view costs ~3 us a step
        value = value if value.dtype in (torch.float32, torch.float64) else value.float()
        self._loss = value if self._loss is None else self._loss + value
        if self.snapshot is not None:
            scale = self.scaler._get_scale_async() if self.scaler is not None else None
            self.snapshot.on_batch(self.step, batch, value, scale, loss)

    # ----------------------------------------------------------------------------------- a step

    def _close(self, row: torch.Tensor | None) -> None:
        """Close this step's measurements (see Capture); `row`, given when the weight norms are
        measured this step, is its zeroed row (see Layout)."""
        self.capture.close_step(row, self._loss)
        self._loss_seen, self._loss = self._loss is not None, None
        if not self.capture.ordered and not self._complete:
            steps = self.capture.step_calls
            # a step calling every block gives the order whole; merged, steps skipping different
            # blocks of two lists called in turn placed a block wrongly, for good
            self._complete = len(steps) == len(self.blocks)
            self._calls = steps if self._complete else merged_calls(self._calls, steps)
        self.capture.step_calls, self.capture.step_seen = [], set()

    def _called_in(self, calls: list[int], final: bool) -> None:
        """The steps so far called the blocks in `calls`' order: findings are located in it, and once
        it is `final`, where that is not the order given (or found), the report says so."""
        calls = in_call_order(calls, len(self.blocks))
        self.out.called_in(calls)
        if final and calls != sorted(calls):
            said = shown_blocks([self.names[b] for b in calls], most=6)
            listed = "blocks= lists them" if self._blocks_given else "the model registers them"
            note = (
                f"the forward called the blocks in another order than {listed} ({said}): findings "
                "are located in the order it called them"
            )
            if self._blocks_given:  # a list given input side first, as documented, was not
                self._say(note, stacklevel=callers_level() + 1)  # from _say: one frame more
            else:  # two lists called in turn: as the model is written
                self._note(note)

    def before_step(self) -> torch.Tensor | None:
        """Close the step: measure, apply the rule on the device (single process), buffer the row.
        Returns the device flag 'this step is flagged' (single process), else None."""
        self._check_open("before_step")
        return self._close_step(scaler_skipped=False)

    def _check_open(self, method: str) -> None:
        """A one-line UsageError where the watcher is not open: nothing would be measured or written."""
        if not self._open:
            when = "after it closed" if self.report is not None else "before it was entered"
            raise UsageError(
                f"watch: w.{method}() was called {when}; call it inside `with watch(model, optimizer) as w:`"
            )

    def _loss_scale(self, scaler_skipped: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
        """With a GradScaler: this step's factors on its squared norms (1/scale^2 on what the loss
        scale multiplied: the output gradients always, the weight gradients while the scaler has not
        unscaled them, as for a fused optimizer, or where the step is closed before scaler.step()
        with no unscale_()) and whether the scaler skips the step (0-d 0/1)."""
        scale = self.scaler._get_scale_async() if self.scaler is not None else None
        if scale is None:
            return None
        parts = self.layout.parts()
        factors = torch.ones(self.layout.width, dtype=torch.float64, device=self.device)
        inverse = scale.to(self.device, torch.float64).reciprocal().square()
        factors[parts["activation_grad"]] = inverse
        grad_scale = getattr(self.optimizer, "grad_scale", None)  # set by scaler.step for a fused one
        found = getattr(self.optimizer, "found_inf", None) if hasattr(self.optimizer, "grad_scale") else None
        # the scaler's record of this optimizer in this iteration: unscaled (scaler.step does it before
        # a non-fused step, a caller before clipping), with the infs it found, or not yet
        record = getattr(self.scaler, "_per_optimizer_states", {}).get(id(self.optimizer), {})
        unscaled = record.get("stage") == OptState.UNSCALED
        if grad_scale is not None:
            factors[parts["gradient"]] = grad_scale.to(self.device, torch.float64).reciprocal().square()
        if scaler_skipped or self.optimizer is None:
            return factors, torch.full((), float(scaler_skipped), dtype=torch.float64, device=self.device)
        if found is not None:  # a fused optimizer is stepped, and skips on the scaler's found_inf itself
            return factors, (found.to(self.device) > 0).double()
        if unscaled:  # scaler.step() skips it where unscale_() found an Inf/NaN
            infs = [f.to(self.device) for f in record.get("found_inf_per_device", {}).values()]
            return factors, (torch.stack([*infs, torch.zeros((), device=self.device)]).sum() > 0).double()
        # closed by the caller before scaler.step() and any unscale_() (a fused optimizer under
        # Lightning): the gradients are still scaled, and the scaler skips where one of the optimizer's
        # is not finite (its own check; a parameter of the model it does not step is no skip)
        factors[parts["gradient"]] = inverse
        stepped = [p for group in self.optimizer.param_groups for p in group["params"]]  # as the scaler
        grads = [dense(p.grad) for p in stepped if p.grad is not None]
        largest = torch.stack(torch._foreach_norm(grads, math.inf)).max() if grads else torch.zeros(())
        return factors, (~torch.isfinite(largest)).double().to(self.device)

    def _close_step(self, scaler_skipped: bool) -> torch.Tensor | None:
        self._termination.check()
        self.hooks.stepped = True
        self.weights_measured = self.step % self.weights_every == 0
        flagged = None
        slot = self._filled
        self.clips.close_row(slot)
        amp = self._loss_scale(scaler_skipped)
        if self.state is None:
            measured = self.weights_measured  # the row was zeroed at the last flush
            self._close(self.buffer[slot, : self.layout.width] if measured else None)
            self._passed[slot] = float(self._loss_seen)  # written into the rows at the flush
            if amp is not None and self.factors is not None:
                self.factors[slot].copy_(amp[0])
                self.buffer[slot, -1].copy_(amp[1])
        else:
            row = torch.zeros(self.layout.width, dtype=torch.float64, device=self.device)
            self._close(row if self.weights_measured else None)
            self.capture.settle(row.unsqueeze(0))
            if amp is not None:
                row *= amp[0]
            series = distributed.to_series(row.unsqueeze(0), self.layout).squeeze(0)
            weight, values = self.layout.parts()["weight"], series
            if self.weights_measured:
                self._last_weights = series[weight].clone()
            else:  # the last measured weight norms stand in for this step's in its row, unjudged
                values = unmeasured(series, weight)
                series[weight] = self._last_weights
            if self.capture.fewer:
                values = noisier(values, self.layout.noisier())
            if amp is None:
                judged, skipped = self.rule.update(self.state, values), self._not_skipped
                flags = judged.flags
            else:  # on a step the scaler skips, its scaled values (the gradients) are no finding
                off = amp[1].bool() & self._scaled  # and none of them enters the window
                judged = self.rule.update(self.state, torch.where(off, torch.nan, values))
                flags, skipped = judged.flags & ~off, amp[1].reshape(1)
            judged_row = [series, flags.double(), judged.expected, judged.threshold, skipped]
            self.buffer[slot].copy_(torch.cat(judged_row))
            flagged = flags.any()
            if self.skip and self.fused and not scaler_skipped:
                self.hooks.skip_fused(flagged, scaled=amp is not None)
            if self.buffers:  # skip=True: a flagged step is skipped, by this or by the scaler
                self.host_reads += self.buffers.close(flagged)
            if self.snapshot is not None:
                self.snapshot.on_flag(flagged)
        self.out.on_step(self._loss_seen, self.weights_measured, self.capture.fewer)
        self._loss_seen = False
        self._filled += 1  # the row is in: a signal after this line keeps it, before it drops it
        self.step += 1
        if self._filled == self.flush_every:
            self.flush()
        self._termination.check()  # a SIGTERM deferred while the step closed (or flushed, held)
        return flagged

    def after_step(self) -> None:
        """After the optimizer's update: the bundle's copy of 'the state before the next step'."""
        if self.snapshot is not None:
            self.snapshot.after_update()

    def flush(self) -> None:
        """Read the buffered steps (one host read; one all_gather first under torch.distributed).
        Single-process, Ctrl-C or SIGTERM waits until the flush is done: its rows are read once, and
        one cut short was in the report, not in the log (under torch.distributed the flush waits on
        the other ranks, and a rank stuck there must stay killable)."""
        with signals_held() if self.world == 1 else contextlib.nullcontext():
            self._flush()

    def _flush(self) -> None:
        n, self._filled = self._filled, 0
        if n == 0:
            return
        if not self.capture.ordered:  # findings are located from here: in the order merged so far
            self._flushes += 1
            # final once a step called every block, by the 4th flush (merged: a block no step calls
            # keeps its registered place) or at the end: an early flush (flush_every=1) left a
            # block skipped there misplaced
            final = self._complete or self._flushes >= 4 or not self._open
            self.capture.ordered = final
            self._called_in(self._calls, final)
        data = self.buffer[:n]
        if self.state is None:
            data[:, -2].copy_(torch.tensor(self._passed[:n], dtype=torch.float64))
            norms = data[:, : self.layout.width]
            self.capture.settle(norms)
            if self.factors is not None:
                norms *= self.factors[:n]
            data = distributed.gather(data)
        self.host_reads += 1
        clips = self.clips.values(n, data.device)  # read with the rows: the flush's one host read
        flat = torch.cat([data.reshape(-1), *(c.reshape(1) for c in clips)]).tolist() if clips else None
        host = data.tolist() if flat is None else _nested(flat[: data.numel()], list(data.shape))
        if self.state is None:
            self.buffer.zero_()  # before_step adds each step's squares into its zeroed row
        first = self.out.result.steps  # the steps logged so far: derived, never off by a step cut short
        self.out.clips = self.clips.read(first, n, flat[data.numel() :] if flat is not None else [])
        if self.state is None:
            self.out.add_ranks(first, host)
        else:
            self.out.add(first, host)
        if self.snapshot is not None:
            self.snapshot.write_if_flagged(
                self.out.first_flag, first, n, self.out.first_flag_values, self.names, self.capture.sizes
            )


def _a_head(owner: list[int], trains: list[bool], n: int) -> bool:
    """Whether the trainable parameters outside the n blocks all come after every block's in the
    model's order (`owner`: each parameter's block, n outside; `trains`: whether it requires grad): a
    head, whose gradients the backward makes first. Registration order is a proxy for the forward's:
    an embedding registered after the blocks reads as a head."""
    inside = [i for i, b in enumerate(owner) if b < n]
    outside = [i for i, b in enumerate(owner) if b == n and trains[i]]
    return bool(inside and outside) and min(outside) > max(inside)


def _nested(flat: list[float], shape: list[int]) -> Any:
    """`flat` in the nested lists .tolist() gives for a tensor of `shape` (row-major)."""
    if len(shape) == 1:
        return flat
    step = len(flat) // shape[0]
    return [_nested(flat[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


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
    hook_optimizer (False when a callback calls before_step, as the Lightning and HF adapters do),
    scaler (the torch.amp.GradScaler stepping the optimizer: a step it skips is a row marked so, and
    gradient norms are divided by the loss scale; not given, the one whose step() gets the optimizer),
    clip_grad_norm (the max_norm the loop passes torch.nn.utils.clip_grad_norm_ before each step: the
    gradients measured are the clipped ones, and a bundle's replay clips alike). Whatever it is
    given, the total norm clipping measured (the gradient's before clipping) is logged as
    grad_norm_before_clip and summed up in the report (stabilitycheck.watchclip.ClipLog).
    """
    known = [name for name in inspect.signature(Watcher).parameters if name not in ("model", "optimizer")]
    unknown = sorted(set(options) - set(known))
    if unknown:
        hint = did_you_mean(unknown[0], known)
        raise UsageError(f"watch: no option {unknown[0]!r}{hint}; the options are {', '.join(known)}")
    return Watcher(model, optimizer, **options)
