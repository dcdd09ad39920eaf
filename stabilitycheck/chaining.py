"""How the probe's recorded block calls chain into one chain: the junction check of each call, parallel
branches on one stream value, block 0's entry side (a residual add around it) and that add's backward taps."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import GradientEdge

from stabilitycheck import blockcalls
from stabilitycheck._tree import tensors
from stabilitycheck.junctions import (
    alone_from,
    comes_from,
    made_from,
    near,
    skip_around,
    skips,
    sources,
    stack_starts,
    stream_goes_on,
    summed,
    taken_chains,
)

Alts = Mapping[int, tuple[list[torch.Tensor], list[int], set[int]]]  # the recorder's `alts`


class Chaining:
    """The chaining decisions of one recorder (recording.Recorder), and what they keep across a pass:
    the stacks the blocks form, the junctions found, the siblings pending, block 0's entry side. It
    reads the recorder's record, `calls` and `outputs` (its lists, cleared in place and never
    rebound, written there alone), and is handed the rest per call: block 0's input copied (`raw`),
    the copied positions, the calls' tensors (`alts`)."""

    def __init__(
        self, calls: list[int], outputs: list[torch.Tensor], blocks: Sequence[tuple[str, nn.Module]]
    ) -> None:
        self.calls, self.outputs = calls, outputs  # the recorder's record: read here, never written
        self.stacks = [blockcalls.stack_of(name) for name, _ in blocks]
        self.modules = [module for _, module in blocks]
        self.own: dict[str, set[Any]] = {
            s: set() for s in self.stacks
        }  # its outputs' nodes this pass (recorded)
        self.starts = stack_starts(self.stacks)  # the blocks whose calls a pre-hook checks (`joins`)
        # a stack's later blocks are checked in their forward hook, on the arguments it gets (a pre-hook
        # per call cost ~14 us, 0.03x of a 16-block MLP's step)
        self.later = {b for b in range(1, len(self.stacks)) if self.stacks[b - 1] == self.stacks[b]}
        # block 0 as a stack of its own (a model attribute, a cell called per token) has no pre-hook:
        # its calls after the first are checked in its forward hook too (a shared tower of attributes
        # run on a second input, a cell run again from a fresh state, read as one chain: 0.53 for 0.96)
        self.lone = bool(blocks) and 0 not in self.starts
        self.dropped = False  # the entry is not the chain's (block 0's next call): Recorder.take drops it
        self.around: list[torch.Tensor] = []  # dL/d sum of a residual add around block 0 (`skip_around`),
        # or what its taps hand the input the block's copy was made from
        self.around_hooks: list[Any] = []  # the node hooks that fill `around`, until release
        # the add's node where `around` holds taps' gradients (x + block(norm(x))), not one dL/d sum
        self.sum: Any = None
        # where the taps hand their gradients (x's gradient edge): asked for in the backward, which
        # else computes none where nothing else needs x's (a raw float input's copy: x + block(norm(x))
        # read through the branch alone, growth 1.02 for 1.85)
        self.fed: Any = None
        self.goes_on = False  # the call after block 0's next takes the add's sum plus that call's output
        self.checked = 0  # the position of the call `skip_around` looked at; `goes_on` is read after it
        self.sided = False  # nothing more to read of the entry's side this pass (`entry_side`)
        self.breaks: set[int] = set()  # positions in `outputs` whose block does not take the last output
        self.feeds: dict[int, frozenset[int]] = {}  # per break, the starts of the chains its call takes
        self.cuts: set[int] = set()  # breaks where a cell took its last output detached (`blockcalls.cut`)
        # calls taking, as their chain's input, the last output or a detached view of it that carries
        # no gradient (`blockcalls.severs`): the gradient stops there (readings.cut_before says where)
        self.severed: set[int] = set()
        # a call that went on from the output before it while the next call took that output too
        # (`_branches`): its position until the calls after it say whether it is a branch
        self.branch: int | None = None
        # parallel branches on one stream value (x + attn(ln1(x)) + mlp(ln2(x))): the positions of a
        # call and the later calls reading what it read (`_kin`), until `_resolve`; `stream`: the nodes
        # of that value; `twins`: the later ones found links of the chain this pass; `unsure`: block
        # 0's entry is dropped should its siblings be none (`skips`, as a second tower's reading)
        self.kin: list[int] = []
        self.stream: set[Any] = set()
        self.twins: set[int] = set()
        self.unsure = False
        self.given: tuple[Any, Any] | None = None  # the last call's (args, kwargs), for `_kin`
        # this pass, the positions of later block calls that took the last output as returned (or a
        # view of all its data), and (position, input) of those taking a function of it alone: see
        # Recorder.take_between
        self.as_returned: list[int] = []
        self.between: list[tuple[int, torch.Tensor]] = []

    def start(self) -> None:
        """Forget the last pass's junctions, siblings and entry side: a pass starts."""
        self.as_returned, self.between = [], []
        for found in (self.breaks, self.feeds, self.cuts, self.severed):
            found.clear()
        self.branch = None
        self.kin, self.stream, self.twins, self.unsure, self.given = [], set(), set(), False, None
        self.checked, self.sided = 0, False
        for ids in self.own.values():
            ids.clear()
        self.around.clear()
        self.sum, self.fed, self.goes_on, self.dropped = None, None, False, False

    def shift(self) -> None:
        """The entry dropped (`dropped`): every position counts from block 0's first output."""
        self.dropped = False
        self.breaks = {b - 1 for b in self.breaks}
        self.cuts = {b - 1 for b in self.cuts}
        self.severed = {b - 1 for b in self.severed}
        self.feeds = {b - 1: frozenset(max(0, a - 1) for a in fed) for b, fed in self.feeds.items()}
        self.between = [(at - 1, x) for at, x in self.between]
        self.as_returned = [at - 1 for at in self.as_returned]

    def let_go(self) -> None:
        """Drop the tensors and graph nodes this pass kept (see Recorder.let_go for the order)."""
        self.between, self.as_returned = [], []
        for nodes in self.own.values():
            nodes.clear()

    def remove(self) -> None:
        """Take the add's node hooks off, and drop what they kept and the autograd nodes kept for the
        junction test (they hold the pass's saved tensors): Recorder.remove."""
        self.unhook()
        self.around.clear()
        self.sum = self.fed = None
        for nodes in self.own.values():
            nodes.clear()

    def joins(
        self, b: int, args: tuple[Any, ...], kwargs: dict[str, Any], raw: torch.Tensor | None, alts: Alts
    ) -> None:
        """Check that block b's call, taking `args` and `kwargs`, goes on with the chain; where it does
        not, record the junction: the chains it takes (`feeds`) and a break where its output goes.
        `raw`: the input block 0's first call got a copy of; `alts`: the recorder's (Recorder._joins)."""
        stack = self.stacks[b]
        at, x = len(self.outputs), blockcalls.entry(args, kwargs)[1]
        if isinstance(x, tuple | list | Mapping):  # a call taking one container, an nn.RNN's
            # PackedSequence or a block's (h, mask): its chain is its first floating tensor, as a
            # block's output is read (taken whole, a junction read a packed nn.RNN's gain in no
            # chain: growth 0.49 where torch's is 7814)
            x = blockcalls.first_tensor(x, scalars=False)
        x, goes_on = self._chain_argument(x, args, kwargs)
        entry = self.calls[0] < 0
        kin = None if goes_on else self._kin(b, at, x, raw)
        if self.kin and (kin is None or kin[0] != self.kin[0]):
            self._resolve(list(tensors((args, kwargs))))
        if kin is not None:
            self.kin = kin
        if self.branch is not None:
            self._settle(x, list(tensors((args, kwargs))))
        if blockcalls.severs(x, self.outputs[-1]) and self._upstream_learns():
            self.severed.add(at)  # read as before (a frozen backbone under a head is meant so); said
        if goes_on:
            if blockcalls.as_returned(x, self.outputs[-1]):
                self.as_returned.append(at)
            elif isinstance(x, torch.Tensor) and x.requires_grad and alone_from(x, self.outputs[-1]):
                self.between.append((at, x))  # a function of the output alone: its gain is one
            if self.breaks and x is not self.outputs[-1]:  # the chain runs on, unless what the
                # call takes as its chain's input is made from another chain's output too: a
                # merge (a head on two towers' outputs) starts a chain that takes both (memory
                # in another argument, as every decoder layer takes, is no merge)
                taken = taken_chains(self.outputs, sorted(self.breaks), [x], entry)
                if len(taken) > 1:
                    self.feeds[at] = taken
                    self.breaks.add(at)
            return
        given = list(tensors((args, kwargs)))
        held = alts.get(at - 1) if b in self.later else None
        if held is not None and any(comes_from(t, alt) for alt in held[0] for t in given):
            return  # a later block taking another of its predecessor's tensors (its h of
            # (router_logits, h)): the chain runs on, read on the tensor recorded
        # block 0 alone in its stack goes on where it takes its own output (the lower of two
        # stacked attribute cells, c1 called between its calls), as a stack entered again does
        mine = self.stacks[self.calls[-1]] == stack or (b == 0 and self.lone)
        own = self.own[stack] if mine else set()
        if not any(near(t, own) for t in given) and not any(made_from(t, own) for t in given):
            self.feeds[at] = taken_chains(self.outputs, sorted(self.breaks), given, entry)
            self.breaks.add(at)
            self._branches(at, x)
            restart = self.calls[-1] == 0 or self.calls.count(0) > 1  # a cell's: not a tower's 2nd pass
            if b == 0 and self.lone and not self.feeds[at] and restart:
                # a cell run on from a fresh state (reset every K tokens) ends its window as a
                # detach does (`blockcalls.cut`): a loss on the last token takes nothing from the windows
                # before it (their 0 / 0 read the model's growth as none, for g^(K-1)); a tower's
                # second pass (block 0 called once before) is no window: one behind a zero gate
                # says so (0 / 0), as a list-held tower's does
                self.cuts.add(at)

    def _kin(self, b: int, at: int, x: Any, raw: torch.Tensor | None) -> list[int] | None:
        """Where call `at`, of block b, not on the last output, reads the stream value the call before
        read (or its siblings: `kin`), by a path around their outputs and from none of them (mlp's
        ln2(x) beside attn's ln1(x)): the siblings with it, else None. Not where that value is a block
        output or a function of one alone (heads on a trunk's output, experts on a mixer's:
        `_branches`), nor for a block called again right after itself (a cell per token beside
        another cell's state: no search back through the tokens)."""
        p = at - 1
        if not isinstance(x, torch.Tensor) or x.grad_fn is None or self.calls[p] in (-1, b):
            return None
        going = bool(self.kin) and self.kin[-1] == p
        stream = self.stream if going else self._stream(p, raw)
        kin = self.kin if going else [p]
        mine = {self.outputs[k].grad_fn for k in kin}
        if not stream or None in mine or made_from(x, mine) or not made_from(x, stream, mine):
            return None
        if not going:
            self.stream = stream
        return [*kin, at]

    def _stream(self, p: int, raw: torch.Tensor | None) -> set[Any]:
        """The nodes of the value call p read (`sources`: a norm's input too): block 0's input where
        p is block 0's entered call; empty where it is a block output or made from one alone."""
        entered = p == 1 and self.calls[0] < 0
        x = raw if entered else blockcalls.entry(*self.given)[1] if self.given is not None else None
        if not isinstance(x, torch.Tensor) or x.grad_fn is None:
            return set()
        before = self.outputs[p - 1] if p > 0 and not entered else None
        return set() if before is not None and (x is before or alone_from(x, before)) else sources(x)

    def _resolve(self, given: Sequence[Any]) -> None:
        """The siblings in `kin` are links of one chain (`twins`: no junction between them, their
        gradients all dL/d of the stream's next value) where one of `given` (a later call's tensors,
        or the model's output) is made from an add of each one's output, the residual stream going
        on (x + attn + mlp: every call a chain of its own, growth 1 for torch's 3.02). Else they stay
        as read: heads on one stream value, Inception's branches concatenated."""
        kin, self.kin = self.kin, []
        outs = [self.outputs[k] for k in kin]
        if any(summed(t, outs) for t in given):
            self.twins.update(kin[1:])
            for k in kin[1:]:
                self.breaks.discard(k)
                self.feeds.pop(k, None)
            if self.branch in kin:
                self.branch = None  # its output goes on, summed
        elif kin[0] == 1 and self.calls[0] < 0:
            self.dropped |= self.unsure  # as read at block 0's next call, no residual add found there
            self.sided = True
        self.unsure = False

    def _after(self, k: int) -> int:
        """The position of the first call after call k that is not one of its siblings (`twins`,
        `kin`): where what the model makes of their outputs shows."""
        q = k + 1
        while q in self.twins or q in self.kin[1:]:
            q += 1
        return q

    def entry_side(
        self, b: int, args: tuple[Any, ...], kwargs: dict[str, Any], raw: torch.Tensor, copied: frozenset[int]
    ) -> None:
        """Block 0's entry, read at the call after block 0's first and its siblings: a residual add
        around block 0 (`skip_around`), or a path around it that drops the entry (`skips`); then,
        at the call after that one, whether the stream goes on from the add's sum (`stream_goes_on`).
        Beside siblings, a call by keyword is read on its entry (GPT-J's and Phi's attn(hidden_states=
        ...) read none, and block 0's input gradient through its branch alone: growth 0.018 for
        torch's 2.31, a review)."""
        at, first = len(self.outputs), self.outputs[1]
        if not args and self._after(1) > 2:
            args = (blockcalls.entry(args, kwargs)[1],)
        if at == self._after(1):
            self.checked = at
            found = skip_around(args, raw, first, again=b == 0, beside=self.outputs[2:at])
            if found is not None:
                self._read_add(*found)
            elif b != 0 and 1 not in copied and skips(args, raw, first):
                self.dropped = True  # the input is not on block 0's output's chain
            self.sided = self.sum is None
        elif at == 2 and self.kin[:2] == [1, 2]:  # a sibling of block 0's: decided at `_resolve`
            self.unsure = b != 0 and 1 not in copied and skips(args, raw, first)
        elif self.sum is not None and at == self._after(self.checked):  # does the stream go on?
            self.goes_on = stream_goes_on(args, self.sum, self.outputs[-1])
            self.sided = True

    def _entry_read(self) -> bool:
        """Whether block 0's input gradient is read whole: a residual add around it found, its taps'
        sum added where they are on the input itself, or its dL/d sum where the stream goes on. Beside
        siblings, where it is not, it would be block 0's branch's alone (an ensemble, b0(x) + b1(x) +
        b2(x), with no residual add: 0.47 for torch's 0.83, a review): the entry is dropped."""
        return bool(self.around_hooks) and (self.sum is None or self.goes_on)

    def _read_add(self, add: Any, taps: Any, instead: bool) -> None:
        """Hook the residual add around block 0 that `skip_around` found: its taps, or its dL/d sum."""
        self.around_hooks = [node.register_hook(functools.partial(self._tap, j)) for node, j in taps] or [
            add.register_prehook(self._through)
        ]
        self.sum = add if instead else None
        self.fed = GradientEdge(*taps[0][0].next_functions[taps[0][1]]) if taps else None

    def _branches(self, at: int, x: Any) -> None:
        """Call `at`, a junction, takes as its chain's input what the call before it took, the output
        before that (two heads on a trunk's last features, two experts on a mixer's output): the call
        before it went on with the chain only if what it returned goes on with the model's flow. Its
        place is kept (`branch`) until `_settle` sees the calls after these siblings."""
        p = at - 1
        if (
            self.branch is None
            and p >= 2
            and p not in self.breaks
            and min(self.calls[p - 1 : p + 1]) >= 0
            and comes_from(x, self.outputs[p - 1])
        ):
            self.branch = p

    def _settle(self, x: Any, given: list[torch.Tensor] | None) -> None:
        """Whether the first of two or more siblings (`branch`, `_branches`) went on with the chain,
        seen at the first later call that is not another sibling (`x`: its chain's input, `given`: its
        tensors), or at the end of the pass (None: on the outputs recorded since). Where that call
        takes what one of the siblings made (the experts' mean added back to a mixer's stream, which
        the next mixer takes; a layer after an aux head on its predecessor's output), the chain runs
        on as read. Where none does (the pass ended: task heads on a trunk's last features), every
        sibling is a branch: the first too is a chain of its own taking the trunk's. Read as the
        trunk's next block, its gain divided dL/d(trunk output), every head's gradient, by its own:
        a head lightly weighted in the loss read as an explosion (160 where the trunk's growth is
        1.28). Decided at the next call, not at the end of the pass: a trunk run again on a second
        input (a Siamese pair) comes between."""
        p = self.branch
        assert p is not None
        made = self.outputs[p:]
        if given is not None:
            nodes = {o.grad_fn for o in made if o.grad_fn is not None}
            if any(any(t is o for o in made) or made_from(t, nodes) for t in given):
                self.branch = None  # the siblings' outputs go on: read as before
                return
            if comes_from(x, self.outputs[p - 1]) and not comes_from(x, self.outputs[-1]):
                return  # another sibling
        else:  # the end of the pass: a call `joins` did not see may have taken a sibling's output
            before: set[Any] = set()  # the nodes of the outputs before made[q]
            for q in range(1, len(made)):
                node = made[q - 1].grad_fn
                if node is not None:
                    before.add(node)
                if any(made[q] is o for o in made[:q]) or made_from(made[q], before):
                    self.branch = None
                    return
        start = max((s for s in self.breaks if s < p), default=0)
        self.breaks.add(p)
        self.feeds[p] = frozenset({start})
        self.branch = None

    def _chain_argument(self, x: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, bool]:
        """The tensor a call continues the chain on, and whether it comes from the last output (one
        search of the graph, not two, for a residual stream's every call): `x`, its first floating
        argument, or where that is a skip from an earlier output (a U-Net's up(skip, x)) and another
        argument comes from the last output, that one: up(skip, x) read a junction there, up(x, skip)
        none, for the same function (an audit). An encoder-decoder's first decoder layer, taking the
        encoder's output beside its own embeddings (no block output), still starts a chain. A skip is
        an earlier output or what is made from it within `near`'s reach (a crop, a pool): no search
        back through the graph, which a cell's call beside another cell's state would make at every
        token. Arguments themselves only: a block taking a list of branches [x0, x1] (CrossViT's,
        HRNet's stages) is read on its first output, so its chain comes in on x0; chained on x1, from
        the last output, its gain divided one branch's gradient by another's (HRNet read growth 467
        where torch's is 32 end to end: an audit)."""
        last, earlier = self.outputs[-1], self.outputs[:-1]
        if comes_from(x, last):
            return x, True
        if not earlier or not isinstance(x, torch.Tensor) or x.grad_fn is None:
            return x, False
        if not near(x, {o.grad_fn for o in earlier if o.grad_fn is not None}):
            return x, False
        top = [*args, *kwargs.values()]
        if not any(a is x for a in top):
            return x, False
        other = next(
            (t for t in top if isinstance(t, torch.Tensor) and t is not x and comes_from(t, last)), None
        )
        return (x, False) if other is None else (other, True)

    def _upstream_learns(self) -> bool:
        """Whether a gradient into the last output would reach something: it carries one, an earlier
        output does, or its block has a parameter that learns. A frozen embedding's output carries
        none by design, and the chain starts after it, as before."""
        last = self.calls[-1]
        return any(o.requires_grad for o in self.outputs) or (
            last >= 0 and any(p.requires_grad for p in self.modules[last].parameters())
        )

    def ended(self, output: Any, raw: torch.Tensor | None) -> None:
        """The model returned `output`: siblings still in `kin` (the last layer's branches) are links
        of the chain where it is made from an add of their outputs (`_resolve`). Where block 0 and its
        siblings were the last calls (one layer), the residual add around them is read on the output,
        where the stream ends (its taps' sum dL/dx; through block 0's branch alone, 2.48 for 2.63)."""
        if self.kin:
            self._resolve(tensors(output))
        if 2 not in self.twins or raw is None or self.sided:
            return
        out = blockcalls.first_tensor(output, scalars=False)
        if len(self.outputs) != self._after(1):
            self._ends_stream(out)
            return
        first, beside = self.outputs[1], self.outputs[2:]
        found = None if out is None else skip_around((out,), raw, first, False, beside)
        if found is not None:
            self._read_add(*found)
            self.goes_on = True
        self.sided = True

    def _ends_stream(self, out: Any) -> None:
        """Beside block 0's siblings, where the call after the next layer's is none (two layers), whether
        the stream goes on from the residual add's sum is read on the model's output (read nowhere,
        block 0's input gradient came through its branch alone: 0.565 for 1.49, a review)."""
        if self.sum is None or self.sided or len(self.outputs) != self._after(self.checked):
            return
        self.goes_on = isinstance(out, torch.Tensor) and stream_goes_on((out,), self.sum, self.outputs[-1])
        self.sided = True

    def stop(self) -> None:
        """The pass ended: the siblings and branch still pending are decided on what was recorded."""
        if self.kin:
            self._resolve([])
        if self.branch is not None:
            self._settle(None, None)
        if 2 in self.twins and self.calls[:1] == [-1] and not self._entry_read():
            self.dropped = True  # block 0's input gradient would be its branch's alone: no entry
        self.given, self.stream = None, set()

    def unhook(self) -> None:
        """Take the residual add's node hook (`skip_around`) off the pass's graph, which may outlive it."""
        for hook in self.around_hooks:
            hook.remove()
        self.around_hooks = []

    def _through(self, grads: tuple[torch.Tensor | None, ...]) -> None:
        """The residual add's node pre-hook (`skip_around`): keeps dL/d sum, changing nothing."""
        if grads[0] is not None:
            self.around.append(grads[0])

    def _tap(self, j: int, grad_inputs: tuple[torch.Tensor | None, ...], _: Any) -> None:
        """A tap's node hook (`skip_around`): keeps the gradient it hands its input j, changing nothing."""
        grad = grad_inputs[j]
        if grad is not None:
            self.around.append(grad)

    def backward_starts(self) -> None:
        """The probe's own backward is next: a dL/d sum kept before it is dropped (a loss with a
        gradient penalty, torch.autograd.grad with create_graph inside it, ran the add's node once
        already: two kept, none read, block 0 read through its branch alone)."""
        self.around.clear()

    def through(self) -> tuple[torch.Tensor | None, bool]:
        """After the backward, what a residual add around block 0 (`skip_around`) hands the chain's input:
        its dL/d sum, to add to the copy's gradient, or, from taps (x + block(norm(x))), dL/dx along the
        chain, to take in its place (True); None where there is none, or the entry is not the chain's. The
        taps' sum is x's gradient along the chain only where the stream goes on from the add's sum (the
        call after block 0's next takes that sum plus its own output: `stream_goes_on`); a tensor re-added
        before every layer, h = layer(h + c), does not (read as a stream: growth 0.120 for 0.054),
        and block 0 is then read through its branch alone, as where no third call shows it. Other uses
        of x (a second tower, a skip around the whole stack) are not on this chain and leave it be. Taps
        on `raw` itself (the add's and parallel branches', x + attn(x) + mlp(x)) are added, their sum."""
        kept, self.around = self.around, []
        if self.calls[:1] != [-1] or not kept:
            return None, False
        if self.sum is not None:
            return (functools.reduce(torch.add, kept), True) if self.goes_on else (None, False)
        if self.fed is not None:
            return functools.reduce(torch.add, kept), False
        return (kept[0] if len(kept) == 1 else None), False
