"""The random state a probe saves and restores (rng): torch's CPU generator, Python's and numpy's."""

from __future__ import annotations

import pytest
import torch


def test_rng_state_restores_torchs_cpu_generator() -> None:
    from stabilitycheck.rng import rng_state, set_rng_state

    state = rng_state()
    a = torch.rand(5)
    set_rng_state(state)
    assert torch.equal(torch.rand(5), a)


def test_host_rng_state_restores_python_and_numpy() -> None:
    np = pytest.importorskip("numpy")  # torch runs without it
    import random

    from stabilitycheck.rng import host_rng_state, set_host_rng_state

    state = host_rng_state()
    a = (random.random(), float(np.random.rand()))
    set_host_rng_state(state)
    assert (random.random(), float(np.random.rand())) == a
