"""pytest plugin (entry point pytest11): --stability-* options, the device and recording fixtures, and a
terminal summary of the counterexamples found in the session, gathered from pytest-xdist workers too.

It changes nothing unasked: Hypothesis tests are seeded only under --stability-seed or
--stability-profile (and tests that use its fixtures), torch's thread count only under
--stability-threads, and SIGTERM ends the session as Ctrl-C does only under --stability-profile.

Cheap to import: torch, Hypothesis and the rest of stabilitycheck load lazily inside the hooks that need
them. Counterexamples get into the summary three ways: the `stability_record` fixture; `assert_stable`,
whose error carries its Counterexample; and any test failing with an AssertionError (StabilityError
included) whose arguments hold a Config, e.g. a Hypothesis property over `strategies.configs()`: the
Config recorded is the one of the failing call, so after Hypothesis's shrinking, the minimal one.

Hooks, fixtures and session state only: the options are declared in _options.py, the findings and
their summary rendered in findings.py, and assert_stable lives in invariants_stable.py.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import random
import shlex
import signal
import sys
import threading
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest

from stabilitycheck._command import AGAIN_S
from stabilitycheck._options import PREFIX
from stabilitycheck._options import (
    add_options as add_options,  # `X as X`: the plugin's public names
)
from stabilitycheck.alarms import deliver_later, in_dropping_frame
from stabilitycheck.findings import Finding as Finding
from stabilitycheck.findings import failing_configs, failure_text, leaves
from stabilitycheck.findings import finding as finding
from stabilitycheck.findings import summary as summary
from stabilitycheck.invariants_stable import assert_stable as assert_stable

if TYPE_CHECKING:
    from stabilitycheck.config import Config
    from stabilitycheck.counterexample import Counterexample, SearchResult

WORKER_KEY = "stabilitycheck"
SEED_ATTRIBUTE = "_hypothesis_internal_use_seed"
"""What hypothesis.seed() sets on a test. The plugin sets it directly, and only when asked: the public
hypothesis.seed() and --hypothesis-seed both turn the example database off (Hypothesis 6.100-6.170),
and a seeded CI run must still replay what an earlier run found (tests/test_plugin.py checks it)."""
FIXTURES = ("stability_device", "stability_record")
CI_SEED = 0
"""The seed of --stability-profile ci when --stability-seed is not given: CI runs repeat, and the
example database (kept) replays what an earlier run found first."""

# --------------------------------------------------------------------------------------------------
# Per-session state, kept in config.stash (never in module globals: pytester runs nest sessions)


@dataclass
class _State:
    seed: int
    seed_all: bool = False
    """Seed every Hypothesis test (--stability-seed or --stability-profile given), not only those
    using the plugin's fixtures."""
    findings: list[Finding] = field(default_factory=list)
    seen: set[tuple[str, str]] = field(default_factory=set)
    previous_profile: str | None = None
    previous_sigterm: Any = None  # SIGTERM's handler before the session's (`_sigterm_interrupts`)
    profile: str | None = None  # --stability-profile, as given (a reproduction line repeats it)
    current: str = ""  # the node id of the test running now (stability_record names its findings by it)
    sent: int = 0  # an xdist worker: the findings already attached to a report (`_hand_over`)
    rerun: str = ""  # the line that runs it again (`_rerun`): a Config it records reproduces by it

    def add(self, f: Finding | None) -> bool:
        if f is None:
            return False
        key = (f.test, json.dumps(f.config, sort_keys=True))
        if key in self.seen:
            return False
        self.seen.add(key)
        self.findings.append(f)
        return True


_STATE = pytest.StashKey[_State]()
_SEEDED = pytest.StashKey[
    bool
]()  # the plugin seeded this test's examples: its reproduction line repeats the seed


def _state(config: pytest.Config) -> _State:
    return config.stash[_STATE]


class Recorder:
    """The `stability_record` fixture: record(found) adds a SearchResult's counterexample, a
    Counterexample or a failing Config to the session summary, under the test running now; True when
    something was added."""

    def __init__(self, state: _State) -> None:
        self._state = state

    def __call__(
        self,
        found: SearchResult | Counterexample | Config,
        *,
        failure: str | None = None,
        knobs: tuple[str, ...] | None = None,
    ) -> bool:
        again = self._state.rerun or None  # a Config's failure is the test's own criterion: rerun it
        return self._state.add(
            finding(found, self._state.current, failure=failure, knobs=knobs, reproduce=again)
        )


# --------------------------------------------------------------------------------------------------
# Hooks


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser.getgroup("stabilitycheck", "stabilitycheck: exploding-gradient properties").addoption)


def _hypothesis_seed_option(config: pytest.Config) -> str | None:
    try:
        value = config.getoption("--hypothesis-seed")
    except ValueError:  # Hypothesis's pytest plugin is not loaded
        return None
    return None if value is None else str(value)


