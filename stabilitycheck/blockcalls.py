"""What a block's call takes and returns, read from its arguments and output, for the probe's
recorder: the tensor of an output its chain runs on, where the chain enters a call, whether a call
takes the last output as it came, detached, or a function of it."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from stabilitycheck._tree import tensors
from stabilitycheck.junctions import comes_from


def first_tensor(value: Any, scalars: bool = True) -> torch.Tensor | None:
    """The first floating-point tensor of `value`, in order, inside tuples, lists and dicts; within
    them a 0-d one only with `scalars`. As a block's output (scalars False): LSTMCell's (h, c), a
    layer's (h, attention), {"aux_loss": l, "hidden": h}, (None, h) are read on h (element 0 alone
    missed the dict and (None, h): their blocks read 0); an integer output is none (no gradient); an
    MoE layer returning (router_logits, h) is read on its logits: declare a block that returns h. (The
    probe's recorder reads a block called again on the tensors its next call takes: Recorder._repick
    and carrying.Carrying.found.)"""
    if isinstance(value, torch.Tensor):
        return value if value.is_floating_point() else None
    items = value.values() if isinstance(value, Mapping) else value if isinstance(value, tuple | list) else ()
    for item in items:
        if scalars or not isinstance(item, torch.Tensor) or item.dim() > 0:
            found = first_tensor(item, scalars)
            if found is not None:
                return found
    return None


def floating(value: Any) -> list[torch.Tensor]:
    """Every floating-point tensor of a block's output with a dimension, in `first_tensor`'s order
    (the first is what it returns with scalars False)."""
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() and value.dim() > 0 else []
    items = value.values() if isinstance(value, Mapping) else value if isinstance(value, tuple | list) else ()
    return [t for item in items for t in floating(item)]


def passes_on(args: tuple[Any, ...], kwargs: dict[str, Any], prev: torch.Tensor) -> bool:
    """Whether a call takes `prev` itself, as an argument or in a tuple or list among them (a cell's
    (x, h) or (x, (h, c))): it goes on with prev's chain, no junction to look for (the look cost
    ~17 us a token, x1.4 an RNN's probe at 256 tokens)."""
    for given in (args, kwargs.values()) if kwargs else (args,):  # loops: generators cost ~1 us a call
        for a in given:
            if a is prev:
                return True
            if isinstance(a, tuple | list):
                for t in a:
                    if t is prev:
                        return True
    return False


def cut(args: tuple[Any, ...], kwargs: dict[str, Any], prev: torch.Tensor) -> bool:
    """Whether a cell's call takes its last output `prev` detached (`h = h.detach()` every K tokens:
    truncated backpropagation through time) and not as it came: no gradient crosses from this call
    to that one, and a gain across the cut is no Jacobian's (a loss on the last token read the
    window before it as growth 0, a dead layer). Arguments and one level of tuples in them: (x, h)
    and (x, (h, c)); a few checks a call, the cheapest that tell a detached alias."""
    if not prev.requires_grad or prev.layout != torch.strided:  # a sparse tensor has no data_ptr
        return False
    found = False
    for a in (*args, *kwargs.values()):
        for t in a if isinstance(a, tuple | list) else (a,):
            if t is prev:
                return False
            found = found or (
                isinstance(t, torch.Tensor)
                and not t.requires_grad
                and t.layout == torch.strided
                and t.data_ptr() == prev.data_ptr()
                and t.shape == prev.shape
            )
    return found


def kept(out: torch.Tensor) -> torch.Tensor:
    """A copy of a block's output `out` that the model never sees, written back into `out` in place, so
    that everything the model computes from `out` afterwards (from `out` itself, its views, its base,
    another reference to it) is computed from the copy: dL/d(copy) is dL/d(output as returned), and the
    model's own in-place changes go into `out`, aliases and all, as without the probe. `out` itself
    where it cannot be written (a view of a leaf that requires grad, one of several views returned
    by one function: an in-place change by the model would have raised too)."""
    kept = out.clone()
    try:
        out.copy_(kept)
    except RuntimeError:
        return out
    return kept


def entry(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str | None, Any]:
    """Where a block's chain enters its call (a keyword, None for the first positional argument) and
    what is there: its first positional argument, or called by keyword alone, `hidden_states` (HF's
    name) or else its one tensor argument; (None, None) where that is not one tensor."""
    if args:
        return None, args[0]
    if "hidden_states" in kwargs:
        return "hidden_states", kwargs["hidden_states"]
    given = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    return (given[0], kwargs[given[0]]) if len(given) == 1 else (None, None)


def chain_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str | None, torch.Tensor] | None:
    """The `entry` of a block's call and its tensor, if floating and no other positional tensor has its
    shape. A recurrent cell's call (u_t, h) or (x_t, (h, c)) has two such tensors: which one is the
    chain is not knowable from the call, so none is taken. The entry passed again as itself (an
    attention layer called as layer(h, h, h), Hugging Face's Funnel) is that one input, not another."""
    key, x = entry(args, kwargs)
    if isinstance(x, nn.utils.rnn.PackedSequence):  # an nn.RNN's packed input: its data is the entry
        x = x.data
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return None
    # x itself again is allowed where `entering` puts its copy, a positional argument; inside a
    # container (layer(h, (h, h))) it would read its original's gradient, as another input would
    nested = [t for a in args[1:] if not isinstance(a, torch.Tensor) for t in tensors(a)]
    if any(t.shape == x.shape and t is not x for t in args[1:] if isinstance(t, torch.Tensor)) or any(
        t.shape == x.shape for t in nested
    ):
        return None
    return key, x


