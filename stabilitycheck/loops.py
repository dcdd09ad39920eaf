"""Modules a model's forward calls again on their own output: a recurrent cell of the user's own (the
char-RNN tutorial's `rnn(x_t, h)`), a weight-tied block looped over depth. Only a forward shows them,
so find_blocks, which reads the module tree alone, falls back to the leaf modules, whose calls then
interleave (i2h[0], i2o[0], i2h[1], ...: gains read across unrelated tensors)."""

from __future__ import annotations

from copy import deepcopy
from typing import Any

import torch
from torch import nn

from stabilitycheck._tree import tensors
from stabilitycheck.junctions import _feeds
from stabilitycheck.losses import Inputs
from stabilitycheck.recording import _floating, call_model
from stabilitycheck.rng import host_rng_state, set_host_rng_state
from stabilitycheck.subject import LEAVES_NOTE, Blocks

LOOPED_NOTE = "blocks: {names} (called again on their own output: a block per call)"


def looped_blocks(model: nn.Module, inputs: Inputs, blocks: Blocks, note: str) -> tuple[Blocks, str]:
    """`blocks` and `note` as find_blocks chose them, or, where that was its last resort (the leaf
    modules), the outermost modules owning parameters that the forward calls two or more times, each
    call after the first taking what the one before returned or what is computed from it. Seen in one
    forward of a deep copy of the model and its inputs, in the model's own mode (a forward branching
    on self.training runs its probed path), so that nothing of the model changes (buffers, Python
    attributes, a hidden state it keeps), with the random states of torch, Python and numpy put back.
    A model that cannot be copied, or whose copy's forward fails, keeps find_blocks' choice."""
    if not note.startswith(LEAVES_NOTE) or type(model).__name__ == "OptimizedModule":
        return blocks, note  # a compiled model's forward would compile again around the hooks
    states = host_rng_state()
    devices = [p.device for p in model.parameters() if p.device.type == "cuda"][:1]
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            copy, given = deepcopy((model, inputs))  # inputs too: a forward may change them in place
            found = _looped(copy, given)
    except Exception:  # the probe's own forward will say what is wrong, in its own words
        return blocks, note
    finally:
        set_host_rng_state(states)
    if not found:
        return blocks, note
    return tuple((name, model.get_submodule(name)) for name in found), LOOPED_NOTE.format(
        names=" + ".join(found)
    )


def _looped(model: nn.Module, inputs: Inputs) -> list[str]:
    """The names of the outermost modules owning parameters that a forward of `model` (run here)
    calls two or more times, each later call taking what the one before returned (`_feeds`)."""
    named = [
        (name, m) for name, m in model.named_modules() if name and not isinstance(m, torch.jit.ScriptModule)
    ]
    calls: dict[int, int] = {}
    fed: dict[int, bool] = {}
    last: dict[int, list[torch.Tensor]] = {}

    def before(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        key = id(module)
        if key in last:
            given = tensors((args, kwargs))
            fed[key] = fed.get(key, True) and any(_feeds(t, out) for out in last[key] for t in given)

    def after(module: nn.Module, args: Any, output: Any) -> None:
        calls[id(module)] = calls.get(id(module), 0) + 1
        last[id(module)] = _floating(output)

    for _, m in named:
        m.register_forward_pre_hook(before, with_kwargs=True)
        m.register_forward_hook(after)
    call_model(model, inputs)
    looped = [
        name
        for name, m in named
        if calls.get(id(m), 0) >= 2 and fed.get(id(m), False) and any(True for _ in m.parameters())
    ]
    return [name for name in looped if not any(name.startswith(f"{other}.") for other in looped)]
