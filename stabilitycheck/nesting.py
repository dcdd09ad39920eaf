"""Blocks nested in one another: a block that is a submodule of another block and runs inside that
block's call reads as a step of one chain with it, a gain between unrelated tensors (GPT-2's h.0 with
h.0.attn read growth 0.0064 where the stack's is 1.23). The module tree says which blocks may nest;
the call says whether they do (a tied autoencoder's decoder layer holds its encoder layer for its
weight and never runs it)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from torch import nn

from stabilitycheck.blocks import Layer
from stabilitycheck.errors import UsageError


def held(pairs: Sequence[tuple[str, nn.Module]]) -> dict[int, list[int]]:
    """Per block that is a submodule of other blocks, those blocks' indices: a walk of each block's
    children, each module once (a child registered back, `attn.layer = self`, is no loop). A Layer (a
    flat Sequential's layer, found, never declared) holds no other block."""
    index = {id(m): i for i, (_, m) in enumerate(pairs) if not isinstance(m, Layer)}
    holders: dict[int, list[int]] = {}
    for outer, (_, module) in enumerate(pairs):
        if isinstance(module, Layer):
            continue
        seen = {id(module)}
        below = [m for m in module._modules.values() if m is not None]
        while below:
            sub = below.pop()
            if id(sub) in seen:
                continue
            seen.add(id(sub))
            inner = index.get(id(sub))
            if inner is not None:
                holders.setdefault(inner, []).append(outer)
            below.extend(m for m in sub._modules.values() if m is not None)
    return holders


def refusing_inside(pairs: Sequence[tuple[str, nn.Module]], who: str) -> list[Any]:
    """Hooks under which a block called inside the call of a block holding it raises a one-line
    UsageError from `who` naming both; none where no block holds another (the usual case: nothing to
    pay). The caller removes them. A holder's call counts as begun before its other pre-hooks and as
    over even where its forward or a pre-hook raised (a model that catches that and goes on read its
    next pass as inside it, or as never inside it again)."""
    holders = held(pairs)
    if not holders:
        return []
    running: Counter[int] = Counter()

    def enter(outer: int) -> Any:
        return lambda *_: running.update((outer,))

    def leave(outer: int) -> Any:
        def hook(*_: Any) -> None:  # never below 0: a pre-hook of the model's raising before `enter`
            running[outer] = max(running[outer] - 1, 0)

        return hook

    def check(inner: int) -> Any:
        def hook(*_: Any) -> None:
            inside = [outer for outer in holders[inner] if running[outer] > 0]
            if inside:  # named: the innermost, held by the most blocks, whatever the list's order
                outer = max(inside, key=lambda o: len(holders.get(o, ())))
                raise UsageError(
                    f"{who}: block {pairs[inner][0]!r} runs inside block {pairs[outer][0]!r}, which "
                    "holds it: its output and the outer block's would read as two steps of one chain (a "
                    "gain between unrelated tensors); list blocks none of which runs another, e.g. the "
                    "model's repeated layers"
                )

        return hook

    outers = sorted({outer for found in holders.values() for outer in found})
    handles = [pairs[o][1].register_forward_pre_hook(enter(o), prepend=True) for o in outers]
    handles += [pairs[o][1].register_forward_hook(leave(o), always_call=True) for o in outers]
    handles += [pairs[i][1].register_forward_hook(check(i)) for i in holders]
    return handles
