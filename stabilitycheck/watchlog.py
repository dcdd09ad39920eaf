"""The host side of `watch`: flushed rows turned into findings, the JSONL log, the report at exit
and the heatmap's columns (watchplot draws them). Everything here runs on Python floats after the
flush's one host read."""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from stabilitycheck._json import strict_json
from stabilitycheck._validation import check_image, writable
from stabilitycheck.distributed import Layout, nonfinite_rank, to_series
from stabilitycheck.errors import UsageError
from stabilitycheck.measurement import AFTER_LAST_SAID, INPUT, shown
from stabilitycheck.spikes import SpikeRule, SpikeState, noisier, unmeasured

OUTSIDE = "(outside blocks)"
Limits = tuple[list[float], list[float]]  # per series, what its trend expected and the threshold, one step


@dataclass(frozen=True)
class Finding:
    """A flagged value: the step, which tensor (a measurement.TENSOR_KINDS name or 'grad_norm'), the
    block, the value, under torch.distributed the lowest rank holding a non-finite value, for an
    output gradient the code that made it: dL/d(output of block i) is made by the backward of block
    i + 1, or of the loss after the last block (the probe's rule), so that is the block to look at;
    and for a finite spike the threshold it passed and what the trend of its window expected there
    (spikes.SpikeRule; a norm's read on ln x, given back as a norm)."""

    step: int
    tensor: str
    block: str
    value: float
    rank: int | None = None
    made_by: str | None = None
    threshold: float | None = None
    expected: float | None = None
    after: str | None = None  # a block output flagged: the block before it, where the model's code
    # between them made what this block took (Capture.glued), which may have made the value; INPUT
    # for the first block's, whose input (the batch, or the code before it) the watcher does not read

    def describe(self) -> str:
        where = f" on rank {self.rank}" if self.rank is not None else ""
        block = shown(self.block)
        made = f" (made by the backward of {shown(self.made_by)})" if self.made_by is not None else ""
        if self.after == INPUT:  # the first block's output: what it took is not read
            made += (
                f" ({block} is the first block: what it took, the batch or the model's code before it, "
                "may hold the value; the watcher does not read it)"
            )
        elif self.after is not None:
            made += (
                f" ({block} took what the model's code made of {shown(self.after)}'s output, not that "
                "output: the value may have been made there)"
            )
        what = "" if self.tensor == "loss" else "L2 norm "  # every series but the loss is a norm
        limit = ""
        if self.threshold is not None and self.expected is not None:
            limit = f" > threshold {self.threshold:.4g} (its trend expected {self.expected:.4g})"
        return f"step {self.step}: {self.tensor} of {block}, {what}{self.value:.4g}{limit}{where}{made}"


