"""The `stabilitycheck` command: search the zoo, a model file or a Hugging Face model type for the
smallest configuration whose gradients explode, and report it.

Exit codes: 0 nothing explodes, 1 an explosion found, 2 usage or model-file error, 3 internal error,
130 interrupted (Ctrl-C), 143 terminated (SIGTERM); what was found so far is still printed and written.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Sequence
from typing import Any

from stabilitycheck._command import interrupted, require_devices, run_command, stop_if_signalled
from stabilitycheck._options import EXIT_FOUND as EXIT_FOUND  # `X as X`: public here (exit codes, parser)
from stabilitycheck._options import EXIT_INTERRUPTED as EXIT_INTERRUPTED
from stabilitycheck._options import EXIT_OK as EXIT_OK
from stabilitycheck._options import EXIT_TERMINATED as EXIT_TERMINATED
from stabilitycheck._options import EXIT_USAGE as EXIT_USAGE
from stabilitycheck._options import apply_knobs, require_steps
from stabilitycheck._options import parser as parser
from stabilitycheck._outputs import Outputs as Outputs
from stabilitycheck._outputs import Progress as Progress
from stabilitycheck._outputs import Unsearched, said
from stabilitycheck.alarms import stop_seen
from stabilitycheck.errors import UsageError


def _devices(requested: list[list[str]]) -> list[str]:
    """The devices to search on: each --device once, 'all' as every one this machine has."""
    import torch

    names = list(dict.fromkeys(d for group in requested for d in group)) or ["cpu"]  # each once
    if "all" in names:
        if not torch.cuda.is_available():
            sys.stderr.write("stabilitycheck: note: --device all: no CUDA device on this machine, CPU only\n")
            return ["cpu"]
        return ["cpu", "cuda"]
    require_devices(names, " (or all)")
    return names


def _families(args: argparse.Namespace) -> list[str]:
    """The zoo targets --family names (repeatable, comma-separated), each once, in order."""
    return list(dict.fromkeys(f for group in args.family for f in group))


def _spaces(args: argparse.Namespace) -> list[Any]:
    """Every Space to search: target x device x dtype, with the CLI's overrides."""
    from stabilitycheck.subjects import resolve

    if args.target is None:
        raise UsageError("no target given; expected 'zoo', a zoo family, MODEL.py[:factory] or hf:TYPE")
    if args.target == "zoo":
        from stabilitycheck.zoo import targets

        zoo = targets()
        names = _families(args) or list(zoo)
        unknown = [n for n in names if n not in zoo]
        if unknown:
            raise UsageError(f"--family {unknown[0]!r} is not a zoo target; expected one of {', '.join(zoo)}")
        pairs = [(resolve(zoo[n].base.subject), zoo[n]) for n in names]
    else:
        if args.family:
            raise UsageError("--family applies to 'stabilitycheck zoo' only")
        subject = resolve(args.target)
        pairs = [(subject, subject.space())]
    run: dict[str, Any] = {
        k: getattr(args, k) for k in ("steps", "lr", "optimizer", "clip") if getattr(args, k) is not None
    }
    run.update(seed=args.seed, seeds=args.seeds, quantile=args.quantile)
    dtypes = list(dict.fromkeys(d for group in args.dtype for d in group))  # float32,float32: one search
    from stabilitycheck.searching import check

    out = []
    for subject, space in pairs:
        space = apply_knobs(space.with_run(**run), args.knob)
        if args.target != "zoo":  # the user's code, at the lowest corner of the space, else elsewhere
            check(subject, *(space.config(index) for index in space.spread_points()))
        for device in _devices(args.device):
            for dtype in dtypes or [space.base.run.dtype]:
                amp = args.amp if args.amp != "auto" else ("bfloat16" if device == "cpu" else "float16")
                out.append((subject, space.with_run(device=device, dtype=dtype, amp=amp or "none")))
    return out


LIMIT_FIELDS = {  # the command line's limit options by Limits field (`run` and `_limits_given`)
    "grad_norm": "grad_norm_limit",
    "growth": "growth_limit",
    "divergence": "divergence_limit",
    "vanishing": "vanishing_limit",
    "stall": "stall_limit",
}


