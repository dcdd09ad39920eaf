"""How every `stabilitycheck` command runs: SIGINT and SIGTERM stop it as a KeyboardInterrupt (exit
130 and 143), so what it found is still written; bad input is one line and exit 2, an internal error
one line and exit 3 (--debug: the traceback). No torch at import."""

from __future__ import annotations

import re
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from stabilitycheck._options import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_USAGE
from stabilitycheck.alarms import STOP, deliver_later, in_dropping_frame, stop_seen
from stabilitycheck.errors import UsageError

_SIGNALLED: list[int] = []
"""The signals received. Each handler also raises, but an exception raised while Python runs a gc
callback or a __del__ is printed and dropped, so a long command checks this after every point too."""


_WRITING: list[list[int]] = []
"""While a command writes what it found (`uninterrupted`): the signals held for after the writing."""

AGAIN_S = 0.05  # a signal landing where a raise is dropped (alarms.in_dropping_frame) comes again then
WRITE_GRACE_S = 5.0  # how long a held signal waits for the writing: a blocked write (a FIFO) ends then


def _on_signal(signum: int, frame: Any) -> None:
    _SIGNALLED.append(signum)
    if _WRITING and not _WRITING[0]:  # the first while writing: held, raised when the writing is done
        held = _WRITING[0]
        held.append(signum)
        _again(signum, WRITE_GRACE_S, lambda: any(h is held for h in _WRITING))  # still writing then: raised
        return  # a second signal, or this one again, is raised as any other
    _again(signum)  # until a KeyboardInterrupt is seen: one raised in a weakref's callback is dropped
    if not in_dropping_frame(frame):  # a gc or weakref callback, a __del__: a raise there is dropped
        stop_if_signalled()


def _again(signum: int, after: float = AGAIN_S, still: Callable[[], bool] | None = None) -> None:
    """Deliver `signum` again `after` seconds from now, from a thread, unless the command is over or,
    without `still`, a KeyboardInterrupt was seen meanwhile (alarms.stop_seen); with it, while it
    holds (a write still under way). Left to the command's next check, a SIGTERM landing in a gc
    callback while a 100,000-layer model was built for its memory estimate waited minutes, and the
    run was killed with nothing written."""
    run = STOP.run
    deliver_later(
        signum,
        after,
        lambda: STOP.live and STOP.run == run and (still() if still is not None else not STOP.seen),
    )


def stop_if_signalled() -> None:
    """SIGINT or SIGTERM (a CI timeout) stop the same way, as a KeyboardInterrupt, so a command keeps
    what it found either way; only the exit code tells them apart (`interrupted`)."""
    if _SIGNALLED:
        raise KeyboardInterrupt


@contextmanager
def uninterrupted() -> Iterator[None]:
    """Write what a run found whole: the first SIGINT or SIGTERM landing in the block is held, and
    raised as a KeyboardInterrupt once it is done (one landing in the report's Markdown lost it and
    the report on stdout, exit 143 with nothing printed after a finished search); a second one, or
    the first again WRITE_GRACE_S later (a write blocked on a FIFO no one reads), is raised at once.
    Nested, the outer block holds."""
    if _WRITING:
        yield
        return
    held: list[int] = []
    _WRITING.append(held)
    try:
        yield
    finally:
        _WRITING.clear()
    if held:
        raise KeyboardInterrupt


def interrupted() -> int:
    """The exit code of a stopped run: 143 after SIGTERM, 130 after Ctrl-C."""
    return EXIT_TERMINATED if signal.SIGTERM in _SIGNALLED else EXIT_INTERRUPTED


def require_devices(names: Sequence[str], more: str = "") -> None:
    """A device that is none (--device tpu read "Run.device='tpu' is not allowed", naming no option),
    or a CUDA device on a machine without CUDA, is bad input, one line; `more`: the other values the
    command takes, said beside the devices."""
    import torch

    for name in names:
        if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
            raise UsageError(f"--device {name!r}: expected cpu, cuda or cuda:N{more}")
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu")


def run_command(prog: str, run: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None) -> int:
    """`run(argv)` under the signal handlers, its errors mapped to exit codes with one line on stderr
    named by `prog`."""
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    _SIGNALLED.clear()
    STOP.live, STOP.run, STOP.seen = True, STOP.run + 1, False
    on_main = threading.current_thread() is threading.main_thread()
    # a signal the process was started ignoring (SIGINT in a shell script's `&` job) stays ignored
    signals = (signal.SIGINT, signal.SIGTERM) if on_main else ()
    handled = [s for s in signals if signal.getsignal(s) is not signal.SIG_IGN]
    previous = {s: signal.signal(s, _on_signal) for s in handled}
    try:
        return run(argv)
    except UsageError as exc:
        if debug:
            traceback.print_exc()
        sys.stderr.write(f"{prog}: error: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        stop_seen()
        return interrupted()
    except ModuleNotFoundError as exc:
        sys.stderr.write(f"{prog}: error: {exc.name} is not installed; pip install stabilitycheck\n")
        return EXIT_USAGE
    except Exception as exc:  # an internal error: say so, and how to get the traceback
        if _SIGNALLED:  # library code that turned the signal's KeyboardInterrupt into its own error
            return interrupted()
        if debug:
            traceback.print_exc()
        sys.stderr.write(
            f"{prog}: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)\n"
        )
        return EXIT_INTERNAL
    finally:
        STOP.live = False
        for s, handler in previous.items():
            signal.signal(s, handler)
