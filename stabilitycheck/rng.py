"""The random generators' state, recorded and restored: a probe's re-run of a step and a replay draw
what the step drew (dropout masks, a loss's mask)."""

from __future__ import annotations

import random
import sys
from typing import Any

import torch


def rng_state() -> dict[str, Any]:
    """The CPU's and, where CUDA is in use, every GPU's random state (`set_rng_state` restores it)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
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


def set_host_rng_state(state: tuple[object, object]) -> None:
    """Restore the states `host_rng_state` recorded."""
    python, numpy_state = state
    random.setstate(python)  # type: ignore[arg-type]
    numpy = sys.modules.get("numpy")
    if numpy is not None and numpy_state is not None:
        numpy.random.set_state(numpy_state)
