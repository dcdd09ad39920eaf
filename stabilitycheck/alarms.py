"""Signals and alarms around user code: a per-probe time limit; SIGTERM unwinding a watched run to
its watcher before it ends the process (deferred while the watcher's own code runs); signals held
while a flush completes; and the test whether code runs inside a gc callback, where an exception
raised is printed and dropped, so a handler or an alarm that would raise there defers instead
(standard library only: the CLI's signal handler uses it before anything heavy is imported)."""

from __future__ import annotations

import contextlib
import gc
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

# the callbacks of WeakSet, WeakValueDictionary and torch's ExactWeakKeyDictionary
_WEAKREF_FILES = ("_weakrefset.py", "weakref.py", "torch/utils/weak.py")


class _Stop:
    """What a command's signal redelivery reads (_command), in one place: whether its handlers are
    installed (`live`), which run of it this is (`run`: a signal delivered again belongs to the run
    it was received in), and whether a KeyboardInterrupt reached code that handles it since the run
    began (`seen`, `stop_seen`): until then the handler delivers its signal again."""

    live = False
    run = 0
    seen = False


STOP = _Stop()


def deliver_later(signum: int, after: float, still: Callable[[], bool] = lambda: True) -> None:
    """Send `signum` to the main thread `after` seconds from now, from a daemon thread, where `still()`
    holds then: its handler runs there, and a system call the main thread is blocked in (a write to a
    FIFO no one reads, a sleep) is interrupted for it. raise_signal from another thread is that
    thread's, and left the main thread blocked."""

    def deliver() -> None:
        if not still():
            return
        ident = threading.main_thread().ident
        if hasattr(signal, "pthread_kill") and ident is not None:
            signal.pthread_kill(ident, signum)
        else:  # no pthreads (Windows)
            signal.raise_signal(signum)

    timer = threading.Timer(after, deliver)
    timer.daemon = True
    timer.start()


def stop_seen() -> None:
    """Say that a KeyboardInterrupt reached code that handles it (a search, a map, the command line):
    one raised where Python drops it (a callback of any weakref, not knowable from the frames) is
    delivered again until one does."""
    STOP.seen = True


def in_dropping_frame(frame: Any) -> bool:
    """Whether `frame` runs, up its call chain, where Python prints an exception raised and drops it:
    a gc callback (Hypothesis registers one), a __del__, or a weakref's callback (a WeakSet's removal
    dropped a KeyboardInterrupt there). Where weakref's code runs otherwise too (a lookup), a signal
    handler waiting for its check costs a moment, never the signal."""
    codes = {getattr(cb, "__code__", None) for cb in gc.callbacks}
    while frame is not None:
        code = frame.f_code
        if code in codes or code.co_name == "__del__" or code.co_filename.endswith(_WEAKREF_FILES):
            return True
        frame = frame.f_back
    return False


_PACKAGE = __name__.partition(".")[0]
_PASSED_THROUGH = ("torch", "contextlib", "functools")  # what our code calls, or what calls it back


def in_own_code(frame: Any) -> bool:
    """Whether `frame` runs this package's code: itself, or code of torch (or of the standard library's
    contextlib or functools) that this package's code called, as a hook or a helper."""
    while frame is not None:
        top = str(frame.f_globals.get("__name__", "")).partition(".")[0]
        if top == _PACKAGE:
            return True
        if top not in _PASSED_THROUGH:
            return False
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
        if in_dropping_frame(frame):  # an exception raised there is printed and dropped: retry just after
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


class Terminated(BaseException):
    """Raised by Termination's SIGTERM handler to unwind a watched run to its watcher (a BaseException:
    `except Exception` in the loop lets it by)."""


class Termination:
    """While open, SIGTERM unwinds the run to the watcher (Terminated), which writes its log and report,
    then ends the process by SIGTERM itself (`close`): what the default handler does, after the report
    instead of before it, and nothing that catches SystemExit (pytest) can swallow it. Only where
    SIGTERM has the default handler (one a user or a framework installed is theirs), in the main
    thread. A SIGTERM that lands in the watcher's own code (a hook, a step's bookkeeping: unwound
    half-way, its log and report were lost) or where its exception would be dropped (a gc callback, a
    __del__) is raised at the next `check`, and ends the process at `close` in any case; a second one
    ends it at once."""

    def __init__(self) -> None:
        self.installed = False
        self.fired = False

    def open(self) -> None:
        main = threading.current_thread() is threading.main_thread()
        if main and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, self._on_term)
            self.installed = True

    def _on_term(self, signum: int, frame: Any) -> None:
        if self.fired or not self.installed:  # a second SIGTERM, or one after close: the default's
            _die()
        self.fired = True
        if not (in_own_code(frame) or in_dropping_frame(frame)):  # else `check` raises it
            raise Terminated

    def check(self) -> None:
        """Raise a SIGTERM that was deferred (or whose exception was dropped)."""
        if self.fired:
            raise Terminated

    def close(self) -> None:
        """Give SIGTERM back its default handler (unless someone installed another since); after a
        SIGTERM, end the process with it."""
        if not self.installed:
            return
        self.installed = False
        main = threading.current_thread() is threading.main_thread()
        if main and signal.getsignal(signal.SIGTERM) == self._on_term:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if self.fired:
            _die()


def _die() -> None:
    """End the process by SIGTERM, as its default handler does, the Python streams flushed first."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.raise_signal(signal.SIGTERM)  # elsewhere our handler, now closed, does this in the main thread


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
        # SIGTERM first: raised again, SIGINT's KeyboardInterrupt would leave a SIGTERM behind it unsent
        for signum in sorted(dict.fromkeys(got), key=lambda s: s != signal.SIGTERM):
            signal.raise_signal(signum)
