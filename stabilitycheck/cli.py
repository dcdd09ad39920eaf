"""The `stabilitycheck` command: search the zoo, a model file or a Hugging Face model type for the
smallest configuration whose gradients explode, and report it.

Exit codes: 0 nothing explodes, 1 an explosion found, 2 usage or model-file error, 3 internal error,
130 interrupted (Ctrl-C), 143 terminated (SIGTERM); what was found so far is still printed and written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FOUND, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 3, 130, 143
PROGRESS_EVERY = 5.0  # seconds between progress lines when stderr is not a terminal


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of exiting, so every error is one line + exit 2."""

    def error(self, message: str) -> Any:
        from stabilitycheck.errors import UsageError

        raise UsageError(f"{message} (see stabilitycheck --help)")


def _number(kind: type, lo: float, hi: float = math.inf, open_lo: bool = False) -> Callable[[str], Any]:
    """An argparse type: a finite `kind` in [lo, hi] ((lo, hi] with open_lo), else a one-line error."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        ok = math.isfinite(value) and (value > lo if open_lo else value >= lo) and value <= hi
        if not ok:
            span = f"{'(' if open_lo else '['}{lo:g}, {hi:g}]"
            raise argparse.ArgumentTypeError(f"must be a finite number in {span}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


_positive = _number(float, 0, open_lo=True)


def _limit(text: str) -> float | None:
    return None if text.lower() == "off" else _positive(text)


def _csv(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return items


def parser() -> argparse.ArgumentParser:
    """The command line, defined once."""
    p = _Parser(
        prog="stabilitycheck",
        description="Find the smallest configuration whose gradients explode, and what fixes it.",
    )
    p.add_argument(
        "target",
        nargs="?",
        help="'zoo', a zoo family (mlp, rnn...), MODEL.py[:factory], or hf:TYPE (hf:gpt2)",
    )
    p.add_argument("--family", action="append", type=_csv, default=[], help="zoo targets (repeatable)")
    p.add_argument(
        "--knob",
        action="append",
        default=[],
        metavar="NAME=LO:HI[:STEP]",
        help="search NAME over LO..HI (or fix it with NAME=VALUE); repeatable",
    )
    p.add_argument(
        "--max-examples",
        type=_number(int, 1, 10**6),
        default=100,
        help="Hypothesis examples per search (100); the canonical descent and the remedies come on top",
    )
    p.add_argument("--seed", type=_number(int, 0, 2**32 - 1), default=0, help="first seed of everything (0)")
    p.add_argument(
        "--seeds",
        type=_number(int, 1, 1000),
        default=5,
        help="initialisations a verdict may spend (5; 1 = a single draw); more only near the limit",
    )
    p.add_argument(
        "--quantile",
        type=_number(float, 0, 1, open_lo=True),
        default=0.5,
        help="the quantile over seeds each criterion is judged on (0.5: the median)",
    )
    p.add_argument("--device", action="append", type=_csv, default=[], help="cpu, cuda, cuda:N or all")
    p.add_argument(
        "--dtype",
        action="append",
        type=_csv,
        default=[],
        help="float32, float64, bfloat16, float16 (repeatable or comma-separated)",
    )
    p.add_argument(
        "--steps", type=_number(int, 0, 10**6), help="optimiser steps per probe (default 0: at init)"
    )
    p.add_argument("--lr", type=_positive, help="learning rate of the steps")
    p.add_argument("--optimizer", choices=("sgd", "adam"))
    p.add_argument(
        "--amp",
        nargs="?",
        const="auto",
        choices=("auto", "bfloat16", "float16"),
        help="forward under torch.autocast (auto: bfloat16 on CPU, float16 + GradScaler on CUDA)",
    )
    p.add_argument("--clip", type=_positive, help="clip the total gradient norm during steps")
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
    p.add_argument("--probe-timeout", type=_positive, help="seconds one verdict may take (default: no limit)")
    p.add_argument("--json", type=Path, help="write the results as JSON (written as they are found)")
    p.add_argument("--markdown", type=Path, help="write a Markdown summary (also GITHUB_STEP_SUMMARY)")
    p.add_argument("--plot", type=Path, help="write a PNG of each result's gradient profile (extra: plot)")
    p.add_argument("--replay", type=Path, help="re-judge the counterexamples of a --json file")
    p.add_argument(
        "--database",
        default=".hypothesis/stabilitycheck",
        help="Hypothesis example database directory, or 'none' (default %(default)s)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


class Progress:
    """Progress on stderr: rewritten in place on a terminal; elsewhere (CI logs) a line every
    PROGRESS_EVERY seconds; nothing with --quiet."""

    def __init__(self, quiet: bool) -> None:
        self.quiet, self.tty, self.last = quiet, sys.stderr.isatty(), 0.0

    def __call__(self, message: str) -> None:
        if self.quiet:
            return
        if self.tty:
            sys.stderr.write(f"\r\033[K{message}")
        elif message and time.monotonic() - self.last >= PROGRESS_EVERY:
            self.last = time.monotonic()
            sys.stderr.write(f"{message}\n")
        sys.stderr.flush()

    def say(self, message: str) -> None:
        if not self.quiet:
            if self.tty:
                sys.stderr.write("\r\033[K")
            sys.stderr.write(f"{message}\n")
            sys.stderr.flush()


def _knob(text: str) -> tuple[str, list[float]]:
    """Parse NAME=LO:HI[:STEP] or NAME=VALUE into the name and its numbers."""
    from stabilitycheck.errors import UsageError

    name, sep, spec = text.partition("=")
    try:
        numbers = [float(x) if any(c in x for c in ".eEn") else int(x) for x in spec.split(":")]
    except ValueError:
        numbers = []
    if not sep or not name or not 1 <= len(numbers) <= 3 or not all(math.isfinite(x) for x in numbers):
        raise UsageError(f"--knob {text!r} is malformed; expected NAME=LO:HI[:STEP], e.g. --knob depth=1:32")
    return name, numbers


def _apply_knobs(space: Any, knobs: Sequence[str], subject: Any) -> Any:
    """The Space with --knob axes: with any --knob given, the searched axes are exactly the knobs named
    with a range (nothing added behind the user's back); a single value fixes the knob."""
    import dataclasses

    from stabilitycheck.errors import UsageError
    from stabilitycheck.space import RUN_AXES, Axis

    if not knobs:
        return space
    base, axes = space.base, list[Any]()
    for text in knobs:
        name, numbers = _knob(text)
        if name not in base.values and name not in RUN_AXES:
            raise UsageError(
                f"--knob {name!r} is not a knob of {space.label}; its knobs are {sorted(base.values)} "
                f"(and the run settings {', '.join(RUN_AXES)}), e.g. --knob {sorted(base.values)[0]}=1:8"
            )
        axes = [a for a in axes if a.name != name]
        if len(numbers) == 1:
            base = base.with_knobs(**{name: numbers[0]})
        else:
            axes.append(Axis.range(name, *numbers))
    return dataclasses.replace(space, base=base, axes=tuple(axes or space.axes))


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
    from stabilitycheck.subjects import resolve

    if args.target is None:
        raise UsageError("no target given; expected 'zoo', a zoo family, MODEL.py[:factory] or hf:TYPE")
    if args.target == "zoo":
        from stabilitycheck.zoo import targets

        zoo = targets()
        names = [f for group in args.family for f in group] or list(zoo)
        unknown = [n for n in names if n not in zoo]
        if unknown:
            raise UsageError(f"--family {unknown[0]!r} is not a zoo target; expected one of {', '.join(zoo)}")
        pairs = [(resolve(zoo[n].base.subject), zoo[n]) for n in names]
    else:
        if args.family:
            raise UsageError("--family applies to 'stabilitycheck zoo' only")
        from stabilitycheck.searching import check

        subject = resolve(args.target)
        space = subject.space()
        check(subject, space.config(tuple(0 for _ in space.axes)))
        pairs = [(subject, space)]
    run: dict[str, Any] = {
        k: getattr(args, k) for k in ("steps", "lr", "optimizer", "clip") if getattr(args, k) is not None
    }
    run.update(seed=args.seed, seeds=args.seeds, quantile=args.quantile)
    dtypes = [d for group in args.dtype for d in group]
    out = []
    for subject, space in pairs:
        space = _apply_knobs(space.with_run(**run), args.knob, subject)
        for device in _devices(args.device):
            for dtype in dtypes or [space.base.run.dtype]:
                amp = args.amp if args.amp != "auto" else ("bfloat16" if device == "cpu" else "float16")
                out.append((subject, space.with_run(device=device, dtype=dtype, amp=amp or "none")))
    return out


class Outputs:
    """The files a run writes: checked writable before the search, rewritten as results come in, each
    written on its own (one failing never stops the others)."""

    def __init__(self, args: argparse.Namespace) -> None:
        from stabilitycheck.errors import UsageError

        self.args = args
        self.summary = os.environ.get("GITHUB_STEP_SUMMARY")
        self.failures: list[str] = []
        for flag, path in (("--json", args.json), ("--markdown", args.markdown), ("--plot", args.plot)):
            if path is not None and not _writable(path):
                raise UsageError(f"{flag} {path}: cannot write there (no such directory or no permission)")
        if args.plot is not None:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise UsageError("--plot needs matplotlib: pip install 'stabilitycheck[plot]'") from None

    def save(self, results: Sequence[Any]) -> None:
        """Rewrite the JSON (atomically) with what is known so far."""
        from stabilitycheck import report

        if self.args.json:
            self._attempt("--json", lambda: _atomic_write(self.args.json, report.to_json(results)))

    def final(self, results: Sequence[Any]) -> None:
        """Everything: JSON, Markdown, plot, then the report on stdout (a closed pipe loses only that)."""
        from stabilitycheck import report

        self.save(results)
        md = report.markdown(results) if self.args.markdown or self.summary else ""
        if self.args.markdown:
            self._attempt("--markdown", lambda: self.args.markdown.write_text(md))
        if self.summary and Path(self.summary) != self.args.markdown:
            self._attempt("GITHUB_STEP_SUMMARY", lambda: _append(Path(self.summary or ""), md))
        if self.args.plot:
            from stabilitycheck.plot import plot

            self._attempt("--plot", lambda: plot(results, self.args.plot))
        try:
            print(report.text(results), flush=True)
        except BrokenPipeError:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (the interpreter flushes stdout at exit)
        for failure in self.failures:
            sys.stderr.write(f"stabilitycheck: error: {failure}\n")

    def _attempt(self, what: str, write: Callable[[], object]) -> None:
        from stabilitycheck._validation import describe

        try:
            write()
        except Exception as exc:
            self.failures.append(f"{what}: writing it failed: {describe(exc)}")


def _writable(path: Path) -> bool:
    folder = path.parent if str(path.parent) else Path(".")
    return folder.is_dir() and os.access(folder, os.W_OK) and not path.is_dir()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _append(path: Path, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)


def _replay(args: argparse.Namespace, limits: Any) -> list[Any]:
    """Re-judge the counterexamples stored in a --json file. Replay is data, not code: a model file
    named in the JSON is imported only when the command line names that same file as the target."""
    from stabilitycheck.config import Config, kind
    from stabilitycheck.errors import UsageError
    from stabilitycheck.searching import Counterexample, SearchResult, try_remedies
    from stabilitycheck.seeds import assess
    from stabilitycheck.space import Space
    from stabilitycheck.subjects import resolve

    where = f"--replay {args.replay}"
    try:
        stored = json.loads(args.replay.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{where}: cannot read it as UTF-8 JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(stored, list) or not all(isinstance(e, dict) for e in stored):
        raise UsageError(f"{where}: expected the list written by --json, got {type(stored).__name__}")
    target = resolve(args.target) if args.target not in (None, "zoo") else None
    results = []
    for entry in stored:
        cx = entry.get("counterexample")
        if not cx:
            continue
        if not isinstance(cx, dict) or "config" not in cx:
            raise UsageError(f"{where}: a counterexample has no 'config'; expected the output of --json")
        config = Config.from_dict(cx["config"])
        if kind(config.subject) == "file" and (target is None or target.name != config.subject):
            raise UsageError(
                f"{where} names the model file {config.subject}; replaying would run its code, so name "
                f"it on the command line: stabilitycheck {config.subject} --replay {args.replay}"
            )
        subject = target if target is not None and target.name == config.subject else resolve(config.subject)
        j = assess(config, subject, limits)
        label = str(entry.get("label", config.subject))
        found = Counterexample(label, config, j, limits, tuple(try_remedies(config, subject, limits)))
        space = Space(label, config, _searched_axes(label, subject))
        results.append(
            SearchResult(
                space,
                found if j.exploded else None,
                len(j.seeds),
                1,
                0.0,
                None if j.exploded else config,
                None if j.exploded else j,
            )
        )
    return results


def _searched_axes(label: str, subject: Any) -> tuple[Any, ...]:
    """The axes a replayed row names its knobs by: the zoo target's, else the subject's own space."""
    from stabilitycheck.zoo import targets

    zoo = targets()
    return tuple(zoo[label].axes if label in zoo else subject.space().axes)


def run(argv: Sequence[str] | None, progress: Progress | None = None) -> int:
    """Parse, search, report; returns the exit code."""
    given = list(sys.argv[1:] if argv is None else argv)
    if given[:1] == ["replay"]:  # `stabilitycheck replay BUNDLE`: re-run a watch bundle's flagged step
        from stabilitycheck.replay import main as replay_main

        return replay_main(given[1:])
    args = parser().parse_args(argv)
    from stabilitycheck.verdicts import Limits

    limits = Limits(
        grad_norm=args.grad_norm_limit,
        growth=args.growth_limit,
        divergence=args.divergence_limit,
        vanishing=args.vanishing_limit,
        stall=args.stall_limit,
    )
    outputs = Outputs(args)
    progress = progress or Progress(args.quiet)
    if args.replay:
        results = _replay(args, limits)
        outputs.final(results)
        return EXIT_FOUND if any(r.counterexample for r in results) else EXIT_OK
    from hypothesis.database import DirectoryBasedExampleDatabase

    from stabilitycheck.searching import search

    db = None if args.database == "none" else DirectoryBasedExampleDatabase(args.database)
    spaces = _spaces(args)
    results = list[Any]()
    code = EXIT_OK
    try:
        for subject, space in spaces:
            budget = (
                f"{args.max_examples} Hypothesis examples, then the canonical descent and remedies; "
                f"each verdict up to {space.base.run.seeds} seeds"
            )
            progress.say(
                f"searching {space.label} on {space.base.run.device} ({space.base.run.dtype}): {budget}"
            )
            done = len(results)

            def partial(r: Any, done: int = done) -> None:
                outputs.save([*results[:done], r])

            result = search(
                space,
                subject=subject,
                limits=limits,
                max_examples=args.max_examples,
                seed=args.seed,
                database=db,
                progress=progress,
                timeout=args.probe_timeout,
                on_result=partial,
            )
            results.append(result)
            outputs.save(results)
            found = result.counterexample
            progress.say(
                f"  {result.points} points, {result.probes} probes in {result.elapsed:.1f} s: "
                + (f"explodes at {found.config.describe()}" if found else "stable")
            )
            if result.interrupted:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    except _Terminated:
        code = EXIT_TERMINATED
    finally:
        outputs.final(results)
    if code != EXIT_OK:
        return code
    return EXIT_FOUND if any(r.counterexample for r in results) else EXIT_OK


class _Terminated(BaseException):
    """SIGTERM (a CI timeout): stop like Ctrl-C, write what was found, exit 143."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: one-line errors with exit code 2 for bad input, 3 for internal errors."""
    from stabilitycheck.errors import UsageError

    if (given := sys.argv[1:] if argv is None else list(argv))[:1] == ["map"]:
        from stabilitycheck.cli_map import main_map

        return main_map(given[1:])
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return run(argv)
    except UsageError as exc:
        if debug:
            traceback.print_exc()
        sys.stderr.write(f"stabilitycheck: error: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except _Terminated:
        return EXIT_TERMINATED
    except ModuleNotFoundError as exc:
        sys.stderr.write(f"stabilitycheck: error: {exc.name} is not installed; pip install stabilitycheck\n")
        return EXIT_USAGE
    except Exception as exc:  # an internal error: say so, and how to get the traceback
        if debug:
            traceback.print_exc()
        sys.stderr.write(
            f"stabilitycheck: internal error: {type(exc).__name__}: {exc} "
            "(rerun with --debug for the traceback)\n"
        )
        return EXIT_INTERNAL
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
