"""Block choices only a forward shows. Modules a model's forward calls again on their own output: a
recurrent cell of the user's own (the char-RNN tutorial's `rnn(x_t, h)`), a weight-tied block looped
over depth; find_blocks, which reads the module tree alone, falls back to the leaf modules, whose
calls then interleave (i2h[0], i2o[0], i2h[1], ...: gains read across unrelated tensors). And stacks
of composite blocks that find_blocks takes together as an encoder's and a decoder's, but whose calls
interleave: a deep-supervision model's per-layer heads beside its layers."""

from __future__ import annotations

from collections.abc import Callable
from copy import deepcopy
from typing import Any, TypeVar

import torch
from torch import nn

from stabilitycheck.blockcalls import floating, stack_of
from stabilitycheck.blocks import DECLARED_NOTE, LEAVES_NOTE, MIXED, Blocks, stacks_in
from stabilitycheck.junctions import taken_outputs
from stabilitycheck.losses import Inputs, call_model
from stabilitycheck.rng import host_rng_kept

T = TypeVar("T")
LOOPED_NOTE = "blocks: {names} (called again on their own output: a block per call)"
APART_NOTE = "blocks: {names} ({n}; {others} run between their calls, off the chain: not taken)"
ORDER_NOTE = "blocks: {parts} (in the order the forward calls them)"
BESIDE_NOTE = "blocks: {parts} ({heads}: side by side, no call taking another's output: not taken)"


def looped_blocks(model: nn.Module, inputs: Inputs, blocks: Blocks, note: str) -> tuple[Blocks, str]:
    """`blocks` and `note` as find_blocks chose them, or where a forward shows otherwise: where that
    was its last resort (the leaf modules), the outermost modules owning parameters that the forward
    calls two or more times, each call after the first taking what the one before returned or what is
    computed from it; where it took several stacks of composite blocks together, the one stack whose
    calls chain, if another's calls fall between them (`_apart`), and the stacks in the order the
    forward first calls them (the chain's `(input)` is block 0's: CLIP declares its text tower first
    and runs its vision tower first, and neither tower's input was read). Seen in one forward of a
    deep copy of the model and its inputs, in the model's own mode (a forward branching on
    self.training runs its probed path), so that nothing of the model changes (buffers, Python
    attributes, a hidden state it keeps), with the random states of torch, Python and numpy put back.
    A model that cannot be copied, or whose copy's forward fails, keeps find_blocks' choice."""
    beside = _chain_beside(model, inputs, blocks, note)
    if beside is not None:
        return looped_blocks(model, inputs, *beside)
    stacks = _stacks_of(blocks) if note != DECLARED_NOTE else []
    # a list of modules of mixed types, the inside of one block a loop may call again on its own
    # output (a weight-tied Sequential(Linear, Tanh) read as its Linear and its Tanh per call)
    mixed = MIXED in note and not stacks
    leaves = note.startswith(LEAVES_NOTE) or mixed
    if not (leaves or len(stacks) > 1) or type(model).__name__ == "OptimizedModule":
        return blocks, note  # a compiled model's forward would compile again around the hooks
    try:
        found = on_a_copy(
            model,
            inputs,
            lambda copy, given: (
                _looped(copy, given) if leaves else _apart(copy, given, [name for name, _ in blocks], stacks)
            ),
        )
    except Exception:  # the probe's own forward will say what is wrong, in its own words
        return blocks, note
    if not found or found == stacks:
        return blocks, note
    if mixed:  # that list's own container looped (or a module holding it): else the list stands
        inside = {stack_of(name) for name, _ in blocks}
        if not any(c == f or c.startswith(f"{f}.") for c in inside for f in found):
            return blocks, note
    if not leaves:
        kept = [b for stack in found for b in blocks if stack_of(b[0]) == stack]
        if len(found) == len(stacks):
            parts = " + ".join(
                f"{s or '(model)'} ({sum(stack_of(n) == s for n, _ in blocks)})" for s in found
            )
            return tuple(kept), ORDER_NOTE.format(parts=parts)
        names = " + ".join(s or "(model)" for s in found)
        others = " + ".join(s or "(model)" for s in stacks if s not in found)
        return tuple(kept), APART_NOTE.format(names=names, n=len(kept), others=others)
    return tuple((name, model.get_submodule(name)) for name in found), LOOPED_NOTE.format(
        names=" + ".join(found)
    )


