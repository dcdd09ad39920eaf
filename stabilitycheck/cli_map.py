"""`stabilitycheck map TARGET --x KNOB --y KNOB`: trace the stable/exploding frontier over two knobs.

Prints the map (one row per y) and the frontier table; --json is rewritten after every verdict, so
an interrupted run (Ctrl-C: exit 130, SIGTERM: 143) still leaves what was traced. Exit 0 when the
map was traced, 2 for bad input (one line), 3 for an internal error.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stabilitycheck._command import interrupted, require_devices, uninterrupted
from stabilitycheck._json import strict_json
from stabilitycheck._options import (
    EXIT_FOUND,
    EXIT_OK,
    EXIT_USAGE,
    Parser,
    add_output_options,
    add_run_options,
    apply_knobs,
    dtype,
    require_steps,
)
from stabilitycheck._outputs import Progress, atomic_write, check_outputs
from stabilitycheck.errors import UsageError


def parser() -> argparse.ArgumentParser:
    """The `map` command line."""
    p = Parser(
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
    add_run_options(p)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (cpu)")
    p.add_argument("--dtype", type=dtype, default=None, help="float32, float64, bfloat16 or float16")
    p.add_argument(
        "--loss",
        choices=("default", "last"),
        default="default",
        help="'last': every criterion of a recurrent subject on its last-step loss (else growth, vanishing)",
    )
    p.add_argument("--json", type=Path, help="write the map as JSON (rewritten after every verdict)")
    p.add_argument("--markdown", type=Path, help="write the frontier table as Markdown")
    p.add_argument("--png", type=Path, help="write the figure (extra: plot)")
    add_output_options(p)
    return p


def _axes(args: argparse.Namespace, subject: Any) -> tuple[Any, Any, Any]:
    """The Space (with --knob and run settings) and the Axes of --x and --y: a --knob range, else the
    target's own search grid of that knob."""
    original = subject.space()
    run: dict[str, Any] = {"seed": args.seed, "seeds": args.seeds, "quantile": args.quantile}
    given = {"device": args.device, "dtype": args.dtype, "steps": args.steps, "lr": args.lr}
    run.update({k: v for k, v in {**given, "optimizer": args.optimizer}.items() if v is not None})
    require_devices([args.device])
    space = apply_knobs(original.with_run(**run), args.knob)
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


def run(argv: Sequence[str] | None) -> int:
    """Parse, trace, write, print; returns the exit code (run by cli.main, as `stabilitycheck map`)."""
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
            atomic_write(args.json, strict_json(pm.to_dict()))

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
    with uninterrupted():  # the map's outputs whole: a signal now stops the run after them
        save(pm)
        if args.markdown:
            args.markdown.write_text(maptext.markdown(pm))
        progress.say(maptext.cost(pm))
        print(maptext.text(pm), flush=True)
        if pm.stopped:  # the model's code failed at a point: the map so far is out, then the reason
            sys.stderr.write(f"stabilitycheck map: error: {pm.stopped}\n")
    if args.png:  # the slowest, last: a second Ctrl-C while it draws loses only the image
        from stabilitycheck.plot_map import plot_map

        plot_map(pm, args.png)
    if pm.stopped:
        return EXIT_USAGE
    if pm.interrupted:
        return interrupted()
    return EXIT_FOUND if any(p.criteria for p in pm.points) else EXIT_OK  # as the search's CLI
