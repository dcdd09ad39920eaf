"""The blocks x steps heatmap of a watched run (needs the `plot` extra): log10 of each block's output
norm and of its gradient's norm; NaN and Inf cells drawn in their own colours, never dropped."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from stabilitycheck.errors import UsageError
from stabilitycheck.measurement import shown as quoted
from stabilitycheck.watchlog import Finding

NAN_COLOUR, INF_COLOUR = "magenta", "orange"
Grid = list[list[float]]


def cells(columns: Sequence[Sequence[float]], n: int) -> list[tuple[Grid, Grid]]:
    """Per panel (block outputs, their gradients), its blocks x steps grids: log10 of each finite
    positive norm (else NaN, left blank), and the mark over it: 0 for a NaN norm, 1 for an Inf,
    NaN (no mark) for the rest."""
    out = []
    for panel in range(2):
        values = [[col[panel * n + b] for col in columns] for b in range(n)]
        finite = [[math.log10(v) if math.isfinite(v) and v > 0 else math.nan for v in row] for row in values]
        marks = [
            [0.0 if math.isnan(v) else 1.0 if math.isinf(v) else math.nan for v in row] for row in values
        ]
        out.append((finite, marks))
    return out


def heatmap(
    columns: Sequence[Sequence[float]], blocks: Sequence[str], spike: Finding | None, path: Path
) -> list[tuple[Grid, Grid]]:
    """Write the PNG: one column per step; top panel block outputs, bottom panel their gradients,
    `spike` (the first flagged value) circled where it is a block output or its gradient; the legend
    says where else it is (a weight, the total norm: in neither panel). Returns the `cells` it drew."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap
        from matplotlib.patches import Patch
    except ImportError:
        raise UsageError(
            "watch(heatmap=...) needs matplotlib; install the extra: pip install 'stabilitycheck[plot]'"
        ) from None
    n = len(blocks)
    fig, axes = plt.subplots(2, 1, figsize=(10, 1.5 + 0.5 * n), sharex=True, squeeze=False)
    special = ListedColormap([NAN_COLOUR, INF_COLOUR])
    drawn = cells(columns, n)
    kinds = ("activation", "activation_grad")  # the panels' tensors, top to bottom
    shown = spike is not None and spike.tensor in kinds and spike.block in blocks  # circled in a panel
    for panel, (ax, title, (finite, marks)) in enumerate(
        zip(axes[:, 0], ("block output", "d loss / d block output"), drawn, strict=True)
    ):
        image = ax.imshow(finite, aspect="auto", interpolation="nearest", cmap="viridis")
        ax.imshow(marks, aspect="auto", interpolation="nearest", cmap=special, vmin=0, vmax=1)
        fig.colorbar(image, ax=ax, label="log10 norm")
        ax.set_yticks(range(n), list(blocks), fontsize=7)
        ax.set_title(title, fontsize=9)
        if shown and spike is not None and spike.tensor == kinds[panel]:
            ax.plot(spike.step, list(blocks).index(spike.block), marker="o", mfc="none", mec="red", ms=10)
    axes[-1, 0].set_xlabel("step")
    elsewhere = (
        f"first flagged: {spike.tensor} of {quoted(spike.block)} at step {spike.step} (in neither panel)"
        if spike is not None and not shown
        else None
    )
    axes[0, 0].legend(
        handles=[
            Patch(color=NAN_COLOUR, label="NaN"),
            Patch(color=INF_COLOUR, label="Inf"),
            Patch(fill=False, edgecolor="red", label=elsewhere or "first flagged value"),
        ][: 3 if spike is not None else 2],
        fontsize=7,
        loc="upper left",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return drawn
