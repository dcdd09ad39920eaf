"""The signal handling (alarms): which frames are the package's own, signals held in a block raised
again after it, and a SIGTERM after the watcher let go ending the process at once."""

from __future__ import annotations

import pytest


def _frames(*modules: str) -> object:
    """A chain of stand-in frames, innermost first, each running code of `modules[i]` (what
    in_own_code reads of a frame: f_globals['__name__'] and f_back)."""
    from types import SimpleNamespace

    back = None
    for name in reversed(modules):
        back = SimpleNamespace(f_globals={"__name__": name}, f_back=back)
    return back


@pytest.mark.parametrize(
    ("chain", "own"),
    [
        (("stabilitycheck.watching",), True),
        (("torch.nn.modules.module", "stabilitycheck.capture"), True),  # a torch hook our code set
        (("contextlib", "functools", "stabilitycheck.watching"), True),
        (("torch.autograd.graph", "torch.nn.modules.module", "stabilitycheck.watching"), True),
        (("torch.nn.modules.module", "train"), False),  # torch called by the user's loop
        (("train", "stabilitycheck.watching"), False),  # the user's code, whoever called it
        (("torch.optim.sgd",), False),
    ],
)
def test_own_code_is_this_package_or_torch_and_contextlib_it_called(
    chain: tuple[str, ...], own: bool
) -> None:
    """alarms.in_own_code: this package's code, or code of torch (or contextlib, functools) this
    package's code called, as a hook or a helper; anything else, the user's. Oracle: that docstring,
    on stand-in frame chains (innermost first)."""
    from stabilitycheck.alarms import in_own_code

    assert in_own_code(_frames(*chain)) is own


def test_signals_held_in_a_block_are_raised_again_after_it_sigterm_first() -> None:
    """alarms.signals_held: SIGINT and SIGTERM arriving in the block are held and raised again as it
    ends, under the handlers in place before it, SIGTERM first (a KeyboardInterrupt raised first would
    leave the SIGTERM behind it unsent). Oracle: that docstring, with recording handlers of our own."""
    import signal

    from stabilitycheck.alarms import signals_held

    got: list[int] = []
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for s in previous:
            signal.signal(s, lambda signum, frame: got.append(signum))
        with signals_held():
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGINT)
            assert got == []  # held while the block runs
        assert got == [signal.SIGTERM, signal.SIGINT]  # each once, SIGTERM first
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def test_a_sigterm_after_the_watcher_let_go_or_a_second_one_ends_the_process_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Termination: a SIGTERM that reaches its handler after close (closed from another thread, the
    handler still in place) does what the default handler does, end the process, as a second SIGTERM
    does; only the first one while open unwinds the run (Terminated). Oracle: Termination's docstring
    ('a second one ends it at once') and the handler's comment (one after close: the default's); the
    process ending is observed through a stand-in for alarms._die, which would send the real SIGTERM."""
    from stabilitycheck import alarms

    class Died(Exception):
        pass

    def die() -> None:
        raise Died

    monkeypatch.setattr(alarms, "_die", die)
    closed = alarms.Termination()  # installed False: never opened, or closed
    with pytest.raises(Died):
        closed._on_term(15, None)
    open_ = alarms.Termination()
    open_.installed = True  # as open() leaves it (without touching the real handler here)
    with pytest.raises(alarms.Terminated):
        open_._on_term(15, None)  # the first, in the user's code (no frame of ours): unwinds the run
    with pytest.raises(Died):
        open_._on_term(15, None)  # a second one
