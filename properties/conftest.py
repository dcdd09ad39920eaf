"""The property suites' settings: the Hypothesis profile from HYPOTHESIS_PROFILE (default "quick"),
and one torch thread per xdist worker (two workers on two cores were 6x slower oversubscribed)."""

from __future__ import annotations

import os

from stabilitycheck.strategies import load_profile

load_profile()

if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(1)