def _chain_beside(model: nn.Module, inputs: Inputs, blocks: Blocks, note: str) -> tuple[Blocks, str] | None:
    """Where find_blocks took one stack of leaf layers as the longest (`blocks`) over stacks of
    composite blocks, and a forward (on a copy: `on_a_copy`) shows that none of the leaf stack's calls
    takes what its call before returned (task heads side by side on a trunk's features, one task's
    head alone, a head per layer) while the calls of one or more composite stacks chain (each after
    the first takes what the one before returned, or what is computed from it): those composite
    stacks, with a note.
    16 Linear heads on a trunk of 12 Sequential(Linear, Tanh) blocks were the chain, each head a
    chain of one, growth 1 whatever the trunk did (~20-300 at sigma_w 4). A leaf stack that chains
    (a trunk of Linear layers beside small composite probe heads: `_outweighs`) stays. None where
    the choice stands, or the copy's forward fails."""
    if note == DECLARED_NOTE or not note.startswith("blocks: ") or type(model).__name__ == "OptimizedModule":
        return None
    if len(blocks) < 2 or any(any(True for _ in m.children()) for _, m in blocks):
        return None
    stacks = stacks_in(model)
    names = [n for n, _ in blocks]
    composite = [(name, pairs) for name, pairs in stacks if any(True for _ in pairs[0][1].children())]
    if not any([n for n, _ in pairs] == names for _, pairs in stacks) or not composite:
        return None
    groups = [("", tuple(blocks)), *composite]
    try:
        seen = on_a_copy(model, inputs, lambda copy, given: _chaining(copy, given, groups))
    except Exception:  # the probe's own forward will say what is wrong, in its own words
        return None
    calls, chained, taken, first = seen
    if calls[0] < 1 or taken[0]:  # the leaf stack: called, no call on another's output (one alone: a
        # task's head of 16, growth 1 where the trunk's was 33.8: a review)
        return None
    order = sorted((k for k in range(1, len(groups)) if calls[k] >= 2 and chained[k]), key=first.__getitem__)
    if not order:
        return None
    kept = tuple(b for k in order for b in groups[k][1])
    parts = " + ".join(f"{groups[k][0] or '(model)'} ({len(groups[k][1])})" for k in order)
    heads = note.removeprefix("blocks: ").split(" (")[0]
    return kept, BESIDE_NOTE.format(parts=parts, heads=heads)


def _chaining(
    model: nn.Module, inputs: Inputs, groups: list[tuple[str, Blocks]]
) -> tuple[list[int], list[bool], list[bool], list[int]]:
    """Per group of blocks (names in `model`, run here), in one forward: how many calls, whether two
    thirds or more of the calls after the first take what the group's call before returned or what is
    computed from it (`_chains`: a trunk run twice, a Siamese pair, starts its second pass on
    another input, and read as no chain its leaf heads were taken, growth 1 for 37.4: a review),
    whether any does, and when the group was first called."""
    order, fed = _calls(model, inputs, {name: k for k, (_, pairs) in enumerate(groups) for name, _ in pairs})
    ks = range(len(groups))
    first = [order.index(k) if k in order else 1 << 30 for k in ks]
    return (
        [order.count(k) for k in ks],
        [_chains(fed.get(k, [])) for k in ks],
        [any(fed.get(k, [])) for k in ks],
        first,
    )