@dataclass
class Report:
    """What a watched run found: the first spike and the first non-finite value (in causal order
    within their step), every flagged step, the skipped ones (by `skip=True`; by the GradScaler
    passed as `scaler=`, whose Inf gradients are its normal overflow handling, not findings, while
    that step's loss, block outputs and weights are judged as on any step), and the host reads it
    cost."""

    steps: int = 0
    first_spike: Finding | None = None
    first_nonfinite: Finding | None = None
    flagged_steps: list[int] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)
    scaler_skipped_steps: list[int] = field(default_factory=list)
    host_reads: int = 0
    note: str | None = None
    warmup: int = 0  # the rule's warm-up: values each series accepts before it is judged
    # torch.nn.utils.clip_grad_norm_ heard (watchclip): on how many steps, on how many of them its
    # norm before clipping passed max_norm, and the largest of those norms (step, norm, max_norm)
    clip_steps: int = 0
    clipped_steps: int = 0
    clip_peak: tuple[int, float, float] | None = None
    # what ended the run inside the watcher's with block ('SIGTERM', 'KeyboardInterrupt', 'ValueError: ...')
    stopped: str | None = None
    # the blocks watched and which rule chose them: a value made outside them is located by what it
    # reached (the loss), so a choice covering part of the model is said (blocks.find_blocks' note)
    blocks: str = ""

    def text(self) -> str:
        """The report printed when the watcher closes: steps and flags, what stopped the run early,
        the first flagged and first non-finite values, the steps skipped, the norm before clipping, a
        note, the warm-up where nothing was flagged, the blocks watched, the host reads."""
        lines = [f"stabilitycheck watch: {self.steps} steps, {len(self.flagged_steps)} flagged"]
        if self.stopped is not None:
            lines.append(f"  stopped early by {self.stopped}: what follows is of the steps closed before it")
        if self.first_spike is not None:
            lines.append(f"  first flagged value: {self.first_spike.describe()}")
        if self.first_nonfinite is not None:
            lines.append(f"  first non-finite value: {self.first_nonfinite.describe()}")
        for what, steps in (
            ("skipped steps", self.skipped_steps),
            ("steps the GradScaler skipped (Inf/NaN gradients)", self.scaler_skipped_steps),
        ):
            if steps:  # the first 10, and how many in all where there are more
                shown = ", ".join(map(str, steps[:10]))
                more = f" ... ({len(steps)} in all)" if len(steps) > 10 else ""
                lines.append(f"  {what}: {shown}{more}")
        if self.clip_peak is not None:
            step, norm, max_norm = self.clip_peak
            lines.append(
                f"  before clipping (the total gradient norm the clip measured): largest {norm:.4g} "
                f"at step {step}; above max_norm at {self.clipped_steps} of the {self.clip_steps} steps "
                f"it was called (max_norm {max_norm:g} there)"
            )
        if self.note is not None:
            lines.append(f"  note: {self.note}")
        if self.first_spike is None and self.warmup:  # a spike at step 30 of 60 read '0 flagged' alone
            lines.append(
                f"  warm-up: each series is judged from its value {self.warmup + 1} on (SpikeRule(warmup="
                f"{self.warmup})): a finite spike among its first {self.warmup} is not flagged, a NaN or "
                "Inf always is"
            )
        if self.blocks:
            lines.append(f"  blocks watched: {self.blocks}")
        lines.append(f"  host reads: {self.host_reads}")
        return "\n".join(lines)


def clipped_to(measured: float, before: float, max_norm: float, rtol: float) -> bool:
    """Whether the step's total gradient norm as the watcher measured it at the optimizer step is what
    a clip of `before` to `max_norm` leaves (torch's rule: times min(1, max_norm / (before + 1e-6))):
    the clip heard is the one that step's gradient went through. A clip heard for the wrong step (the
    call of an update the loop then skipped, another optimizer's over the same model, one after the
    step closed: reviews) leaves another norm. A non-finite norm before leaves a non-finite gradient."""
    if not math.isfinite(before):
        return not math.isfinite(measured)
    left = before * min(1.0, max_norm / (before + 1e-6))
    return math.isclose(measured, left, rel_tol=rtol, abs_tol=1e-12)


def merged_calls(order: list[int], step: list[int]) -> list[int]:
    """`order` with each block of `step` (one step's first calls, in order) it lacks put between the
    blocks that step called before and after it, among the blocks there (which that step did not
    call) by registered index: a layer LayerDrop skipped on one step takes its place from a step
    that calls it (put at its registered place, ffns.0 of two lists called in turn landed after
    attns.1; put right after the block called before it, blocks 1 and 2 skipped on two steps read
    0, 2, 1, 3)."""
    out = list(order)
    for i, b in enumerate(step):
        if b in out:
            continue
        before = next((out.index(c) for c in reversed(step[:i]) if c in out), -1)
        after = next((out.index(c) for c in step[i + 1 :] if c in out), len(out))
        k = before + 1
        while k < after and out[k] < b:
            k += 1
        out.insert(k, b)
    return out


def in_call_order(calls: list[int], n: int) -> list[int]:
    """The n blocks in the order of their first calls (`calls`), each block never called placed right
    after the one registered before it (put last, a layer no step called moved every finding after
    it: a x50 on blocks.2 named in blocks.3)."""
    order = list(calls)
    for b in range(n):
        if b not in order:
            order.insert(order.index(b - 1) + 1 if b > 0 else 0, b)
    return order