def same_data(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same values in the same memory: `a` is `b`, or a view made again the same way (a checkpointed
    function reshaping its input makes a new tensor object on its recomputation)."""
    return a is b or (
        a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
    )


def as_returned(x: Any, out: torch.Tensor) -> bool:
    """Whether `x`, computed from the last block output `out` (junctions.comes_from), holds its values
    as they are: `out` itself or a view of all its data (a reshape between blocks has gain 1)."""
    return x is out or (
        isinstance(x, torch.Tensor)
        and x.layout == out.layout == torch.strided
        and x.data_ptr() == out.data_ptr()
        and x.numel() == out.numel()
    )


def severs(x: Any, out: torch.Tensor) -> bool:
    """Whether `x`, what a block takes as its chain's input, is the last block's output `out` or a view
    of its data, and carries no gradient while autograd records: a `detach()`, `.data` or a block run
    under torch.no_grad() cuts the chain there, and no gradient reaches the blocks before it through
    it (a 12-block stack cut at block 5 read growth 0.705 from its other half, with no word of it)."""
    return (
        isinstance(x, torch.Tensor)
        and torch.is_grad_enabled()
        and x.is_floating_point()
        and not x.requires_grad
        and same_data(x, out)
    )


def taken_norm(args: tuple[Any, ...], kwargs: dict[str, Any], returned: set[int]) -> torch.Tensor | None:
    """The call's chain input (`entry`; else its first positional floating tensor), its norm NaN where
    another floating tensor it takes, by keyword or in a container, holds a NaN that no block call
    returned (`returned`: their ids, this pass): a NaN the model's own code put into a cell's h beside
    its x_t is found outside the blocks (it named the healthy cell[6]). Inf there is no finding (a
    causal mask holds -inf), nor a tensor a block returned beside its chain (an LSTMCell's c: its NaN
    is that block's, read where it shows as before). None where the call takes no floating tensor.
    Taken on exact re-runs only, which are rare."""
    x = entry(args, kwargs)[1]
    if not (isinstance(x, torch.Tensor) and x.is_floating_point()):
        x = first_tensor(args)
    if not (isinstance(x, torch.Tensor) and x.is_floating_point()):
        return None
    floats = [t for t in tensors((args, kwargs)) if t.is_floating_point()]
    others = [t.detach() for t in floats if t is not x and id(t) not in returned]
    first: torch.Tensor = torch.linalg.vector_norm(x.detach(), dtype=torch.float64)
    if not others:
        return first
    poisoned = torch.stack([t.isnan().any() for t in others]).any()
    marked: torch.Tensor = torch.where(poisoned, torch.full_like(first, math.nan), first)
    return marked


def stack_of(name: str) -> str:
    """The container a block's name puts it in (`encoder.layers.5`: encoder.layers; `stages.1.0`:
    stages.1; `encoder.enc0`: encoder); a model's own attribute is a stack of its own (two recurrent
    cells `fwd` and `bwd` of a bidirectional reader: a junction between them), its Sequential layers
    (`0`, `1`, ...) one stack."""
    parent, _, last = name.rpartition(".")
    return parent if parent or last.isdigit() else last


def entering(
    args: tuple[Any, ...], kwargs: dict[str, Any], key: str | None, x: torch.Tensor
) -> tuple[torch.Tensor, tuple[tuple[Any, ...], dict[str, Any]]]:
    """A copy of block 0's input `x` that requires grad, and the call's arguments with it in x's place
    (`key`: a keyword, None for the first positional argument) and wherever else the call passes x
    itself (layer(h, h, h): the gradient through all of block 0's uses of its input, queries, keys and
    values; with the copy in the first place alone, the other uses' gradients went uncounted): of an
    `x` that requires grad already (a stem's or an embedding's output), a copy in its graph, so the
    gradient still reaches what made it, while the copy's is the gradient through block 0 alone."""
    entry = x.clone() if x.requires_grad else x.detach().requires_grad_().clone()
    held = (args[0] if args else None) if key is None else kwargs.get(key)
    # a PackedSequence keeps its batch sizes and indices around the copy of its data
    placed = held._replace(data=entry) if isinstance(held, nn.utils.rnn.PackedSequence) else entry
    args = tuple(entry if a is x else a for a in args)
    kwargs = {k: entry if v is x else v for k, v in kwargs.items()}
    if key is None:
        return entry, ((placed, *args[1:]), kwargs)
    return entry, (args, {**kwargs, key: placed})


def elsewhere(args: tuple[Any, ...], kwargs: dict[str, Any], key: str | None, first: torch.Tensor) -> bool:
    """Whether a call of block 0 takes its `first` output (or what is computed from it) in another
    argument than the one its entry came from (`key`: see `entry`), and not in that one: the chain of a
    recurrent cell called as cell(x_t, h), which runs through h."""
    at = (args[0] if args else None) if key is None else kwargs.get(key)
    if comes_from(at, first):
        return False
    others = (
        [*args[1:], *kwargs.values()] if key is None else [*args, *(v for k, v in kwargs.items() if k != key)]
    )
    return any(comes_from(t, first) for t in tensors(others))
