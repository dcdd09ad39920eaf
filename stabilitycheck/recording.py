"""The probe's recorder of block outputs and junctions: forward hooks on the blocks, reading each
call through blockcalls."""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import GradientEdge

from stabilitycheck import blockcalls
from stabilitycheck._tree import tensors
from stabilitycheck.carrying import Carrying, goes_on_from, version_of
from stabilitycheck.hooking import hooked, outside_graph
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
        self.entering: list[torch.Tensor | None] | None = None  # per call, its floating input (on request)
        self.returned: set[int] = set()  # with `entering`: the ids of what block calls returned this pass
        self.held: list[torch.Tensor] = []  # and those tensors, kept alive until the next start
        self.entry: torch.Tensor | None = None  # block 0's input, until its first call returns
        self.version = 0  # the entry's version counter when block 0 received it
        self.key: str | None = None  # where the entry came from in block 0's call: see blockcalls.entry
        self.recheck = False  # block 0 took the entry: its next call is checked (`blockcalls.elsewhere`)
        self.dropped = False  # the entry is not the chain's (block 0's next call): `take` drops it
        self.touched = False  # block 0 changed its copy of the input in place (`entry_moved`)
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
        self.sided = False  # nothing more to read of the entry's side this pass (`_entry_side`)
        self.versions: list[int] = []  # per recorded output, its version counter when recorded
        self.copied: frozenset[int] = (
            frozenset()
        )  # positions in `outputs` recorded as a copy (`blockcalls.kept`)
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
        self.stacks = [blockcalls.stack_of(name) for name, _ in blocks]
        self.modules = [module for _, module in blocks]
        self.own: dict[str, set[Any]] = {s: set() for s in self.stacks}  # its outputs' nodes this pass
        self.starts = stack_starts(self.stacks)  # the blocks whose calls a pre-hook checks (`_joins`)
        # a stack's later blocks are checked in their forward hook, on the arguments it gets (a pre-hook
        # per call cost ~14 us, 0.03x of a 16-block MLP's step)
        self.later = {b for b in range(1, len(self.stacks)) if self.stacks[b - 1] == self.stacks[b]}
        # block 0 as a stack of its own (a model attribute, a cell called per token) has no pre-hook:
        # its calls after the first are checked in its forward hook too (a shared tower of attributes
        # run on a second input, a cell run again from a fresh state, read as one chain: 0.53 for 0.96)
        self.lone = bool(blocks) and 0 not in self.starts
        self.handles: list[Any] = []
        self.picks: dict[int, int] = {}  # per block, which of its output's tensors is its chain's (_repick)
        # the tensors a block's calls carry beside its chain, its next call taking them as they came
        self.carrying = Carrying([module for _, module in blocks])
        # per position in `outputs`, its call's tensors, their version counters as it returned them,
        # and which of them are the call's own positional arguments, returned as they came
        self.alts: dict[int, tuple[list[torch.Tensor], list[int], set[int]]] = {}
        sizes = Counter(self.stacks)
        self.alone = {b for b, stack in enumerate(self.stacks) if sizes[stack] == 1}  # a stack of its own
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
        # this pass, the positions of later block calls that took the last output as returned (or a
        # view of all its data), and (position, input) of those taking a function of it alone: see
        # `take_between`
        self.as_returned: list[int] = []
        self.between: list[tuple[int, torch.Tensor]] = []

    def _on_input(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if self._skipped(0):  # not recorded: the entry is block 0's first call with grad
            return None
        if self.recheck:  # block 0's next call; its first output follows the entry, at position 1
            self.dropped |= self.active and blockcalls.elsewhere(args, kwargs, self.key, self.outputs[1])
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
        """Check that block b's call, taking `args` and `kwargs`, goes on with the chain; where it does
        not, record the junction: the chains it takes (`feeds`) and a break where its output goes."""
        stack = self.stacks[b]
        if self.active and self.outputs and not self._skipped(b):
            at, x = len(self.outputs), blockcalls.entry(args, kwargs)[1]
            if isinstance(x, tuple | list | Mapping):  # a call taking one container, an nn.RNN's
                # PackedSequence or a block's (h, mask): its chain is its first floating tensor, as a
                # block's output is read (taken whole, a junction read a packed nn.RNN's gain in no
                # chain: growth 0.49 where torch's is 7814)
                x = blockcalls.first_tensor(x, scalars=False)
            x, goes_on = self._chain_argument(x, args, kwargs)
            entry = self.calls[0] < 0
            kin = None if goes_on else self._kin(b, at, x)
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
            held = self.alts.get(at - 1) if b in self.later else None
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

    def _kin(self, b: int, at: int, x: Any) -> list[int] | None:
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
        stream = self.stream if going else self._stream(p)
        kin = self.kin if going else [p]
        mine = {self.outputs[k].grad_fn for k in kin}
        if not stream or None in mine or made_from(x, mine) or not made_from(x, stream, mine):
            return None
        if not going:
            self.stream = stream
        return [*kin, at]

    def _stream(self, p: int) -> set[Any]:
        """The nodes of the value call p read (`sources`: a norm's input too): block 0's input where
        p is block 0's entered call; empty where it is a block output or made from one alone."""
        entered = p == 1 and self.calls[0] < 0
        x = self.raw if entered else blockcalls.entry(*self.given)[1] if self.given is not None else None
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

    def _entry_side(self, b: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Block 0's entry, read at the call after block 0's first and its siblings: a residual add
        around block 0 (`skip_around`), or a path around it that drops the entry (`skips`); then,
        at the call after that one, whether the stream goes on from the add's sum (`stream_goes_on`).
        Beside siblings, a call by keyword is read on its entry (GPT-J's and Phi's attn(hidden_states=
        ...) read none, and block 0's input gradient through its branch alone: growth 0.018 for
        torch's 2.31, a review)."""
        at, raw, first = len(self.outputs), self.raw, self.outputs[1]
        assert raw is not None
        if not args and self._after(1) > 2:
            args = (blockcalls.entry(args, kwargs)[1],)
        if at == self._after(1):
            self.checked = at
            found = skip_around(args, raw, first, again=b == 0, beside=self.outputs[2:at])
            if found is not None:
                self._read_add(*found)
            elif b != 0 and 1 not in self.copied and skips(args, raw, first):
                self.dropped = True  # the input is not on block 0's output's chain
            self.sided = self.sum is None
        elif at == 2 and self.kin[:2] == [1, 2]:  # a sibling of block 0's: decided at `_resolve`
            self.unsure = b != 0 and 1 not in self.copied and skips(args, raw, first)
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
        else:  # the end of the pass: a call `_joins` did not see may have taken a sibling's output
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

    def _hook(self, b: int) -> Any:
        calls, outputs = self.calls, self.outputs  # cleared in place, never rebound
        own = self.own[self.stacks[b]]

        def on_forward(module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> Any:
            swapped = None
            if self.active and not self._skipped(b):
                outs = blockcalls.floating(output)
                pick = self.picks.get(b, 0)
                out = outs[pick] if pick < len(outs) else blockcalls.first_tensor(output, scalars=False)
                if out is None:
                    self.empty.add(b)
                else:
                    again, mine = b == 0 and self.lone and bool(calls), self.last.get(0)
                    passes = again and mine is not None and blockcalls.passes_on(args, kwargs, outputs[mine])
                    again = again and not passes  # a cell called on its own last output: the chain goes on
                    if (b in self.later or again) and (args or kwargs):
                        self._joins(b, args, kwargs)
                    entry, self.entry = self.entry, None
                    self.touched |= b == 0 and entry is not None and entry._version != self.version
                    if b == 0 and not calls and entry is not None and entry._version == self.version:
                        calls.append(-1)
                        outputs.append(entry)
                        self.versions.append(entry._version)
                        if self.entering is not None:
                            self.entering.append(None)
                        self.recheck = True  # see _on_input
                    if len(calls) >= 2 and calls[0] < 0 and self.raw is not None and not self.sided:
                        self._entry_side(b, args, kwargs)
                    carrying = self.carrying
                    if b in carrying.extras and b not in carrying.confirmed:
                        carrying.confirm(b, self.last.get(b), out, calls)
                    if b in carrying.extras:
                        swapped, outs = carrying.carry(b, len(outputs), output, outs, (args, kwargs), calls)
                    if len(outputs) in self.copied:  # the model changes `out`, the copy stays as returned
                        out = blockcalls.kept(out)
                    # taking its last output as it came, it took it undetached (blockcalls.cut's first look)
                    cut = calls and calls[-1] == b and b not in self.later and not passes
                    if cut and blockcalls.cut(args, kwargs, outputs[-1]):
                        self.breaks.add(len(outputs))  # a window of its own, beside the last
                        self.feeds[len(outputs)] = frozenset()
                        self.cuts.add(len(outputs))
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
                self.given = (args, kwargs)
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
                                    self.own[self.stacks[b]].add(outs[j].grad_fn)
                        break
            self.carrying.found(b, at, self.picks.get(b, 0), alts, passed, given, self.calls)

        return on_call

    def take_between(self) -> tuple[list[tuple[int, torch.Tensor]], list[int]]:
        """The later block calls that took a function of the block output before them alone (a tanh
        the model applies between bare Linear blocks; junctions.alone_from), as (position in `take`'s
        outputs, the tensor taken), and the positions of those that took that output as returned;
        dropping the recorder's references. Block 0's gain, from the model's input, has no such
        function in it (Measurement.between_gain). Call after `take`."""
        between, self.between = self.between, []
        return between, self.as_returned

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
        self.as_returned = []
        self.between = []
        self.empty.clear()
        self.copied = copied
        self.breaks.clear()
        self.feeds.clear()
        self.cuts.clear()
        self.severed.clear()
        self.branch = None
        self.kin, self.stream, self.twins, self.unsure, self.given = [], set(), set(), False, None
        self.checked, self.sided = 0, False
        for ids in self.own.values():
            ids.clear()
        self.entering = [] if inputs else None
        self.returned, self.held = set(), []
        self.alts.clear()
        self.last.clear()
        self.carrying.start()
        self.entry = None
        self.around.clear()
        self.sum, self.fed, self.goes_on = None, None, False
        self.recheck, self.dropped, self.touched = False, False, False
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
            for b in self.starts
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
        """The model returned `output`: siblings still in `kin` (the last layer's branches) are links
        of the chain where it is made from an add of their outputs (`_resolve`). Where block 0 and its
        siblings were the last calls (one layer), the residual add around them is read on the output,
        where the stream ends (its taps' sum dL/dx; through block 0's branch alone, 2.48 for 2.63)."""
        if not self.active:
            return
        if self.kin:
            self._resolve(tensors(output))
        if 2 not in self.twins or self.raw is None or self.sided:
            return
        out = blockcalls.first_tensor(output, scalars=False)
        if len(self.outputs) != self._after(1):
            self._ends_stream(out)
            return
        first, beside = self.outputs[1], self.outputs[2:]
        found = None if out is None else skip_around((out,), self.raw, first, False, beside)
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
        if self.active and self.kin:
            self._resolve([])
        if self.active and self.branch is not None:
            self._settle(None, None)
        if self.active and 2 in self.twins and self.calls[:1] == [-1] and not self._entry_read():
            self.dropped = True  # block 0's input gradient would be its branch's alone: no entry
        self.active = False
        self.given, self.stream = None, set()
        self.entry = None
        if self.raw is None:  # else kept for a recomputation in the backward, until `release`
            self._unhook()

    def release(self) -> None:
        """After the step's backward: block 0's input is no longer replaced, and the residual add's
        node hook is off (`_unhook_around`)."""
        self.raw = None
        self._unhook()
        self._unhook_around()

    def _unhook(self) -> None:
        if self.pre is not None:
            self.pre.remove()
            self.pre = None

    def _unhook_around(self) -> None:
        """Take the residual add's node hook (`skip_around`) off the pass's graph, which may outlive it."""
        for hook in self.around_hooks:
            hook.remove()
        self.around_hooks = []

    def take(self) -> list[torch.Tensor]:
        """The recorded outputs, dropping the recorder's references to them (and the entry, where it is
        not the chain's: `calls`, `breaks` and `entering` then count from block 0's first output)."""
        if self.dropped:
            self.dropped = False
            for held in (self.calls, self.outputs, self.versions):
                del held[0]
            if self.entering is not None:
                del self.entering[0]
            self.breaks = {b - 1 for b in self.breaks}
            self.cuts = {b - 1 for b in self.cuts}
            self.severed = {b - 1 for b in self.severed}
            self.feeds = {b - 1: frozenset(max(0, a - 1) for a in fed) for b, fed in self.feeds.items()}
            self.between = [(at - 1, x) for at, x in self.between]
            self.as_returned = [at - 1 for at in self.as_returned]
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
        self.between, self.as_returned = [], []
        for nodes in self.own.values():
            nodes.clear()
        self.alts.clear()
        self.last.clear()
        self.held = []
        if self.entering is not None:
            self.entering.clear()
        self.outputs.clear()  # CPython lets go of a list's items last first

    def take_carried(self) -> list[tuple[int, torch.Tensor]]:
        """What the blocks' calls carried beside their chains (Carrying.take); call after `take`."""
        return self.carrying.take(self.calls)

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
        self._unhook_around()
        self.around.clear()
        self.sum = self.fed = None
        for nodes in self.own.values():
            nodes.clear()
