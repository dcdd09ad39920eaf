"""Reports: render search results as a table, sparklines, reproduction lines, JSON and Markdown.

Rendering only: every number shown was computed by the probe or the search.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from tabulate import tabulate

from stabilitycheck.config import Config
from stabilitycheck.searching import Counterexample, SearchResult

SPARKS = "▁▂▃▄▅▆▇█"
HEADERS = (
    "target",
    "device",
    "precision",
    "smallest exploding",
    "criterion",
    "culprit",
    "fixed by",
    "probes",
)


def knobs(result: SearchResult, config: Config) -> str:
    """The searched knobs of a Config, e.g. 'depth=18 init_scale=2.5'."""
    return " ".join(f"{a.name}={config.knob(a.name)}" for a in result.space.axes)


def row(result: SearchResult) -> list[str]:
    """One table row: the counterexample, or the largest stable Config tried."""
    base = result.space.base
    cx = result.counterexample
    precision = base.dtype if base.amp == "none" else f"amp:{base.amp}"
    if cx is None:
        tried = knobs(result, result.largest_stable) if result.largest_stable else "-"
        return [
            result.space.label,
            base.device,
            precision,
            f"{'interrupted, ' if result.interrupted else ''}stable (tried up to {tried})",
            "-",
            "-",
            "-",
            str(result.probes),
        ]
    fixed = [r.name for r in cx.remedies if r.fixed]
    return [
        result.space.label,
        cx.config.device,
        precision,
        knobs(result, cx.config),
        cx.verdict.criteria[0].describe() if cx.verdict.criteria else "-",
        cx.culprit,
        ", ".join(fixed) or "none",
        str(result.probes),
    ]


def table(results: Sequence[SearchResult], fmt: str = "simple") -> str:
    """The table of smallest exploding configurations, one row per target x device x dtype."""
    return tabulate([row(r) for r in results], headers=HEADERS, tablefmt=fmt, disable_numparse=True)


def sparkline(values: Sequence[float], width: int = 64) -> str:
    """A log-scale sparkline; non-finite values show as '!' (never hidden), zeros as ' '."""
    if len(values) > width:  # keep the largest of each bucket, so a spike is never averaged away
        step = len(values) / width
        values = [
            max(values[int(k * step) : max(int((k + 1) * step), int(k * step) + 1)]) for k in range(width)
        ]
    logs = [math.log10(v) for v in values if math.isfinite(v) and v > 0]
    lo, hi = (min(logs), max(logs)) if logs else (0.0, 0.0)
    out = []
    for v in values:
        if not math.isfinite(v):
            out.append("!")
        elif v <= 0:
            out.append(" ")
        else:
            level = 0 if hi == lo else round((math.log10(v) - lo) / (hi - lo) * (len(SPARKS) - 1))
            out.append(SPARKS[level])
    return "".join(out)


def profile(cx: Counterexample) -> str:
    """The per-block gradient-norm profile of a counterexample, input side on the left."""
    m = cx.measurement
    values = m.activation_grad_norms or m.layer_grad_norms
    names = m.activation_names or m.layer_names
    if not values:
        return "(no blocks)"
    finite = [v for v in values if math.isfinite(v)]
    span = f"{max(finite):.3g} .. {min(finite):.3g}" if finite else "all non-finite"
    return f"{names[0]} {sparkline(values)} {names[-1]}   |dL/d out|: {span}"


def config_call(config: Config) -> str:
    """Python source of `config` with only the fields that differ from the defaults."""
    default = Config()
    args = [f"{k}={v!r}" for k, v in vars(config).items() if v != getattr(default, k)]
    return f"sc.Config({', '.join(args)})"


def reproduction(config: Config) -> str:
    """A line a user can paste to re-probe the Config and print its verdict."""
    return (
        f'python -c "import stabilitycheck as sc; c = {config_call(config)}; print(sc.verdict(sc.probe(c)))"'
    )


def details(results: Sequence[SearchResult]) -> str:
    """Below the table: for each counterexample its remedies, profile and reproduction line."""
    blocks = []
    for r in results:
        cx = r.counterexample
        if cx is None:
            continue
        remedies = "; ".join(x.describe() for x in cx.remedies) or "not tried (interrupted)"
        blocks.append(
            f"{r.space.label} [{cx.config.device}, {cx.config.dtype}]: "
            f"{', '.join(c.describe() for c in cx.verdict.criteria)}\n"
            f"  profile   {profile(cx)}\n"
            f"  remedies  {remedies}\n"
            f"  reproduce {reproduction(cx.config)}"
        )
    return "\n\n".join(blocks)


def one_sided(results: Sequence[SearchResult]) -> list[str]:
    """Lines naming each target that explodes on some devices or precisions but not on others."""
    out = []
    for label in dict.fromkeys(r.space.label for r in results):
        rows = [r for r in results if r.space.label == label]
        bad = {f"{r.space.base.device}/{row(r)[2]}" for r in rows if r.counterexample}
        good = {f"{r.space.base.device}/{row(r)[2]}" for r in rows if not r.counterexample}
        if bad and good:
            out.append(
                f"! {label} explodes only on {', '.join(sorted(bad))} (stable on {', '.join(sorted(good))})"
            )
    return out


def too_large(results: Sequence[SearchResult]) -> list[str]:
    """Lines naming the configurations skipped because their activations would not fit in memory."""
    return [
        f"! {r.space.label}: {len(r.too_large)} configuration(s) skipped as too large for this machine's "
        f"free memory, e.g. {knobs(r, r.too_large[-1])}"
        for r in results
        if r.too_large
    ]


def text(results: Sequence[SearchResult]) -> str:
    """The full terminal report."""
    parts = [table(results), "\n".join(one_sided(results) + too_large(results)), details(results)]
    return "\n\n".join(p for p in parts if p)


def to_json(results: Sequence[SearchResult]) -> str:
    """Machine-readable results; each counterexample's `config` replays with --replay."""
    data: list[dict[str, Any]] = [
        {
            "label": r.space.label,
            "probes": r.probes,
            "elapsed_s": r.elapsed,
            "interrupted": r.interrupted,
            "largest_stable": r.largest_stable.to_dict() if r.largest_stable else None,
            "counterexample": r.counterexample.to_dict() if r.counterexample else None,
        }
        for r in results
    ]
    return json.dumps(data, indent=2, sort_keys=True)


def markdown(results: Sequence[SearchResult]) -> str:
    """A Markdown summary for a CI job: the table and each reproduction line in a code block."""
    parts = ["## stabilitycheck", "", table(results, fmt="github")]
    for r in results:
        if r.counterexample is not None:
            parts += [
                "",
                f"**{r.space.label}** ({r.counterexample.config.device}): reproduce with",
                "",
                "```bash",
                reproduction(r.counterexample.config),
                "```",
            ]
    return "\n".join(parts) + "\n"
