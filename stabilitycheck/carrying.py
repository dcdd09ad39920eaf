"""A recurrent step's state beside its chain (an nn.LSTMCell's c beside h): which tensors of a block's
output its next call takes as they came, the copies the forward hook hands on in their place, and
whether they are state at all. The recorder (recording.Recorder) owns one per probe."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from stabilitycheck._tree import tensors
from stabilitycheck.junctions import comes_from, made_from

# per module class, the tensors of its output its calls were seen to carry beside their chain (an
# nn.LSTMCell's c from the start): a probe of a new model of that class carries them from its first
# call, where the first probe of the class saw them at its second call and ran that step again
_CARRIED: weakref.WeakKeyDictionary[type, tuple[int, ...]] = weakref.WeakKeyDictionary()
_CARRIED[nn.LSTMCell] = (1,)


def version_of(t: torch.Tensor) -> int:
    """The tensor's version counter (bumped by each in-place change); -1 for an inference tensor, which
    has none (and cannot change in place outside inference mode). Read first, the rare case caught:
    half the cost of asking is_inference() first, on every output of every call."""
    try:
        return t._version
    except RuntimeError:  # "Inference tensors do not track version counter"
        return -1


def _swapped(value: Any, swap: dict[int, torch.Tensor]) -> tuple[Any, int]:
    """`value` with each tensor whose id is a key of `swap` replaced by its value, rebuilt through
    tuples, namedtuples, lists and dicts (another container is left as it is), and how many were
    replaced."""
    if isinstance(value, torch.Tensor):
        new = swap.get(id(value))
        return (value, 0) if new is None else (new, 1)
    if isinstance(value, tuple | list) and (type(value) in (tuple, list) or hasattr(value, "_fields")):
        pairs = [_swapped(v, swap) for v in value]
        count = sum(n for _, n in pairs)
        if not count:
            return value, 0
        rebuilt = [v for v, _ in pairs]
        return (type(value)(*rebuilt) if hasattr(value, "_fields") else type(value)(rebuilt)), count
    if type(value) is dict:
        entries = {k: _swapped(v, swap) for k, v in value.items()}
        count = sum(n for _, n in entries.values())
        return ({k: v for k, (v, _) in entries.items()} if count else value), count
    return value, 0


def goes_on_from(given: Sequence[torch.Tensor], out: torch.Tensor, alts: Sequence[torch.Tensor]) -> bool:
    """Whether a call taking `given` goes on from `out`, one of the tensors `alts` of a block's last
    output: takes it, or a tensor made from it other than another of `alts` as it came. Those are
    made by the same node where one op returns them all (oneDNN's LSTM on the CPU, y beside h_n and
    c_n), and made_from, which follows nodes, took h_n for one made from y: the step was read on y,
    h_n and c_n, its head's gradient as the state's."""
    siblings = {id(alt) for alt in alts if alt is not out}
    return any(t is out or (id(t) not in siblings and comes_from(t, out)) for t in given)


class Carrying:
    """The state the blocks carry beside their chains: per block, which tensors of its output
    (`extras`), and, this pass, per recorded call (its position in the recorder's outputs), the
    copies handed on in their place with their version counters as returned."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.kinds = [type(m) for m in modules]
        # from the start where a block's class is known to carry (_CARRIED), else once seen
        self.extras: dict[int, tuple[int, ...]] = {
            b: _CARRIED[kind] for b, kind in enumerate(self.kinds) if kind in _CARRIED
        }
        self.plain: set[int] = set()  # blocks returning such a tensor as they got it: none carried
        self.discovered = False  # a block's carried tensors became known after its first call ran
        self.confirmed: set[int] = set()  # blocks whose chain this pass is made from what they carry
        self.carried: dict[int, list[torch.Tensor]] = {}  # per position in `outputs`, those tensors
        self.versions: dict[int, list[int]] = {}  # their version counters as returned

    def start(self) -> None:
        """A new pass: nothing carried or confirmed yet (what blocks carry is kept)."""
        self.carried.clear()
        self.versions.clear()
        self.discovered = False
        self.confirmed.clear()

    def shift(self) -> None:
        """The recorder dropped its first output (an entry that is not the chain's): positions - 1."""
        self.carried = {pos - 1: extra for pos, extra in self.carried.items()}
        self.versions = {pos - 1: v for pos, v in self.versions.items()}

    def found(
        self,
        b: int,
        at: int,
        pick: int,
        alts: list[torch.Tensor],
        passed: set[int],
        given: list[torch.Tensor],
        calls: Sequence[int],
    ) -> None:
        """The other tensors of block b's last output (at position `at`, its chain's tensor alts[pick])
        that its next call takes as they came, beside the chain's (an nn.LSTMCell's c beside h,
        `cell(x, (h, c))`), none the call got as an argument: the recurrence's state is all of them
        (read on h alone, a cell whose forget gate carries c at 0.999 a step with no recurrent weight
        read growth 0, a dead layer, for 0.999^(T-1)). Each is read on a copy that the forward hook
        hands on in its place (`carry`): its gradient is that of every use after the call returned
        it, as h's is, and none of what reaches it through h, the same call's output (that is h's:
        counted in c too, it was counted twice, and CUDA's fused LSTM cell, which makes h and c in one
        autograd node, gives no such part). Known only now for the call at `at`, not copied when it
        ran: the step is run again (`discovered`), every call copied alike."""
        taken = {id(t) for t in given}
        chain = alts[pick] if pick < len(alts) else None
        extra = tuple(
            j
            for j, alt in enumerate(alts)
            if j != pick and j not in passed and alt is not chain and id(alt) in taken
            if all(alt is not other for other in alts[:j])
        )
        if not extra or b in self.plain:
            self._drop(b, calls)
            return
        self.extras[b] = extra
        self.discovered |= at not in self.carried
        _CARRIED[self.kinds[b]] = extra

    def confirm(self, b: int, prev: int | None, out: torch.Tensor, calls: Sequence[int]) -> None:
        """At block b's first call of the pass after one that carried tensors (`prev`, its position):
        they are its state only where this call's chain tensor `out` is made from each (an LSTMCell's
        h from c, through the cell state's update), and each is in the graph; else (an accumulator of
        per-step losses passed on beside h, an additive -inf mask with no gradient) block b is read on
        its chain alone."""
        held = self.carried.get(prev) if prev is not None else None
        if held is None:
            return
        self.confirmed.add(b)
        if not all(t.grad_fn is not None and made_from(out, {t.grad_fn}) for t in held):
            self._plain(b, calls)

    def _plain(self, b: int, calls: Sequence[int]) -> None:
        """Block b carries nothing from now on, nor, in a later probe, does a block of its class (an
        nn.LSTMCell's class aside: another use of it may carry its c)."""
        self.plain.add(b)
        self._drop(b, calls)
        if self.kinds[b] is not nn.LSTMCell:
            _CARRIED.pop(self.kinds[b], None)

    def _drop(self, b: int, calls: Sequence[int]) -> None:
        """Block b carries nothing beside its chain: none of its calls is read on carried tensors."""
        self.extras.pop(b, None)
        for at in [at for at in self.carried if calls[at] == b]:
            del self.carried[at], self.versions[at]

    def carry(
        self, b: int, pos: int, output: Any, outs: list[torch.Tensor], call: Any, calls: Sequence[int]
    ) -> tuple[Any, list[torch.Tensor]]:
        """The output of block b's call at position `pos` with a copy of each tensor it carries beside
        its chain's (`found`), recorded, and its floating tensors with the copies in place; (None,
        outs) where there is none to carry. A call returning such a tensor as it got it (a bias made
        once and passed on) carries no state: block b is read on its chain alone from now on."""
        extra = self.extras[b]
        got = {id(t) for t in tensors(call)}
        if any(j >= len(outs) or id(outs[j]) in got for j in extra):
            self._plain(b, calls)
            return None, outs
        # a copy, not a view: a truncated-BPTT loop's c.detach_() refuses views
        aliases = {id(outs[j]): outs[j].clone() for j in extra}
        swapped, count = _swapped(output, aliases)
        if count != len(aliases):  # held in a container the hook cannot rebuild
            self._plain(b, calls)
            return None, outs
        self.carried[pos] = list(aliases.values())
        self.versions[pos] = [version_of(t) for t in self.carried[pos]]
        return swapped, [aliases.get(id(t), t) for t in outs]

    def take(self, calls: Sequence[int]) -> list[tuple[int, torch.Tensor]]:
        """(position in the recorder's outputs, tensor) of each tensor a confirmed block's call
        carried, dropping the references to them. None where the model changed one in place after the
        call returned it (`c.mul_(0.5)`): its values and gradient are no longer the state's, and the
        state is read on the chain's tensor alone."""
        moved = any(
            [version_of(t) for t in extra] != self.versions[pos] for pos, extra in self.carried.items()
        )
        kept = sorted((pos, extra) for pos, extra in self.carried.items() if calls[pos] in self.confirmed)
        self.carried.clear()
        self.versions.clear()
        return [] if moved else [(pos, t) for pos, extra in kept for t in extra]
