"""A PhaseMap as a PNG (needs the optional extra `plot`: matplotlib): the regions shaded from the traced
frontier, the frontier with its spread over seeds, every measured point, and for zoo subjects the
mean-field prediction. Rendering only, no probing."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stabilitycheck.meanfield import zoo_growth
from stabilitycheck.phasemap import PhaseMap
from stabilitycheck.plot import pyplot

COLOURS = {"stable": "#d7e7f5", "explodes": "#f6d2cc", "vanishes": "#e3dcef"}
LOG_KNOBS = ("lr", "init_scale")


def _log(pm: PhaseMap, name: str, values: Sequence[Any]) -> bool:
    """Log scale for a scale-like knob (the subject's init knob, lr) with positive values."""
    scale = name == pm.init_knob or name in LOG_KNOBS
    return scale and all(isinstance(v, int | float) and v > 0 for v in values)


def _edges(values: Sequence[Any], log: bool) -> list[float]:
    """Cell boundaries around grid values: midpoints (geometric on a log axis)."""
    v = [math.log(float(a)) if log else float(a) for a in values]
    if len(v) == 1:
        mids = [v[0] - 0.5, v[0] + 0.5]
    else:
        inner = [(a + b) / 2 for a, b in itertools.pairwise(v)]
        mids = [2 * v[0] - inner[0], *inner, 2 * v[-1] - inner[-1]]
    return [math.exp(m) if log else m for m in mids]


def _round_ticks(lo: float, hi: float) -> list[float]:
    """Round values (1, 1.5, 2, 3, 4, 5, 7 x 10^k) in [lo, hi] for a log axis: at most nine."""
    for mantissas in ((1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 7), (1, 1.5, 2, 3, 5, 7), (1, 2, 5), (1,)):
        ticks = [m * 10.0**k for k in range(-6, 7) for m in mantissas if lo <= m * 10.0**k <= hi]
        if len(ticks) <= 9:
            return ticks or [lo, hi]
    return [lo, hi]


def _regions(pm: PhaseMap) -> list[list[float]]:
    """Per row, per x: 0 stable, 1 explodes, 2 vanishes (inferred from the frontiers), NaN untraced."""
    grid = []
    for y in range(len(pm.y.values)):
        e, v = pm.explode[y], pm.vanish[y] if pm.vanish is not None else None
        row = []
        for x in range(len(pm.x.values)):
            if e.how == "untraced" or (v is not None and v.how == "untraced"):
                row.append(math.nan)
            elif e.x is not None and x >= e.x:
                row.append(1.0)
            elif v is not None and v.x is not None and x >= v.x:
                row.append(2.0)
            else:
                row.append(0.0)
        grid.append(row)
    return grid


def _theory(ax: Any, pm: PhaseMap, ylog: bool) -> bool:
    """Draw the mean-field contours (growth = limit, and 1/limit when vanishing is judged)."""
    ys = pm.y.values
    lo, hi = float(ys[0]), float(ys[-1])
    fine = [lo * (hi / lo) ** (k / 119) if ylog else lo + (hi - lo) * k / 119 for k in range(120)]
    if isinstance(ys[0], int):
        fine = list(range(int(lo), int(hi) + 1))
    z = []
    for yv in fine:
        row = []
        for xv in pm.x.values:
            knobs = {**pm.base.values, pm.x.name: xv, pm.y.name: type(ys[0])(yv)}
            g = zoo_growth(pm.base.subject, knobs)
            if g is None:
                return False
            row.append(math.log10(g) if g > 0 else -300.0)
        z.append(row)
    levels = [(pm.limits.growth, "growth = limit", "-")]
    if pm.vanish is not None and pm.limits.vanishing is not None:
        levels.append((1 / pm.limits.vanishing, "growth = 1/limit", "--"))
    for level, what, style in levels:
        if level is None:
            continue
        ax.contour(pm.x.values, fine, z, levels=[math.log10(level)], colors="black", linestyles=style)
        ax.plot([], [], color="black", linestyle=style, label=f"mean field: {what}")
    return True


def _frontier(ax: Any, pm: PhaseMap, vanishing: bool) -> None:
    """The traced frontier (first firing x per row), with bars from the measured x where one seed
    fired to where all the seeds spent did (PhaseMap.band)."""
    edges = pm.vanish if vanishing else pm.explode
    assert edges is not None
    xs, ys, lo, hi = [], [], [], []
    for e in edges:
        if e.x is None:
            continue
        a, b = pm.band(e.y, vanishing)
        x = float(pm.x.values[e.x])
        xs.append(x)
        ys.append(float(pm.y.values[e.y]))
        lo.append(x - float(pm.x.values[a if a is not None else e.x]))
        hi.append(float(pm.x.values[b if b is not None else e.x]) - x)
    colour = "#5b3c88" if vanishing else "#b2182b"
    what = "vanishes" if vanishing else "explodes"
    ax.errorbar(
        xs,
        ys,
        xerr=[lo, hi],
        color=colour,
        marker="D",
        markersize=4,
        linewidth=1.6,
        capsize=2,
        label=(
            f"traced frontier: first {pm.x.name}\nthat {what} (bars: measured, one seed\n"
            "fired to all seeds spent did)"
        ),
    )


def plot_map(pm: PhaseMap, path: Path) -> None:
    """Write the PhaseMap's figure to `path` (PNG)."""
    plt = pyplot()
    from matplotlib.colors import ListedColormap
    from matplotlib.ticker import NullLocator, ScalarFormatter

    fig, ax = plt.subplots(figsize=(10.5, 5.4))
    xlog, ylog = _log(pm, pm.x.name, pm.x.values), _log(pm, pm.y.name, pm.y.values)
    cmap = ListedColormap([COLOURS["stable"], COLOURS["explodes"], COLOURS["vanishes"]])
    ax.pcolormesh(
        _edges(pm.x.values, xlog),
        _edges(pm.y.values, ylog),
        _regions(pm),
        cmap=cmap,
        vmin=-0.5,
        vmax=2.5,
        shading="flat",
    )
    for state, colour in COLOURS.items():
        if state != "vanishes" or pm.vanish is not None:
            ax.fill_between([], [], color=colour, label=f"{state} (inferred from the frontier)")
    marks = {"stable": ("o", "#2166ac"), "explodes": ("x", "#b2182b"), "vanishes": ("v", "#5b3c88")}
    for state, (marker, colour) in marks.items():
        pts = [
            p
            for p in pm.points
            if (
                p.exploded
                if state == "explodes"
                else p.vanished
                if state == "vanishes"
                else not (p.exploded or p.vanished)
            )
        ]
        if pts:
            ax.scatter(
                [pm.x.values[p.x] for p in pts],
                [pm.y.values[p.y] for p in pts],
                marker=marker,
                s=14,
                color=colour,
                facecolors="none" if marker == "o" else colour,
                linewidths=0.8,
                label=f"measured: {state} ({len(pts)})",
            )
    _frontier(ax, pm, False)
    if pm.vanish is not None:
        _frontier(ax, pm, True)
    _theory(ax, pm, ylog)
    ax.set_xscale("log" if xlog else "linear")
    ax.set_yscale("log" if ylog else "linear")
    for axis, log, values in ((ax.xaxis, xlog, pm.x.values), (ax.yaxis, ylog, pm.y.values)):
        if log:
            axis.set_major_formatter(ScalarFormatter())
            axis.set_minor_locator(NullLocator())
            axis.set_ticks(_round_ticks(float(values[0]), float(values[-1])))
    ax.set_xlabel(pm.x.name)
    ax.set_ylabel(pm.y.name)
    fixed = ", ".join(f"{k}={v}" for k, v in pm.base.knobs if k not in (pm.x.name, pm.y.name))
    limits = f"growth limit {pm.limits.growth:g}" if pm.limits.growth is not None else "growth off"
    if pm.limits.vanishing is not None:
        limits += f", vanishing limit {pm.limits.vanishing:g}"
    loss = ", loss on the last step" if pm.loss == "last" else ""
    ax.set_title(
        f"{pm.label}: {fixed}\n{limits}{loss}; median of up to {pm.base.run.seeds} seeds, "
        f"{pm.verdicts}/{pm.grid} points judged ({100 * pm.verdicts / pm.grid:.0f}%)",
        fontsize=9,
    )
    ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
