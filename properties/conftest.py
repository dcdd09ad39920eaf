"""The property suites' settings: the Hypothesis profile from HYPOTHESIS_PROFILE (default "quick") unless
--stability-profile chose one. (The stabilitycheck plugin sets each xdist worker's torch threads.)"""

from __future__ import annotations

import math

import pytest

from stabilitycheck.strategies import load_profile


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--stability-profile", None) is None:  # None also under -p no:stabilitycheck
        load_profile()


DURATIONS = "stabilitycheck/durations"
"""Cache key of the seconds each test's call took in the last run (pytest's cache, .pytest_cache)."""

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
    if report.when == "call":
        _durations[report.nodeid] = report.duration


def pytest_sessionfinish(session: pytest.Session) -> None:
    cache = getattr(session.config, "cache", None)
    if cache and _durations and not hasattr(session.config, "workerinput"):  # xdist's controller or -n 0
        cache.set(DURATIONS, {**cache.get(DURATIONS, {}), **_durations})
