"""The `stabilitycheck` command: search the zoo or a user's model file and report what explodes.

Exit codes: 0 nothing explodes, 1 an explosion found, 2 usage or model-file error, 3 internal
error, 130 interrupted (what was found so far is still printed and written).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FOUND, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of exiting, so every error is one line + exit 2."""

    def error(self, message: str) -> Any:
        from stabilitycheck.errors import UsageError

        raise UsageError(f"{message} (see stabilitycheck --help)")


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _limit(text: str) -> float | None:
    return None if text.lower() == "off" else _positive_float(text)


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parser() -> argparse.ArgumentParser:
    """The command line, defined once."""
    p = _Parser(
        prog="stabilitycheck",
        description="Find the smallest configuration whose gradients explode, and what fixes it.",
    )
    p.add_argument("target", help="'zoo' for the built-in families, or MODEL.py[:factory]")
    p.add_argument("--family", action="append", type=_csv, default=[], help="zoo families (repeatable)")
    p.add_argument(
        "--knob",
        action="append",
        default=[],
        metavar="NAME=LO:HI[:STEP]",
        help="search NAME over LO..HI (or fix it with NAME=VALUE); repeatable",
    )
    p.add_argument("--max-examples", type=int, default=100, help="Hypothesis examples per search (100)")
    p.add_argument("--seed", type=int, default=0, help="seed of the search and of every model (0)")
    p.add_argument("--device", action="append", type=_csv, default=[], help="cpu, cuda, cuda:N or all")
    p.add_argument(
        "--dtype",
        action="append",
        type=_csv,
        default=[],
        help="float32, float64, bfloat16, float16 (repeatable or comma-separated)",
    )
    p.add_argument("--steps", type=int, help="optimiser steps per probe (default 0: at init only)")
    p.add_argument("--lr", type=_positive_float, help="learning rate of the steps")
    p.add_argument("--optimizer", choices=("sgd", "adam"))
    p.add_argument(
        "--amp",
        nargs="?",
        const="auto",
        choices=("auto", "bfloat16", "float16"),
        help="forward under torch.autocast (auto: bfloat16 on CPU, float16 + GradScaler on CUDA)",
    )
    p.add_argument("--clip", type=_positive_float, help="clip the total gradient norm during steps")
    p.add_argument("--grad-norm-limit", type=_limit, default=1e3, help="peak total grad norm (1e3; off)")
    p.add_argument("--growth-limit", type=_limit, default=1e2, help="input/output grad growth (1e2; off)")
    p.add_argument("--divergence-limit", type=_limit, default=2.0, help="final/initial loss (2; off)")
    p.add_argument(
        "--vanishing-limit", type=_limit, default=None, help="growth below 1/X fails (default off)"
    )
    p.add_argument(
        "--stall-limit",
        type=_limit,
        default=None,
        help="final/initial loss above X fails, e.g. 0.95 (default off; needs --steps)",
    )
    p.add_argument("--json", type=Path, help="write the results as JSON (configs replay with --replay)")
    p.add_argument("--markdown", type=Path, help="write a Markdown summary (also GITHUB_STEP_SUMMARY)")
    p.add_argument("--plot", type=Path, help="write a PNG of each counterexample (extra: plot)")
    p.add_argument("--replay", type=Path, help="re-probe the counterexamples of a --json file")
    p.add_argument(
        "--database",
        default=".hypothesis/stabilitycheck",
        help="Hypothesis example database directory, or 'none' (default %(default)s)",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _progress(message: str) -> None:
    if sys.stderr.isatty():
        sys.stderr.write(f"\r\033[K{message}")
        sys.stderr.flush()


def _knob(text: str) -> tuple[str, list[float]]:
    """Parse NAME=LO:HI[:STEP] or NAME=VALUE into the name and its numbers."""
    from stabilitycheck.errors import UsageError

    name, sep, spec = text.partition("=")
    try:
        numbers = [float(x) if any(c in x for c in ".eE") else int(x) for x in spec.split(":")]
    except ValueError:
        numbers = []
    if not sep or not name or not 1 <= len(numbers) <= 3:
        raise UsageError(f"--knob {text!r} is malformed; expected NAME=LO:HI[:STEP], e.g. --knob depth=1:32")
    return name, numbers


RUN_KNOBS = ("init_scale", "lr", "steps", "warmup")  # Config fields that every Subject reads


def _apply_knobs(space: Any, knobs: Sequence[str], allowed: Sequence[str] | None = None) -> Any:
    """The Space with each --knob replacing (or adding) its axis; a single value fixes the knob.
    `allowed`: the knobs of a model file (None for the zoo, whose knobs are the Config fields)."""
    from stabilitycheck.errors import UsageError
    from stabilitycheck.space import Axis

    axes = list(space.axes)
    base = space.base
    for text in knobs:
        name, numbers = _knob(text)
        if allowed is not None and name not in allowed and name not in RUN_KNOBS:
            raise UsageError(
                f"--knob {name!r} is not a knob of {space.label}; its knobs are {sorted(allowed)} "
                f"(and the run settings {', '.join(RUN_KNOBS[1:])}), e.g. --knob {sorted(allowed)[0]}=1:8"
            )
        base.knob(name)  # raises ConfigError naming the knobs there are
        axes = [a for a in axes if a.name != name]
        if len(numbers) == 1:
            base = base.with_knobs(**{name: numbers[0]})
        else:
            axes.append(Axis.range(name, *numbers))
    return dataclasses.replace(space, base=base, axes=tuple(axes))


def _devices(requested: list[list[str]]) -> list[str]:
    import torch

    from stabilitycheck.errors import UsageError

    names = [d for group in requested for d in group] or ["cpu"]
    if "all" in names:
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for name in names:
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return names


def _spaces(args: argparse.Namespace) -> list[Any]:
    """Every Space to search: target x device x dtype, with the CLI's overrides."""
    from stabilitycheck.errors import UsageError

    if args.target == "zoo":
        from stabilitycheck.space import default_spaces

        zoo = default_spaces()
        names = [f for group in args.family for f in group] or list(zoo)
        unknown = [n for n in names if n not in zoo]
        if unknown:
            raise UsageError(f"--family {unknown[0]!r} is not a zoo family; expected one of {', '.join(zoo)}")
        spaces = [zoo[n] for n in names]
        allowed: list[str] | None = None
    else:
        if args.family:
            raise UsageError("--family applies to 'stabilitycheck zoo' only, not to a model file")
        from stabilitycheck.modelfile import load, space_of

        subject = load(args.target)
        space = space_of(subject)
        if not space.axes:
            from stabilitycheck.space import INIT_SCALES, Axis

            space = dataclasses.replace(space, axes=(Axis("init_scale", INIT_SCALES),))
        subject.check(space.base)
        spaces = [space]
        allowed = sorted({*subject.knobs, "init_scale"})
    overrides = {
        k: getattr(args, k) for k in ("steps", "lr", "optimizer", "clip") if getattr(args, k) is not None
    }
    overrides["seed"] = args.seed
    dtypes = [d for group in args.dtype for d in group]
    out = []
    for space in spaces:
        space = _apply_knobs(space.with_base(**overrides), args.knob, allowed)
        for device in _devices(args.device):
            for dtype in dtypes or [space.base.dtype]:
                amp = args.amp if args.amp != "auto" else ("bfloat16" if device == "cpu" else "float16")
                out.append(space.with_base(device=device, dtype=dtype, amp=amp or "none"))
    return out


def _write(args: argparse.Namespace, results: Sequence[Any]) -> None:
    from stabilitycheck import report

    print(report.text(results))
    if args.plot:
        from stabilitycheck.plot import plot

        plot(results, args.plot)
    if args.json:
        args.json.write_text(report.to_json(results))
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    md = report.markdown(results) if args.markdown or summary else ""
    if args.markdown:
        args.markdown.write_text(md)
    if summary and Path(summary) != args.markdown:
        with open(summary, "a") as f:
            f.write(md)


def _replay(args: argparse.Namespace, limits: Any) -> list[Any]:
    """Re-probe the counterexamples stored in a --json file, keeping their labels and spaces."""
    from stabilitycheck.config import Config
    from stabilitycheck.errors import UsageError
    from stabilitycheck.searching import SearchResult, counterexample

    try:
        stored = json.loads(args.replay.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"--replay {args.replay}: cannot read it as JSON ({exc})") from None
    results = []
    spaces = {s.label: s for s in _spaces(args)} if args.target == "zoo" else {}
    for entry in stored:
        if not entry.get("counterexample"):
            continue
        config = Config.from_dict(entry["counterexample"]["config"])
        label = entry["label"]
        space = spaces.get(label) or _spaces(args)[0]
        cx = counterexample(label, config, limits=limits)
        results.append(SearchResult(space.with_base(**{}), cx, 1, 0.0, None))
    return results


def run(argv: Sequence[str] | None = None) -> int:
    """Parse, search, report; returns the exit code."""
    given = list(sys.argv[1:] if argv is None else argv)
    if given[:1] == ["replay"]:  # `stabilitycheck replay BUNDLE`: re-run a watch bundle's flagged step
        from stabilitycheck.replay import main as replay_main

        return replay_main(given[1:])
    args = parser().parse_args(argv)
    from hypothesis.database import DirectoryBasedExampleDatabase

    from stabilitycheck import report
    from stabilitycheck.searching import search
    from stabilitycheck.verdicts import Limits

    limits = Limits(
        grad_norm=args.grad_norm_limit,
        growth=args.growth_limit,
        divergence=args.divergence_limit,
        vanishing=args.vanishing_limit,
        stall=args.stall_limit,
    )
    if args.replay:
        results = _replay(args, limits)
        _write(args, results)
        return (
            EXIT_FOUND if any(r.counterexample and r.counterexample.verdict.exploded for r in results) else 0
        )
    db = None if args.database == "none" else DirectoryBasedExampleDatabase(args.database)
    results = []
    try:
        for space in _spaces(args):
            sys.stderr.write(f"searching {space.label} on {space.base.device} ({space.base.dtype})...\n")
            result = search(
                space,
                limits=limits,
                max_examples=args.max_examples,
                seed=args.seed,
                database=db,
                progress=_progress,
            )
            results.append(result)
            _progress("")
            found = result.counterexample
            sys.stderr.write(
                f"  {result.probes} probes in {result.elapsed:.1f} s: "
                + (f"explodes at {report.knobs(result, found.config)}\n" if found else "stable\n")
            )
            if result.interrupted:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        _write(args, results)
        return EXIT_INTERRUPTED
    _write(args, results)
    return EXIT_FOUND if any(r.counterexample for r in results) else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: one-line errors with exit code 2 for bad input, 3 for internal errors."""
    from stabilitycheck.errors import UsageError

    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        return run(argv)
    except UsageError as exc:
        if debug:
            traceback.print_exc()
        sys.stderr.write(f"stabilitycheck: error: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:  # an internal error: say so, and how to get the traceback
        if debug:
            traceback.print_exc()
        sys.stderr.write(
            f"stabilitycheck: internal error: {type(exc).__name__}: {exc} "
            "(rerun with --debug for the traceback)\n"
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
