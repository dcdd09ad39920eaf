"""Text and Markdown renderings of a PhaseMap: one row per y value, each x a character, the frontier
and beside it where the seeds spent began to fire, the mean-field prediction where there is one, and
the cost."""

from __future__ import annotations

from collections.abc import Sequence

from stabilitycheck.phasemap import PhaseMap, theory
from stabilitycheck.space import trains
from stabilitycheck.staircase import Edge
from stabilitycheck.verdicts import limits_text

SEEDS_FIRED = "measured: one seed-all seeds"
"""The band column (PhaseMap.band): the smallest measured x where one of the seeds spent fired (the
explosion's band: on a criterion other than vanishing), and where all of them did; from the points
the trace measured and the seeds their verdicts spent, not each seed's own frontier (which can lie
outside it)."""

LEGEND = (
    "X explodes, V vanishes, o stable (measured); # explodes, ~ vanishes, . stable (inferred from the "
    "frontier, assuming monotonicity in x); ? not traced"
)


def _cell(pm: PhaseMap, x: int, y: int) -> str:
    p = pm.point(x, y)
    if p is not None:
        return "X" if p.exploded else "V" if p.vanished else "o"
    e = pm.explode[y]
    v = pm.vanish[y] if pm.vanish is not None else None
    if e.how == "untraced" or (v is not None and v.how == "untraced"):
        return "?"
    if e.x is not None and x >= e.x:
        return "#"
    if v is not None and v.x is not None and x >= v.x:
        return "~"
    return "."


def _at(pm: PhaseMap, i: int | None) -> str:
    return "none" if i is None else f"{pm.x.values[i]}"


def _band(pm: PhaseMap, y: int, vanishing: bool) -> str:
    lo, hi = pm.band(y, vanishing)
    return f"{_at(pm, lo)}-{_at(pm, hi)}" if lo is not None else "-"


def _edge(pm: PhaseMap, e: Edge, th: Sequence[int | None] | None, vanishing: bool) -> list[str]:
    if e.how == "untraced":
        return ["not traced", *([] if vanishing else [""]), "", "" if th is None else _at(pm, th[e.y]), ""]
    fired = [] if vanishing else [_fired(pm, e)]
    return [_at(pm, e.x), *fired, _band(pm, e.y, vanishing), "" if th is None else _at(pm, th[e.y]), e.how]


def _fired(pm: PhaseMap, e: Edge) -> str:
    """The criteria the frontier's point fired on ('grad_norm' where the weight-gradient norm passed
    its limit before the growth did: a frontier that is then not growth's), '-' where there is none."""
    p = pm.point(e.x, e.y) if e.x is not None else None
    return ", ".join(p.criteria) if p is not None and p.criteria else "-"


def cost(pm: PhaseMap) -> str:
    """'163 verdicts (412 seed probes) of the 1600-point grid (10.2%) in 95 s'."""
    share = 100 * pm.verdicts / pm.grid
    stop = (
        ", stopped: what was traced so far"
        if pm.stopped
        else ", interrupted: what was traced so far"
        if pm.interrupted
        else ""
    )
    return (
        f"{pm.verdicts} verdicts ({pm.probes} seed probes) of the {pm.grid}-point grid ({share:.1f}%) "
        f"in {pm.elapsed:.1f} s{stop}"
    )


def judged(pm: PhaseMap, th: Sequence[int | None] | None) -> str:
    """What each point's verdict is and what the columns read: the quantile over how many seeds, on
    which limits, and the mean-field column's meaning where there is one (`th`: theory(pm), which the
    table computed already)."""
    run = pm.base.run
    seeds = f"up to {run.seeds} seeds, stopping once they decide it" if run.seeds > 1 else "1 seed"
    through = " (growth through time, the loss on the last step)" if pm.base.recurrent else ""
    under = " (vanishing: under 1 / its limit)" if pm.vanish is not None else ""
    how = "the exact product sigma^(T-1)" if pm.base.recurrent else "infinite-width signal propagation"
    theory_said = (
        f"; mean field: the first {pm.x.name} where {how} puts the growth past its limit{under}"
        if th is not None
        else ""
    )
    limits = limits_text(pm.limits, trains(pm.base, (pm.x, pm.y)))
    return f"each point: the q={run.quantile:g} verdict over {seeds}, on {limits}{through}{theory_said}"


def _rows(pm: PhaseMap, th: Sequence[int | None] | None) -> list[tuple[str, list[str]]]:
    """Per y: its value, and the columns of the frontier table (`th`: theory(pm))."""
    tv = theory(pm, vanishing=True) if pm.vanish is not None else None
    rows = []
    for y, yv in enumerate(pm.y.values):
        cols = _edge(pm, pm.explode[y], th, False)
        if pm.vanish is not None:
            cols += _edge(pm, pm.vanish[y], tv, True)
        rows.append((f"{yv}", cols))
    return rows


def _header(pm: PhaseMap) -> list[str]:
    cols = [f"explodes at {pm.x.name}", "fired on", SEEDS_FIRED, "mean field", "how"]
    if pm.vanish is not None:
        cols += [f"vanishes at {pm.x.name}", SEEDS_FIRED, "mean field", "how"]
    return cols


def text(pm: PhaseMap) -> str:
    """The terminal rendering: the grid, one row per y (largest on top), then the frontier table."""
    width = max(len(f"{v}") for v in pm.y.values)
    lines = [
        f"phase map of {pm.label}: {pm.x.name} across ({pm.x.values[0]}..{pm.x.values[-1]}), "
        f"{pm.y.name} down; {LEGEND}"
    ]
    for y in reversed(range(len(pm.y.values))):
        cells = "".join(_cell(pm, x, y) for x in range(len(pm.x.values)))
        lines.append(f"{pm.y.values[y]!s:>{width}} {cells}")
    lines.append("")
    head = [pm.y.name, *_header(pm)]
    th = theory(pm)
    table = [head, *([v, *c] for v, c in _rows(pm, th))]
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table]
    lines += ["", judged(pm, th), *(f"note: {v}" for v in pm.violations), cost(pm)]
    return "\n".join(lines)


def markdown(pm: PhaseMap) -> str:
    """The frontier table as Markdown, with the cost and any monotonicity notes."""
    head = [pm.y.name, *_header(pm)]
    lines = [
        f"## Phase map of {pm.label}: {pm.x.name} x {pm.y.name}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    th = theory(pm)
    lines += ["| " + " | ".join([v, *c]) + " |" for v, c in _rows(pm, th)]
    lines += ["", judged(pm, th), "", *(f"- {v}" for v in pm.violations), "", cost(pm), ""]
    return "\n".join(lines)
