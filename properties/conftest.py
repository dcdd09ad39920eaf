"""The property suites' settings: the Hypothesis profile from HYPOTHESIS_PROFILE (default "quick") unless
--stability-profile chose one. (The stabilitycheck plugin sets each xdist worker's torch threads.)"""

from __future__ import annotations

import pytest

from stabilitycheck.strategies import load_profile


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--stability-profile", None) is None:  # None also under -p no:stabilitycheck
        load_profile()
