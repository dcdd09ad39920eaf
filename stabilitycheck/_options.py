"""The command lines: the parser of `stabilitycheck`, the argparse types of its flags, --knob, the exit
codes, and the --stability-* options the pytest plugin shares with a CLI. No torch, no Hypothesis."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from stabilitycheck import __version__
from stabilitycheck._validation import writable
from stabilitycheck.errors import UsageError, did_you_mean

EXIT_OK, EXIT_FOUND, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 3, 130, 143
PREFIX = "--stability-"
DEFAULT_DATABASE = ".hypothesis/stabilitycheck"
DEVICES = ("cpu", "cuda", "all")
PROFILES = ("quick", "ci", "thorough")  # the Hypothesis profiles strategies registers


def add_options(addoption: Callable[..., Any], prefix: str = PREFIX) -> None:
    """Declare the shared options with `addoption` (pytest's group.addoption, or argparse's add_argument
    with prefix "--"), so the plugin and a CLI define them once."""
    addoption(
        f"{prefix}device",
        choices=DEVICES,
        default="cpu",
        help="device of the stability_device fixture: cpu (default), cuda, or all (one test per device)",
    )
    addoption(
        f"{prefix}profile",
        choices=PROFILES,
        default=None,
        help="Hypothesis profile (registered as stabilitycheck-NAME): quick (100 examples), ci (50, seed 0 "
        "unless --stability-seed, example database kept) or thorough (300); default: leave the loaded one",
    )
    addoption(
        f"{prefix}seed",
        type=number(int, 0, 2**32 - 1),  # as the CLI's --seed: -1 and 2**40 were taken
        default=None,
        help="seed every Hypothesis test from N and its test id (default: only under --stability-profile "
        "and for tests using the stabilitycheck fixtures, with a random seed shown in the header)",
    )
    addoption(
        f"{prefix}threads",
        default=None,
        help="torch threads per process: N, or auto = cores // pytest-xdist workers (default: leave "
        "torch's own; 2 workers x 2 threads on 2 cores ran 6x slower than with auto)",
    )


class Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of exiting, so every error is one line + exit 2."""

    def error(self, message: str) -> Any:

        raise UsageError(f"{message} (see {self.prog} --help)")


def number(kind: type, lo: float, hi: float = math.inf, open_lo: bool = False) -> Callable[[str], Any]:
    """An argparse type: a finite `kind` in [lo, hi] ((lo, hi] with open_lo), else a one-line error."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        ok = math.isfinite(value) and (value > lo if open_lo else value >= lo) and value <= hi
        if not ok:
            ends = [str(kind(x)) if kind is int and math.isfinite(x) else f"{x:g}" for x in (lo, hi)]
            span = f"{'(' if open_lo else '['}{ends[0]}, {ends[1]}{']' if math.isfinite(hi) else ')'}"
            raise argparse.ArgumentTypeError(f"must be a finite number in {span}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


_positive = number(float, 0, open_lo=True)


def _limit(text: str) -> float | None:
    return None if text.lower() == "off" else _positive(text)


def _ratio_limit(text: str) -> float | None:
    """A limit on a ratio that grows when training goes wrong (growth, final/initial loss, 1/growth
    for vanishing): `off`, or a number >= 1 (below 1 a shrinking gradient or a falling loss fires)."""
    value = _limit(text)
    if value is not None and value < 1:
        raise argparse.ArgumentTypeError(
            f"must be >= 1 (or off), got {text}: it bounds a ratio that grows when training goes wrong, "
            "so below 1 a shrinking gradient or a falling loss would fire"
        )
    return value


class _StepLimit(argparse.Action):
    """Store a limit judged on the loss after training steps, and note in `step_limits` that a value
    (not `off`) was given (a default cannot tell), so `require_steps` can refuse it without steps."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        given = [f for f in getattr(namespace, "step_limits", []) if f != self.option_strings[0]]
        namespace.step_limits = given + [self.option_strings[0]] * (values is not None)


def add_limits(p: argparse.ArgumentParser) -> None:
    """The limits the search and the map share: grad norm, growth and divergence (X or off)."""
    p.add_argument("--grad-norm-limit", type=_limit, default=1e3, help="peak total grad norm (1e3; off)")
    p.add_argument(
        "--growth-limit", type=_ratio_limit, default=1e2, help="input/output grad growth (1e2; off)"
    )
    p.add_argument(
        "--divergence-limit",
        type=_ratio_limit,
        default=2.0,
        action=_StepLimit,
        help="final/initial loss (2; off; needs --steps)",
    )


TRAINING = ("lr", "warmup", "clip")  # run settings of the training steps alone, a --knob each


