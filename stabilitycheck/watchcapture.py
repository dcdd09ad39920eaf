"""What the watcher measures in a step, reduced to one row of squared norms on the device: block
outputs and their gradients (hooks), the parameters' gradients and, when asked, their weights.

A block call keeps its output, and a pre-hook on the autograd node that made it keeps dL/d(output)
when the backward pass reaches that node (no tensor hook, whose Python setup costs more than the
norm). A capture larger than EAGER_NUMEL elements is normed at once, while it is still in cache;
smaller ones are kept and normed together when the step closes, with the weight gradients in one
fused call, or stacked per block when a block made STACK_MIN or more of them (a recurrent cell
called 256 times costs two kernels, not 512), or sooner once PENDING_CAP elements are kept (the
memory held stays bounded). A kept output modified in place before its norm is taken is caught by
its version counter; the watcher then warns and norms every output at once from then on. Under
torch.compile the hooks run outside the graph (hooking.outside_graph: a graph break at each watched
block), on the real outputs: traced, they read a version counter that the compiled graph's outputs do
not keep, and a host read in the norm broke the graph anyway. Every
norm of a finite tensor is finite, above 1.8e19 and below 1e-19 too, and within 5e-5 of the float64
norm (norms.fused_norms).
"""

from __future__ import annotations

import functools
import math
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from stabilitycheck import distributed
from stabilitycheck._tree import tensors
from stabilitycheck.blockcalls import first_tensor
from stabilitycheck.hooking import callers_level, hooked, outside_graph
from stabilitycheck.norms import (
    STACK_MIN,
    STACK_NUMEL,
    accumulated,
    clean,
    dense,
    fused_norms,
    narrow,
    norm,
    refine,
)

PENDING_CAP = 1 << 22  # elements kept for lazy norms (16 MiB in float32) before they are normed
# a capture larger than this (128 KiB in float32) is normed at once, while it is in cache: on the
# 16x256 MLPs, 64K-element captures kept to the step's end cost ~6% more, 16K-element ones ~4% less
EAGER_NUMEL = 1 << 15

GradHook = Callable[[Any], None]


