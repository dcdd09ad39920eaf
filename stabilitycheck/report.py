"""Reports: render search results as a table, sparklines, reproduction lines, JSON and Markdown.

Rendering only: every number shown was computed by the probe or the search.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from tabulate import tabulate

from stabilitycheck._json import strict_json
from stabilitycheck.config import Config, Run
from stabilitycheck.counterexample import SearchResult
from stabilitycheck.culprit import made_by
from stabilitycheck.judgement import Judgement
from stabilitycheck.measurement import AFTER_LAST, AFTER_LAST_SAID, INPUT, Measurement, shown
from stabilitycheck.remedies import fixed_by
from stabilitycheck.spread import bracket
from stabilitycheck.subject import torch_dtype
from stabilitycheck.verdicts import Limits, bound, limits_text

SPARKS = "▁▂▃▄▅▆▇█"
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


def _precision(run: Run) -> str:
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
    precision = _precision(run)
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


SPAN = math.log10(2.0)  # the least range the sparkline's levels span: values within 2x of each other


def sparkline(values: Sequence[float], width: int = 64) -> str:
    """A log-scale sparkline; non-finite values show as '!' (never hidden), zeros as ' '. Its levels
    span at least a factor 2 (SPAN): a flat profile is drawn flat (values 0.009% apart drew a full
    ramp)."""
    if len(values) > width:  # keep the largest of each bucket, so a spike is never averaged away,
        step = len(values) / width  # and a NaN first (max() kept one only in a bucket's first place)
        buckets = [values[int(k * step) : max(int((k + 1) * step), int(k * step) + 1)] for k in range(width)]
        values = [next((v for v in b if math.isnan(v)), max(b)) for b in buckets]
    logs = [math.log10(v) for v in values if math.isfinite(v) and v > 0]
    lo, hi = (min(logs), max(logs)) if logs else (0.0, 0.0)
    out = []
    for v in values:
        if not math.isfinite(v):
            out.append("!")
        elif v <= 0:
            out.append(" ")
        else:
            level = round((math.log10(v) - lo) / max(hi - lo, SPAN) * (len(SPARKS) - 1))
            out.append(SPARKS[level])
    return "".join(out)


def profile(j: Judgement, q: float) -> str:
    """The per-block gradient-norm profile of the seed whose growth is the q-quantile (or a recurrent
    subject's own-loss probe that went non-finite: Judgement.own_loss), input side first, naming that
    seed where there are several."""
    m = j.measurement
    whose = f" (seed {j.measured_seed}: the q={q:g} growth of {len(j.seeds)})" if len(j.seeds) > 1 else ""
    if j.own_loss:
        whose = f" (seed {j.measured_seed}'s probe under its own loss, where it went non-finite)"
    values = m.activation_grad_norms or m.layer_grad_norms
    names = m.activation_names or m.layer_names
    if not values:
        return "(no blocks)"
    finite = [v for v in values if math.isfinite(v)]
    # the first and the last value as they are (a NaN shows as nan, as '!' in the sparkline)
    span = f"{values[0]:.3g} .. {values[-1]:.3g}" if finite else "all non-finite"
    what = "|dL/d out|" if names[0] != INPUT else "|dL/d (input)|, then |dL/d out|"
    when = f" at step {m.profile_step} (none reached a block before)" if m.profile_step else ""
    first, last = (f"block {shown(n)}" if n[:1].isdigit() else n for n in (names[0], names[-1]))
    # several chains: first over last is no growth (bart's 117 .. 0.718 beside its growth 116)
    chains = (
        f"; chains from {shown(', '.join(names[i] for i in m.chain_starts))} on: the growth is read per "
        "chain, not first over last"
        if m.chain_starts and values is m.activation_grad_norms
        else ""
    )
    return f"{first} {sparkline(values)} {last}   {what}{when} first .. last: {span}{chains}{whose}"


def _fitted(j: Judgement, q: float) -> str:
    """What the kind's rate or exponent is, where several seeds were fitted: their q-quantile."""
    fits = len(j.seeds) > 1 and j.kind.kind in ("exponential", "polynomial")
    return f" (q={q:g} over {len(j.seeds)} seeds' fits)" if fits else ""


def config_call(config: Config) -> str:
    """Python source of `config`: its knobs, then the run settings that differ from the defaults."""
    run = [f"{k}={v!r}" for k, v in vars(config.run).items() if v != getattr(Run(), k)]
    args = [repr(config.subject), *(f"{k}={v!r}" for k, v in config.knobs), *run]
    return f"sc.Config.of({', '.join(args)})"


def reproduction(config: Config, limits: Limits | None = None) -> str:
    """A line a user can paste to re-judge the Config, with the limits and seeds used."""
    limits = limits or Limits()
    lim = ", ".join(f"{k}={v!r}" for k, v in vars(limits).items() if v != getattr(Limits(), k))
    return (
        f'python -c "import stabilitycheck as sc; c = {config_call(config)}; '
        f'print(sc.assess(c, limits=sc.Limits({lim})).verdict)"'
    )


def _unjudged_note(r: SearchResult, below: Config, why: str) -> str:
    """A one-step-lower neighbour that could not be judged: 1-minimal there is unverified."""
    return (
        f"\n  note      one step lower, {knobs(r, below)} was skipped ({why}): the point is 1-minimal "
        "only among the neighbours judged, a smaller one may explode"
    )


def _searched(r: SearchResult) -> str:
    """How much of the grid a stable row's search judged: stable says no more than that where the
    verdict is not monotone in the knobs (the post-norm transformer's growth peaks at depth 5 and is 20
    at 24, whose stable top corner and 10 examples read `stable`); none for a
    stored counterexample judged again (--replay), which searched nothing. Points skipped (the model
    raised there, too large, too slow) are no judged ones: they read 'judged: stable' (19 for 10)."""
    if r.replayed:
        return ""
    judged, skipped = r.points - len(r.skipped), len(r.skipped)
    more = f" ({skipped} more skipped)" if skipped else ""
    return (
        f"  searched  {judged} of the grid's {r.space.size} points judged{more}: stable on those; where the "
        "verdict is not monotone in the knobs, a point not judged can explode (more --max-examples, or "
        "`stabilitycheck map` over two knobs, judges more)"
    )


def _top_note(r: SearchResult) -> str:
    """Why the point reported is one 1-minimal point among others, where the top corner is stable."""
    top = knobs(r, r.space.config(r.space.top()))
    return (
        f"\n  note      the top corner ({top}) is stable: the verdict is not monotone in the knobs here, so "
        "the descent started from Hypothesis' first failure, and another --seed can end on another "
        "1-minimal point, maybe smaller"
    )


def _bottom_note(r: SearchResult) -> str:
    """Where the point reported is the lowest corner of the space: nothing smaller was searched."""
    cx = r.counterexample
    if cx is None or not r.space.axes or cx.config.knobs != r.space.config((0,) * len(r.space.axes)).knobs:
        return ""  # no axis searched (every knob fixed): no corner to speak of
    nf = cx.judgement.measurement.first_nonfinite
    if nf is not None and nf.layer == INPUT and nf.step == 0:
        return (
            f"\n  note      the model's input is non-finite ({nf.describe()}): no knob changes that; "
            "give finite inputs (batch(), example_input)"
        )
    how = cx.judgement.verdict.how  # 'vanishes' where vanishing alone fired
    return (
        f"\n  note      this is the lowest corner of the space searched ({knobs(r, cx.config)}): every knob "
        f"is at its smallest value, so the model {how} there already; lower the ranges (--knob) to "
        "find where it stops"
    )


def _below_note(r: SearchResult) -> str:
    """Where a point below the one reported in every knob failed too: the criteria are not monotone
    there, and 'smallest exploding' means 1-minimal (a stall limit firing at depth 1, seen by the
    search, beside a report of depth 21)."""
    if r.below is None:
        return ""
    config, read, seed = r.below
    reported = (
        "the point reported is 1-minimal (no knob one step lower fails)"
        if r.minimal
        else "the point reported was not verified 1-minimal (interrupted)"
    )
    if seed is not None:  # one seed's failure: the verdict over seeds may differ there
        return (
            f"\n  note      {knobs(r, config)}, below it in every knob, failed on seed {seed} alone: {read} "
            "(one seed steers the search; that point was not judged over seeds): the criteria may not "
            f"be monotone in the knobs; {reported}, not necessarily the smallest failing one"
        )
    return (
        f"\n  note      {knobs(r, config)}, below it in every knob, failed too (on the full rule: "
        f"{read}): the criteria are not monotone in the knobs here; {reported}, not the smallest "
        "failing one"
    )


def _nonfinite_line(m: Measurement) -> str:
    """Where the profile's seed first went non-finite (step, tensor, block), when it did: the culprit
    column names the block alone, not whether at init or in training."""
    nf = m.first_nonfinite
    if nf is None:
        return ""
    overflow = "; float32 stays finite there: the dtype's range" if m.overflow is not None else ""
    maker = made_by(m)  # the loss after the last call, a block taking the output, or a block's name
    maker = AFTER_LAST_SAID if maker == AFTER_LAST else (maker or "").strip("()")
    made = f" (made by the backward of {shown(maker)})" if maker else ""
    return f"  nonfinite {nf.describe()}{made}, in the profile's seed{overflow}\n"


def details(results: Sequence[SearchResult]) -> str:
    """Below the table: for each counterexample its spread, growth kind, remedies, profile and
    reproduction line; for a stable row, the same of the largest point tried (which blocks were
    measured, and how the gradient ran through them, whatever the verdict)."""
    blocks = []
    for r in results:
        cx = r.counterexample
        if cx is None:
            j = r.largest_stable_judgement
            if j is not None and r.largest_stable is not None:
                config = r.largest_stable
                point = knobs(r, config)
                one = "its one configuration (every knob fixed)"
                where = f"{point}, the largest point tried" if point else one
                measured = _measured(j, config.run.quantile, r.limits, config.run.seeds) + _searched(r)
                lim = r.limits
                judged_on = f"; limits {limits_text(lim, r.space.trains())}" if lim is not None else ""
                blocks.append(
                    f"{r.space.label} [{config.run.device}, {_precision(config.run)}]: stable at {where} "
                    f"(q={config.run.quantile:g} over seeds {', '.join(map(str, j.seeds))}{judged_on})\n"
                    + measured.rstrip("\n")
                )
            continue
        j = cx.judgement
        remedies = "; ".join(x.describe() for x in cx.remedies) or "not tried (interrupted)"
        q = cx.config.run.quantile
        blocks.append(
            f"{r.space.label} [{cx.config.run.device}, {_precision(cx.config.run)}]: "
            f"{', '.join(c.describe() for c in j.verdict.criteria)} "
            f"(q={q:g} over seeds {', '.join(map(str, j.seeds))})\n"
            + _measured(j, q, cx.limits, cx.config.run.seeds)
            + f"  remedies  {remedies}\n"
            f"  reproduce {reproduction(cx.config, cx.limits)}"
            + (_top_note(r) if r.top_stable else "")
            + _bottom_note(r)
            + "".join(_unjudged_note(r, c, why) for c, why in r.unjudged)
            + _below_note(r)
        )
    return "\n\n".join(blocks)


def _measured(j: Judgement, q: float, limits: Limits | None = None, budget: int | None = None) -> str:
    """A judgement's growth, its brackets (`limits`: a counterexample's; `budget`: the seeds it could
    spend), kind (with the blocks measured), profile and first non-finite value: one line each."""
    own = f"; per token (its own loss): {j.per_token.describe()}" if j.per_token else ""
    peak = "peak grad norm (its own loss)" if j.per_token else "peak grad norm"
    return (
        f"  growth    {j.summary()}; {peak} {j.grad_norm.describe()}{own}\n"
        + _bracket(j, q, limits, budget)
        + f"  kind      {j.kind.describe()}{_fitted(j, q)}; {j.measurement.blocks_note}\n"
        f"  profile   {profile(j, q)}\n" + _nonfinite_line(j.measurement)
    )


BRACKETED = ("growth", "grad_norm", "divergence", "vanishing", "stall")  # criteria of continuous values


def _bracket(j: Judgement, q: float, limits: Limits | None = None, budget: int | None = None) -> str:
    """Where the seeds put the initialisation distribution's q-quantile of the growth, and of each
    other criterion that fired: between two order statistics of the seeds' values, whatever the
    distribution (spread.bracket: the least and largest of 5 seeds at the median, 93%; more seeds
    take inner ones, which narrow). A verdict is about that quantile, and one seed's growth varies
    3-10x near the limit (hf:t5's 5 seeds read 231 where 25 read 43): the line says how far the seeds
    spent pin it down, and, given the `limits`, when the limit lies inside the bracket, where the
    verdict is the seeds' (a search stops at the first point its seeds fire at, which favours high
    draws: hf:bert's 4 of 4 seeds read 242 at a point whose median over 80 is 83). The confidence is
    rounded down, never up to 100%, and for n seeds fixed in advance: where the verdict stopped
    before its `budget`, once the seeds so far decided it, it is nominal (seeds that agree hold the
    quantile less often: near the limit, runs stopped at 3 of 5 held the median 0 times in 16, for
    75% printed). None over one seed, or with NaN."""
    lines = []
    for name in ("growth", *(c for c in j.verdict.names if c in BRACKETED and c != "growth")):
        got = bracket([v[name] for v in j.values], q)
        if got is None or not (math.isfinite(got.low) and math.isfinite(got.high)):
            continue
        ranks = (
            "the least and largest"
            if (got.i, got.j) == (1, got.n)
            else f"the {_ordinal(got.i)} and {_ordinal(got.j)} smallest"
        )
        limit = bound(name, limits) if limits is not None else None
        inside = (
            f"; the limit {limit:g} lies inside it: the verdict is these seeds' (--seeds N narrows it)"
            if limit is not None and got.low < limit < got.high
            else ""
        )
        nominal = (
            f"; nominal: the verdict stopped at {got.n} of {budget} seeds once they decided it, and seeds "
            "that agree hold the quantile less often than seeds fixed in advance"
            if budget is not None and got.n < budget
            else ""
        )
        lines.append(
            f"  bracket   the distribution's q={q:g} {name} lies in {got.low:.3g}-{got.high:.3g} with "
            f"{math.floor(got.confidence * 100)}% confidence ({ranks} of {got.n} seeds){inside}{nominal}\n"
        )
    return "".join(lines)


def _ordinal(k: int) -> str:
    """1st, 2nd, 3rd, 4th ... 11th, 12th, 13th ... 21st."""
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


def one_sided(results: Sequence[SearchResult]) -> list[str]:
    """Lines naming each target that explodes on some devices or precisions but not on others: stable
    on those a search finished with points judged, not judged on those where every point was skipped
    or the search was interrupted (a row that tested nothing was called stable), and where it exploded
    on one seed alone (`alone`: on all seeds it may be stable)."""
    out = []
    for label in dict.fromkeys(r.space.label for r in results):
        rows = [r for r in results if r.space.label == label]
        where = {id(r): f"{r.space.base.run.device}/{row(r)[2]}" for r in rows}
        bad = {where[id(r)] for r in rows if r.counterexample and not alone(r)}
        judged = {where[id(r)] for r in rows if not r.counterexample and _stable(r)}
        unjudged = {where[id(r)] for r in rows if alone(r) or (not r.counterexample and not _stable(r))}
        others = [
            f"{what} on {', '.join(sorted(s))}"
            for what, s in (("stable", judged), ("not judged", unjudged))
            if s
        ]
        if bad and others:
            only = "" if unjudged else " only"
            out.append(f"! {label} explodes{only} on {', '.join(sorted(bad))} ({'; '.join(others)})")
    return out


def _stable(r: SearchResult) -> bool:
    """A search without a counterexample that judged points and finished: its target is stable there."""
    return r.largest_stable is not None and not r.interrupted


def skipped(results: Sequence[SearchResult]) -> list[str]:
    """Lines naming the configurations skipped (too large, too slow, failing in user code)."""
    return [
        f"! {r.space.label}: {len(r.skipped)} configuration(s) skipped, e.g. "
        f"{knobs(r, r.skipped[-1][0]) or r.skipped[-1][0].describe()}: {r.skipped[-1][1]}"  # no axis: all
        for r in results
        if r.skipped
    ]


def unmeasured(results: Sequence[SearchResult]) -> list[str]:
    """Lines naming each target whose reported growth no gradient could show: none reached any block
    output in the step the profile was read at (a zero-initialised head), so every gain is 0 / 0 and
    a stable row says only that nothing grew; or none reached one chain's (timm's RegNet, read on its
    leaf modules, whose branches end in zero-initialised norms), whose growth NaN read as stable with
    no word of it."""
    out = []
    for r in results:
        m = r.shown.measurement if r.shown is not None else None
        if m is None or not m.activation_grad_norms:
            continue
        if any(m.activation_grad_norms):
            grads = m.activation_grad_norms
            if m.growth == 0 and m.first_nonfinite is None and grads[0] == 0:
                dead = max(i for i, g in enumerate(grads) if g == 0)
                names = m.activation_names
                config = r.counterexample.config if r.counterexample else r.largest_stable
                plain = config is not None and config.run.amp == "none"
                dtype = config.run.dtype if plain and config is not None else None
                tiny = torch.finfo(torch_dtype(dtype)).tiny if dtype else 0.0
                subnormal = dead + 1 < len(grads) and grads[dead + 1] < tiny  # every element of it
                # float16's smallest normal number, 6.1e-5, is a common gradient norm: its underflow is
                # one of two readings there (a ReLU dead in every precision read 'underflowed')
                if subnormal and dtype != "float16":
                    out.append(
                        f"! {r.space.label}: growth 0: the gradient underflowed to 0 in {dtype} "
                        f"(|dL/d out| is {grads[dead + 1]:.3g} at {names[dead + 1]}, below {dtype}'s "
                        f"smallest normal number {tiny:.3g}, and 0 at {names[dead]} and before it): a "
                        "gradient that vanishes, which the growth limit cannot fire on (--vanishing-limit "
                        "X judges it); --dtype float64 reads how far"
                    )
                    continue
                by = f"the backward of {names[dead + 1]}" if dead + 1 < len(names) else "the backward"
                under = (
                    f"; or an underflow to 0 in float16: |dL/d out| is {grads[dead + 1]:.3g} at "
                    f"{names[dead + 1]}, below its smallest normal number {tiny:.3g}, every element "
                    "subnormal: --dtype float32 tells which"
                    if subnormal
                    else ""
                )
                out.append(
                    f"! {r.space.label}: growth 0: {by} passes no gradient (dL/d output is exactly 0 at "
                    f"{names[dead]} and before it: a dead layer, a ReLU whose inputs are all negative, a "
                    "zero weight, or another tensor the block returns carries it: an nn.LSTMCell's c "
                    f"passed on as a copy, read on h alone{under}), a vanishing the growth limit cannot "
                    "fire on; --vanishing-limit X judges it"
                )
            if math.isnan(m.growth) and m.first_nonfinite is None:
                out.append(
                    f"! {r.space.label}: growth not read: every dL/d output of a chain of its blocks is 0 "
                    "(its gains 0 / 0: a branch behind a zero-initialised norm or scale, a tower the loss "
                    "does not use), so the growth criterion cannot fire; declare the blocks of the main "
                    "chain (blocks=... or stability_blocks()), or --steps 1 reads them after one update"
                )
            continue
        if m.first_nonfinite is not None:  # its nonfinite line says why: an Inf divided by passes 0
            continue
        when, fix = (
            (f"in any of its {m.steps_run + 1} steps", "initialise the head")
            if m.steps_run
            else ("at step 0", "--steps 1 reads it after one update, or initialise the head")
        )
        out.append(
            f"! {r.space.label}: growth not measured: no gradient reached any block output {when} (every "
            f"dL/d output is 0, as behind a zero-initialised head, where the loss does not depend on "
            f"the blocks, or where blocks return their chain's tensor after another, (attn, h), read on "
            f"the first: return h first); {fix}"
        )
    return out


def cut(results: Sequence[SearchResult]) -> list[str]:
    """Lines naming each target whose shown measurement has a block taking the output before it with
    no gradient (Measurement.cut_before): that output gets none from this loss (nor those before it,
    where no earlier output got any: a skip around the cut, a second loss term or a tied weight
    reaches them), and the growth is read from the cut on (a detach left in a 12-block stack read
    stable, growth 0.705, with no word of it; a frozen backbone under a trained head is meant so)."""
    out = []
    for r in results:
        m = r.shown.measurement if r.shown is not None else None
        if m is None:
            continue
        names = m.activation_names
        for s in m.cut_before:
            before = " or those before it" if not any(m.activation_grad_norms[:s]) else ""
            out.append(
                f"! {r.space.label}: {names[s]} takes {names[s - 1]}'s output with no gradient (detach(), "
                f".data or torch.no_grad()): no gradient reaches that output{before} from this loss, and "
                f"the growth is read from {names[s]} on; where that is not meant, the gradient vanishes "
                "there (exactly 0) and no limit can fire on it"
            )
    return out


def minority(results: Sequence[SearchResult]) -> list[str]:
    """Lines naming each shown verdict where some seeds went non-finite but too few to fire at its
    quantile (2 of 5 at the median): the row read stable, exit 0, with no word of them. Going
    non-finite is all or nothing per initialisation, so such a model fails on some of its draws; the
    quantile that would judge them is said."""
    out = []
    for r in results:
        j = r.shown
        if j is None or "nonfinite" in j.verdict.names or "overflow" in j.verdict.names:
            continue
        broken = sum(
            math.isinf(v.get("nonfinite", 0.0)) or math.isinf(v.get("overflow", 0.0)) for v in j.values
        )
        if not broken:
            continue
        n, budget = len(j.seeds), r.space.base.run.seeds
        config = r.counterexample.config if r.counterexample else r.largest_stable
        where = f" at {knobs(r, config)}" if config is not None else ""
        q = (budget - broken + 1) / budget  # the quantile whose verdict these seeds decide
        out.append(
            f"! {r.space.label}: {broken} of the {n} seeds spent went non-finite (NaN or Inf){where}, "
            f"too few to fire at q={r.space.base.run.quantile:g}: the verdict is the other seeds'; the "
            f"model fails on some of its initialisations (--quantile {q:.2g} judges them)"
        )
    return out


def text(results: Sequence[SearchResult]) -> str:
    """The full terminal report."""
    notes = one_sided(results) + skipped(results) + unmeasured(results) + cut(results) + minority(results)
    parts = [table(results), "\n".join(notes), details(results)]
    return "\n\n".join(p for p in parts if p)


def to_json(results: Sequence[SearchResult], left: Sequence[dict[str, Any]] = ()) -> str:
    """Machine-readable results; each counterexample's `config` replays with --replay. The entries
    `left` (the targets an interrupt left unsearched) follow as they are."""
    data: list[dict[str, Any]] = [
        {
            "label": r.space.label,
            "searched": [a.name for a in r.space.axes],  # the knobs searched (--replay names them)
            "probes": r.probes,
            "last_step_probes": r.last_step_probes,
            "points": r.points,
            "skipped": [{"config": c.to_dict(), "reason": why} for c, why in r.skipped],
            "elapsed_s": r.elapsed,
            "interrupted": r.interrupted,
            "limits": vars(r.limits) if r.limits is not None else None,  # what every point was judged on
            "top_stable": r.top_stable,
            "minimal": r.minimal if r.counterexample else None,  # verified 1-minimal; none: no claim
            # seen on one seed alone (its config holds that seed): the run the search judged on all seeds
            "alone": {"seed": r.space.base.run.seed, "seeds": r.space.base.run.seeds} if alone(r) else None,
            "unjudged": [{"config": c.to_dict(), "reason": why} for c, why in r.unjudged],
            "below": None
            if r.below is None
            else {"config": r.below[0].to_dict(), "read": r.below[1], "seed_alone": r.below[2]},
            "largest_stable": r.largest_stable.to_dict() if r.largest_stable else None,
            "largest_stable_judgement": (
                r.largest_stable_judgement.to_dict() if r.largest_stable_judgement else None
            ),
            "counterexample": r.counterexample.to_dict() if r.counterexample else None,
        }
        for r in results
    ]
    return strict_json([*data, *left])


def markdown(results: Sequence[SearchResult], left: Sequence[str] = ()) -> str:
    """A Markdown summary for a CI job: the table, the limits each row was judged on, each
    reproduction line in a code block, and the targets `left` unsearched (interrupted first)."""
    parts = ["## stabilitycheck", "", table(results, fmt="github")]
    if left:  # no row of theirs: a summary of 5 of 8 zoo targets read as the whole zoo
        parts += ["", f"Not searched (interrupted first): {', '.join(left)}."]
    judged = dict.fromkeys(limits_text(r.limits, r.space.trains()) for r in results if r.limits is not None)
    if judged:
        parts += ["", f"Judged on the limits {' / '.join(judged)}."]
    for r in results:
        if r.counterexample is not None:
            parts += [
                "",
                f"**{r.space.label}** ({r.counterexample.config.run.device}): reproduce with",
                "",
                "```bash",
                reproduction(r.counterexample.config, r.counterexample.limits),
                "```",
            ]
    return "\n".join(parts) + "\n"
