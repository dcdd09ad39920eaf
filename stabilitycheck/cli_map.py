"""`stabilitycheck map TARGET --x KNOB --y KNOB`: trace the stable/exploding frontier over two knobs.

Prints the map (one row per y) and the frontier table; --json is rewritten after every verdict, so
an interrupted run (Ctrl-C: exit 130, SIGTERM: 143) still leaves what was traced. Exit 0 when the
map was traced, 2 for bad input (one line), 3 for an internal error.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stabilitycheck._json import strict_json
from stabilitycheck._options import (
    EXIT_FOUND,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TERMINATED,
    EXIT_USAGE,
    _apply_knobs,
    _limit,
    _number,
    _Parser,
    add_limits,
    require_steps,
)
from stabilitycheck._outputs import Progress, _atomic_write, check_outputs


def parser() -> argparse.ArgumentParser:
    """The `map` command line."""
    p = _Parser(
        prog="stabilitycheck map",
        description="Trace the frontier between stable and exploding configurations over two knobs.",
    )
    p.add_argument("target", help="a zoo family (mlp, rnn...), MODEL.py[:factory] or hf:TYPE")
    p.add_argument("--x", required=True, help="the knob explosion grows with (e.g. depth, seq_len)")
    p.add_argument("--y", required=True, help="the knob of the rows (e.g. init_scale)")
    p.add_argument(
        "--knob",
        action="append",
        default=[],
        metavar="NAME=LO:HI[:STEP]",
        help="the grid of --x or --y (default: the target's search grid); NAME=VALUE fixes a knob "
        "(a word for a choice knob: activation=relu)",
    )
    p.add_argument("--seeds", type=_number(int, 1, 1000), default=5, help="seeds per verdict (5)")
    p.add_argument("--seed", type=_number(int, 0, 2**32 - 1), default=0, help="first seed (0)")
    p.add_argument("--quantile", type=_number(float, 0, 1, open_lo=True), default=0.5, help="(0.5)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (cpu)")
    p.add_argument("--dtype", default=None, help="float32, float64, bfloat16 or float16")
    p.add_argument("--steps", type=_number(int, 0, 10**6), help="optimiser steps per probe (0)")
    p.add_argument("--lr", type=_number(float, 0, open_lo=True), help="learning rate of the steps (0.01)")
    p.add_argument("--optimizer", choices=("sgd", "adam"), help="optimiser of the steps (sgd)")
    p.add_argument(
        "--loss",
        choices=("default", "last"),
        default="default",
        help="'last': every criterion of a recurrent subject on its last-step loss (else growth, vanishing)",
    )
    add_limits(p)
    p.add_argument("--vanishing-limit", type=_limit, default=None, help="also trace growth < 1/X (off)")
    p.add_argument("--json", type=Path, help="write the map as JSON (rewritten after every verdict)")
    p.add_argument("--markdown", type=Path, help="write the frontier table as Markdown")
    p.add_argument("--png", type=Path, help="write the figure (extra: plot)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _axes(args: argparse.Namespace, subject: Any) -> tuple[Any, Any, Any]:
    """The Space (with --knob and run settings) and the Axes of --x and --y: a --knob range, else the
    target's own search grid of that knob."""
    from stabilitycheck.errors import UsageError

    original = subject.space()
    run: dict[str, Any] = {"seed": args.seed, "seeds": args.seeds, "quantile": args.quantile}
    given = {"device": args.device, "dtype": args.dtype, "steps": args.steps, "lr": args.lr}
    run.update({k: v for k, v in {**given, "optimizer": args.optimizer}.items() if v is not None})
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError(
                f"--device {args.device}: CUDA is not available on this machine; use --device cpu"
            )
    space = _apply_knobs(original.with_run(**run), args.knob, subject)
    given_knobs = {text.partition("=")[0]: text for text in args.knob}
    for name, text in given_knobs.items():
        if name not in (args.x, args.y) and any(a.name == name for a in space.axes):
            raise UsageError(
                f"--knob {text}: a map has two axes, --x {args.x} and --y {args.y}, and would leave "
                f"{name} at its default; fix it to one value (--knob {name}=VALUE) and map once per value"
            )
    axes = []
    for flag, name in (("--x", args.x), ("--y", args.y)):
        if name in given_knobs and all(a.name != name for a in space.axes):
            raise UsageError(
                f"{flag} {name}: --knob {given_knobs[name]} fixes it to one value; give the grid to map "
                f"instead, e.g. --knob {name}=1:16"
            )
        found = [a for a in (*space.axes, *original.axes) if a.name == name]
        if not found:
            if name not in space.base.values:
                raise UsageError(
                    f"{flag} {name!r} is not a knob of {space.label}; its knobs are "
                    f"{sorted(space.base.values)}"
                )
            value = space.base.values[name]
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise UsageError(
                    f"{flag} {name}: a map's axes are numeric knobs, and {name} is {value!r}; fix it with "
                    f"--knob {name}=VALUE and map once per value"
                )
            raise UsageError(f"{flag} {name}: give its grid, e.g. --knob {name}=1:16")
        axes.append(found[0])
    return space, axes[0], axes[1]


