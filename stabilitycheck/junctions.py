"""Which block calls continue a chain of blocks and which start another: what a call takes, traced
back through the autograd graph to the outputs recorded before it (the recorder's junctions, a
merge's chains, the loops' own-output test, a residual add written around block 0)."""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from stabilitycheck._tree import tensors


def comes_from(x: Any, out: torch.Tensor) -> bool:
    """Whether `x` is `out` or is computed from it (a residual sum, a norm, a pooling, a transition
    between loops): a block taking it continues the chain of the block that made `out`; an
    encoder-decoder's decoder taking its own embeddings, or a second tower taking the model's input,
    starts another."""
    return x is out or made_from(x, {out.grad_fn} if out.grad_fn is not None else set())


def taken_outputs(outs: Sequence[torch.Tensor], args: Any) -> list[int]:
    """The places of `outs`, one call's outputs, that a later call's arguments `args` (tuples, lists
    and dicts at any depth) take, as they are or in what is computed from them (`comes_from`): empty
    where that call starts afresh."""
    given = tensors(args)
    return [i for i, out in enumerate(outs) if any(comes_from(t, out) for t in given)]


def made_from(x: Any, targets: set[Any], past: Collection[Any] = ()) -> bool:
    """Whether the autograd graph behind tensor `x` reaches one of the nodes `targets` by a path that
    does not go through one of the nodes `past`. Only nodes created after the earliest target are
    searched (a node's inputs are older than it): the search ends where the targets were made,
    however many nodes lie between (a cap of 32 nodes, parameter leaves counted, read a 6-layer
    transition between two loops over a stack as a junction)."""
    return isinstance(x, torch.Tensor) and _node_made_from(x.grad_fn, targets, past)


ALONE = 64  # autograd nodes `alone_from` looks at between a block's output and the next block's input


