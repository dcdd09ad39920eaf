"""What a command writes: progress on stderr, and the files (JSON, Markdown, PNG, the GitHub step
summary), each written on its own so one failing never stops the others."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from stabilitycheck._command import uninterrupted
from stabilitycheck._validation import check_image, describe, writable
from stabilitycheck.errors import UsageError

PROGRESS_EVERY = 5.0  # seconds between progress lines when stderr is not a terminal
Unsearched = tuple[str, str, str]  # a search an interrupt left undone: its target, device and dtype


def said(left: Sequence[Unsearched]) -> list[str]:
    """Each search an interrupt left undone as a report names it: 'label [device, dtype]'."""
    return [f"{label} [{device}, {dtype}]" for label, device, dtype in left]


def _unsearched(label: str, device: str | None = None, dtype: str | None = None) -> dict[str, Any]:
    """The JSON's entry for a target not searched: an interrupt came first (device and dtype None
    where it came before the searches were set up)."""
    return {"label": label, "device": device, "dtype": dtype, "not_searched": "interrupted first"}


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


class Outputs:
    """The files a run writes: checked writable before the search, rewritten as results come in, each
    written on its own (one failing never stops the others)."""

    def __init__(self, args: argparse.Namespace) -> None:

        self.args = args
        self.stdout = sys.stdout  # the report's, kept: a search sends anything else printed to stderr
        self.summary = os.environ.get("GITHUB_STEP_SUMMARY")
        self.failures: dict[str, str] = {}  # per output its first failure (each rewrite fails alike)
        check_outputs((("--json", args.json), ("--markdown", args.markdown), ("--plot", args.plot)))

    def save(self, results: Sequence[Any], left: Sequence[Unsearched] = ()) -> None:
        """Rewrite the JSON (atomically) with what is known so far (`left`: the searches an interrupt
        left undone, each as its target, device and dtype)."""
        from stabilitycheck import report

        if self.args.json:
            unsearched = [_unsearched(label, device, dtype) for label, device, dtype in left]
            self._attempt("--json", lambda: atomic_write(self.args.json, report.to_json(results, unsearched)))

    def nothing(self, named: Sequence[str]) -> None:
        """The outputs of a run stopped before its first search, without importing the report, which
        imports torch (the stop may have landed in that import): the JSON names the targets `named`
        as not searched, and a Markdown (and CI step summary) says so, so a CI summary does not stay
        silent."""
        md = (
            f"## stabilitycheck\n\nInterrupted before any search: {', '.join(named)} not searched, "
            "nothing tested.\n"
        )
        text = json.dumps([_unsearched(name) for name in named], indent=2)
        try:
            with uninterrupted():
                if self.args.json:
                    self._attempt("--json", lambda: atomic_write(self.args.json, text))
                self._markdown(md)
        finally:  # a held signal raised at the block's end still hears of a file that failed
            self._say_failures()

    def _markdown(self, md: str) -> None:
        """Write `md` to --markdown and append it to the CI step summary: --markdown "$GITHUB_STEP_SUMMARY",
        the CI recipe's, however spelt, is appended once, as the step summary is (written over, it lost
        the step's earlier content)."""
        summary = Path(self.summary).resolve() if self.summary else None
        if self.args.markdown and self.args.markdown.resolve() != summary:
            self._attempt("--markdown", lambda: self.args.markdown.write_text(md))
        if summary is not None:
            self._attempt("GITHUB_STEP_SUMMARY", lambda: _append(summary, md))

    def final(self, results: Sequence[Any], left: Sequence[Unsearched] = ()) -> None:
        """Everything: JSON, Markdown, the report on stdout (a closed pipe loses only that), whole
        under a signal (_command.uninterrupted), then the plot, the slowest (a second Ctrl-C while it
        draws loses only the image). `left`: the targets an interrupt left unsearched."""
        from stabilitycheck import report

        try:
            with uninterrupted():  # a signal now stops the run after these, before the plot
                self.save(results, left)
                if self.args.markdown or self.summary:
                    self._markdown(report.markdown(results, said(left)))
                try:
                    print(report.text(results), file=self.stdout, flush=True)
                except BrokenPipeError:
                    self.stdout = open(os.devnull, "w")  # noqa: SIM115 (the CLI makes it sys.stdout, flushed at exit)
            if self.args.plot:
                from stabilitycheck.plot import plot

                self._attempt("--plot", lambda: plot(results, self.args.plot))
        finally:  # a second Ctrl-C while the plot draws still hears of a file that failed
            self._say_failures()

    def _say_failures(self) -> None:
        for failure in self.failures.values():
            sys.stderr.write(f"stabilitycheck: error: {failure}\n")

    def _attempt(self, what: str, write: Callable[[], object]) -> None:
        try:
            write()
        except Exception as exc:
            self.failures.setdefault(what, f"{what}: writing it failed: {describe(exc)}")


SUFFIX = {"--json": ".json", "--markdown": ".md"}  # an example file name's, per flag; an image's .png


def check_outputs(named: Sequence[tuple[str, Path | None]]) -> None:
    """Before any work: each output path given is writable, and matplotlib is there for the last one
    (the image); else a one-line UsageError naming the flag. --json, written by a rename over the file
    (`atomic_write`), where a link points, takes a regular file alone (renamed over, /dev/full became
    a JSON file); the others are written into, /dev/stdout too."""
    seen: dict[Path, str] = {}
    for flag, path in named:
        if path is None:
            continue
        if path.is_dir():
            example = path / f"results{SUFFIX.get(flag, '.png')}"
            raise UsageError(f"{flag} {path}: is a directory; give a file path, e.g. {example}")
        special = path.exists() and not path.is_file()  # a device or a pipe
        if flag == "--json" and special:
            raise UsageError(f"{flag} {path}: is no regular file (a device or a pipe); give a file path")
        if flag == "--json":  # its rename happens where a link points (a link into a missing folder)
            ok = writable(path.resolve())
        else:  # written into: a device or pipe (/dev/stdout) is tried itself, not its folder
            ok = os.access(path, os.W_OK) if special else writable(path)
        if not ok:
            raise UsageError(f"{flag} {path}: cannot write there (no such directory or no permission)")
        same = seen.setdefault(path.resolve(), flag)
        if same != flag:
            raise UsageError(
                f"{same} and {flag} both name {path}: one would overwrite the other; give each its own file"
            )
    flag, image = named[-1]
    if image is not None:
        check_image(flag, image)


def atomic_write(path: Path, text: str) -> None:
    """Write `text` to `path` whole (a reader never sees half of it): a temporary file beside the
    file, renamed over it; beside the file a link points to, so the link stays (renamed over, the
    link became a file and its target kept the old text)."""
    path = path.resolve()
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _append(path: Path, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)