def require_steps(args: argparse.Namespace) -> None:
    """A --divergence-limit or --stall-limit value without --steps (or a steps --knob) would never be
    checked: the losses they compare are the ones before and after the steps; --lr, --optimizer or
    --clip, or a --knob over lr, warmup or clip (an axis along which nothing could change), would
    change nothing. One line, exit 2; a limit `off` is accepted (it turns off what would not run)."""
    if args.steps or any(k.partition("=")[0] == "steps" for k in args.knob):
        return
    given = sorted(set(getattr(args, "step_limits", [])))
    if given:
        raise UsageError(
            f"{' and '.join(given)}: judged on the loss after training steps against the initial loss, "
            f"but no steps are taken; add --steps K (e.g. --steps 20) or drop {' or '.join(given)}"
        )
    training = [f"--{k}" for k in ("lr", "optimizer", "clip") if getattr(args, k, None) is not None]
    training += [  # a run setting searched as a knob: an axis along which nothing could change
        f"--knob {name}" for name in dict.fromkeys(k.partition("=")[0] for k in args.knob) if name in TRAINING
    ]
    if training:
        raise UsageError(
            f"{' and '.join(training)}: settings of the training steps, but no steps are taken (the probe "
            f"at step 0 does not train); add --steps K (e.g. --steps 20) or drop {' or '.join(training)}"
        )


def _csv(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return items


def dtype(text: str) -> str:
    """A --dtype value the probe runs (said as the flag, not as the Run field the value lands in: a
    new user read `Run.dtype='float8' is not allowed`)."""
    from stabilitycheck.config import DTYPES

    if text not in DTYPES:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a dtype it probes; expected {', '.join(DTYPES)}{did_you_mean(text, DTYPES)}"
        )
    return text


def _dtypes(text: str) -> list[str]:
    """--dtype's comma-separated list, each a `dtype`."""
    return [dtype(item) for item in _csv(text)]


def parser() -> argparse.ArgumentParser:
    """The command line, defined once."""
    p = Parser(
        prog="stabilitycheck",
        description="Find the smallest configuration whose gradients explode, and what fixes it.",
        epilog=(
            "other commands: 'stabilitycheck map TARGET --x KNOB --y KNOB' traces the stable/exploding "
            "frontier over two knobs; 'stabilitycheck replay BUNDLE' re-runs the step a watch() bundle "
            "saved. Each takes --help."
        ),
    )
    p.add_argument("--version", action="version", version=f"stabilitycheck {__version__}")
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
        help="search NAME over LO..HI (or fix it with NAME=VALUE); repeatable, once per NAME",
    )
    p.add_argument(
        "--max-examples",
        type=number(int, 1, 10**6),
        default=100,
        help="Hypothesis examples per search (100); the canonical descent and the remedies come on top",
    )
    add_run_options(p)
    p.add_argument("--device", action="append", type=_csv, default=[], help="cpu, cuda, cuda:N or all")
    p.add_argument(
        "--dtype",
        action="append",
        type=_dtypes,
        default=[],
        help="float32, float64, bfloat16, float16 (repeatable or comma-separated)",
    )
    p.add_argument(
        "--amp",
        nargs="?",
        const="auto",
        choices=("auto", "bfloat16", "float16"),
        help="forward under torch.autocast (auto: bfloat16 on CPU, float16 + GradScaler on CUDA)",
    )
    p.add_argument("--clip", type=_positive, help="clip the total gradient norm during steps")
    p.add_argument(
        "--stall-limit",
        type=_limit,
        default=None,
        action=_StepLimit,
        help="final/initial loss above X fails, e.g. 0.95 (default off; needs --steps)",
    )
    p.add_argument("--probe-timeout", type=_positive, help="seconds one verdict may take (default: no limit)")
    p.add_argument("--json", type=Path, help="write the results as JSON (written as they are found)")
    p.add_argument("--markdown", type=Path, help="write a Markdown summary (also GITHUB_STEP_SUMMARY)")
    p.add_argument("--plot", type=Path, help="write a PNG of each result's gradient profile (extra: plot)")
    p.add_argument("--replay", type=Path, help="re-judge the counterexamples of a --json file")
    p.add_argument(
        "--database",
        type=_database,
        default=DEFAULT_DATABASE,
        help="Hypothesis example database directory, or 'none' (default %(default)s)",
    )
    add_output_options(p)
    return p


