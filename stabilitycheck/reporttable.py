"""The report's table: one row per search, its counterexample or the largest stable point, and the
one-line outcome the CLI prints after each search. Rendering only."""

from __future__ import annotations

from collections.abc import Sequence

from tabulate import tabulate

from stabilitycheck.config import Config, Run
from stabilitycheck.counterexample import SearchResult
from stabilitycheck.judgement import Judgement
from stabilitycheck.measurement import shown
from stabilitycheck.remedies import fixed_by

HEADERS = (
    "target",
    "device",
    "precision",
    "smallest exploding",
    "criterion ({q})",
    "growth: {q} (min-max), seeds",
    "kind (rate: {q})",
    "culprit",
    "fixed by",
    "probes",
)


def headers(q: float | None) -> tuple[str, ...]:
    """HEADERS naming the quantile over seeds the rows were judged on (q=0.8; q alone where the rows
    were judged on different ones, None)."""
    return tuple(h.format(q="q" if q is None else f"q={q:g}") for h in HEADERS)


def knobs(result: SearchResult, config: Config) -> str:
    """The searched knobs of a Config, e.g. 'depth=18 init_scale=2.5'."""
    return " ".join(f"{a.name}={_value(config, a.name)}" for a in result.space.axes)


def _value(config: Config, name: str) -> object:
    return config.values[name] if name in config.values else getattr(config.run, name)


def _spread(j: Judgement) -> str:
    """The growth column: quantile (min-max), seeds, failures; 'through time' where that is the growth
    (a recurrent subject's: the row's weight-gradient norm stays its own loss's)."""
    through = " through time" if j.per_token else ""
    return f"{j.growth.describe()}{through}, {len(j.seeds)} ({j.failures})"


def precision_of(run: Run) -> str:
    """The dtype, or `amp:<dtype>` under autocast: the table's column and the detail heading alike."""
    return run.dtype if run.amp == "none" else f"amp:{run.amp}"


def no_explosion(result: SearchResult) -> str:
    """What a search that found no counterexample can say: stable up to its largest stable point,
    or nothing tested (every point skipped), or interrupted (maybe on one seed alone so far)."""
    tried = knobs(result, result.largest_stable) if result.largest_stable else "-"
    j = result.largest_stable_judgement
    stable = "stable " + (f"(tried up to {tried})" if tried else "(its one configuration: every knob fixed)")
    if result.interrupted and result.largest_stable is None:
        return "interrupted before any verdict"
    if result.largest_stable is None and result.points and len(result.skipped) == result.points:
        return f"nothing tested (every configuration tried, {result.points}, was skipped)"
    if result.interrupted:  # the point may be judged on the screen's seed alone: say so
        alone = j is not None and len(j.seeds) == 1 and result.space.base.run.seeds > 1
        return "interrupted, " + (
            stable.replace("stable", "stable on one seed so far", 1) if alone else stable
        )
    return stable


def outcome(result: SearchResult) -> str:
    """A search's result in one line (the CLI's summary after each search)."""
    cx = result.counterexample
    if cx is None:
        return no_explosion(result)
    return f"{cx.judgement.verdict.how} at {cx.config.describe()}{unverified(result)}"


def unverified(result: SearchResult) -> str:
    """What a counterexample cut short before its descent ended says beside it: one exploding on the
    screen's seed alone (nothing exploded on all seeds yet) says that too."""
    if result.minimal:
        return ""
    return (
        " (interrupted: on one seed alone, not verified minimal)"
        if alone(result)
        else " (interrupted: not verified minimal)"
    )


def alone(result: SearchResult) -> bool:
    """Whether the counterexample exploded on one seed alone, the search interrupted before any point
    exploded on all seeds (its config then holds that seed and seeds=1, so it reproduces)."""
    cx = result.counterexample
    return cx is not None and cx.config.run.seeds == 1 < result.space.base.run.seeds


def row(result: SearchResult) -> list[str]:
    """One table row: the counterexample, or the largest stable Config tried."""
    run = result.space.base.run
    cx = result.counterexample
    precision = precision_of(run)
    if cx is None:
        j = result.largest_stable_judgement
        return [
            result.space.label,
            run.device,
            precision,
            no_explosion(result),
            "-",
            _spread(j) if j else "-",
            j.kind.describe() if j else "-",
            "-",
            "-",
            str(result.probes),
        ]
    j = cx.judgement
    # the GradScaler's (an overflow at its scale: no update), summed over the seeds judged
    n, k = j.skipped_steps, len(j.seeds)
    skipped = f", the GradScaler skipped {n} step{'s' * (n != 1)} over {k} seed{'s' * (k != 1)}" if n else ""
    remedies = fixed_by(cx.remedies, result.interrupted)  # cut short: the row itself says so
    interrupted = unverified(result)
    return [
        result.space.label,
        run.device,
        precision,
        (knobs(result, cx.config) or "its one configuration (every knob fixed)")
        + (" (vanishes)" if j.verdict.how == "vanishes" else "")
        + interrupted,
        (j.verdict.criteria[0].describe() if j.verdict.criteria else "-") + skipped,
        _spread(j),
        j.kind.describe(),
        shown(cx.culprit),
        remedies,
        str(result.probes),
    ]


def table(results: Sequence[SearchResult], fmt: str = "simple") -> str:
    """The table of smallest exploding configurations, one row per target x device x dtype."""
    qs = {r.space.base.run.quantile for r in results}
    shown = headers(qs.pop() if len(qs) == 1 else None)
    return tabulate([row(r) for r in results], headers=shown, tablefmt=fmt, disable_numparse=True)
