"""The junction rules (junctions), each where a plausible bug passed every other test: a plain input's
residual add around block 0 is read only where the next call's input is raw + first *to the last bit*
(torch.equal), as the docstring says: a value merely close (allclose) is some other computation.
Oracle: the docstring, on tensors built by hand."""

from __future__ import annotations

import torch
from torch import nn

from stabilitycheck import junctions

skip_around = junctions.skip_around


def test_a_plain_inputs_residual_add_is_read_only_when_exact_to_the_last_bit() -> None:
    torch.manual_seed(0)
    block = nn.Linear(4, 4)
    raw = torch.randn(3, 4)  # a plain input: made in the forward, no gradient
    first = block(raw)
    exact = raw + first
    found = skip_around((exact,), raw, first, False)
    assert found is not None and found[0] is exact.grad_fn and found[1] == []
    near = (raw + 1e-6) + first  # within allclose's tolerance of raw + first, but not the same sum
    assert not torch.equal(near, raw + first) and torch.allclose(near, raw + first)
    assert skip_around((near,), raw, first, False) is None
    assert skip_around((exact,), raw, first, True) is None  # block 0 again: not read


def test_the_taps_of_a_long_hand_written_norm_are_found_under_256_nodes() -> None:
    """A LayerNorm written by hand followed by 25 scalings: ~60 autograd nodes between x and raw, under
    the documented TAP_NODES = 256 (a larger graph is taken for no norm). The gradient enters x at the
    two ops that read it (mean and subtract): oracle, a walk of the whole graph behind raw with no cap."""
    base = torch.randn(2, 8, requires_grad=True)
    x = base * 1.5
    mu = x.mean(-1, keepdim=True)
    d = x - mu
    y = d * torch.rsqrt((d * d).mean(-1, keepdim=True) + 1e-5)
    for _ in range(25):
        y = y * 1.0001 + 0.0
    raw = y
    edge = junctions._edge(x)
    start = raw.grad_fn
    assert start is not None
    expected, frontier, seen = set(), [start], {start}
    while frontier:  # brute force: every (node, input number) whose input is x's edge
        node = frontier.pop()
        for j, child in enumerate(node.next_functions):
            if child == edge:
                expected.add((node, j))
            elif child[0] is not None and child[0] is not edge[0] and child[0] not in seen:
                seen.add(child[0])
                frontier.append(child[0])
    assert 16 < len(seen) < 256
    assert len(expected) == 2
    assert set(junctions._taps(raw, edge)) == expected


def test_an_add_of_one_tensor_with_itself_is_no_residual_around_block_0() -> None:
    """Block 0 an identity (its output the very tensor it took): x = out + out adds no path around
    block 0, every gradient of the sum goes through that one tensor; the docstring's add takes block
    0's output on one side and its input on the other, two edges (the guard `other != mine`)."""
    raw = torch.randn(2, 4, requires_grad=True) * 1.0  # an embedding's output: requires grad
    first = nn.Identity()(raw)
    assert first is raw
    doubled = first + first
    assert junctions._residual_add(doubled, raw, first) is None
    block = nn.Linear(4, 4)
    out = block(raw)
    summed = raw + out  # a real residual: found, taking raw itself (no taps)
    found = junctions._residual_add(summed, raw, out)
    assert found is not None and found[0] is summed.grad_fn and found[1] == []


def test_made_from_reaches_the_older_of_two_targets() -> None:
    """x is made from a (the older target) alone, after b was made: the search must reach back to the
    oldest target, not stop at the newest. Oracle: how x was computed."""
    leaf = torch.randn(3, requires_grad=True)
    a = leaf * 2.0
    b = leaf * 3.0
    x = a + 1.0
    assert junctions.made_from(x, {a.grad_fn, b.grad_fn})
    assert junctions.made_from(x, {a.grad_fn})
    assert not junctions.made_from(x, {b.grad_fn})
