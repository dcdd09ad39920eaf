"""PNG plots of counterexamples (needs the optional extra `plot`: matplotlib).

Per counterexample: the per-block gradient-norm profile (log scale, input side left) beside the
same Config with each remedy that fixed it, the culprit marked and the growth limit drawn; and the
loss and total gradient norm per step when there were steps. A target with no counterexample gets
its gradient-flow profile at the largest configuration tried: a SearchResult keeps no Measurement of
it, so that one Config is probed again here (same seed, same numbers). Everything else is rendering.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stabilitycheck.errors import UsageError
from stabilitycheck.probing import Measurement, probe
from stabilitycheck.searching import Counterexample, SearchResult
from stabilitycheck.verdicts import Limits


def _pyplot() -> Any:
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


def _steps(ax: Any, m: Measurement) -> None:
    """The right panel: loss and total gradient norm per step, or the weight-gradient norm per block."""
    if m.steps_run > 0:
        ax.semilogy(m.grad_norm, marker=".", label="total grad norm")
        ax.semilogy(m.loss, marker=".", label="loss")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    else:
        ax.semilogy([v if v > 0 else math.nan for v in m.layer_grad_norms], marker=".")
        ax.set_title("weight-gradient norm per block (step 0)", fontsize=9)
        ax.set_xlabel("block (input side left)")


def _limit(ax: Any, m: Measurement, limits: Limits) -> None:
    last = m.activation_grad_norms[-1] if m.activation_grad_norms else math.nan
    if limits.growth is not None and math.isfinite(last) and last > 0:
        ax.axhline(last * limits.growth, color="black", linestyle="--", label="growth limit")


def _counterexample(left: Any, right: Any, cx: Counterexample, limits: Limits) -> None:
    m = cx.measurement
    left.semilogy(
        _profile(m), marker=".", color="tab:red", label=f"counterexample (init_scale={cx.config.init_scale})"
    )
    for remedy in cx.remedies:
        if remedy.fixed and remedy.measurement is not None:
            left.semilogy(_profile(remedy.measurement), marker=".", alpha=0.7, label=f"with {remedy.name}")
    if cx.culprit in m.activation_names:
        left.axvline(m.activation_names.index(cx.culprit), color="gray", linestyle=":", label="culprit")
    _limit(left, m, limits)
    criteria = ", ".join(c.describe() for c in cx.verdict.criteria)
    left.set_title(f"{cx.label} [{cx.config.device}, {cx.config.dtype}]: {criteria}", fontsize=9)
    _steps(right, m)


def _stable(left: Any, right: Any, result: SearchResult, limits: Limits) -> None:
    config = result.largest_stable
    assert config is not None  # only results with one are drawn
    m = probe(config)
    knobs = " ".join(f"{a.name}={config.knob(a.name)}" for a in result.space.axes)
    left.semilogy(_profile(m), marker=".", color="tab:green", label=f"largest tried ({knobs})")
    _limit(left, m, limits)
    title = f"{result.space.label} [{config.device}, {config.dtype}]: stable up to {knobs}"
    left.set_title(title, fontsize=9)
    _steps(right, m)


def plot(results: Sequence[SearchResult], path: Path, limits: Limits | None = None) -> int:
    """Write one PNG with a row per target: a counterexample's profile beside its remedies', or a stable
    target's profile at the largest configuration tried; returns how many rows were drawn."""
    plt = _pyplot()
    limits = limits or Limits()
    rows = [r for r in results if r.counterexample is not None or r.largest_stable is not None]
    if not rows:
        raise UsageError(f"--plot {path}: nothing to plot, no configuration was probed")
    fig, axes = plt.subplots(len(rows), 2, figsize=(12, 3.6 * len(rows)), squeeze=False)
    for (left, right), result in zip(axes, rows, strict=True):
        if result.counterexample is not None:
            _counterexample(left, right, result.counterexample, limits)
        else:
            _stable(left, right, result, limits)
        left.set_xlabel("block call (input side left)")
        left.set_ylabel("|dL/d output|")
        left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return len(rows)
