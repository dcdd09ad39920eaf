"""Signals and alarms around user code: a per-probe time limit, and the test whether code runs inside
a gc callback, where an exception raised is printed and dropped, so a handler or an alarm that would
raise there defers instead (standard library only: the CLI's signal handler uses it before anything
heavy is imported)."""

from __future__ import annotations

import gc
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def in_gc_callback(frame: Any) -> bool:
    """Whether `frame` runs inside a gc callback (Hypothesis registers one), up its call chain."""
    codes = {getattr(cb, "__code__", None) for cb in gc.callbacks}
    while frame is not None:
        if frame.f_code in codes:
            return True
        frame = frame.f_back
    return False


class ProbeTimeout(BaseException):
    """A probe ran past its time budget (a BaseException, so user code catching Exception lets it by)."""


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise ProbeTimeout in the block after `seconds` (SIGALRM: the main thread of a Unix process;
    elsewhere no limit is applied)."""
    usable = (
        seconds is not None
        and hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
    )
    if not usable:
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        if in_gc_callback(frame):  # an exception raised there is printed and dropped: retry just after
            signal.setitimer(signal.ITIMER_REAL, 0.01)
            return
        raise ProbeTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, float(seconds or 0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Termination:
    """While open, SIGTERM ends the process as sys.exit(143) would, so `with` blocks and finally
    clauses still run (a watched run writes its log and report) where it would otherwise be killed
    at once: only where SIGTERM has the default handler (one a user or a framework installed is
    theirs) and in the main thread. A signal that lands in a gc callback, where an exception is
    dropped, is raised at the next `check`; one after the first is ignored while the run stops."""

    CODE = 128 + signal.SIGTERM  # the shell's status of a process SIGTERM killed: 143

    def __init__(self) -> None:
        self.installed = False
        self.fired = False
        self.pending = False

    def open(self) -> None:
        main = threading.current_thread() is threading.main_thread()
        if main and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, self._on_term)
            self.installed = True

    def _on_term(self, signum: int, frame: Any) -> None:
        if self.fired:
            return
        self.fired = True
        if in_gc_callback(frame):
            self.pending = True
            return
        raise SystemExit(self.CODE)

    def check(self) -> None:
        """Raise a SIGTERM that landed in a gc callback."""
        if self.pending:
            self.pending = False
            raise SystemExit(self.CODE)

    def close(self) -> None:
        """Give SIGTERM back its default handler, unless someone installed another since."""
        if self.installed and signal.getsignal(signal.SIGTERM) == self._on_term:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        self.installed = False


@contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive in the block are held and raised again as it ends, with the
    handlers in place before it: bookkeeping that must not stop half-way (a flush whose rows are
    read once) finishes first. Main thread only, and only signals whose handler Python set."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    previous = {s: h for s in (signal.SIGINT, signal.SIGTERM) if (h := signal.getsignal(s)) is not None}
    for s in previous:
        signal.signal(s, lambda signum, frame: got.append(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for signum in dict.fromkeys(got):
            signal.raise_signal(signum)
