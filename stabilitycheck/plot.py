"""PNG plots of counterexamples (needs the optional extra `plot`: matplotlib).

Per counterexample: the per-block gradient-norm profile (log scale, input side left) beside the
same Config with each remedy that fixed it, the culprit marked and the growth limit drawn; and the
loss and total gradient norm per step when there were steps. Rendering only, no probing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stabilitycheck.errors import UsageError
from stabilitycheck.probing import Measurement
from stabilitycheck.searching import SearchResult
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


def plot(results: Sequence[SearchResult], path: Path, limits: Limits | None = None) -> int:
    """Write one PNG with a row per counterexample; returns how many rows were drawn."""
    plt = _pyplot()
    limits = limits or Limits()
    found = [r.counterexample for r in results if r.counterexample is not None]
    if not found:
        raise UsageError(f"--plot {path}: nothing to plot, no configuration exploded")
    fig, axes = plt.subplots(len(found), 2, figsize=(12, 3.6 * len(found)), squeeze=False)
    for (left, right), cx in zip(axes, found, strict=True):
        m = cx.measurement
        left.semilogy(
            _profile(m),
            marker=".",
            color="tab:red",
            label=f"counterexample (init_scale={cx.config.init_scale})",
        )
        for remedy in cx.remedies:
            if remedy.fixed and remedy.measurement is not None:
                left.semilogy(
                    _profile(remedy.measurement), marker=".", alpha=0.7, label=f"with {remedy.name}"
                )
        if cx.culprit in m.activation_names:
            left.axvline(m.activation_names.index(cx.culprit), color="gray", linestyle=":", label="culprit")
        last = m.activation_grad_norms[-1] if m.activation_grad_norms else math.nan
        if limits.growth is not None and math.isfinite(last) and last > 0:
            left.axhline(last * limits.growth, color="black", linestyle="--", label="growth limit")
        criteria = ", ".join(c.describe() for c in cx.verdict.criteria)
        left.set_title(f"{cx.label} [{cx.config.device}, {cx.config.dtype}]: {criteria}", fontsize=9)
        left.set_xlabel("block call (input side left)")
        left.set_ylabel("|dL/d output|")
        left.legend(fontsize=7)
        if m.steps_run > 0:
            right.semilogy(m.grad_norm, marker=".", label="total grad norm")
            right.semilogy(m.loss, marker=".", label="loss")
            right.set_xlabel("step")
            right.legend(fontsize=7)
        else:
            right.semilogy([v if v > 0 else math.nan for v in m.layer_grad_norms], marker=".")
            right.set_title("weight-gradient norm per block (step 0)", fontsize=9)
            right.set_xlabel("block (input side left)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return len(found)
