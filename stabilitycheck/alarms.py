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