def alone_from(x: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether `x` is computed from `out` and parameters alone: every path back from x's node reaches
    out's node or a parameter's leaf without a node made before out's (a node's inputs are older than
    it), within ALONE nodes: tanh(out), x / (1 + |x|) (out twice), an RMSNorm, layer_norm with its
    weight and bias. Then dL/d out is that function's Jacobian applied to dL/dx, nothing else added to
    it (a residual stream, x + out, hands out the gradient of every later use of the sum). Of a copy_
    (a block output the model changes in place, recorded as a copy: blockcalls.kept), the source
    alone: what it overwrote gets no gradient."""
    start, target = x.grad_fn, out.grad_fn
    if start is None or target is None:
        return False
    oldest = target._sequence_nr()
    frontier, seen = [start], {start}
    while frontier:
        node = frontier.pop()
        if node is target:
            continue
        if len(seen) > ALONE or node._sequence_nr() < oldest:
            return False
        edges = node.next_functions[1:] if type(node).__name__ == "CopyBackwards" else node.next_functions
        for child, _ in edges:
            if child is not None and child not in seen and type(child).__name__ != "AccumulateGrad":
                seen.add(child)
                frontier.append(child)
    return True


NEAR = 32  # autograd nodes `near` looks at behind one tensor


def near(x: Any, targets: set[Any]) -> bool:
    """Whether one of `targets` is among the NEAR nodes nearest behind tensor `x` (breadth first): the
    look before `made_from`'s search, over a call's every argument (a cell's `h * keep`, or a clamp of
    it, beside another cell's state, searched first back to the first token, made a probe quadratic in
    the tokens: x12 a bare step at 512)."""
    node = x.grad_fn if isinstance(x, torch.Tensor) else None
    frontier, seen = [node] if node is not None else [], 0
    while frontier and seen < NEAR:
        node, frontier, seen = frontier[0], frontier[1:], seen + 1
        if node in targets:
            return True
        frontier += [child for child, _ in node.next_functions if child is not None]
    return False


def _node_made_from(start: Any, targets: set[Any], past: Collection[Any] = ()) -> bool:
    """`made_from` from the autograd node `start` (None: no graph)."""
    if start is None or not targets or start in past:
        return False
    oldest = min(t._sequence_nr() for t in targets)
    frontier, seen = [start], {start}
    while frontier:
        node = frontier.pop()
        if node in targets:
            return True
        for child, _ in node.next_functions:
            if child is None or child in seen or child in past or child._sequence_nr() < oldest:
                continue
            if child in targets:
                return True
            if child.next_functions:  # not a parameter's leaf
                seen.add(child)
                frontier.append(child)
    return False


Taps = list[tuple[Any, int]]  # (autograd node, input number): where a gradient enters a tensor


def skip_around(
    args: tuple[Any, ...],
    raw: torch.Tensor,
    first: torch.Tensor,
    again: bool,
    beside: Sequence[torch.Tensor] = (),
) -> tuple[Any, Taps, bool] | None:
    """A residual add written around block 0 in the model's forward, seen from the call after block
    0's first (`args`; `again`: block 0 again): the add, alpha 1, of block 0's output `first` and its
    input `raw` (x = x + block(x)), or what `raw` was made from (x = x + block(norm(x))), on the chain
    too. As (add node, taps, instead): taps empty where the add takes `raw` itself and nothing else
    on the way to the call reads it, its dL/d sum added to the copy's gradient; else where the
    gradient enters that x (`_taps`, from `raw` and, for parallel branches reading it too, from x, x + attn(x)
    + mlp(x)), whose sum is dL/dx along the chain, added to the copy's where x is `raw` itself, else
    (`instead`) the copy's through the norm in it; `beside`: the outputs of block 0's parallel
    siblings, whose sum with `first` the add may take (x + (attn + mlp)). Of an input that requires
    grad, that add behind the call's input (`_residual_add`: behind a norm too; the probe's copy of a
    float input requires grad, probestep._in_graph); of a plain input (made in the forward, or in a
    container the probe leaves as it is), whose uses autograd does not record, only the call's input
    itself when it is `raw` + `first` to the last bit and the call is another block's (a cell called
    per token on x_t + h, x_1 equal to x_0 by value, would read as one). None otherwise (x + 0.5 *
    block(x): left unread)."""
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or x is first:
        return None
    if raw.requires_grad:
        return _residual_add(x, raw, first, beside)
    if again or type(x.grad_fn).__name__ != "AddBackward0" or x.shape != first.shape or x.shape != raw.shape:
        return None
    with torch.no_grad():
        return (x.grad_fn, [], False) if x._version == 0 and torch.equal(x, raw + first) else None


def skips(args: tuple[Any, ...], raw: torch.Tensor, first: torch.Tensor) -> bool:
    """Whether the next block call's chain input (`args`) is made from block 0's input `raw`, or from
    what `raw` was made from (`sources`), by a path around block 0's output `first`, where
    `skip_around` found no residual add it reads: x + 0.1 * tanh(block(x)), x + dropout(block(x)),
    cat(x, block(x)), x + 0.1 * block(norm(x)). dL/d raw then holds the skip's gradient, or is the
    branch's alone where the skip starts before a norm, and dL/d first the branch's, a ratio of two
    chains (a LayerScale of 0.1 read block 0's gain 14.5 for about 1, and 200 for 1.03 outside a norm:
    false explosions), so the chain starts at block 0's output. Seen where `raw` is in the graph (a
    stem's or an embedding's output, the probe's copy of a float input); a plain input's uses are not
    recorded."""
    x = args[0] if args else None
    if raw.grad_fn is None or first.grad_fn is None:
        return False
    return made_from(x, sources(raw), {first.grad_fn})


def sources(raw: torch.Tensor) -> set[Any]:
    """`raw`'s autograd node and, among the NEAR nodes nearest behind it, each that every path back
    from it goes through (parameters' leaves apart): the tensor a norm or a dropout took, x of
    norm(x) (a leaf too: the probe's copy of a float input), and those behind it in turn. Past a node
    of two inputs, emb + pos, none: either alone is a side input that later blocks may take again
    (positions re-added at every layer), no path around block 0, whose input gradient is the chain's."""
    start: Any = raw.grad_fn
    window, order = {start}, [start]
    for node in order:  # breadth first, the list growing as it is read
        for child in _inputs(node):
            if child not in window and len(window) < NEAR:
                window.add(child)
                order.append(child)
    return {start, *(d for d in order[1:] if not _escapes(start, d, window))}


def _inputs(node: Any) -> list[Any]:
    """The autograd nodes `node` takes its inputs from, parameters' leaves apart."""
    return [
        child
        for child, _ in node.next_functions
        if child is not None and not isinstance(getattr(child, "variable", None), nn.Parameter)
    ]


LOOKUPS = ("EmbeddingBackward", "EmbeddingBagBackward", "IndexBackward", "IndexSelectBackward")
"""Nodes made from a parameter and data autograd does not see (token ids): data, not a parameter."""


def _parametric(node: Any, depth: int = 0) -> bool:
    """Whether `node` is computed from parameters and data that requires no grad alone, no lookup
    among them (within 8 nodes): Gemma's 1 + weight, nn.Linear's weight.t(), a stem on an int input,
    a latent array's expand. A path back that ends there reaches no other tensor the chain is made
    from (read as one, a norm x_n * (1 + w) had no dominator, and a stem x @ W.t() read other than
    x @ W); an embedding's lookup is data (emb + pos: either summand a side input)."""
    if isinstance(getattr(node, "variable", None), nn.Parameter):
        return True
    if depth >= 8 or not node.next_functions or type(node).__name__.startswith(LOOKUPS):
        return False
    return all(child is None or _parametric(child, depth + 1) for child, _ in node.next_functions)


def _escapes(start: Any, avoid: Any, window: set[Any]) -> bool:
    """Whether a path back from `start` that does not go through `avoid` reaches a node of no inputs
    but parameters' leaves that is data (a leaf, a lookup: not `_parametric`) or leaves `window`."""
    frontier, seen = [start], {start}
    while frontier:
        node = frontier.pop()
        inputs = _inputs(node)
        if not inputs and node is not start and not _parametric(node):
            return True
        for child in inputs:
            if child is avoid or child in seen:
                continue
            if child not in window:
                return True
            seen.add(child)
            frontier.append(child)
    return False


def _residual_add(
    x: Any, raw: torch.Tensor, first: torch.Tensor, beside: Sequence[torch.Tensor] = ()
) -> tuple[Any, Taps, bool] | None:
    """The add, alpha 1, of block 0's output `first` itself and its input `raw` or what `raw` was made
    from (see `skip_around`), on the graph behind `x`, the next block call's chain input: a residual
    written around block 0 in the model's forward, maybe behind a norm (XLM's LayerNorm(x +
    attention(x))). Its input side hands dL/d sum on as it is, the gradient along the chain that
    block 0's copy of its input does not see, and its `first` side the same to block 0's output,
    whose gradient is the gain's denominator (an add of what is computed from the output, x + 0.1 *
    block(x), read the stream's gain / 0.1). `raw` requires grad (a stem's or an embedding's output:
    its gradient edge names it). None where there is none, or the shapes differ (a broadcast add is
    no identity). Parallel branches beside block 0 on the way to `x` (`_taps` from x) add their taps; the
    add may take block 0's output summed with theirs (`beside`) first, an add of two of them."""
    if (
        not isinstance(x, torch.Tensor)
        or x.grad_fn is None
        or first.grad_fn is None
        or raw.shape != first.shape
    ):
        return None
    mine, given = _edge(first), _edge(raw)
    made = {mine, *(_edge(out) for out in beside)}  # the outputs' edges, then those of their sums
    for node in sorted(_adds_behind(x, first.grad_fn), key=lambda node: node._sequence_nr()):
        edges = node.next_functions
        inside = [edge in made for edge in edges]
        if all(inside) and edges[0] != edges[1]:  # attn + mlp, before x is added
            made.add((node, 0))
        if inside.count(True) != 1:
            continue
        other = edges[inside.index(False)]
        own = (node, edges.index(other))
        branches = [tap for tap in _taps(x, other, first.grad_fn) if tap != own]
        if other == given:
            return (node, [own, *branches], False) if branches else (node, [], False)
        taps = _taps(raw, other)
        if taps:
            return node, [own, *taps, *(tap for tap in branches if tap not in taps)], True
    return None


def _adds_behind(x: torch.Tensor, since: Any) -> Iterator[Any]:
    """The adds, alpha 1, on the autograd graph behind `x` among the nodes made after `since`."""
    oldest = since._sequence_nr()
    frontier: list[Any] = [x.grad_fn] if x.grad_fn is not None else []
    seen = set(frontier)
    while frontier:
        node = frontier.pop()
        if type(node).__name__ == "AddBackward0" and getattr(node, "_saved_alpha", None) == 1:
            yield node
        for child, _ in node.next_functions:
            if child is not None and child not in seen and child._sequence_nr() > oldest:
                seen.add(child)
                frontier.append(child)


TAP_NODES = 256  # a norm written by hand is a dozen autograd nodes: a larger graph is taken for no norm


def _taps(start: torch.Tensor, edge: tuple[Any, int], avoid: Any = None) -> Taps:
    """Where the gradient enters the tensor behind `edge` (x) from the graph behind `start`, not through
    the node `avoid`: the (node, input number) pairs whose gradients sum to what that graph hands x.
    From `raw` made from x (a norm: one node, or several for one written by hand, x * rsqrt(mean(x^2))
    * (1 + w)), [] where it is not made from x; from a call's input, avoiding block 0's output, the
    residual add's own tap and those of parallel branches reading x too, whose outputs the stream adds
    (x + attn(ln1(x)) + mlp(ln2(x)): read without mlp's, block 0's input gradient missed a branch,
    growth 3.52 for torch's 4.01). Only nodes made after x are searched, up to TAP_NODES; [] past
    that; x may be a leaf (a Perceiver's latent array), whose node has no age. Whether x is the stream
    the next call shows (`stream_goes_on`: x + c re-added before every layer is conditioning)."""
    source = edge[0]
    if source is None or start.grad_fn is None:
        return []
    oldest = source._sequence_nr() if source.next_functions else -1  # a leaf: no age
    taps: Taps = []
    frontier, seen = [start.grad_fn], {start.grad_fn} if avoid is None else {start.grad_fn, avoid}
    while frontier:
        node = frontier.pop()
        for j, child in enumerate(node.next_functions):
            if child == edge:
                taps.append((node, j))
            elif child[0] is not None and child[0] not in seen and child[0]._sequence_nr() > oldest:
                seen.add(child[0])
                frontier.append(child[0])
        if len(seen) > TAP_NODES:
            return []
    return taps


def summed(x: Any, outs: Sequence[torch.Tensor]) -> bool:
    """Whether the graph behind `x` adds, alpha 1, each of `outs` itself (parallel branches added into
    a stream, x + attn + mlp, or averaged first, x + 0.5 * (attn + mlp)): their gradients are then one,
    that of the sum. Not where they are concatenated (Inception) or weighted apart."""
    nodes = [out.grad_fn for out in outs if out.grad_fn is not None]
    if not isinstance(x, torch.Tensor) or x.grad_fn is None or not outs or len(nodes) < len(outs):
        return False
    since = min(nodes, key=lambda node: node._sequence_nr())
    edges = {edge for node in _adds_behind(x, since) for edge in node.next_functions}
    return all(_edge(out) in edges for out in outs)


def stream_goes_on(args: tuple[Any, ...], add: Any, out: torch.Tensor) -> bool:
    """Whether a call's input (`args`) is made from an add, alpha 1, of `out` (the call before's
    output) and what is made from the sum `add` made, not through `out` (maybe behind a norm): the
    residual stream going on from block 0's sum, s2 = s1 + out1, or norm2(s1) + out1, or 0.5 * s1 +
    out1 (those two read as no stream: 1.68 for 2.09). A tensor re-added before
    every layer, h = layer(h + c), gives out1 + c, c made before the sum."""
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or x.grad_fn is None or out.grad_fn is None:
        return False
    mine = _edge(out)
    return any(
        mine in edges
        and edges != (mine, mine)
        and _node_made_from(edges[1 - edges.index(mine)][0], {add}, {out.grad_fn})
        for edges in (node.next_functions for node in _adds_behind(x, out.grad_fn))
    )


def _edge(t: torch.Tensor) -> tuple[Any, int]:
    """Where `t`'s gradient goes in the autograd graph: (node, input number)."""
    edge = torch.autograd.graph.get_gradient_edge(t)
    return edge.node, edge.output_nr


def taken_chains(
    outputs: Sequence[torch.Tensor], breaks: Sequence[int], given: Sequence[Any], entry: bool
) -> frozenset[int]:
    """The chains so far (each by its first position in `outputs`; `breaks`: where each after the
    first starts) of which the call taking `given` takes an output, or what is computed from one other
    than through a later chain's outputs: a decoder takes its encoder's (through the memory), a head
    its two towers'; a second tower takes none, it runs beside the first, and a head after a decoder
    takes the decoder's alone (the encoder's reach it through the decoder). With `entry`, outputs[0]
    is block 0's input, not an output of chain 0: a second tower taking that input too (a stem's
    output, which needs no copy) runs beside the first."""
    taken = set()
    later: set[Any] = set()  # the nodes of the chains after the one looked at
    spans = list(zip([0, *breaks], [*breaks, len(outputs)], strict=True))
    for a, b in reversed(spans):
        outs = outputs[a + (entry and a == 0) : b]
        nodes = {out.grad_fn for out in outs if out.grad_fn is not None}
        if any(any(t is out for out in outs) for t in given) or any(
            made_from(t, nodes, later) for t in given
        ):
            taken.add(a)
        later |= nodes
    return frozenset(taken)


def stack_starts(stacks: Sequence[str]) -> list[int]:
    """The first block of each stack (a run of blocks in one container), where the recorder checks
    in a pre-hook that a call continues the chain (a stack's later blocks it checks in their forward
    hook). From one stack to the next (`encoder.layers.5` then `decoder.layers.0`) a call does where
    the block takes the last block's output or what is computed from it (a ResNet's next stage does,
    as does the next stage of a list of lists; an encoder-decoder's decoder does not, its chain starts
    anew). A stack of two or more blocks entered again (a shared tower run on a second input)
    continues where the call also takes one of the stack's own outputs this pass, or what is computed
    from one (stacked recurrent cells, each taking its own hidden state, masked or not). Within a
    stack too: a head per stage, each on its own stage's output, is a chain of its own (read as one
    chain, two unrelated heads' ratio was in the growth, 5128 for 45), and a decoder whose first layer
    LayerDrop skipped starts its chain at its next. A one-block stack, a recurrent cell called per
    token, is not checked (a hook per token). `stacks`: each block's `stack_of`."""
    first = [b for b in range(len(stacks)) if b == 0 or stacks[b - 1] != stacks[b]]
    return [b for b in first if b > 0 or stacks[1:2] == stacks[:1]]