def run(argv: Sequence[str]) -> int:
    """Parse, trace, write, print; returns the exit code."""
    args = parser().parse_args(argv)
    require_steps(args)
    from stabilitycheck.verdicts import Limits

    limits = Limits(args.grad_norm_limit, args.growth_limit, args.divergence_limit, args.vanishing_limit)
    check_outputs((("--json", args.json), ("--markdown", args.markdown), ("--png", args.png)))
    from stabilitycheck import maptext
    from stabilitycheck.phasemap import phase_map
    from stabilitycheck.searching import check
    from stabilitycheck.subjects import resolve

    with contextlib.redirect_stdout(sys.stderr):  # what a model file prints is no result (here too)
        subject = resolve(args.target)
        space, x, y = _axes(args, subject)
        corners = [space.base.with_knobs(**{x.name: x.values[k], y.name: y.values[k]}) for k in (0, -1)]
        check(subject, *corners)
    progress = Progress(args.quiet)

    def save(pm: Any) -> None:
        if args.json:
            _atomic_write(args.json, strict_json(pm.to_dict()))

    terminated: list[bool] = []

    def on_term(signum: int, frame: Any) -> None:
        terminated.append(True)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            pm = phase_map(
                subject,
                x=x,
                y=y,
                space=space,
                limits=limits,
                loss=args.loss,
                progress=progress,
                on_point=save,
            )
    finally:
        signal.signal(signal.SIGTERM, previous)
    save(pm)
    if args.markdown:
        args.markdown.write_text(maptext.markdown(pm))
    progress.say(maptext.cost(pm))
    print(maptext.text(pm), flush=True)
    if args.png:  # the slowest, last: a second Ctrl-C while it draws loses only the image
        from stabilitycheck.plot_map import plot_map

        plot_map(pm, args.png)
    if pm.stopped:  # the model's code failed at a point: the map so far is out, then the reason
        sys.stderr.write(f"stabilitycheck map: error: {pm.stopped}\n")
        return EXIT_USAGE
    if pm.interrupted:
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    return EXIT_FOUND if any(p.criteria for p in pm.points) else EXIT_OK  # as the search's CLI


def main_map(argv: Sequence[str]) -> int:
    """`stabilitycheck map ...`: one-line errors with exit code 2 for bad input, 3 for internal errors."""
    from stabilitycheck.errors import StabilityCheckError

    try:
        return run(argv)
    except StabilityCheckError as exc:
        if "--debug" in argv:
            traceback.print_exc()
        sys.stderr.write(f"stabilitycheck map: error: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:
        if "--debug" in argv:
            traceback.print_exc()
        sys.stderr.write(
            f"stabilitycheck map: internal error: {type(exc).__name__}: {exc} "
            "(rerun with --debug for the traceback)\n"
        )
        return EXIT_INTERNAL
