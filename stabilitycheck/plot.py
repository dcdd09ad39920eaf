"""PNG plots of counterexamples (needs the optional extra `plot`: matplotlib).

Per result, on the left the per-block gradient-norm profile of the seed whose growth is the
verdict's quantile (the median by default; log scale, input side left), the culprit marked and the
growth limit drawn (at limit x the last block's gradient norm: growth is the first over the last); on
the right the loss and total gradient norm per step when there were steps, else the weight-gradient
norm per block, of the same seed. Rendering only, no probing.
"""

from __future__ import annotations

import math
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stabilitycheck.counterexample import SearchResult
from stabilitycheck.errors import UsageError
from stabilitycheck.measurement import Measurement
from stabilitycheck.verdicts import Limits

TITLE_CHARS = 90  # a title line's length at fontsize 8 on a half-width (6 inch) panel: no cut-off
NAMED_BLOCKS = 12  # up to this many blocks, the weight-gradient panel names each under its point


def pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError(
            "--plot needs matplotlib, which is not installed; install the extra: "
            "pip install 'stabilitycheck[plot]'"
        ) from None
    return plt


def _profile(m: Measurement) -> list[float]:
    """The backward signal per block call (non-finite values left out: matplotlib cannot draw them)."""
    return [v if math.isfinite(v) and v > 0 else math.nan for v in m.activation_grad_norms]


def _mark_nonfinite(ax: Any, values: Sequence[float]) -> None:
    """A vertical red line at each non-finite value, which a log axis cannot draw (a NaN profile drew
    two empty panels), over an x range that spans every value."""
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    for k, i in enumerate(bad):
        ax.axvline(
            i, color="tab:red", alpha=0.5, linewidth=3, label="non-finite (Inf/NaN)" if k == 0 else None
        )
    if values:
        ax.set_xlim(-0.5, len(values) - 0.5)


LEGEND_ROOM = 0.7  # a horizontal limit line lies at most this far up its log axis: the legend above


def _room_above(ax: Any, y: float) -> None:
    """Raise the top of the log axis so that the line at `y` lies at most LEGEND_ROOM of the way up:
    the legend, placed at the top, covered a limit line drawn across the whole panel (a stable LSTM's
    growth limit, listed in the legend and never seen)."""
    bottom, top = (math.log10(v) for v in ax.get_ylim())
    need = bottom + (math.log10(y) - bottom) / LEGEND_ROOM
    if top < need < math.log10(sys.float_info.max):  # beyond (a line at 1e300, or inf): left as it is
        ax.set_ylim(top=10**need)


def plot(results: Sequence[SearchResult], path: Path) -> int:
    """Write one PNG with a row per result: a counterexample's profile with the limits it was judged on,
    or a stable result's profile at the largest configuration tried; returns how many rows were drawn."""
    plt = pyplot()
    fig, drawn = figure(results, f"--plot {path}")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return drawn


def figure(results: Sequence[SearchResult], what: str = "--plot") -> tuple[Any, int]:
    """The matplotlib figure `plot` writes, and how many rows it has (`what` names it in errors)."""
    plt = pyplot()
    rows = [(r, r.shown) for r in results]
    drawn = [(r, j) for r, j in rows if j is not None]
    if not drawn:
        raise UsageError(
            f"{what}: nothing was measured (every configuration was skipped: the table says why), so there "
            f"is no profile to draw; change the knob ranges, or drop {what}"
        )
    fig, axes = plt.subplots(len(drawn), 2, figsize=(12, 3.6 * len(drawn)), squeeze=False)
    for (left, right), (r, j) in zip(axes, drawn, strict=True):
        cx = r.counterexample
        config = cx.config if cx else r.largest_stable
        limits = cx.limits if cx else Limits()
        m = j.measurement
        left.semilogy(_profile(m), marker=".", color="tab:red" if cx else "tab:blue", label=j.summary())
        _mark_nonfinite(left, m.activation_grad_norms)
        if cx and cx.culprit in m.activation_names:
            left.axvline(m.activation_names.index(cx.culprit), color="gray", linestyle=":", label="culprit")
        last = m.activation_grad_norms[-1] if m.activation_grad_norms else math.nan
        if limits.growth is not None and math.isfinite(last) and last > 0:
            left.axhline(
                last * limits.growth,
                color="black",
                linestyle="--",
                label=f"growth limit {limits.growth:g} x the last block's |dL/d out|",
            )
            _room_above(left, last * limits.growth)
        what = ", ".join(c.describe() for c in j.verdict.criteria) if cx else "stable (largest tried)"
        knobs = config.describe() if config else r.space.label
        title = f"{knobs} [{r.space.base.run.device}, {r.space.base.run.dtype}]: {what}"
        left.set_title(textwrap.fill(title, TITLE_CHARS, break_long_words=True), fontsize=8)
        left.set_xlabel("block call (input side left)")
        seed = f"seed {j.measured_seed}: the q={r.space.base.run.quantile:g} growth's"
        if j.own_loss:
            seed = f"seed {j.measured_seed}, under its own loss: non-finite"
        left.set_ylabel(f"|dL/d output| ({seed})", fontsize=8)
        left.legend(fontsize=7)
        if m.steps_run > 0:
            right.semilogy(m.grad_norm, marker=".", label="total grad norm")
            right.semilogy(m.loss, marker=".", label="loss")
            _mark_nonfinite(right, [g + x for g, x in zip(m.grad_norm, m.loss, strict=True)])
            if limits.grad_norm is not None:
                right.axhline(limits.grad_norm, color="black", linestyle="--", label="grad-norm limit")
                _room_above(right, limits.grad_norm)
            right.set_xlabel(f"step ({seed})")
            right.legend(fontsize=7)
        else:
            right.semilogy([v if v > 0 else math.nan for v in m.layer_grad_norms], marker=".")
            _mark_nonfinite(right, m.layer_grad_norms)
            loss = ", the loss on the last step" if j.per_token else ""  # a recurrent subject's profile
            title = f"weight-gradient norm per block (step 0, {seed}{loss})"
            right.set_title(textwrap.fill(title, TITLE_CHARS, break_long_words=True), fontsize=8)
            right.set_xlabel("block (input side left)")
            # a recurrent cell, one block, read as 'cell', not on an axis of -0.4..0.4
            if len(m.layer_names) <= NAMED_BLOCKS:
                right.set_xticks(range(len(m.layer_names)))
                right.set_xticklabels(m.layer_names, rotation=30 if len(m.layer_names) > 4 else 0, fontsize=7)
    fig.tight_layout()
    return fig, len(drawn)
