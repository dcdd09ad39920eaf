"""The probe's recorder of block outputs: forward hooks on the blocks, reading each call through
blockcalls; how the calls chain (junctions, siblings, block 0's entry side) is chaining's to decide."""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from stabilitycheck import blockcalls
from stabilitycheck._tree import tensors
from stabilitycheck.carrying import Carrying, goes_on_from, version_of
from stabilitycheck.chaining import Chaining
from stabilitycheck.hooking import hooked, outside_graph
from stabilitycheck.junctions import comes_from
from stabilitycheck.measurement import INPUT


class Recorder:
    """Forward hooks on the blocks, collecting (block index, output) of every block call while active;
    dL/d(output) is then captured by the backward pass itself (torch.autograd.grad), no tensor hooks.

    With `input_side`, block 0's input is the chain's first entry (index -1, named INPUT), so block
    0's own gain is measured: taken on block 0's first call when no block has run before it, its
    input is the chain's entry (`blockcalls.chain_input`) and the block did not modify its input in place (its
    version counter). The shapes may differ (an nn.RNN from input to hidden width, a stem widening
    the channels): under fan-in init a layer's backward gain does not depend on its widths, and for
    a whole-sequence recurrent block it is where the growth through time shows. The input is replaced
    by a copy that requires grad, for dL/d input through block 0 alone (a copy, not a leaf: an
    in-place op on a leaf that requires grad would raise inside the user's model); of an input in the
    graph already (a stem's output), a copy in that graph, so what made it still gets its gradient,
    and a skip around the stack from it (h + blocks(h)) is not read as block 0's gain. Until
    `release`, every call of block 0 on that same input (its data: torch.utils.checkpoint recomputing
    it in the backward makes new views) gets a copy too, so a recomputation saves what its forward
    saved. Block 0 called again with its first output in another argument than the one
    the entry came from is a recurrent cell of another kind (a hand-written `cell(x_t, h)`): its chain
    runs through h, not x_0, and the entry is dropped, as for nn.RNNCellBase (x_0 as the entry of a
    linear cell W = 1.3 O, 12 tokens, read growth 15.5 for 1.3^11 = 17.9).
    """

    def __init__(self, blocks: Sequence[tuple[str, nn.Module]], input_side: bool = False) -> None:
        self.blocks, self.input_side = tuple(blocks), input_side  # for `renewed`
        self.active = False
        self.calls: list[int] = []
        self.outputs: list[torch.Tensor] = []
        # how the calls chain: junctions, parallel branches, block 0's entry side (chaining.Chaining)
        self.chaining = Chaining(self.calls, self.outputs, blocks)
        self.entering: list[torch.Tensor | None] | None = None  # per call, its floating input (on request)
        self.returned: set[int] = set()  # with `entering`: the ids of what block calls returned this pass
        self.held: list[torch.Tensor] = []  # and those tensors, kept alive until the next start
        self.entry: torch.Tensor | None = None  # block 0's input, until its first call returns
        self.version = 0  # the entry's version counter when block 0 received it
        self.key: str | None = None  # where the entry came from in block 0's call: see blockcalls.entry
        self.recheck = False  # block 0 took the entry: its next call is checked (`blockcalls.elsewhere`)
        self.touched = False  # block 0 changed its copy of the input in place (`entry_moved`)
        self.versions: list[int] = []  # per recorded output, its version counter when recorded
        self.copied: frozenset[int] = (
            frozenset()
        )  # positions in `outputs` recorded as a copy (`blockcalls.kept`)
        self.handles: list[Any] = []
        self.picks: dict[int, int] = {}  # per block, which of its output's tensors is its chain's (_repick)
        # the tensors a block's calls carry beside its chain, its next call taking them as they came
        self.carrying = Carrying([module for _, module in blocks])
        # per position in `outputs`, its call's tensors, their version counters as it returned them,
        # and which of them are the call's own positional arguments, returned as they came
        self.alts: dict[int, tuple[list[torch.Tensor], list[int], set[int]]] = {}
        stacks = self.chaining.stacks
        sizes = Counter(stacks)
        self.alone = {b for b, stack in enumerate(stacks) if sizes[stack] == 1}  # a stack of its own
        self.last: dict[int, int] = {}  # per block, the position of its last call's output
        self.repicking: dict[int, Any] = {}  # per block whose output holds several tensors, its
        # pre-hook until its next call (_repick), then None
        # a recurrent cell's chain is its hidden state, not its input token (it took u_0 as the entry
        # where the widths differ: growth 0.127 for 1.03)
        cell = bool(blocks) and isinstance(blocks[0][1], nn.RNNCellBase)
        self.first = blocks[0][1] if input_side and blocks and not cell else None
        self.pre: Any = None  # the input pre-hook's handle, from start() to block 0's next call or `release`
        self.raw: torch.Tensor | None = None  # the input block 0's first call got a copy of, until release
        # blocks whose calls without grad mode are not recorded: they also run with it in one pass (a
        # target or teacher pass of the same blocks under torch.no_grad beside the trained one), whose
        # outputs no gradient reaches (`quiet_found`); kept for the probe's later passes, but for an
        # exact re-run (`start(inputs=True)`, `entering` kept), which locates a non-finite value wherever
        # it was made
        self.quiet: set[int] = set()
        self.empty: set[int] = set()  # blocks that ran this pass returning no floating tensor (None)
        self.muted: list[int] = []  # this pass, the positions in `outputs` recorded without grad mode

    @property
    def breaks(self) -> set[int]:
        """Positions in `outputs` whose block does not take the last output (Chaining.breaks)."""
        return self.chaining.breaks

    @property
    def feeds(self) -> dict[int, frozenset[int]]:
        """Per break, the starts of the chains its call takes (Chaining.feeds)."""
        return self.chaining.feeds

    @property
    def cuts(self) -> set[int]:
        """Breaks where a cell took its last output detached (Chaining.cuts)."""
        return self.chaining.cuts

    @property
    def severed(self) -> set[int]:
        """Calls whose chain's input carries no gradient from the last output (Chaining.severed)."""
        return self.chaining.severed

    @property
    def fed(self) -> Any:
        """Where a residual add's taps around block 0 hand their gradients, or None (Chaining.fed)."""
        return self.chaining.fed

    def _on_input(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if self._skipped(0):  # not recorded: the entry is block 0's first call with grad
            return None
        if self.recheck:  # block 0's next call; its first output follows the entry, at position 1
            elsewhere = self.active and blockcalls.elsewhere(args, kwargs, self.key, self.outputs[1])
            self.chaining.dropped |= elsewhere
            self.recheck = False
            if self.raw is None:
                self._unhook()
                return None
        chain = blockcalls.chain_input(args, kwargs) if torch.is_grad_enabled() else None
        if self.raw is not None:  # the first call's input again: each call gets a copy, so that a
            # checkpoint's recomputation in the backward saves what its forward saved
            again = chain is not None and blockcalls.same_data(chain[1], self.raw)
            return blockcalls.entering(args, kwargs, *chain)[1] if again and chain is not None else None
        first = chain is not None and self.active and not self.calls
        if chain is None or not first:  # block 0's first call only: a recurrent cell is called once
            self._unhook()  # per token
            return None
        self.raw = chain[1]  # the hook stays: a checkpoint may call block 0 on it again in the backward
        self.key = chain[0]
        self.entry, replaced = blockcalls.entering(args, kwargs, *chain)
        self.version = self.entry._version
        return replaced

    def _skipped(self, b: int) -> bool:
        """Whether this call of block b goes unrecorded: a `quiet` block's call without grad mode, but
        in an exact re-run (its calls' inputs kept: `entering`)."""
        return self.entering is None and b in self.quiet and not torch.is_grad_enabled()

    def quiet_found(self) -> bool:
        """Whether this pass recorded calls without grad mode of a block that also ran with it, not
        known before (the same blocks run under torch.no_grad for a target before the trained pass:
        their outputs took the entry's place and started the call order: growth 3.43 for torch's
        4.78). Those blocks join `quiet`; the caller runs the pass again on a `renewed` recorder,
        which records their calls with grad alone. A block that runs only without grad (a frozen
        backbone) is recorded as before: it is where the chain is cut (`severed`)."""
        muted = set(self.muted)
        loud = {b for pos, b in enumerate(self.calls) if b >= 0 and pos not in muted}
        found = ({self.calls[pos] for pos in muted} & loud) - self.quiet
        self.quiet |= found
        return bool(found)

    def renewed(self) -> Recorder:
        """A recorder of the same blocks that knows their `quiet` calls and nothing else this one
        learned from its calls: which tensor of a step's output its chain is (`_repick`) and what it
        carries were read on calls a quiet one came between (a (y, h) step read growth NaN for 1.67,
        an LSTMCell without its c). This one's hooks come off."""
        self.remove()
        fresh = Recorder(self.blocks, self.input_side)
        fresh.quiet = set(self.quiet)
        return fresh

    def _join(self, b: int) -> Any:
        def on_join(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self._joins(b, args, kwargs)

        return on_join

    def _joins(self, b: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Block b's call, where this pass records it, checked for a junction (Chaining.joins)."""
        if self.active and self.outputs and not self._skipped(b):
            self.chaining.joins(b, args, kwargs, self.raw, self.alts)

    def _hook(self, b: int) -> Any:
        calls, outputs = self.calls, self.outputs  # cleared in place, never rebound
        chaining = self.chaining  # never rebound
        own = chaining.own[chaining.stacks[b]]

        def on_forward(module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> Any:
            swapped = None
            if self.active and not self._skipped(b):
                outs = blockcalls.floating(output)
                pick = self.picks.get(b, 0)
                out = outs[pick] if pick < len(outs) else blockcalls.first_tensor(output, scalars=False)
                if out is None:
                    self.empty.add(b)
                else:
                    again, mine = b == 0 and chaining.lone and bool(calls), self.last.get(0)
                    passes = again and mine is not None and blockcalls.passes_on(args, kwargs, outputs[mine])
                    again = again and not passes  # a cell called on its own last output: the chain goes on
                    if (b in chaining.later or again) and (args or kwargs) and outputs:  # see _joins
                        chaining.joins(b, args, kwargs, self.raw, self.alts)
                    entry, self.entry = self.entry, None
                    self.touched |= b == 0 and entry is not None and entry._version != self.version
                    if b == 0 and not calls and entry is not None and entry._version == self.version:
                        calls.append(-1)
                        outputs.append(entry)
                        self.versions.append(entry._version)
                        if self.entering is not None:
                            self.entering.append(None)
                        self.recheck = True  # see _on_input
                    if len(calls) >= 2 and calls[0] < 0 and self.raw is not None and not chaining.sided:
                        chaining.entry_side(b, args, kwargs, self.raw, self.copied)
                    carrying = self.carrying
                    if b in carrying.extras and b not in carrying.confirmed:
                        carrying.confirm(b, self.last.get(b), out, calls)
                    if b in carrying.extras:
                        swapped, outs = carrying.carry(b, len(outputs), output, outs, (args, kwargs), calls)
                    if len(outputs) in self.copied:  # the model changes `out`, the copy stays as returned
                        out = blockcalls.kept(out)
                    # taking its last output as it came, it took it undetached (blockcalls.cut's first look)
                    cut = calls and calls[-1] == b and b not in chaining.later and not passes
                    if cut and blockcalls.cut(args, kwargs, outputs[-1]):
                        chaining.breaks.add(len(outputs))  # a window of its own, beside the last
                        chaining.feeds[len(outputs)] = frozenset()
                        chaining.cuts.add(len(outputs))
                    if not torch.is_grad_enabled():
                        self.muted.append(len(outputs))
                    calls.append(b)
                    outputs.append(out)
                    self.versions.append(version_of(out))
                    self.last[b] = len(outputs) - 1
                    if len(outs) > 1 and self.repicking.get(b, True) is not None:
                        # which tensor continues the chain is seen at the block's next call, once
                        passed = {j for j, t in enumerate(outs) if any(t is a for a in tensors(args))}
                        self.alts[len(outputs) - 1] = (outs, [version_of(t) for t in outs], passed)
                        if b not in self.repicking:
                            self.repicking[b] = module.register_forward_pre_hook(
                                outside_graph(self._repick(b)), with_kwargs=True, prepend=True
                            )
                    if out.grad_fn is not None:
                        own.add(out.grad_fn)
                    if self.entering is not None:
                        self.entering.append(blockcalls.taken_norm(args, kwargs, self.returned))
                        self.returned.update(id(t) for t in outs)
                        self.held += outs  # alive while their ids stand for them
                chaining.given = (args, kwargs)
            return swapped

        return on_forward

    def _repick(self, b: int) -> Any:
        """Block b's pre-hook, once, at its second call, where b is a stack of its own or its calls
        follow each other (a cell called per token; where another block of its stack runs between,
        the chain runs on to it, as the first tensor does) and its output holds several tensors (a
        step returning (y, h)): its chain is the one its next call takes. Where the tensor recorded
        from its last call does not feed this call and another of that call's tensors does, one the
        call made (not an argument it returned as it came: a decoder step's memory), that one is
        block b's from now on, every call recorded so far read on it with its version counter as
        returned (a change in place since is a re-run's). The first tensor, y, read the chain of a
        char-RNN cell as growth 1 with no gain measured, where h grew 1.3 per step."""

        def on_call(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            at = self.last.get(b)
            held = None if at is None or not self.active or self._skipped(b) else self.alts.get(at)
            if at is None or held is None:
                return
            alts, _, passed = held
            self.repicking[b].remove()  # one look per pass: a cell per token pays it once
            self.repicking[b] = None
            given = list(tensors((args, kwargs)))
            fed = goes_on_from(given, self.outputs[at], alts)
            if b not in self.alone and self.calls[-1] != b:
                # a block of a stack with another called between: the chain runs on to it; where
                # that tensor goes on to its own next call too, so does its state (stacked LSTMCells
                # in an nn.ModuleList; not a step whose y the next cell takes and h its next call)
                if fed:
                    self.carrying.found(b, at, self.picks.get(b, 0), alts, passed, given, self.calls)
                return
            if not fed:
                for j, alt in enumerate(alts):
                    if (
                        j not in passed
                        and alt is not self.outputs[at]
                        and any(comes_from(t, alt) for t in given)
                    ):
                        self.picks[b] = j
                        for pos, (outs, versions, _) in self.alts.items():
                            if self.calls[pos] == b and len(outs) > j:
                                self.outputs[pos] = outs[j]
                                self.versions[pos] = versions[j]  # as returned: a change since is re-run
                                if outs[j].grad_fn is not None:
                                    self.chaining.own[self.chaining.stacks[b]].add(outs[j].grad_fn)
                        break
            self.carrying.found(b, at, self.picks.get(b, 0), alts, passed, given, self.calls)

        return on_call

    def take_between(self) -> tuple[list[tuple[int, torch.Tensor]], list[int]]:
        """The later block calls that took a function of the block output before them alone (a tanh
        the model applies between bare Linear blocks; junctions.alone_from), as (position in `take`'s
        outputs, the tensor taken), and the positions of those that took that output as returned;
        dropping the recorder's references. Block 0's gain, from the model's input, has no such
        function in it (Measurement.between_gain). Call after `take`."""
        between, self.chaining.between = self.chaining.between, []
        return between, self.chaining.as_returned

    def changed(self) -> frozenset[int]:
        """The positions in `outputs` of block outputs changed in place since their block returned them
        (their version counter moved: an in-place ReLU or x.mul_() after the block), whose recorded
        tensor then holds the changed values, and whose gradient would be the changed ones'."""
        return frozenset(
            i
            for i, (b, out, version) in enumerate(zip(self.calls, self.outputs, self.versions, strict=True))
            if b >= 0 and version_of(out) != version
        )

    def start(self, inputs: bool = False, copied: frozenset[int] = frozenset(), entry: bool = True) -> None:
        """Hook the blocks and record from now on; with `inputs`, each call's floating input too
        (`entering`); the outputs at positions `copied` are recorded as a copy the model computes from
        and never changes (`blockcalls.kept`: a re-run of a step whose model changed them in place,
        `changed`); without `entry`, block 0's input is left as it is, no copy, no `(input)` (a re-run
        of a step whose model changed the copy in place: `entry_moved`)."""
        if not self.handles:
            self.handles = hooked(self._registrations())
        self.release()
        self.calls.clear()
        self.outputs.clear()
        self.versions.clear()
        self.muted.clear()
        self.empty.clear()
        self.copied = copied
        self.chaining.start()
        self.entering = [] if inputs else None
        self.returned, self.held = set(), []
        self.alts.clear()
        self.last.clear()
        self.carrying.start()
        self.entry = None
        self.recheck, self.touched = False, False
        self.active = True
        if self.first is not None and entry:
            self.pre = self.first.register_forward_pre_hook(outside_graph(self._on_input), with_kwargs=True)

    def _registrations(self) -> list[tuple[str, nn.Module, Any]]:
        """Per hook on a block, (block name, module, its registration): made each time the hooks go on,
        not kept, so that once they come off nothing holds the recorder in a reference cycle (its
        hooks' closures hold it): a probe left 272 objects to the garbage collector, ~0.1 ms of its
        collections a call on a 16x256 MLP (~1% of its step)."""
        return [
            (
                name,
                module,
                functools.partial(
                    module.register_forward_hook, outside_graph(self._hook(b)), with_kwargs=True
                ),
            )
            for b, (name, module) in enumerate(self.blocks)
        ] + [
            (
                *self.blocks[b],
                functools.partial(
                    self.blocks[b][1].register_forward_pre_hook,
                    outside_graph(self._join(b)),
                    with_kwargs=True,
                ),
            )
            for b in self.chaining.starts
        ]

    def entry_moved(self) -> bool:
        """Whether the model changed block 0's copy of its input in place (block 0 itself, or the
        model through block 0's output returned as it came): the copy no longer stands for the input,
        which the model may read again (a skip around the stack), so the step is not the model's own
        until it is run again without the copy (a skip reading the input unchanged read loss 8.86 for
        29.98)."""
        entry = bool(self.calls) and self.calls[0] < 0 and version_of(self.outputs[0]) != self.versions[0]
        return self.touched or entry

    def ended(self, output: Any) -> None:
        """The model returned `output` (Chaining.ended)."""
        if self.active:
            self.chaining.ended(output, self.raw)

    def stop(self) -> None:
        if self.active:
            self.chaining.stop()
        self.active = False
        self.entry = None
        if self.raw is None:  # else kept for a recomputation in the backward, until `release`
            self._unhook()

    def release(self) -> None:
        """After the step's backward: block 0's input is no longer replaced, and the residual add's
        node hook is off (`Chaining.unhook`)."""
        self.raw = None
        self._unhook()
        self.chaining.unhook()

    def _unhook(self) -> None:
        if self.pre is not None:
            self.pre.remove()
            self.pre = None

    def take(self) -> list[torch.Tensor]:
        """The recorded outputs, dropping the recorder's references to them (and the entry, where it is
        not the chain's: `calls`, `breaks` and `entering` then count from block 0's first output)."""
        if self.chaining.dropped:
            for held in (self.calls, self.outputs, self.versions):
                del held[0]
            if self.entering is not None:
                del self.entering[0]
            self.chaining.shift()
            self.carrying.shift()
        outputs = self.outputs[:]
        self.outputs.clear()
        self.alts.clear()
        self.last.clear()
        return outputs

    def let_go(self) -> None:
        """Drop what this pass recorded, to run it again: the tensors and graph nodes the recorder
        holds, the outputs last, last first, while they still hold the graph. A chain of nodes whose
        grad_fn Python has read is freed in a C recursion, a level per node, where its last holder
        lets go of it all at once (the node sets cleared in hash order after the outputs: a
        segmentation fault past ~20,000 block calls, blocks out of order or changed in place)."""
        self.chaining.let_go()
        self.alts.clear()
        self.last.clear()
        self.held = []
        if self.entering is not None:
            self.entering.clear()
        self.outputs.clear()  # CPython lets go of a list's items last first

    def take_carried(self) -> list[tuple[int, torch.Tensor]]:
        """What the blocks' calls carried beside their chains (Carrying.take); call after `take`."""
        return self.carrying.take(self.calls)

    def backward_starts(self) -> None:
        """The probe's own backward is next (Chaining.backward_starts)."""
        self.chaining.backward_starts()

    def through(self) -> tuple[torch.Tensor | None, bool]:
        """After the backward, what a residual add around block 0 hands the chain's input: see
        Chaining.through."""
        return self.chaining.through()

    def take_entering(self) -> list[torch.Tensor | None]:
        """Each recorded call's floating input (None where it had none; empty unless asked for at
        `start`), dropping the recorder's references to them."""
        entering, self.entering = self.entering or [], None
        return entering

    def call_names(self, names: Sequence[str]) -> tuple[str, ...]:
        """One name per recorded call: the block name, with [k] for blocks called more than once (INPUT
        for block 0's input)."""
        counts = Counter(self.calls)
        seen: Counter[int] = Counter()
        out = []
        for b in self.calls:
            if b < 0:
                out.append(INPUT)
                continue
            out.append(f"{names[b]}[{seen[b]}]" if counts[b] > 1 else names[b])
            seen[b] += 1
        return tuple(out)

    def remove(self) -> None:
        """Take every hook off the model and drop the autograd nodes kept for the junction test (they
        hold the pass's saved tensors)."""
        for handle in [*self.handles, *self.repicking.values()]:
            if handle is not None:
                handle.remove()
        self.handles.clear()
        self.repicking.clear()
        self._unhook()
        self.chaining.remove()
