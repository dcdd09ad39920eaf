"""Modules a model's forward calls again on their own output: a recurrent cell of the user's own (the
char-RNN tutorial's `rnn(x_t, h)`), a weight-tied block looped over depth. Only a forward shows them,
so find_blocks, which reads the module tree alone, falls back to the leaf modules, whose calls then
interleave (i2h[0], i2o[0], i2h[1], ...: gains read across unrelated tensors)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from stabilitycheck._tree import tensors
from stabilitycheck.losses import Inputs
from stabilitycheck.recording import _feeds, _floating, call_model
from stabilitycheck.subject import LEAVES_NOTE, Blocks

LOOPED_NOTE = "blocks: {names} (called again on their own output: a block per call)"


def looped_blocks(model: nn.Module, inputs: Inputs, blocks: Blocks, note: str) -> tuple[Blocks, str]:
    """`blocks` and `note` as find_blocks chose them, or, where that was its last resort (the leaf
    modules), the outermost modules owning parameters that the forward calls two or more times, each
    call after the first taking what the one before returned or what is computed from it. Seen in one
    forward, in eval mode (no running statistics updated, no dropout drawn), with torch's random state
    put back and every module's train/eval mode as it was."""
    if not note.startswith(LEAVES_NOTE) or type(model).__name__ == "OptimizedModule":
        return blocks, note  # a compiled model's forward would compile again around the hooks
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

    modes = [(m, m.training) for m in model.modules()]
    handles = [m.register_forward_pre_hook(before, with_kwargs=True) for _, m in named]
    handles += [m.register_forward_hook(after) for _, m in named]
    devices = [p.device for p in model.parameters() if p.device.type == "cuda"][:1]
    try:
        model.eval()
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            call_model(model, inputs)
    except Exception:  # the probe's own forward will say what is wrong, in its own words
        return blocks, note
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes:
            m.training = training
    looped = [
        (name, m)
        for name, m in named
        if calls.get(id(m), 0) >= 2 and fed.get(id(m), False) and any(True for _ in m.parameters())
    ]
    outer = tuple(
        (name, m) for name, m in looped if not any(name.startswith(f"{other}.") for other, _ in looped)
    )
    if not outer:
        return blocks, note
    return outer, LOOPED_NOTE.format(names=" + ".join(name for name, _ in outer))
