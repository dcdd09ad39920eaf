"""The property suites' settings: the Hypothesis profile from HYPOTHESIS_PROFILE (default "quick") unless
--stability-profile chose one, longest tests first, and the GC spared re-walking what collection made.
(The stabilitycheck plugin sets each xdist worker's torch threads.)"""

from __future__ import annotations

import gc
import math

import pytest

from stabilitycheck.strategies import load_profile


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--stability-profile", None) is None:  # None also under -p no:stabilitycheck
        load_profile()


DURATIONS = "stabilitycheck/durations"
"""Cache key of the seconds each test took in the last run (pytest's cache, .pytest_cache)."""

_durations: dict[str, float] = {}
"""This run's call durations by test id, written to the cache at the end of the session."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Longest first, so pytest-xdist hands the long tests out before the short ones and the workers
    finish together: by the durations of the last run where known, and unknown tests marked slow first."""
    cache = getattr(config, "cache", None)  # None under -p no:cacheprovider
    last: dict[str, float] = cache.get(DURATIONS, {}) if cache else {}

    def expected(item: pytest.Item) -> float:
        return last.get(item.nodeid, math.inf if item.get_closest_marker("slow") else 0.0)

    items.sort(key=expected, reverse=True)


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