def _calls(model: nn.Module, inputs: Inputs, keys: dict[str, Any]) -> tuple[list[Any], dict[Any, list[bool]]]:
    """One forward of `model` (run here), each module named in `keys` hooked: the keys of the calls in
    the order they return, and per key, for each call after its first, whether it took what the key's
    call before returned or what is computed from it (`taken_outputs`)."""
    order: list[Any] = []
    fed: dict[Any, list[bool]] = {}
    last: dict[Any, list[torch.Tensor]] = {}

    def hooks(key: Any) -> tuple[Any, Any]:
        def before(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if key in last:
                fed.setdefault(key, []).append(bool(taken_outputs(last[key], (args, kwargs))))

        def after(module: nn.Module, args: Any, output: Any) -> None:
            order.append(key)
            last[key] = floating(output)

        return before, after

    for name, key in keys.items():
        module = model.get_submodule(name)
        before, after = hooks(key)
        module.register_forward_pre_hook(before, with_kwargs=True)
        module.register_forward_hook(after)
    call_model(model, inputs)
    return order, fed


def _chains(fed: list[bool]) -> bool:
    """Whether calls go on from the one before in two thirds or more of them (`_calls`' flags): a
    cell that truncated backpropagation detaches every K >= 3 tokens does, a module called on x_t and
    on h_t by turns does not (see `_looped`)."""
    return 2 * fed.count(False) <= fed.count(True)


def on_a_copy(model: nn.Module, inputs: Inputs, see: Callable[[nn.Module, Inputs], T]) -> T:
    """`see(copy, given)` on a deep copy of the model and its inputs (a forward may change them in
    place), with gradients on and torch's, Python's and numpy's random states put back: a forward there
    changes nothing of the model (buffers, Python attributes, a hidden state it keeps) nor what the
    caller draws next."""
    devices = [p.device for p in model.parameters() if p.device.type == "cuda"][:1]
    with torch.random.fork_rng(devices=devices), host_rng_kept(), torch.enable_grad():
        copy, given = deepcopy((model, inputs))
        return see(copy, given)


def _stacks_of(blocks: Blocks) -> list[str]:
    """The stacks (`stack_of`) of `blocks` in order, where every block is composite (a module with
    children: find_blocks takes several stacks together only of those, an encoder's and a decoder's);
    else none (recurrent cells side by side, leaf layers)."""
    if not all(any(True for _ in m.children()) for _, m in blocks):
        return []
    return list(dict.fromkeys(stack_of(name) for name, _ in blocks))


def _apart(model: nn.Module, inputs: Inputs, names: list[str], stacks: list[str]) -> list[str]:
    """The stacks to take, in the order a forward of `model` (run here) first calls them: where it
    calls a block (`names`) of one of `stacks` between two calls of another, and some of them chain
    (every call after the first takes what its stack's call before returned or what is computed from
    it) and some do not, those that do (a deep-supervision model's heads, one after each layer, none
    taking the head before it: taken with the layers, every layer after the first read its gain
    across the head before it, growth 1.24 for 1.55); else all (the calls of each stack follow each
    other, an encoder's, then a decoder's; or every stack chains, a decoder layer after each encoder
    layer; or none does). A stack never called comes last."""
    order, fed = _calls(model, inputs, {name: stack_of(name) for name in names})
    chained = {stack: all(fed.get(stack, [])) for stack in stacks}
    runs = [stack for i, stack in enumerate(order) if i == 0 or order[i - 1] != stack]
    first = {stack: i for i, stack in reversed(list(enumerate(order)))}
    called = sorted(stacks, key=lambda stack: first.get(stack, len(order)))
    kept = [stack for stack in called if chained[stack]]
    return kept if len(runs) > len(set(runs)) and 0 < len(kept) < len(stacks) else called


def _looped(model: nn.Module, inputs: Inputs) -> list[str]:
    """The names of the outermost modules owning parameters that a forward of `model` (run here)
    calls two or more times, two thirds or more of its later calls taking what the one before
    returned (`taken_outputs`): not every one, as truncated backpropagation through time runs a cell
    on from a detached or fresh state every K tokens, K >= 3 (taken for no loop, the cell's W and U
    read as leaves, each call a chain of its own: growth 1 for g^(K-1)); not fewer (a tower run on
    two inputs; a projection called per token on x_t and on h_t, its calls fed one in two, taken with
    the cell: a review)."""
    named = [
        (name, m) for name, m in model.named_modules() if name and not isinstance(m, torch.jit.ScriptModule)
    ]
    _, fed = _calls(model, inputs, {name: name for name, _ in named})
    looped = [
        name for name, m in named if name in fed and _chains(fed[name]) and any(True for _ in m.parameters())
    ]
    return [name for name in looped if not any(name.startswith(f"{other}.") for other in looped)]
