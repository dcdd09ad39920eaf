"""Reports: the whole terminal report (the table, its notes, then each row's details: spread, growth
kind, remedies, sparkline profile, reproduction line), JSON and Markdown.

Rendering only: every number shown was computed by the probe or the search.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from stabilitycheck._json import strict_json
from stabilitycheck.config import Config, Run
from stabilitycheck.counterexample import SearchResult
from stabilitycheck.culprit import made_by
from stabilitycheck.judgement import Judgement
from stabilitycheck.measurement import AFTER_LAST, AFTER_LAST_SAID, INPUT, Measurement, shown
from stabilitycheck.reportnotes import notes
from stabilitycheck.reporttable import alone, knobs, precision_of, table
from stabilitycheck.spread import bracket
from stabilitycheck.verdicts import Limits, bound, limits_text

SPARKS = "▁▂▃▄▅▆▇█"
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
                    f"{r.space.label} [{config.run.device}, {precision_of(config.run)}]: stable at {where} "
                    f"(q={config.run.quantile:g} over seeds {', '.join(map(str, j.seeds))}{judged_on})\n"
                    + measured.rstrip("\n")
                )
            continue
        j = cx.judgement
        remedies = "; ".join(x.describe() for x in cx.remedies) or "not tried (interrupted)"
        q = cx.config.run.quantile
        blocks.append(
            f"{r.space.label} [{cx.config.run.device}, {precision_of(cx.config.run)}]: "
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


def text(results: Sequence[SearchResult]) -> str:
    """The full terminal report."""
    parts = [table(results), "\n".join(notes(results)), details(results)]
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