def _given(argv: Sequence[str] | None) -> dict[str, Any]:
    """The options the command line gives itself, by dest, with their values: one given at its
    default value is given (--seeds 5), one left out is not."""
    unset = object()  # not a string: argparse would parse a string default as if it were given
    p = parser()
    options = [a for a in p._actions if a.option_strings and a.dest != "help"]
    # an appending option's default must be a list or None (argparse appends to it): None stands out
    p.set_defaults(**{a.dest: None if isinstance(a, argparse._AppendAction) else unset for a in options})
    parsed = vars(p.parse_args(argv))
    return {
        a.dest: parsed[a.dest] for a in options if parsed[a.dest] is not unset and parsed[a.dest] is not None
    }


def _limits_given(given: dict[str, Any]) -> dict[str, Any]:
    """Of the options `given` (`_given`), the limits, by Limits field."""
    return {field: given[dest] for field, dest in LIMIT_FIELDS.items() if dest in given}


REPLAY_TAKES = {  # the options a replay uses; and the search's budget and example store, which change
    # no verdict (a CI step replaying with its search's arguments passes them)
    *("replay", "target", "json", "markdown", "plot", "quiet", "debug", "max_examples", "database"),
    *LIMIT_FIELDS.values(),
}


def _replay_alone(given: dict[str, Any]) -> None:
    """--replay beside an option it does not use (a knob, the seeds, the dtype, the family), given at
    any value (`given`: `_given`'s): a UsageError naming them, where each was ignored in silence
    (--dtype float64 --seeds 1 replayed in float32 on 3 seeds, and printed 'clip: n/a (no optimiser
    steps: --steps N)' after --steps 5)."""
    flags = {a.dest: a.option_strings[0] for a in parser()._actions if a.option_strings}
    ignored = [flags[d] for d in given if d not in REPLAY_TAKES]
    if ignored:
        verb = "has" if len(ignored) == 1 else "have"
        raise UsageError(
            f"{', '.join(ignored)} {verb} no effect with --replay: a replay re-judges each stored "
            "counterexample as it was found (its knobs, seeds and run settings), on its stored limits or "
            "the limit options given; drop them, or search again without --replay"
        )