class Capture:
    """Hooks on the blocks and the per-step row of squared norms (slots as distributed.Layout).
    `param_slots` and `param_scale` give, for each parameter's gradient then weight, its slot and
    the factor its square is multiplied by (1 / the ranks holding the same values)."""

    def __init__(
        self,
        blocks: Sequence[tuple[str, nn.Module]],
        params: Sequence[nn.Parameter],
        width: int,
        param_slots: Sequence[int],
        param_scale: Sequence[float],
        check: Callable[[], None],
    ) -> None:
        self.blocks, self.params, self.width = blocks, list(params), width
        self.check = check  # raises a SIGTERM held while the watcher's code ran (alarms.Termination)
        self.param_slots, self.param_scale = list(param_slots), list(param_scale)
        self.sharded = any(distributed.is_dtensor(p) for p in self.params)
        self.eager = False  # set once a kept output was modified in place before its norm
        self.seen = False  # set once a block's forward hook ran (see Watcher.close)
        self.measured = False  # set once a block's forward hook ran with gradients on (Watcher.close)
        self.called = False  # set once the watched model was called with gradients on
        self.backward = False  # set once a backward reached a block output (Watcher._no_step)
        self.fed = 0  # gradients that reached block outputs so far: a count that moves with each backward
        # blocks a call of which took no tensor the block call before it returned, only what the
        # model's code made of it (x * 50, a NaN, a residual add between blocks): a value flagged in
        # such a block's output may have been made there (watchlog.Finding.after)
        self.glued: set[int] = set()
        # this step's blocks in the order of their first calls, gradients on or off (frozen first
        # layers run under no_grad), until `ordered` (the watcher merges them: watchlog.merged_calls)
        self.step_calls: list[int] = []
        self.step_seen: set[int] = set()
        self.ordered = False
        self._prev: weakref.ref[torch.Tensor] | None = None  # the last block output of this pass
        n = len(blocks)
        self._pending: dict[int, list[torch.Tensor]] = {slot: [] for slot in range(1, 1 + 2 * n)}
        self._versions: list[tuple[torch.Tensor, int]] = []
        self._now: list[torch.Tensor] = []  # norms of large output gradients, taken at once
        self._now_slots: list[int] = []
        self._fwd_now: list[torch.Tensor] = []  # norms of large block outputs, taken at once
        self._fwd_now_slots: list[int] = []
        self._fwd_now_numel: list[int] = []
        # elements captured this step per slot, and per slot those of the first step that captured
        # it: the reference its output and gradient norms are read at (see `_at_reference`)
        self._counts: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.fewer = False  # the step just closed captured fewer elements than a reference somewhere
        # per call of the watched model this step (a pass): where its forward captures start, whether
        # it hooked an output gradient and whether one arrived; passes before `_settled` are normed
        self._passes: list[list[int] | None] = []  # None: every mark 0 (nothing kept yet this step)
        self._hooked: list[bool] = []
        self._fed: list[bool] = []
        self._settled = 0
        self._held = 0
        self._norms: list[torch.Tensor] = []  # 0-d norms, float32 or wider
        self._norm_slots: list[int] = []  # the slot of each norm
        self._index: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._groups: list[tuple[tuple[int, ...], list[torch.Tensor]]] = []
        self._grad_codes = [-2 - i for i in range(len(self.params))]  # when every parameter has one
        self.device = self.params[0].device
        self._no_loss = torch.zeros((), device=self.device)  # the loss of a step without one
        self._out_slot = [1 + b for b in range(n)]
        self._grad_slot = [1 + n + b for b in range(n)]

    def attach(self, model: nn.Module) -> list[Any]:
        """Register the forward hooks on the blocks and the pass hook on `model`; returns the handles."""
        hooks = [
            (name, m, functools.partial(m.register_forward_hook, self._forward_hook(b)))
            for b, (name, m) in enumerate(self.blocks)
        ]
        model_hooks = [
            ("(model)", model, functools.partial(model.register_forward_pre_hook, self._pass_hook())),
            ("(model)", model, functools.partial(model.register_forward_hook, self._pass_output())),
        ]
        return hooked([*hooks, *model_hooks])

    def _pass_hook(self) -> Callable[[nn.Module, Any], None]:
        """A pre-hook on the watched model: each call starts a pass (see `_drop_unfed`)."""

        def on_call(module: nn.Module, args: Any) -> None:
            if torch.is_grad_enabled():
                self.called = True
                self._prev = None
                self._passes.append(self._marks() if self._held or self._fwd_now else None)
                self._hooked.append(False)
                self._fed.append(False)

        return outside_graph(on_call)

    def _pass_output(self) -> Callable[[nn.Module, Any, Any], None]:
        """A forward hook on the watched model: a gradient reaching any of its outputs also tells a
        backpropagated pass, for passes in which no block output wants one (every block frozen, heads
        trained): a validation pass with gradients on was counted there. Every output is hooked: a
        loss on one head of two leaves the other without a gradient."""

        def on_output(module: nn.Module, args: Any, output: Any) -> None:
            k = len(self._passes) - 1
            if k < 0 or not torch.is_grad_enabled():
                return

            for out in tensors(output):
                if out.grad_fn is not None:
                    self._hooked[k] = True
                    out.grad_fn.register_prehook(lambda grads: self._feed(k))

        return outside_graph(on_output)

    def _feed(self, k: int) -> None:
        """A gradient reached an output of pass k (-1: no pass) this step: it was backpropagated."""
        if 0 <= k < len(self._fed):
            self._fed[k] = True

    def _drop_unfed(self) -> None:
        """Forget the block outputs of every pass this step that hooked output gradients of which none
        arrived: a forward that no backward went through (a validation pass run with gradients on) is
        not part of the step. Passes backpropagated together (a contrastive loss) each got theirs."""
        if all(self._fed[self._settled :]):  # every pass got its gradients, as in most steps
            self._clear_passes()
            return
        ends = self._marks()
        for k in reversed(range(self._settled, len(self._passes))):
            starts = self._passes[k] or [0] * len(ends)
            if self._hooked[k] and not self._fed[k]:
                for slot, a, b in zip(self._out_slot, starts, ends, strict=False):
                    self._counts[slot] -= sum(t.numel() for t in self._pending[slot][a:b])
                    del self._pending[slot][a:b]
                for slot, numel in zip(
                    self._fwd_now_slots[starts[-1] : ends[-1]],
                    self._fwd_now_numel[starts[-1] : ends[-1]],
                    strict=True,
                ):
                    self._counts[slot] -= numel
                del self._fwd_now[starts[-1] : ends[-1]], self._fwd_now_slots[starts[-1] : ends[-1]]
                del self._fwd_now_numel[starts[-1] : ends[-1]]
            ends = starts
        self._clear_passes()

    def _marks(self) -> list[int]:
        """Where the next forward captures go: the length of each block's kept outputs, then of the
        outputs normed at once."""
        return [len(self._pending[s]) for s in self._out_slot] + [len(self._fwd_now)]

    def _clear_passes(self) -> None:
        self._passes.clear()
        self._hooked.clear()
        self._fed.clear()
        self._settled = 0

    def _forward_hook(self, b: int) -> Callable[[nn.Module, Any, Any], None]:
        slot = self._out_slot[b]
        outputs = self._pending[slot]  # cleared in place, never rebound
        grad_hooks: dict[tuple[int, int], GradHook] = {}  # by (output index, pass): see _grad_hook

        def on_forward(module: nn.Module, args: Any, output: Any) -> None:
            try:
                keep(args, output)
            finally:  # a SIGTERM that landed in the hook stops an evaluation too (no step closes there)
                self.check()

        def keep(args: Any, output: Any) -> None:
            self.seen = True
            self.measured = self.measured or torch.is_grad_enabled()
            if not self.ordered and b not in self.step_seen:
                self.step_seen.add(b)
                self.step_calls.append(b)
            out = first_tensor(output, scalars=False)
            if out is None or not torch.is_grad_enabled():
                return
            if b > 0 and args and self._prev is not None:  # called by keyword alone: not known, not said
                prev = self._prev()  # None: freed, so no argument is it (x = block(x); x = x * 50)
                if prev is None or not any(a is prev for a in args):
                    self.glued.add(b)
            self._prev = weakref.ref(out)
            kept = out.detach()
            numel = kept.numel()
            self._counts[slot] = self._counts.get(slot, 0) + numel
            if self.eager or numel > EAGER_NUMEL:
                self._fwd_now.append(norm(kept))
                self._fwd_now_slots.append(slot)
                self._fwd_now_numel.append(numel)
            else:
                self._versions.append((kept, kept._version))
                self._keep(kept, outputs, numel)
            if out.requires_grad:
                k = len(self._passes) - 1  # -1: no pass (the model itself was not called)
                if k >= 0:
                    self._hooked[k] = True
                node = out.grad_fn
                index = 0 if node is None else out.output_nr
                hook = grad_hooks.get((index, k))
                if hook is None:
                    hook = grad_hooks[index, k] = self._grad_hook(b, index, k)
                if node is None:  # a leaf: only a tensor hook sees its gradient
                    out.register_hook(hook)  # type: ignore[no-untyped-call]
                else:
                    node.register_prehook(hook)

        return outside_graph(on_forward)

    def _grad_hook(self, b: int, index: int, k: int) -> GradHook:
        """The hook keeping the gradient of output `index` of a node as block b's, output of pass k
        (built once per block, index and pass by the block's forward hook)."""
        slot = self._grad_slot[b]
        kept = self._pending[slot]

        def on_grad(grads: Any) -> None:
            grad = grads[index] if isinstance(grads, tuple) else grads
            if grad is None:
                return
            self.backward = True
            self.fed += 1
            self._feed(k)
            numel = grad.numel()
            self._counts[slot] = self._counts.get(slot, 0) + numel
            if numel > EAGER_NUMEL:
                self._norm_now(grad, slot)
            else:
                self._keep(grad, kept, numel)

        return on_grad

    def _norm_now(self, tensor: torch.Tensor, slot: int) -> None:
        self._now.append(norm(tensor))
        self._now_slots.append(slot)

    def _keep(self, tensor: torch.Tensor, into: list[torch.Tensor], numel: int) -> None:
        into.append(tensor)
        self._held += numel
        if self._held >= PENDING_CAP:
            self._reduce()

    def _reduce(self) -> None:
        """Norm what is kept in one fused call per dtype (PENDING_CAP reached); forget the tensors."""
        tensors, codes = self._taken((), ())
        if tensors:
            self._norms += fused_norms(tensors, False)
            self._norm_slots += codes

    def _taken(
        self, extra: Sequence[torch.Tensor], extra_slots: Sequence[int]
    ) -> tuple[list[torch.Tensor], list[int]]:
        """What is kept (stacked per block where it can be), then `extra`, with their slots, to be
        normed; forgotten here. A kept output modified in place since its block returned warns."""
        for output, version in self._versions:
            if output._version != version and not self.eager:
                warnings.warn(
                    "watch: a block's output was modified in place after the block returned; its norm "
                    "is that of the modified values this step, and output norms are taken eagerly "
                    "(at each block call, which costs more) from now on",
                    stacklevel=callers_level(),
                )
                self.eager = True
        for norms, slots in ((self._fwd_now, self._fwd_now_slots), (self._now, self._now_slots)):
            self._norms += norms
            self._norm_slots += slots
        self._now, self._now_slots, self._fwd_now, self._fwd_now_slots = [], [], [], []
        self._fwd_now_numel = []
        self._settled = len(self._passes)  # what was kept so far is normed: no pass of it is dropped
        tensors: list[torch.Tensor] = []
        codes: list[int] = []
        for slot, kept in self._pending.items():
            if not kept:
                continue
            if len(kept) >= STACK_MIN and kept[0].numel() <= STACK_NUMEL:
                stacked = _stack(kept)
                if stacked is not None:  # one norm over all calls: the block's norm this step
                    tensors.append(stacked)
                    codes.append(slot)
                    kept.clear()
                    continue
            tensors += kept
            codes += [slot] * len(kept)
            kept.clear()
        self._versions, self._held = [], 0
        return tensors + list(extra), codes + list(extra_slots)

    def close_step(self, row: torch.Tensor | None, loss: torch.Tensor | None) -> None:
        """Norm this step's captures and gradients and keep them (one stacked tensor) until `settle`;
        the weight norms, when `row` (this step's zeroed row) is given, are added into it at once."""
        with torch.no_grad():
            got = [p.grad for p in self.params]
            grads = [
                dense(g) for g in got if g is not None
            ]  # a sparse one (nn.Embedding(sparse=True)): its values
            codes = self._grad_codes
            if len(grads) < len(got):
                codes = [c for c, g in zip(codes, got, strict=True) if g is not None]
            if self.sharded:
                grads = [distributed.local(g)[0] for g in grads]
            self._drop_unfed()
            tensors, codes = self._taken(grads, codes)
            largest = max(tensors, key=torch.Tensor.numel, default=self._no_loss)
            norms = accumulated(tensors, False)
            head = [self._no_loss if loss is None else loss, *self._norms]  # these are exact already
            key = (*self._norm_slots, *codes)
            self._norms, self._norm_slots = [], []
            # one op: the loss then the norms, in the widest of their dtypes
            values = torch.stack([*head, *norms])
            if narrow(tensors, norms) and not clean(values.tolist()[len(head) :], largest.numel()):
                values = torch.stack([*head, *refine(tensors, norms)])
            values = self._at_reference(values, key)
            if not self._groups or self._groups[-1][0] != key:
                self._groups.append((key, []))
            self._groups[-1][1].append(values)
            if row is not None:
                n = len(self.params)
                weights = [distributed.local(p)[0] for p in self.params] if self.sharded else self.params
                index, factors = self._lookup(tuple(range(-2 - n, -2 - 2 * n, -1)))
                squares = torch.stack(fused_norms(list(weights), False)).double().square()
                row.index_add_(0, index, squares if factors is None else squares * factors)

    def _at_reference(self, values: torch.Tensor, key: Sequence[int]) -> torch.Tensor:
        """This step's norms (the loss first, then one per code of `key`) read at each block's
        reference element count, its first step's: a block output's norm times sqrt(reference / now),
        its gradient's times sqrt(now / reference). A norm over the whole batch grows as the square
        root of the batch size (or token count) and, under a mean loss, its gradient's shrinks as much:
        an epoch's short last batch, or a batch-size ramp, read as a spike (x2 at 32 -> 128, past the
        rule's floor). Read at the reference, a mean loss's norms do not move with the batch, a sum's
        gradients still do.
        A step of the reference sizes, nearly every one, costs one dict comparison."""
        counts, self._counts = self._counts, {}
        self.fewer = False
        if counts == self.sizes:
            return values
        factors: dict[int, float] = {}
        grads = set(self._grad_slot)
        for slot, numel in counts.items():
            reference = self.sizes.setdefault(slot, numel)
            self.fewer |= numel < reference
            if numel != reference and numel > 0:
                ratio = numel / reference
                factors[slot] = math.sqrt(ratio if slot in grads else 1.0 / ratio)
        if not factors:
            return values
        entries = list(values.unbind())
        for i, code in enumerate(key, start=1):
            if code in factors:
                entries[i] = entries[i] * factors[code]
        return torch.stack(entries)

    def settle(self, rows: torch.Tensor) -> None:
        """Write the closed steps into `rows` (one row each, in order, zeroed but for weight norms):
        the loss in slot 0, squared norms added into their slots; a few ops per run of steps whose
        captures came in the same order (per flush, usually)."""
        start = 0
        with torch.no_grad():
            for key, steps in self._groups:
                values = torch.stack(steps).double()
                out = rows[start : start + len(steps)]
                out.select(1, 0).copy_(values.select(1, 0))
                index, factors = self._lookup(key)
                squares = values[:, 1:].square()
                out.index_add_(1, index, squares if factors is None else squares * factors)
                start += len(steps)
        self._groups = []

    def _lookup(self, key: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The slots and scale factors of a step's norms, built once per `key`: a code per norm, its
        slot for a block capture, -2 - i for parameter i's gradient (-2 - n - i for its weight)."""
        if key not in self._index:
            slots = [c if c >= 0 else self.param_slots[-2 - c] for c in key]
            scale = [1.0 if c >= 0 else self.param_scale[-2 - c] for c in key]
            factors = None if all(f == 1.0 for f in scale) else torch.tensor(scale, dtype=torch.float64)
            self._index[key] = (
                torch.tensor(slots, dtype=torch.long, device=self.device),  # long when empty too
                None if factors is None else factors.to(self.device),
            )
        return self._index[key]


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The tensors stacked, or None when their shapes differ."""
    try:
        return torch.stack(tensors)
    except RuntimeError:
        return None
