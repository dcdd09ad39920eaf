"""Which block owns each trainable parameter, cached per model, and per-parameter numbers combined per
block: what the probe and the watcher read weight gradients by."""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class _Layout:
    """The trainable parameters, the blocks and which block owns each parameter (-1: none)."""

    params: tuple[nn.Parameter, ...]
    blocks: tuple[weakref.ref[nn.Module], ...]  # weak: a block may be the model itself, the cache's key
    owner: tuple[int, ...]


_LAYOUTS: weakref.WeakKeyDictionary[nn.Module, _Layout] = weakref.WeakKeyDictionary()
"""Per model, its last _Layout: the owner map is rebuilt only when the parameters or blocks change."""


def block_of(
    params: Sequence[nn.Parameter], blocks: Sequence[tuple[str, nn.Module]], ran: frozenset[int] | None = None
) -> list[int]:
    """For each parameter, the index of the first block owning it, or -1; with `ran`, the first of
    those blocks that ran, where one did: a weight shared by blocks of which the first never runs
    (Zamba2's shared adapters, each list held by every hybrid layer, one adapter called by each) is
    the block's that used it (its gradient was put on a block that never ran, the one that ran read 0)."""
    owner: dict[int, int] = {}
    order = list(range(len(blocks)))
    if ran is not None:
        order = [*(b for b in order if b in ran), *(b for b in order if b not in ran)]
    for b in order:
        for p in blocks[b][1].parameters():
            owner.setdefault(id(p), b)
    return [owner.get(id(p), -1) for p in params]


def _same(a: Sequence[Any], b: Sequence[Any]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


def trainable(modules: Sequence[nn.Module]) -> tuple[nn.Parameter, ...]:
    """The trainable parameters of the modules `model.modules()` gave, each once, in the order of
    `model.parameters()`: one walk of the model serves the probe's every use of it (a walk builds
    every submodule's dotted name; three of them cost ~0.1 ms a probe of a 16-block MLP)."""
    seen: set[int] = set()
    out = []
    for module in modules:
        for p in module._parameters.values():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                if p.requires_grad:
                    out.append(p)
    return tuple(out)


def layout_of(
    model: nn.Module, blocks: Sequence[tuple[str, nn.Module]], params: tuple[nn.Parameter, ...]
) -> _Layout:
    """The model's _Layout for its trainable `params` (`trainable`), from the cache while they and the
    blocks are the same objects (checked on every call: a frozen, added or replaced parameter makes a
    new one). The cache holds nothing that holds the model: a leaf model is its own block, a flat
    Sequential's Layer blocks hold it, and either kept the model alive for good."""
    modules = tuple(module for _, module in blocks)
    cached = _LAYOUTS.get(model)
    if cached is not None and _same(cached.params, params) and _same([r() for r in cached.blocks], modules):
        return cached
    layout = _Layout(params, tuple(weakref.ref(m) for m in modules), tuple(block_of(params, blocks)))
    _LAYOUTS[model] = layout
    return layout


def combined(norms: Sequence[float]) -> float:
    """The L2 norm of tensors of these L2 norms: math.hypot, finite for any finite norms (a sum of
    their squares leaves float64's range above 1.3e154), NaN where one is (hypot reads inf and NaN
    as inf; torch's total norm, as NaN)."""
    return math.nan if any(map(math.isnan, norms)) else math.hypot(*norms)


def per_block(norms: Sequence[float], owner: Sequence[int], n_blocks: int) -> tuple[float, ...]:
    """Combine per-parameter L2 norms into per-block L2 norms (`combined`)."""
    parts: list[list[float]] = [[] for _ in range(n_blocks)]
    for value, b in zip(norms, owner, strict=True):
        if b >= 0:
            parts[b].append(value)
    return tuple(combined(p) for p in parts)


def scatter(values: Sequence[float], where: Sequence[int], n: int) -> list[float]:
    """`values` put at the indices `where` of n zeros (0.0: a tensor no gradient reached)."""
    out = [0.0] * n
    for i, v in zip(where, values, strict=True):
        out[i] = v
    return out
