"""The report's notes under the table: what a row alone would hide (a target exploding on some devices
only, skipped points, a growth no gradient could show, a cut chain, seeds that went non-finite too
few to fire), a line each. Rendering only."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from stabilitycheck.counterexample import SearchResult
from stabilitycheck.measurement import Measurement
from stabilitycheck.reporttable import alone, knobs, row
from stabilitycheck.subject import torch_dtype


def notes(results: Sequence[SearchResult]) -> list[str]:
    """Every note on `results`, one line each, in the order the report prints them."""
    return (
        one_sided(results)
        + skipped(results)
        + unmeasured(results)
        + cut(results)
        + unreached(results)
        + minority(results)
    )


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


def unreached(results: Sequence[SearchResult]) -> list[str]:
    """Lines naming each target whose shown measurement has a chain ending in an output no gradient
    reached (exactly 0) before a chain that got one, not cut by a detach (`cut` says those): the
    growth up to it is not measured. An encoder nn.RNN handing its final state to a decoder is read
    on its output sequence, which the loss does not use: growth 1 where the encoder's through time
    was 1.5^39, with no word of it (an audit). Not between calls of one block: a cell's windows that
    truncated backpropagation starts afresh, which a loss on the last token leaves unreached."""
    out = []
    for r in results:
        m = r.shown.measurement if r.shown is not None else None
        if m is None or m.first_nonfinite is not None or math.isnan(m.growth):  # unmeasured's 'not read'
            continue
        grads, names = m.activation_grad_norms, m.activation_names
        ends = [
            s - 1
            for s in m.chain_starts
            if s not in m.cut_before
            and grads[s - 1] == 0
            and any(grads[s:])
            and _block(names[s - 1]) != _block(names[s])  # a cell's windows: truncated backpropagation's
        ]
        if ends:
            out.append(
                f"! {r.space.label}: no gradient reaches {names[ends[0]]}'s output (exactly 0) where the "
                f"chain after it, from {names[ends[0] + 1]}, gets one: the growth up to it is not measured "
                "(a tower the loss does not use; or a later block takes another tensor it returns, an "
                "RNN's final state beside its output sequence, which the probe does not read: declare "
                "blocks that return that tensor first, stability_blocks() or blocks=)"
            )
        elif _last_unread(m):
            out.append(
                f"! {r.space.label}: no gradient reaches {names[-1]}'s output (exactly 0), read on the first "
                "tensor it returns, though its weights get one: the loss takes another tensor it returns, "
                "which the probe does not read, and the growth is measured only up to the last output a "
                "gradient reached (declare blocks that return that tensor first, stability_blocks() or "
                "blocks=)"
            )
    return out


def _last_unread(m: Measurement) -> bool:
    """The last call's output got exactly 0 where an earlier one got a gradient and the last block's
    weights did too: the model's loss reads another tensor the block returns (PiT's stages return
    (x, cls_tokens), its head reads cls_tokens: growth 1.41 over one stage of three, unsaid: an
    audit). Not a cell's truncated windows (the same block's calls before it)."""
    grads, names = m.activation_grad_norms, m.activation_names
    last = _block(names[-1]) if names else ""
    if not grads or grads[-1] != 0 or last not in m.layer_names:
        return False
    weights = m.layer_grad_norms[m.layer_names.index(last)]
    return weights > 0 and any(g for g, n in zip(grads, names, strict=True) if _block(n) != last)


def _block(call: str) -> str:
    """The block a call's name is of: `cell` of `cell[9]`."""
    return call.split("[", 1)[0]


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