def add_run_options(p: argparse.ArgumentParser) -> None:
    """The seeds, training steps and limits of every verdict: the search's and the map's, alike."""
    p.add_argument("--seed", type=number(int, 0, 2**32 - 1), default=0, help="first seed of everything (0)")
    p.add_argument(
        "--seeds",
        type=number(int, 1, 1000),
        default=5,
        help="initialisations a verdict may spend (5; 1 = a single draw); more only near the limit",
    )
    p.add_argument(
        "--quantile",
        type=number(float, 0, 1, open_lo=True),
        default=0.5,
        help="the quantile over seeds each criterion is judged on (0.5: the median)",
    )
    p.add_argument(
        "--steps", type=number(int, 0, 10**6), help="optimiser steps per probe (default 0: at init)"
    )
    p.add_argument("--lr", type=_positive, help="learning rate of the steps")
    p.add_argument("--optimizer", choices=("sgd", "adam"))
    add_limits(p)
    p.add_argument(
        "--vanishing-limit", type=_ratio_limit, default=None, help="growth below 1/X fails (default off)"
    )


def add_output_options(p: argparse.ArgumentParser) -> None:
    """--quiet and --debug, alike in every command."""
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _database(text: str) -> str:
    """--database: a directory or 'none'; an empty value (an unset shell variable) would fill the
    current directory with Hypothesis' hash folders. A file, or a place no folder can be made in
    (/proc, a read-only mount), was taken silently and nothing was kept."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a directory or 'none', got an empty value")
    if text in ("none", DEFAULT_DATABASE):  # the default is not checked: where it cannot be written,
        return text  # Hypothesis goes on without it (a run from a read-only directory was refused)
    path = Path(text)
    there = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if not there.is_dir():
        raise argparse.ArgumentTypeError(f"{there} is a file, not a directory; give a directory or 'none'")
    if not writable(there / ".stabilitycheck-probe"):
        raise argparse.ArgumentTypeError(f"cannot write in {there}; give a writable directory or 'none'")
    return text


def _knob(text: str) -> tuple[str, list[float]]:
    """Parse NAME=LO:HI[:STEP] or NAME=VALUE into the name and its numbers."""
    name, sep, spec = text.partition("=")
    try:
        numbers = [float(x) if any(c in x for c in ".eEn") else int(x) for x in spec.split(":")]
    except ValueError:
        numbers = []
    if not sep or not name or not 1 <= len(numbers) <= 3 or not all(math.isfinite(x) for x in numbers):
        raise UsageError(f"--knob {text!r} is malformed; expected NAME=LO:HI[:STEP], e.g. --knob depth=1:32")
    return name, numbers


def apply_knobs(space: Any, knobs: Sequence[str]) -> Any:
    """The Space with --knob axes: with any knob given a range, the searched axes are exactly those
    (nothing added behind the user's back); a single value fixes the knob, and so does a word for a
    choice knob (activation=relu, norm=post). Fixing knobs alone leaves the space's other axes
    searched; a fixed knob is never an axis, and a knob given twice is an error (which one was meant?)."""
    import dataclasses

    from stabilitycheck.space import RUN_AXES, Axis

    if not knobs:
        return space
    base, axes, fixed = space.base, list[Any](), set[str]()
    for i, text in enumerate(knobs):
        name, _, word = text.partition("=")
        twice = [t for t in knobs[:i] if t.partition("=")[0] == name]
        if twice:
            raise UsageError(
                f"--knob {name} is given twice ({twice[0]}, {text}); give it once: {name}=LO:HI[:STEP] "
                f"searches it, {name}=VALUE fixes it"
            )
        if name not in base.values and name not in RUN_AXES:
            numeric = [k for k, v in base.values.items() if type(v) in (int, float)] or ["depth"]
            raise UsageError(
                f"--knob {name!r} is not a knob of {space.label}; its knobs are {sorted(base.values)} "
                f"(and the run settings {', '.join(RUN_AXES)}), e.g. --knob {numeric[0]}=1:8"
            )
        if word.isidentifier() and name in base.values:  # a choice knob fixed by name: activation=relu
            base = base.with_knobs(**{name: word})
            fixed.add(name)
            continue
        name, numbers = _knob(text)
        now = base.values[name] if name in base.values else getattr(base.run, name)
        if isinstance(now, int) and not isinstance(now, bool):
            if not all(float(x).is_integer() for x in numbers):
                raise UsageError(
                    f"--knob {text!r}: {name} is a whole-number knob (now {now}); give whole numbers, "
                    f"e.g. --knob {name}=1:8"
                )
            numbers = [int(x) for x in numbers]
        elif isinstance(now, float) or now is None:  # init_scale=1:4 is 16 points from 1.0 to 4.0, as
            # 1.0:4.0 is (it searched 1, 2, 3 and 4 alone); clip, off (None) by default
            numbers = [float(x) for x in numbers]
        if len(numbers) == 1:
            base = base.with_knobs(**{name: numbers[0]})
            fixed.add(name)
        else:
            axes.append(Axis.range(name, *numbers))
    default = tuple(a for a in space.axes if a.name not in fixed)
    return dataclasses.replace(space, base=base, axes=tuple(axes or default))