MARKERS = ("slow: takes more than a few seconds", "cuda: needs a CUDA device; skips where none is available")
"""The markers the example properties use: registered, so copied into a project run with
--strict-markers they still collect."""
NO_CUDA = "CUDA is not available here (torch.cuda.is_available() is False)"


def pytest_configure(config: pytest.Config) -> None:
    for marker in MARKERS:
        config.addinivalue_line("markers", marker)
    workerinput: dict[str, Any] | None = getattr(config, "workerinput", None)
    seed = config.getoption(f"{PREFIX}seed")
    profile = config.getoption(f"{PREFIX}profile")
    if seed is None and workerinput is not None:
        seed = workerinput.get("stabilitycheck_seed")
    if seed is None and profile == "ci":
        seed = CI_SEED
    _threads_option(config)  # a bad value is a usage error before anything runs
    state = _State(
        seed=random.randrange(2**32) if seed is None else int(seed),
        seed_all=config.getoption(f"{PREFIX}seed") is not None or profile is not None,
    )
    if profile is not None:
        from hypothesis import settings

        from stabilitycheck.strategies import load_profile

        state.profile = profile
        state.previous_profile = settings.get_current_profile_name()
        load_profile(profile)
        if workerinput is None:  # a worker hands its findings over with each report (`_hand_over`)
            state.previous_sigterm = _sigterm_interrupts()
    config.stash[_STATE] = state
    if workerinput is None:
        config.pluginmanager.register(_Collector(state), f"stabilitycheck-collector-{id(config)}")


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM as Ctrl-C; where Python would drop the raise (a gc callback, which Hypothesis
    registers, a __del__), delivered again a moment later."""
    if in_dropping_frame(frame):
        deliver_later(signum, AGAIN_S)
        return
    raise KeyboardInterrupt


def _sigterm_interrupts() -> Any:
    """SIGTERM (a CI job's timeout) stops the session as Ctrl-C does, so the summary still lists the
    counterexamples found so far (by default the process died and printed none). In the main process's
    main thread (an xdist worker keeps the default: one killed alone is restarted, as before, and its
    findings reached the controller with its reports), and only where SIGTERM has its default action;
    the handler before, to put back, else None."""
    if threading.current_thread() is not threading.main_thread():
        return None
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return None
    return signal.signal(signal.SIGTERM, _interrupt)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked `cuda` skips, saying why, where CUDA is not available (it ran, and failed, on a
    machine without: a trial); torch is imported only for such a test."""
    if item.get_closest_marker("cuda") is not None:
        import torch

        if not torch.cuda.is_available():
            pytest.skip(f"marked cuda: {NO_CUDA}")


def pytest_unconfigure(config: pytest.Config) -> None:
    """Put back the Hypothesis profile that was loaded before --stability-profile (nested pytester runs)
    and SIGTERM's handler."""
    state = config.stash.get(_STATE, None)
    if state is not None and state.previous_profile is not None:
        from hypothesis import settings

        settings.load_profile(state.previous_profile)
    if state is not None and state.previous_sigterm is not None:
        signal.signal(signal.SIGTERM, state.previous_sigterm)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist controller: every worker seeds its Hypothesis tests like the controller would."""
    node.workerinput["stabilitycheck_seed"] = _state(node.config).seed


MAX_THREADS = 4096  # torch threads per process: more is a typo (a huge count raised INTERNALERROR)


def _threads_option(config: pytest.Config) -> int | None:
    """--stability-threads as a count (auto: cores // pytest-xdist workers), None when not given."""
    value = config.getoption(f"{PREFIX}threads")
    if value is None:
        return None
    if value == "auto":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return max(1, cores // max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
    # isascii: '²' is a digit to isdigit() and not to int(); the bound: torch's set_num_threads overflows
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= MAX_THREADS:
        raise pytest.UsageError(f"{PREFIX}threads={value!r}: expected a count in 1..{MAX_THREADS} or 'auto'")
    return int(value)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Under --stability-threads: that many torch threads in this process (each xdist worker), set
    through OMP_NUM_THREADS before torch loads, or torch.set_num_threads once it has."""
    threads = _threads_option(session.config)
    if threads is None:
        return
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


def pytest_report_header(config: pytest.Config) -> str:
    """The Hypothesis profile, the seed and the device, so a run can be repeated."""
    from hypothesis import settings

    current = settings()  # the loaded profile's values
    name = settings.get_current_profile_name()
    database = "off" if current.database is None or current.derandomize else "on"
    profile = f"hypothesis profile {name!r} (max_examples={current.max_examples}, database {database})"
    state = _state(config)
    forced = _hypothesis_seed_option(config)
    if forced is not None:
        seed = f"seed {forced} (--hypothesis-seed)"
    elif current.derandomize:
        seed = "seed derandomized"
    else:
        which = "" if state.seed_all else " for tests using its fixtures"
        seed = f"seed {state.seed}{which} (repeat with {PREFIX}seed={state.seed})"
    return f"stabilitycheck: {profile}, {seed}, device {config.getoption(f'{PREFIX}device')}"


def _derandomized(test: Any) -> bool:
    from hypothesis import settings

    used = getattr(test, "_hypothesis_internal_use_settings", None)
    return bool(settings().derandomize or getattr(used, "derandomize", False))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, Any, None]:
    """Seed a Hypothesis test from the session seed and its node id (so -n 0 and -n 2 draw the same
    examples) when asked (--stability-seed or --stability-profile) or when it uses the plugin's
    fixtures; never when it is derandomised, has its own @seed, or --hypothesis-seed is given. The
    example database stays on (see SEED_ATTRIBUTE)."""
    test = getattr(item, "obj", None)
    test = getattr(test, "__func__", test)  # a test class's method: its function holds the seed
    state = item.config.stash.get(_STATE, None)
    if state is not None:
        state.current = item.nodeid
    seeded = False
    if (
        test is not None
        and state is not None
        and (state.seed_all or any(f in getattr(item, "fixturenames", ()) for f in FIXTURES))
        and "hypothesis" in sys.modules
        and _hypothesis_seed_option(item.config) is None
        and getattr(test, "is_hypothesis_test", False)
        and getattr(test, SEED_ATTRIBUTE, None) is None
        and not _derandomized(test)
    ):
        digest = hashlib.sha256(f"{state.seed}:{item.nodeid}".encode()).digest()
        setattr(test, SEED_ATTRIBUTE, int.from_bytes(digest[:8], "big"))
        seeded = item.stash[_SEEDED] = True
    if state is not None:
        state.rerun = _rerun(item, state, seeded)
    try:
        outcome = yield
        stopped = outcome.excinfo[1] if outcome.excinfo else None
        found = getattr(stopped, "stability_counterexample", None)
        if isinstance(stopped, KeyboardInterrupt) and found is not None and state is not None:
            state.add(finding(found, item.nodeid))  # assert_stable interrupted: what it had found
    finally:
        if seeded:
            setattr(test, SEED_ATTRIBUTE, None)  # the function outlives this session (pytester nests)


def _test_codes(item: pytest.Item) -> set[Any]:
    """The code objects of the test function and, for a Hypothesis test, of the function @given wraps."""
    codes = set()
    for fn in (getattr(item, "obj", None), getattr(getattr(item, "obj", None), "hypothesis", None)):
        fn = getattr(fn, "inner_test", fn)
        if callable(fn):
            code = getattr(inspect.unwrap(fn), "__code__", None)
            if code is not None:
                codes.add(code)
    return codes


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    """Record the counterexample of a test failing with an AssertionError: the one an Unstable carries,
    else each Config among the test's arguments at the failing call (Hypothesis's shrunk example); on
    an xdist worker, hand what was recorded over with the report (`_hand_over`)."""
    outcome = yield
    state = item.config.stash.get(_STATE, None)
    if state is None:
        return
    _record(item, call, state)
    if getattr(item.config, "workerinput", None) is not None and len(state.findings) > state.sent:
        _hand_over(outcome.get_result(), state)


FINDINGS_ATTRIBUTE = "stabilitycheck_findings"
"""A report's attribute holding, as JSON, the findings a worker recorded since its last report
(xdist sends a report's attributes to the controller; user_properties would land in JUnit XML): they
reach the controller as the test ends, not only when the worker's session does (a worker stopped by
SIGTERM, a CI timeout, sent none)."""


def _hand_over(report: pytest.TestReport, state: _State) -> None:
    setattr(report, FINDINGS_ATTRIBUTE, json.dumps([f.to_dict() for f in state.findings[state.sent :]]))
    state.sent = len(state.findings)


class _Collector:
    """xdist controller: the findings each worker's reports carry (FINDINGS_ATTRIBUTE), into the session's."""

    def __init__(self, state: _State) -> None:
        self.state = state

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        carried = getattr(report, FINDINGS_ATTRIBUTE, None)
        for item in json.loads(carried) if isinstance(carried, str) else ():
            self.state.add(Finding.from_dict(item))


def _record(item: pytest.Item, call: pytest.CallInfo[None], state: _State) -> None:
    if call.when != "call" or call.excinfo is None or "stabilitycheck.config" not in sys.modules:
        return
    codes = _test_codes(item)
    for exc in leaves(call.excinfo.value):
        if not isinstance(exc, AssertionError):
            continue
        cx = getattr(exc, "stability_counterexample", None)
        if cx is not None:
            state.add(finding(cx, item.nodeid, knobs=getattr(exc, "stability_knobs", None)))
            continue
        again = _rerun(item, state, item.stash.get(_SEEDED, False))
        for c in failing_configs(exc, codes):
            state.add(finding(c, item.nodeid, failure=failure_text(exc), reproduce=again))


def _rerun(item: pytest.Item, state: _State, seeded: bool) -> str:
    """The line that runs the test again on the examples it ran: its id, the seed they came from (the
    plugin's, or --hypothesis-seed's where that was given: a line with the plugin's alone passed
    where the test failed), or for a derandomised test (Hypothesis' 'ci' profile, loaded where CI is
    set) the Hypothesis profile that made it so (the plugin's seed, unused there, drew other examples
    on a machine without CI: a trial), and the profile; where nothing seeded a Hypothesis test, it
    says so (Hypothesis drew at random: the line may pass); where the example database is on, that a
    failure it replayed needs it (a fresh checkout's run of the line passed: a trial)."""
    from hypothesis import settings

    line = f"pytest {shlex.quote(_from_here(item))}"
    given = _hypothesis_seed_option(item.config)
    test = getattr(item, "obj", None)
    hypothesis = getattr(test, "is_hypothesis_test", False)
    derandomized = hypothesis and given is None and _derandomized(getattr(test, "__func__", test))
    if given is not None:
        line += f" --hypothesis-seed={given}"
    elif derandomized:  # never seeded by the plugin: its examples come from the test and the profile
        line += f" --hypothesis-profile={settings.get_current_profile_name()}"  # CI's, where CI is set
    elif seeded or state.seed_all:
        line += f" {PREFIX}seed={state.seed}"
    line += f" {PREFIX}profile={state.profile}" if state.profile is not None else ""  # its examples
    if hypothesis and given is None and not (seeded or state.seed_all or derandomized):
        return f"{line}  # the test's own assertion; its examples were drawn unseeded: add {PREFIX}seed"
    kept = hypothesis and settings().database is not None  # a failure the database replayed, first
    return f"{line}  # the test's own assertion, on this config" + (DATABASE_NOTE if kept else "")


DATABASE_NOTE = " (or replayed from the example database, .hypothesis/: run it where that is)"


def _from_here(item: pytest.Item) -> str:
    """The test's id as pytest takes it in the directory it was run from (a node id is relative to
    the rootdir, and a reproduction line given relative to it was not found from a subdirectory)."""
    path, sep, rest = item.nodeid.partition("::")
    where = os.path.relpath(item.config.rootpath / path, item.config.invocation_params.dir)
    return where + sep + rest


def pytest_sessionfinish(session: pytest.Session) -> None:
    """xdist worker: hand the findings to the controller as JSON (pytest_testnodedown collects them)."""
    workeroutput: dict[str, Any] | None = getattr(session.config, "workeroutput", None)
    state = session.config.stash.get(_STATE, None)
    if workeroutput is not None and state is not None:
        workeroutput[WORKER_KEY] = json.dumps([f.to_dict() for f in state.findings])


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """xdist controller: collect the findings a worker sent (a crashed worker sends none)."""
    data = getattr(node, "workeroutput", {}).get(WORKER_KEY)
    state = node.config.stash.get(_STATE, None)
    if data and state is not None:
        for item in json.loads(data):
            state.add(Finding.from_dict(item))


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """The table of the session's counterexamples (nothing when there are none)."""
    state = config.stash.get(_STATE, None)
    if state is None or not state.findings or hasattr(config, "workerinput"):
        return
    n = len(state.findings)
    terminalreporter.section(f"stabilitycheck: {n} counterexample{'s' * (n != 1)}, smallest first")
    for line in summary(state.findings).splitlines():
        terminalreporter.line(line)


# --------------------------------------------------------------------------------------------------
# Fixtures


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Under --stability-device all, every test using stability_device runs once per device."""
    if "stability_device" in metafunc.fixturenames and metafunc.config.getoption(f"{PREFIX}device") == "all":
        metafunc.parametrize("stability_device", ["cpu", "cuda"], indirect=True, scope="session")


# Session-scoped, so a Hypothesis test can use them: @given refuses function-scoped fixtures (they
# are not reset between its examples), and neither holds per-test state.
@pytest.fixture(scope="session")
def stability_device(request: pytest.FixtureRequest) -> str:
    """The device to test on ("cpu" or "cuda"); a cuda test skips where CUDA is not available."""
    device: str = getattr(request, "param", None) or request.config.getoption(f"{PREFIX}device")
    if device == "all":
        device = "cpu"
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            pytest.skip(f"{PREFIX}device cuda: {NO_CUDA}")
    return device


@pytest.fixture(scope="session")
def stability_record(request: pytest.FixtureRequest) -> Recorder:
    """record(found): add a SearchResult's counterexample, a Counterexample or a failing Config to the
    session summary (returns whether it was added)."""
    return Recorder(_state(request.config))