def series_names(layout: Layout, blocks: list[str]) -> list[tuple[str, str]]:
    """(tensor kind, block) of each series index."""
    names: list[tuple[str, str]] = [("", "")] * layout.n_series
    for kind, part in layout.parts().items():
        owners = [*blocks, OUTSIDE] if kind in ("gradient", "weight") else blocks
        for i, index in enumerate(range(part.start, part.stop)):
            names[index] = (
                kind,
                "(loss)" if kind == "loss" else "(all)" if kind == "grad_norm" else owners[i],
            )
    return names


class Log:
    """Collects the flushed steps: findings, the JSONL rows, and the heatmap's columns."""

    def __init__(
        self,
        layout: Layout,
        blocks: list[str],
        rule: SpikeRule,
        log: str | Path | None,
        heatmap: str | Path | None,
        report: TextIO | None,
        rank: int,
        world: int,
        skip: bool,
    ) -> None:
        self.layout, self.blocks, self.rule, self.world, self.skip = layout, blocks, rule, world, skip
        self.names = series_names(layout, blocks)
        parts = layout.parts()
        self.total = parts["grad_norm"].start  # the total gradient norm's index in a row
        self.graded = False  # set once a step's total gradient norm is not 0 (a NaN or Inf is not)
        self.scaled = layout.scaled()
        self.called_in(list(range(len(blocks))))
        self.writes = rank == 0  # under torch.distributed rank 0 writes; every rank gets the report
        self.file = _open_log(log) if log is not None and self.writes else None
        self.lines: list[str] = []  # the rows of the flush being read, written together at its end
        owners = [*blocks, OUTSIDE]  # the first row also says which block each entry of its lists is
        self.columns_of = {
            "activation": blocks,
            "activation_grad": blocks,
            "gradient": owners,
            "weight": owners,
        }
        self.heatmap = _heatmap_path(heatmap) if heatmap is not None and self.writes else None
        self.glued: set[int] = set()  # the watcher's Capture.glued: read when a finding is made
        self.stream = report if self.writes else None
        self.result = Report(warmup=rule.warmup)
        self.first_flag_values: list[float] = []
        self.last_values: list[float] = []
        self.columns: list[list[float]] = []
        self.loss_seen: list[bool] = []
        self.weights_measured: list[bool] = []
        self.fewer: list[bool] = []  # per step, fewer samples than the reference (spikes.noisier)
        self.last_weights: torch.Tensor | None = None
        self.host_state: SpikeState | None = None
        self.clips: dict[int, tuple[float, float, float]] = {}  # the flush's steps' clips (watchclip)

    def called_in(self, calls: list[int]) -> None:
        """Locate findings in the order the forward calls the blocks (`calls`, block indices; those
        never called after them): a block's output gradient is made by the backward of the block
        called after it (the loss's, after the last), and the block called first takes the input.
        Two lists called in turn, attention then feed-forward, were read list after list, and a x50
        on ffns.2's output was named in attns.3."""
        calls = in_call_order(calls, len(self.blocks))
        self.calls = calls
        self.order = self.layout.causal_order(calls)

    def _made_by(self, index: int, values: list[float]) -> str | None:
        """The backward that made the output gradient at series `index` (None for another series):
        the next block in the call order that ran on this step (an output norm of 0: LayerDrop
        skipped it, and a NaN blocks.4's backward made, blocks 1-3 skipped, read made by blocks.1),
        else the loss's after the last."""
        parts = self.layout.parts()
        grads, outputs = parts["activation_grad"], parts["activation"].start
        if not grads.start <= index < grads.stop:
            return None
        later = self.calls[self.calls.index(index - grads.start) + 1 :]
        return next((self.blocks[c] for c in later if values[outputs + c] != 0), AFTER_LAST_SAID)

    @property
    def first_flag(self) -> int | None:
        return self.result.first_spike.step if self.result.first_spike is not None else None

    def on_step(self, loss_seen: bool, weights_measured: bool, fewer: bool) -> None:
        self.loss_seen.append(loss_seen)
        self.weights_measured.append(weights_measured)
        self.fewer.append(fewer)

    def add(self, first: int, host: list[list[float]]) -> None:
        """Single process: rows of series, flags (0/1), what their trends expected and the thresholds
        they were judged against and 'skipped by the scaler' (0/1), as the device computed them."""
        n = self.layout.n_series
        for i, row in enumerate(host):
            flags = [v != 0.0 for v in row[n : 2 * n]]
            limits = (row[2 * n : 3 * n], row[3 * n : 4 * n])
            self._record(first + i, row[:n], flags, limits, None, row[-1] != 0.0)
        self._write_lines()

    def add_ranks(self, first: int, host: list[list[list[float]]]) -> None:
        """Rows of squared local norms, 'a loss was passed' and 'skipped by the scaler' (rank, step,
        width + 2):
        combined, then the rule, on the host."""
        full = torch.tensor(host, dtype=torch.float64).transpose(0, 1)  # (step, rank, width + 2)
        rows, passed, off = full[..., :-2], full[..., -2], full[..., -1].amax(1) != 0
        series = to_series(rows, self.layout, passed)
        for i, any_rank in enumerate((passed.amax(1) != 0).tolist()):  # a loss passed on any rank
            self.loss_seen[first + i] = any_rank
        weight = self.layout.parts()["weight"]
        # unmeasured weight norms: the last measured ones stand in (row 0 of `known`: before these)
        known = torch.cat([torch.zeros_like(series[:1, weight]), series[:, weight]])
        if self.last_weights is not None:
            known[0] = self.last_weights
        source, last = [], 0
        for i in range(rows.shape[0]):
            last = i + 1 if self.weights_measured[first + i] else last
            source.append(last)
        if self.last_weights is not None or last:
            series[:, weight] = known[source]
            self.last_weights = known[last].clone()
        if self.host_state is None:
            self.host_state = self.rule.state(self.layout.n_series, logged=self.layout.logged())
        # on a step the scaler skipped, its scaled values (the gradients) are no finding, and none of
        # them enters the window (Layout.scaled)
        off = off.unsqueeze(1) & torch.tensor(self.scaled)
        measured = torch.tensor(self.weights_measured[first : first + rows.shape[0]])
        fewer = torch.tensor(self.fewer[first : first + rows.shape[0]])
        judged = self.rule.update_many(  # the stand-ins above are for the log alone
            self.host_state,
            torch.where(
                off, torch.nan, noisier(unmeasured(series, weight, ~measured), self.layout.noisier(), fewer)
            ),
        )
        flags = (judged.flags & ~off).tolist()
        expected, thresholds = judged.expected.tolist(), judged.threshold.tolist()
        values, skipped = series.tolist(), off.any(1).tolist()
        for i in range(rows.shape[0]):
            ranks = [r[i] for r in host] if self.world > 1 else None
            self._record(first + i, values[i], flags[i], (expected[i], thresholds[i]), ranks, skipped[i])
        self._write_lines()

    def _finding(
        self,
        step: int,
        index: int,
        values: list[float],
        ranks: list[list[float]] | None,
        limits: Limits | None = None,
    ) -> Finding:
        kind, block = self.names[index]
        rank = nonfinite_rank(ranks, self.layout, index) if ranks is not None else None
        value, made_by = values[index], self._made_by(index, values)
        b = self.blocks.index(block) if kind == "activation" else -1
        at = self.calls.index(b) if b >= 0 else -1  # in the call order
        after = INPUT if at == 0 else self.blocks[self.calls[at - 1]] if b in self.glued else None
        if limits is None or not math.isfinite(value):  # a non-finite value is flagged for that alone
            return Finding(step, kind, block, value, rank, made_by, after=after)
        return Finding(step, kind, block, value, rank, made_by, limits[1][index], limits[0][index], after)

    def _record(
        self,
        step: int,
        values: list[float],
        flags: list[bool],
        limits: Limits,
        ranks: list[list[float]] | None,
        scaler_skipped: bool,
    ) -> None:
        self.graded = self.graded or values[self.total] != 0
        found: Finding | None = None
        for index in self.order if any(flags) else ():
            if flags[index]:
                found = self._finding(step, index, values, ranks, limits)
                break
        r = self.result
        r.steps, self.last_values = step + 1, values
        if found is not None:
            r.flagged_steps.append(step)
            if r.first_spike is None:
                r.first_spike, self.first_flag_values = found, values
            if self.skip:
                r.skipped_steps.append(step)
        if scaler_skipped:
            r.scaler_skipped_steps.append(step)
        clip = self.clips.get(step)
        if clip is not None and not clipped_to(values[self.total], *clip):
            clip = None  # not the clip this step's gradient went through: null, not a wrong number
        if clip is not None:
            norm, max_norm, _ = clip
            r.clip_steps += 1
            r.clipped_steps += norm > max_norm
            if r.clip_peak is None or (not math.isnan(r.clip_peak[1]) and not norm <= r.clip_peak[1]):
                r.clip_peak = (step, norm, max_norm)  # a NaN is the largest: the first one stands
        if r.first_nonfinite is None and not math.isfinite(sum(values)):  # a fast check first
            for index in self.order:
                if not math.isfinite(values[index]) and not (scaler_skipped and self.scaled[index]):
                    r.first_nonfinite = self._finding(step, index, values, ranks)
                    break
        if self.heatmap is None and self.file is None:
            return  # nothing kept per step (parts() alone cost ~3 us a step)
        parts = self.layout.parts()
        if self.heatmap is not None:
            self.columns.append(values[parts["activation"]] + values[parts["activation_grad"]])
        if self.file is not None:
            row: dict[str, Any] = {
                "step": step,
                "loss": values[0] if self.loss_seen[step] else None,
                "loss_passed": self.loss_seen[step],  # null above: NaN if passed, else none was
                "grad_norm": values[parts["grad_norm"].start],
                "grad_norm_before_clip": clip[0] if clip is not None else None,
                "skipped": scaler_skipped or (self.skip and found is not None),
                "skipped_by": "scaler" if scaler_skipped else "watch" if self.skip and found else None,
                "flagged": [":".join(self.names[i]) for i in self.order if flags[i]],
                "first": asdict(found) if found is not None else None,
            }
            for kind in ("activation", "activation_grad", "gradient", "weight"):
                row[kind] = values[parts[kind]]
            if not self.weights_measured[step]:
                row["weight"] = None  # not measured at this step (see watch's weights_every)
            if step == 0:
                row["columns"] = self.columns_of
            self.lines.append(strict_json(row, indent=None) + "\n")

    def _write_lines(self) -> None:
        """Write a flush's rows in one call and hand them to the OS: a run killed later leaves whole
        lines up to its last flush, never a cut one."""
        lines, self.lines = "".join(self.lines), []
        if self.file is not None and lines:
            try:
                self.file.write(lines)
                self.file.flush()
            except OSError as error:
                self._close_log(error)

    def _close_log(self, error: OSError | None = None) -> None:
        """Close the log; a failure to write it is a warning, never a crash of the training run."""
        if self.file is not None:
            try:
                if error is None:
                    self.file.close()
            except OSError as late:
                error = late
            self.file = None
        if error is not None:
            warnings.warn(f"watch: the log could not be written ({error}); it stops here", stacklevel=3)

    def finish(self, host_reads: int) -> Report:
        """Close the log and print the report (a failure to write the log is a warning); returns
        the report, which the heatmap is drawn after (Watcher.close)."""
        self.result.host_reads = host_reads
        self._close_log()
        if self.stream is not None:
            self.stream.write(self.result.text() + "\n")
            flush = getattr(self.stream, "flush", None)  # any object with a write() is taken
            if callable(flush):  # handed to the OS now: a file of the caller's, left unflushed, read
                flush()  # 0 bytes after a SIGTERM (which ends the process without flushing it)
        return self.result


def _open_log(path: str | Path) -> TextIO:
    try:
        return open(path, "w")  # closed by finish
    except OSError as error:
        raise UsageError(
            f"watch: cannot write the log {str(path)!r} ({error.strerror}); pass a writable path"
        ) from None


def _heatmap_path(path: str | Path) -> Path:
    """The heatmap's path, checked when watch starts (it is drawn at the end of the run)."""
    out = Path(path)
    check_image("watch(heatmap=...)", out)
    if not writable(out):
        raise UsageError(
            f"watch: cannot write the heatmap {str(out)!r} (its folder is missing or read-only); "
            "pass a writable path"
        )
    return out
