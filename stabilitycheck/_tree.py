"""Nested model inputs: a tensor, or tuples/lists/dicts of them, with None and scalars beside
(e.g. `(tokens, (h0, c0))` of a word-level LSTM language model)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

LEAVES = (int, float, bool, str, type(None))


def tree_map(fn: Callable[[torch.Tensor], Any], tree: Any) -> Any:
    """`tree` with every tensor replaced by fn(tensor); a Mapping becomes a plain dict."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, Mapping):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, tuple | list):
        mapped = [tree_map(fn, v) for v in tree]
        return type(tree)(*mapped) if hasattr(tree, "_fields") else type(tree)(mapped)  # a namedtuple
    return tree


def tensors(tree: Any) -> list[torch.Tensor]:
    """Every tensor of `tree`, depth first in order. Read, never rebuilt: a namedtuple whose class
    checks its fields (a PackedSequence, an LSTM's usual input) raised when made again of Nones."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    items = tree.values() if isinstance(tree, Mapping) else tree if isinstance(tree, tuple | list) else ()
    return [t for item in items for t in tensors(item)]


def invalid_leaf(tree: Any) -> object | None:
    """The first value that is neither a tensor, a container nor a plain scalar/None; else None."""
    if isinstance(tree, (torch.Tensor, *LEAVES)):
        return None
    if isinstance(tree, Mapping):
        if not all(isinstance(k, str) for k in tree):
            mapping: object = tree
            return mapping
        values: Any = tree.values()
    elif isinstance(tree, tuple | list):
        values = tree
    else:
        found: object = tree
        return found
    for value in values:
        bad = invalid_leaf(value)
        if bad is not None:
            return bad
    return None
