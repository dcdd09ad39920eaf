"""The random generators' state, recorded and restored: a probe's re-run of a step and a replay draw
what the step drew (dropout masks, a loss's mask)."""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

SALT_MIX = 0x9E3779B97F4A7C15  # odd; its low 32 bits are no small multiple of seeds.SEED_MIX (below)
SALT_BATCH, SALT_LOSS, SALT_INFER, SALT_FORWARD = 1, 2, 3, 4  # a subject's inputs, its loss's draws,
# a model file's token ids, a probe's forward (dropout masks, noise)


def derived(seed: int, salt: int) -> int:
    """A seed for one purpose, its low 32 bits (all torch's CPU generator keeps) distinct from `seed`'s
    and from those of every seed of its verdict (seeds.seed_of: salt x SALT_MIX is over 3e8 steps of
    SEED_MIX away mod 2^32 for salts 1-8). A model built right after manual_seed(seed) drew its weights
    from `seed`: a forward reseeded with it drew the same numbers, its noise a copy of the weights (a
    weight-noise tanh stack at depth 30 read growth 59-99 over 9 seeds, independent noise 2.4-4.3)."""
    return (seed + salt * SALT_MIX) % 2**63


def seed_all(seed: int) -> None:
    """Seed torch's generator and Python's and (where loaded) numpy's global ones, numpy's with the low
    32 bits it takes: a model drawing with `random` or `np.random` (a LayerDrop, input noise) draws the
    same for the same seed in every run, whatever state the caller left them in."""
    torch.manual_seed(seed)
    random.seed(seed)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(seed % 2**32)


def rng_state() -> dict[str, Any]:
    """The CPU's and, where CUDA is in use, every GPU's random state (`set_rng_state` restores it)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None  # type: ignore[no-untyped-call]
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state: dict[str, Any] | None) -> None:
    """Restore a state `rng_state` recorded (the GPUs' where recorded and present; None: nothing)."""
    if state is not None and state.get("cpu") is not None:
        torch.set_rng_state(state["cpu"])
    if state is not None and state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def host_rng_state() -> tuple[object, object]:
    """Python's and (where loaded) numpy's global random states: a model's forward may draw from them
    (`set_host_rng_state` restores them)."""
    numpy = sys.modules.get("numpy")
    return random.getstate(), None if numpy is None else numpy.random.get_state()


@contextmanager
def host_rng_kept() -> Iterator[None]:
    """Python's and numpy's global random states put back as they were on leaving, whatever ran inside
    (torch's: torch.random.fork_rng)."""
    state = host_rng_state()
    try:
        yield
    finally:
        set_host_rng_state(state)


@contextmanager
def numpy_seeded(seed: int) -> Iterator[None]:
    """numpy's global generator (where loaded) seeded with `seed`'s low 32 bits inside, the caller's
    host states given back on leaving (`host_rng_kept`; ~0.1 ms: numpy's state is 2.5 KB)."""
    with host_rng_kept():
        numpy = sys.modules.get("numpy")
        if numpy is not None:
            numpy.random.seed(seed % 2**32)
        yield


def set_host_rng_state(state: tuple[object, object]) -> None:
    """Restore the states `host_rng_state` recorded."""
    python, numpy_state = state
    random.setstate(python)  # type: ignore[arg-type]
    numpy = sys.modules.get("numpy")
    if numpy is not None and numpy_state is not None:
        numpy.random.set_state(numpy_state)
