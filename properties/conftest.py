"""The property suites' settings: the Hypothesis profile from HYPOTHESIS_PROFILE (default "quick") unless
--stability-profile chose one, longest tests first, and the GC spared re-walking what collection made.
(The stabilitycheck plugin sets each xdist worker's torch threads.)"""

from __future__ import annotations

import gc
import math
import os
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from stabilitycheck.strategies import load_profile


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--stability-profile", None) is None:  # None also under -p no:stabilitycheck
        load_profile()


@pytest.fixture
def model_file(tmp_path: Path) -> Callable[[str, str], str]:
    """Write a model file (name, source) under tmp_path; its spec `path:build` for Config.of."""

    def write(name: str, body: str) -> str:
        path = tmp_path / f"{name}.py"
        path.write_text(textwrap.dedent(body))
        return f"{path}:build"

    return write


DURATIONS = "stabilitycheck/durations"
"""Cache key of the seconds each test took in the last run (pytest's cache, .pytest_cache)."""

_durations: dict[str, float] = {}
"""This run's durations by test id, written to the cache at the end of the session."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order the tests so the xdist workers finish together. pytest-xdist's worksteal scheduler gives
    worker k the k-th of n contiguous equal shares, then moves queued tests from a busy worker to an
    idle one; so the tests, longest first (by the last run's durations, unknown ones marked slow
    first), are dealt into n shares in snake order (0..n-1, n-1..0, ...) and the shares concatenated:
    each share starts with its longest test and holds the same expected time. With one share (-n 0)
    this is plain longest first. (Sorted only: xdist's load scheduler gave one worker every long test,
    60 s for the full suite where 36 s do; worksteal left the properties' two workers 1.5 s apart, now
    0.2 s.)"""
    cache = getattr(config, "cache", None)  # None under -p no:cacheprovider
    last: dict[str, float] = cache.get(DURATIONS, {}) if cache else {}

    def expected(item: pytest.Item) -> float:
        return last.get(item.nodeid, math.inf if item.get_closest_marker("slow") else 0.0)

    n = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    shares: list[list[pytest.Item]] = [[] for _ in range(n)]
    for k, item in enumerate(sorted(items, key=expected, reverse=True)):
        turn, i = divmod(k, n)
        shares[i if turn % 2 == 0 else n - 1 - i].append(item)
    items[:] = [item for share in shares for item in share]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Setup, call and teardown together: a module fixture's setup is paid by the test that runs it."""
    _durations[report.nodeid] = _durations.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session: pytest.Session) -> None:
    cache = getattr(session.config, "cache", None)
    if cache and _durations and not hasattr(session.config, "workerinput"):  # xdist's controller or -n 0
        cache.set(DURATIONS, {**cache.get(DURATIONS, {}), **_durations})


def pytest_collection_finish(session: pytest.Session) -> None:
    """Freeze what exists once collection is done (torch's and Hypothesis' module objects, the items):
    it lives to the end of the session, so the cyclic GC need not walk it again. A full collection
    drops from ~0.17 s to ~0.05 s, and pytest runs five at teardown in every process (measured on
    this suite: 1.5-2 s less wall time at -n 0 and at -n 2). Objects the tests make are collected as
    usual. The frozen ones are left frozen at exit: the interpreter's last collection skips them and
    the OS takes the memory back; unfreezing there cost each process another 0.5 s (an xdist worker's
    exit is waited for)."""
    gc.freeze()