def _replay(args: argparse.Namespace, limits: Any) -> list[Any]:
    """Re-judge the counterexamples stored in a --json file, each on the limits it was found under
    (a counterexample found under --growth-limit 50 read stable on the default 100, exit 0: a CI job
    replaying it passed), but for a limit the command line sets; a target named replays its own rows
    alone. Replay is data, not code: a model file named in the JSON is imported only when the command
    line names that same file as the target."""
    from stabilitycheck._validation import describe
    from stabilitycheck.config import Config, kind
    from stabilitycheck.searching import Counterexample, SearchResult, try_remedies
    from stabilitycheck.seeds import assess
    from stabilitycheck.space import Space
    from stabilitycheck.subjects import resolve

    where = f"--replay {args.replay}"
    if not args.replay.is_file():
        raise UsageError(f"{where}: no such file; give the JSON file a run wrote with --json FILE")
    try:
        stored = json.loads(args.replay.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(
            f"{where}: cannot read it as UTF-8 JSON ({describe(exc)}); give the JSON file a run wrote with "
            "--json FILE"
        ) from None
    if isinstance(stored, dict) and {"x", "y", "points"} <= set(stored):  # `map --json`'s: no rows
        raise UsageError(
            f"{where}: it is a phase map's JSON (stabilitycheck map --json), which --replay does not take; "
            "--replay takes the list a search's --json writes (stabilitycheck zoo/model.py --json FILE)"
        )
    if not isinstance(stored, list) or not all(isinstance(e, dict) for e in stored):
        raise UsageError(f"{where}: expected the list written by --json, got {type(stored).__name__}")
    target = resolve(args.target) if args.target not in (None, "zoo") else None
    rows = []  # (entry, its counterexample, the config to judge), all read before any is judged
    for entry in stored:
        cx = entry.get("counterexample")
        if not cx:
            continue
        if not isinstance(cx, dict) or "config" not in cx:
            raise UsageError(f"{where}: a counterexample has no 'config'; expected the output of --json")
        rows.append((entry, cx, _judged_config(Config.from_dict(cx["config"]), entry.get("alone"), where)))
    if not rows:
        raise UsageError(
            f"{where}: it holds no counterexample to replay (every result in it was stable or not searched, "
            "or it is empty); replay re-judges the exploding rows a --json file recorded"
        )
    named = sorted({config.subject for _, _, config in rows})
    if target is not None:  # a target named replays its own rows alone (mlp --replay zoo.json: the mlp's)
        rows = [row for row in rows if row[2].subject == target.name]
        if not rows:  # checked before any is judged: it said so after replaying every row
            raise UsageError(
                f"{where} holds no counterexample of {args.target} (its rows are of {', '.join(named)}); "
                f"replay it without naming {args.target}, or give a --json file a run of {args.target} wrote"
            )
    for _, _, config in rows:
        if kind(config.subject) == "file" and target is None:
            raise UsageError(
                f"{where} names the model file {config.subject}; replaying would run its code, so name "
                f"it on the command line: stabilitycheck {config.subject} --replay {args.replay}"
            )
    results = []
    for entry, cx, config in rows:
        subject = target if target is not None else resolve(config.subject)
        judged = _stored_limits(cx, where, args.limits_given) or limits
        j = assess(config, subject, judged)
        label = str(entry.get("label", config.subject))
        remedies = tuple(try_remedies(config, subject, judged, fired=j.verdict.names))
        found = Counterexample(label, config, j, judged, remedies)
        space = Space(label, config, _searched_axes(label, subject, config, entry.get("searched")))
        results.append(
            SearchResult(
                space,
                found if j.exploded else None,
                len(j.seeds),
                1,
                0.0,
                None if j.exploded else config,
                None if j.exploded else j,
                limits=judged,
                replayed=True,
            )
        )
    return results


def _judged_config(config: Any, alone: Any, where: str) -> Any:
    """The stored counterexample's config, or, where the search saw it explode on one seed alone (an
    interrupted search: `alone` holds its run's seed and seeds), that point on all those seeds: a
    replay judges the claim a finished search would have made, not one draw."""
    if alone is None:
        return config
    if not isinstance(alone, dict) or not all(isinstance(alone.get(k), int) for k in ("seed", "seeds")):
        raise UsageError(
            f"{where}: 'alone' must hold the integers 'seed' and 'seeds'; expected --json's output"
        )
    return config.with_run(seed=alone["seed"], seeds=alone["seeds"])


def _stored_limits(cx: dict[str, Any], where: str, given: dict[str, Any]) -> Any:
    """The Limits a stored counterexample was judged on, with those the command line sets in their
    place; None where it stores none (a file written before limits were stored)."""
    from stabilitycheck.verdicts import Limits

    stored = cx.get("limits")
    if stored is None:
        return None
    fields = {**dict.fromkeys(LIMIT_FIELDS, "a number > 0 or null"), "nonfinite": "true or false"}
    if not isinstance(stored, dict) or set(stored) - set(fields):
        raise UsageError(f"{where}: a counterexample's 'limits' is not the object --json writes ({stored!r})")
    for name, value in stored.items():
        number = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
        if not (isinstance(value, bool) if name == "nonfinite" else value is None or number):
            raise UsageError(f"{where}: a counterexample's limit {name}={value!r} must be {fields[name]}")
    return Limits(**{**stored, **given})


def _searched_axes(label: str, subject: Any, config: Any, searched: Any) -> tuple[Any, ...]:
    """The axes a replayed row names its knobs by: those the search had (`searched`, the names the JSON
    stores: a knob searched with --knob beside a file's SPACE was left out, and the row read as if the
    default explodes), each at its stored value where the subject's own space has no such axis; in a
    file written before they were stored, the zoo target's, else the subject's own space."""
    from stabilitycheck.config import RUN_FIELDS
    from stabilitycheck.space import Axis
    from stabilitycheck.zoo import targets

    zoo = targets()
    own = tuple(zoo[label].axes if label in zoo else subject.space().axes)
    if not isinstance(searched, list) or not all(isinstance(n, str) for n in searched):
        return own
    axes = {a.name: a for a in own}
    values = {**{f: getattr(config.run, f) for f in RUN_FIELDS}, **config.values}
    return tuple(axes.get(n) or Axis(n, (values[n],)) for n in searched if n in axes or n in values)


def run(argv: Sequence[str] | None, progress: Progress | None = None) -> int:
    """Parse, search, report; returns the exit code."""
    given = list(sys.argv[1:] if argv is None else argv)
    if given[:1] == ["replay"]:  # `stabilitycheck replay BUNDLE`: re-run a watch bundle's flagged step
        from stabilitycheck.cli_replay import main as replay_main

        return replay_main(given[1:])
    args = parser().parse_args(argv)
    from stabilitycheck.verdicts import Limits

    limits = Limits(**{field: getattr(args, dest) for field, dest in LIMIT_FIELDS.items()})
    if args.replay:  # each counterexample is re-judged on its own limits, but for those given here
        options = _given(argv)
        _replay_alone(options)
        args.limits_given = _limits_given(options)
    outputs = Outputs(args)
    shown = progress or Progress(args.quiet)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # what the model prints is no result: the report's
            return _searches(args, limits, outputs, shown)  # stdout is the one Outputs kept
    finally:
        sys.stdout = outputs.stdout  # devnull once a closed pipe broke it (flushed at exit)


def _searches(args: argparse.Namespace, limits: Any, outputs: Outputs, shown: Progress) -> int:
    """Search every space the arguments name (or re-judge a --replay file) and write the results."""

    def progress_or_stop(message: str) -> None:
        stop_if_signalled()
        shown(message)

    if args.replay:
        results = _replay(args, limits)
        outputs.final(results)
        return EXIT_FOUND if any(r.counterexample for r in results) else EXIT_OK
    require_steps(args)
    try:  # importing torch and checking the model take seconds: a stop there still leaves the JSON
        from hypothesis.database import DirectoryBasedExampleDatabase

        from stabilitycheck.reporttable import outcome
        from stabilitycheck.searching import search

        db = None if args.database == "none" else DirectoryBasedExampleDatabase(args.database)
        spaces = _spaces(args)
    except KeyboardInterrupt:
        stop_seen()
        named = _families(args) or ["every zoo target" if args.target == "zoo" else str(args.target)]
        sys.stderr.write(f"stabilitycheck: not searched (interrupted first): {', '.join(named)}\n")
        outputs.nothing(named)
        return interrupted()
    results = list[Any]()
    pending = list[Any]()  # the latest partial result of the search under way (its counterexample)
    left: list[Unsearched] = []  # the searches an interrupt left undone
    code = EXIT_OK
    try:
        for subject, space in spaces:
            budget = (
                f"{args.max_examples} Hypothesis examples, then the canonical descent and remedies; "
                f"each verdict up to {space.base.run.seeds} seeds"
            )
            shown.say(
                f"searching {space.label} on {space.base.run.device} ({space.base.run.dtype}): {budget}"
            )
            done = len(results)

            def partial(r: Any, done: int = done) -> None:
                pending[:] = [r]
                outputs.save([*results[:done], r])

            result = search(
                space,
                subject=subject,
                limits=limits,
                max_examples=args.max_examples,
                seed=args.seed,
                database=db,
                progress=progress_or_stop,
                timeout=args.probe_timeout,
                on_result=partial,
            )
            results.append(result)
            pending.clear()
            outputs.save(results)
            last = f" (+{result.last_step_probes} on the last step)" if result.last_step_probes else ""
            spent = f"{result.points} points, {result.probes} probes{last} in {result.elapsed:.1f} s"
            shown.say(f"  {spent}: {outcome(result)}")
            stop_if_signalled()
            if result.interrupted:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        stop_seen()
        code = interrupted()
        left = [
            (s.label, s.base.run.device, s.base.run.dtype) for _, s in spaces[len(results) + len(pending) :]
        ]
        if left:  # on stderr even with --quiet: the table has no row for them (the JSON and Markdown
            # name them too)
            sys.stderr.write(f"stabilitycheck: not searched (interrupted first): {', '.join(said(left))}\n")
    finally:
        outputs.final(results + pending, left)
    if code != EXIT_OK:
        return code
    for r in results:
        if r.counterexample is None and r.points and len(r.skipped) == r.points:
            config, why = r.skipped[0]
            raise UsageError(
                f"{r.space.label}: every configuration tried was skipped ({r.points}), e.g. "
                f"{config.describe()}: {why}; nothing was tested, check the knob ranges"
            )
    return EXIT_FOUND if any(r.counterexample for r in results) else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: one-line errors with exit code 2 for bad input, 3 for internal errors."""
    if (given := sys.argv[1:] if argv is None else list(argv))[:1] == ["map"]:
        from stabilitycheck import cli_map

        return run_command("stabilitycheck map", cli_map.run, given[1:])
    return run_command("stabilitycheck", run, argv)


if __name__ == "__main__":
    sys.exit(main())
