"""One step of the probe: a forward with the block outputs recorded, one backward, and every norm
of the step brought to the host together.

All norms of a step are computed on the device in float32 (float64 for float64 tensors) and brought
to the host together: one host synchronisation per step, never one per tensor. A step where any of
them is non-finite is run again with every norm in float64 (`run_step(exact=True)`), so a finite
tensor whose float32 norm overflows is never reported as non-finite.
"""

from __future__ import annotations

import copy
import math
import random
import sys
import traceback
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import is_lazy
from torch.utils.checkpoint import CheckpointError

from stabilitycheck._tree import tensors as tensors_of
from stabilitycheck.errors import UsageError
from stabilitycheck.hooking import GRAPH_BREAK
from stabilitycheck.layout import scatter
from stabilitycheck.losses import Inputs, LossFn, call_model, differentiable_loss
from stabilitycheck.norms import STACK_MIN, dense, norm_values
from stabilitycheck.readings import Step, between_gain
from stabilitycheck.recording import Recorder
from stabilitycheck.rng import rng_state, set_rng_state


@dataclass
class Run:
    """What every step of one probe shares: the model and its data, optimiser, hooks and AMP."""

    model: nn.Module
    modules: tuple[nn.Module, ...]  # model.modules(), walked once
    inputs: Inputs
    loss_fn: LossFn
    names: tuple[str, ...]
    params: tuple[nn.Parameter, ...]
    rec: Recorder
    opt: torch.optim.Optimizer | None  # built only when an update or a GradScaler needs one
    autocast: torch.dtype | None
    scaler: torch.amp.GradScaler | None
    ordered: bool = True  # False: step 0 raises OutOfOrder where another block ran before block 0

    @property
    def device(self) -> torch.device:
        return self.params[0].device


def _backward(
    run: Run,
    loss: torch.Tensor,
    outputs: list[torch.Tensor],
    made: list[int] | None = None,
    taken: Sequence[torch.Tensor] = (),
) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
    """Backward from `loss`, setting every parameter's .grad (None where none reached it) and
    returning dL/d(output) of each recorded output (None where the loss does not depend on it), and
    dL/d of each tensor `taken` (what later blocks took, computed from the output before them); the
    entry's (outputs[0], block 0's copy of its input) plus what a residual add written around block 0
    hands its input (junctions.skip_around), which the copy does not see, or, where the add takes what
    the input was made from (x + block(norm(x))), the gradient of that instead. All from one
    torch.autograd.grad pass (measured cheaper than backward() with tensor hooks or retain_grad on
    many-call blocks, and no dearer on dense ones; see ci/bench.py). It runs no hook on the
    parameters' accumulation (an optimizer stepped inside the backward, DDP's reducer) and leaves the
    graph behind a caller's tensor as it was: backward(inputs=...) did both, for no saving
    measurable on the bench's models. `made`, where given, gets the parameters' indices in the order
    the backward made their gradients (hooks on them for this pass alone: an exact re-run's)."""
    wanted = [i for i, out in enumerate(outputs) if out.requires_grad]
    run.rec.backward_starts()
    hooks = (
        [p.register_hook(lambda _, i=i: made.append(i)) for i, p in enumerate(run.params)]  # type: ignore[no-untyped-call]
        if made is not None
        else []
    )
    fed = [run.rec.fed] if run.rec.fed is not None else []  # asked for, its gradient unread: see Recorder
    try:
        asked = [outputs[i] for i in wanted] + list(run.params) + fed + list(taken)
        grads: list[torch.Tensor | None] = list(torch.autograd.grad(loss, asked, allow_unused=True))
        crossed = grads[len(grads) - len(taken) :] if taken else []
        del grads[len(grads) - len(fed) - len(taken) :]
    except CheckpointError as exc:  # a recomputation that differs from its forward: torch's several lines
        raise UsageError(
            f"{str(exc).splitlines()[0]} The probe gives block 0 a copy of its input that requires "
            "grad; declare blocks (blocks=... or stability_blocks()) outside the checkpointed function, "
            "or probe without checkpointing"
        ) from None
    except RuntimeError as exc:
        if "use_reentrant=True" not in str(exc):
            raise
        raise UsageError(
            "the model runs torch.utils.checkpoint with use_reentrant=True, which torch does not allow "
            "with torch.autograd.grad (the probe's backward), and whose blocks run under no_grad, "
            "unmeasurable; pass use_reentrant=False (Hugging Face: model.gradient_checkpointing_enable("
            "gradient_checkpointing_kwargs={'use_reentrant': False})) or probe without checkpointing"
        ) from None
    finally:
        for hook in hooks:
            hook.remove()
    through, instead = run.rec.through()
    if through is not None and wanted[:1] == [0] and through.shape == outputs[0].shape:
        grads[0] = through if grads[0] is None or instead else grads[0] + through
    for p, g in zip(run.params, grads[len(wanted) :], strict=True):
        p.grad = g
    captured: list[torch.Tensor | None] = [None] * len(outputs)
    scaled = run.scaler is not None  # it unscales each .grad in place: a gradient that is one is kept apart
    held = {
        g.data_ptr() for g in grads[len(wanted) :] if scaled and g is not None and g.layout == torch.strided
    }
    for i, g in zip(wanted, grads, strict=False):
        # a parameter's own (a block returning it, a learned query into block 0, or block 0's copy of
        # it, whose gradient autograd hands on as it is) is in its .grad: unscaled twice
        if (
            scaled
            and g is not None
            and (outputs[i].is_leaf or (g.layout == torch.strided and g.data_ptr() in held))
        ):
            g = g.clone()
        captured[i] = g
    return captured, crossed


def _refused_graph_break(exc: Exception) -> bool:
    """Whether `exc` is torch.compile refusing (fullgraph=True) the graph break of a block's hooks;
    torch._dynamo is loaded by then, and is not imported here (seconds of import time)."""
    dynamo = sys.modules.get("torch._dynamo")
    return dynamo is not None and isinstance(exc, dynamo.exc.Unsupported) and GRAPH_BREAK in str(exc)


def _forward(
    run: Run,
    *,
    hooks: bool,
    exact: bool,
    copied: frozenset[int] = frozenset(),
    entry: bool = True,
    plain: bool = False,
) -> torch.Tensor:
    """The loss of one forward pass, the block outputs recorded when `hooks` (`copied`, `entry`: see
    Recorder.start); the inputs as given where `plain` or not `entry`, else `_in_graph`'s copies."""
    if hooks:  # an exact re-run tells a NaN made between blocks from one made in one
        run.rec.start(inputs=exact, copied=copied, entry=entry)
    given = _in_graph(run.inputs) if hooks and entry and not plain else run.inputs
    try:
        with torch.autocast(run.device.type, dtype=run.autocast, enabled=run.autocast is not None):
            out = call_model(run.model, given)
            if hooks:
                run.rec.ended(out)
            return differentiable_loss(run.loss_fn(out, _left(run.inputs, given)))
    except Exception as exc:
        if not _refused_graph_break(exc):
            raise
        raise UsageError(
            "the model is compiled with fullgraph=True, which refuses the graph break each block's "
            "hooks need; probe the model before compiling it (the numbers are the same), or compile "
            "it without fullgraph=True"
        ) from None
    finally:
        run.rec.stop()


def _in_graph(inputs: Inputs) -> Inputs:
    """The model's inputs with each floating tensor that does not require grad (given as it is, or
    in tuples, lists and dicts, at any depth) replaced by a copy in a graph of its own, so autograd
    records its every use: a skip written around block 0 (x + 0.1 * tanh(block(x))) shows in the
    graph, as behind a stem (junctions.skips). A copy, not a leaf: the model may change it in place.
    No gradient of it is asked for, so none is computed. Other containers (a namedtuple such as a
    PackedSequence, whose class checks its fields) are passed as they are."""
    if not torch.is_grad_enabled():
        return inputs
    if isinstance(inputs, torch.Tensor):
        floating = inputs.is_floating_point() and not inputs.requires_grad
        return inputs.detach().requires_grad_().clone() if floating else inputs
    if isinstance(inputs, dict):
        return _refilled(inputs, {k: _in_graph(v) for k, v in inputs.items()})
    if type(inputs) in (tuple, list):
        return type(inputs)(_in_graph(v) for v in inputs)
    return inputs


def _refilled(given: dict[Any, Any], values: dict[Any, Any]) -> dict[Any, Any]:
    """A shallow copy of the dict `given`, of its own class (an attribute dict, an OrderedDict: a
    plain dict lost a loss's `batch.y`), holding `values`."""
    out = copy.copy(given)
    out.update(values)
    return out


def _left(inputs: Inputs, given: Inputs) -> Inputs:
    """The `inputs` with each of `_in_graph`'s copies in `given` as the forward left it, out of the
    graph: what the loss is given, as a plain step gives it the inputs the model may have changed in
    place (x.sub_(mean).div_(std): the loss read them as they came, 4010 where torch's is 119)."""
    if given is inputs:
        return inputs
    if isinstance(given, torch.Tensor):
        return given.detach()  # a copy: the original does not require grad
    if isinstance(given, dict):
        return _refilled(inputs, {k: _left(v, given[k]) for k, v in inputs.items()})
    return type(inputs)(_left(v, g) for v, g in zip(inputs, given, strict=True))


LEAF_ONLY = "requires_grad flags of leaf variables"  # torch's refusal to set requires_grad on a non-leaf

_Buffer = tuple[dict[str, Any], str, torch.Tensor, torch.Tensor]


def _buffers(modules: Sequence[nn.Module]) -> list[_Buffer]:
    """Each buffer of the model's `modules` as (its module's buffers, name, tensor, copy): what a forward may
    update (BatchNorm's running statistics, spectral_norm's power-iteration vectors), for `_restore`
    (an inference tensor, which no forward outside inference mode can update, is left out, as is a
    lazy module's buffer before its first forward, which has no values to copy, and an expanded one,
    whose elements share memory: no in-place write, the forward's or a copy back, can go into it)."""
    kept = []
    with torch.no_grad():
        for module in modules:
            where = module._buffers
            for name, t in where.items():
                if t is not None and not is_lazy(t) and not t.is_inference() and not _expanded(t):
                    kept.append((where, name, t, t.clone()))
    return kept


def _expanded(t: torch.Tensor) -> bool:
    """Whether elements of `t` share memory (a dimension of stride 0 over 2 or more: `expand`)."""
    if t.is_nested or t.layout != torch.strided:
        return False
    return any(n > 1 and step == 0 for n, step in zip(t.shape, t.stride(), strict=True))


def _restore(kept: Sequence[_Buffer]) -> None:
    """Put back every buffer as `_buffers` kept it, each one: BatchNorm updates its running statistics
    without moving their version counter, so which ones a forward changed is not knowable."""
    with torch.no_grad():
        for where, name, t, copy in kept:
            where[name] = t
            t.copy_(copy)


Start = tuple[dict[str, Any], tuple[Any, ...], list[_Buffer]]  # torch's random state, Python's, buffers


def start_of(modules: Sequence[nn.Module]) -> Start:
    """Where a step's forward starts, for a run again of the step to start there too: the random
    states it draws from (torch's: dropout masks; Python's `random`: a LayerDrop) and the buffers of
    the model's `modules` (`_buffers`). A re-run that locates a non-finite value started from the
    buffers the step's forward had updated: BatchNorm's statistics updated twice, spectral_norm's
    vectors iterated again (output norms 10% off those of the step that ran)."""
    return rng_state(), random.getstate(), _buffers(modules)


def back_to(start: Start) -> None:
    """Back to where `start_of` was taken: the random states and every buffer."""
    set_rng_state(start[0])
    random.setstate(start[1])
    _restore(start[2])


def run_step(run: Run, start: Start, *, hooks: bool, exact: bool = False, weights: bool = False) -> Step:
    """Forward and backward once, then every norm of the step in one fused call and one copy to the
    host: the loss, every weight gradient (unscaled under a GradScaler), and on request the block
    outputs, their gradients and the weights. `exact` computes every norm in float64 and runs
    without the GradScaler (a re-run that only locates a non-finite value). `start`: where the
    step's forward starts (`start_of`), for its runs again."""
    scaler = None if exact else run.scaler

    def rewind() -> None:
        """Back to where the step's forward started, to run it again: nothing recorded, the same
        random draws (torch's and Python's: a LayerDrop drawing with `random` read another draw's
        loss and profile), the buffers as they were."""
        run.rec.let_go()
        back_to(start)

    plain = False  # the inputs as given, not `_in_graph`'s copies
    try:
        loss = _forward(run, hooks=hooks, exact=exact)
    except RuntimeError as exc:
        if not (hooks and LEAF_ONLY in str(exc)):
            raise
        # the model sets requires_grad on (a view of) its input, which torch allows on a leaf alone
        # (Hugging Face's wav2vec2 feature encoder, in training): the forward again on the inputs as
        # given, whose uses autograd then does not record (a skip around block 0 is read as a plain
        # input's, junctions.skip_around)
        rewind()
        plain = True
        loss = _forward(run, hooks=True, exact=exact, plain=True)
    if hooks and run.rec.quiet_found():  # blocks also run without grad: again, recording them with it
        del loss
        rewind()
        run.rec = run.rec.renewed()
        loss = _forward(run, hooks=True, exact=exact, plain=plain)
    order = list(dict.fromkeys(b for b in run.rec.calls if b >= 0)) if hooks and not run.ordered else []
    run.ordered = True  # step 0's first forward alone: later ones run on weights an update changed
    if order and order[0] > 0 and order != sorted(order):  # another block ran before block 0
        del loss  # before the outputs `rewind` lets go of: see the end
        rewind()  # the forward updated BatchNorm's statistics: the probe again starts as this did
        raise OutOfOrder(_in_call_order(order, len(run.names)))
    changed = run.rec.changed() if hooks else frozenset()
    moved = hooks and run.rec.entry_moved()
    if changed or moved or (hooks and run.rec.carrying.discovered):
        # the model changed a block's output in place after the block returned (an in-place ReLU after
        # it): the recorded tensor holds the changed values, and its gradient is theirs (x3 off under
        # mul_(3)). The forward again, with the same random draws, recording a copy of each that the
        # model computes from and never changes (blockcalls.kept), from the buffers it started from
        # (spectral_norm's vectors iterated twice moved step 0's gradients and every later step); where
        # it changed block 0's copy of its input, without that copy (no `(input)`: positions shift);
        # or where a block's carried state became known after its first call (carrying.Carrying.found)
        shift = int(moved and run.rec.calls[:1] == [-1])
        del loss
        rewind()
        copied = frozenset(p - shift for p in changed if p >= shift)
        loss = _forward(run, hooks=True, exact=exact, copied=copied, entry=not moved, plain=plain)
    outputs = run.rec.take() if hooks else []
    carried = run.rec.take_carried() if hooks else []  # state beside the chain's: an LSTMCell's c
    outputs += [t for _, t in carried]
    taken, as_returned = run.rec.take_between() if hooks else ([], [])
    scaled_loss = loss
    try:
        made: list[int] | None = [] if exact else None  # the order of the weight gradients, to locate
        scaled_loss = scaler.scale(loss) if scaler else loss
        captured, crossed = _backward(run, scaled_loss, outputs, made, [x for _, x in taken])
    except BaseException as exc:  # the model's backward raised: let go of the graph as at the end
        traceback.clear_frames(exc.__traceback__)  # the frames it passed through held the loss
        del loss, scaled_loss
        run.rec.let_go()  # its node sets, while `outputs` still holds the graph
        taken.clear()
        carried.clear()
        outputs.clear()
        raise
    finally:
        run.rec.release()
        if hooks:
            run.rec.remove()  # steps after the first run with no hooks on the model
    if scaler:
        assert run.opt is not None  # built whenever there is a GradScaler
        scaler.unscale_(run.opt)
    with torch.no_grad():
        present = [i for i, p in enumerate(run.params) if p.grad is not None]
        reached = [i for i, g in enumerate(captured) if g is not None]
        tensors = [dense(g) for g in (run.params[i].grad for i in present) if g is not None]
        tensors += [dense(o) for o in outputs]  # a block may return a sparse tensor
        tensors += [dense(g) for g in captured if g is not None]  # sparse where an output is read sparsely
        tensors += run.params if weights else ()
        entering = run.rec.take_entering() if hooks else []
        tensors += [x for x in entering if x is not None]
        across = [at for (at, _), d in zip(taken, crossed, strict=True) if d is not None]
        tensors += [dense(d) for d in crossed if d is not None]
        g, n, r = len(present), len(outputs), len(reached)
        extra = [scaler.scale(torch.ones((), device=run.device))] if scaler else []
        owners = [*run.rec.calls, *(-2 - run.rec.calls[pos] for pos, _ in carried)]  # see _groups
        groups = _groups(owners, g, reached) if hooks else []
        host = norm_values(tensors, exact, [loss.detach().reshape(()), *extra], groups)  # one host read
    # the loss first, then the lists, each of which lets its tensors go last first (CPython's order):
    # the graph goes a call's part at a time. Let go of last, the loss took every node with it at
    # once, in a C recursion through their Python wrappers (the junction checks read each output's
    # grad_fn): a segmentation fault past ~25,000 block calls
    del loss, scaled_loss
    del captured, crossed, tensors, taken
    del outputs  # last: every other list held a part of the graph they hold too
    loss_value, scale_value = host[0], host[1] if scaler else 1.0
    host = host[1 + len(extra) :]
    crossing = [v / scale_value for v in host[len(host) - len(across) :]] if across else []
    host = host[: len(host) - len(across)]
    into = [i for i, x in enumerate(entering) if x is not None]
    inputs = scatter(host[len(host) - len(into) :], into, len(entering)) if into else [0.0] * len(entering)
    host = host[: len(host) - len(into)]
    if scaler:  # output gradients of the scaled loss, unscaled
        host[g + n : g + n + r] = [b / scale_value for b in host[g + n : g + n + r]]
    forward, backward = host[g : g + n], scatter(host[g + n : g + n + r], reached, n)
    calls = n - len(carried)
    own = host  # the norms a non-finite value counts in: not a carried tensor's (see _together)
    if carried:
        aside = set(range(g + calls, g + n)) | {g + n + j for j, pos in enumerate(reached) if pos >= calls}
        own = [v for i, v in enumerate(host) if i not in aside]
        forward, backward, reached = _together(carried, calls, forward, backward, reached)
    breaks = frozenset(run.rec.breaks) if hooks else frozenset()
    return Step(
        loss=loss_value,
        scale=scale_value,
        grads=scatter(host[:g], present, len(run.params)),
        weights=host[g + n + r :],
        calls=run.rec.call_names(run.names) if hooks else (),
        breaks=breaks,
        severed=frozenset(run.rec.severed) if hooks else frozenset(),
        cuts=frozenset(run.rec.cuts) if hooks else frozenset(),
        between=between_gain(backward, list(zip(across, crossing, strict=True)), as_returned, breaks),
        feeds=dict(run.rec.feeds) if hooks else {},
        unreached=frozenset(range(calls)) - frozenset(reached),
        forward=forward,
        backward=backward,
        entering=inputs,
        given_finite=not (hooks and exact)
        or all(bool(x.isfinite().all()) for x in tensors_of(run.inputs) if x.is_floating_point()),
        finite=math.isfinite(loss_value) and all(map(math.isfinite, own)),
        made=tuple(made or ()),
        carried=frozenset(pos for pos, _ in carried),
        ran=frozenset(b for b in run.rec.calls if b >= 0) if hooks else frozenset(),
    )


def _together(
    carried: Sequence[tuple[int, torch.Tensor]],
    calls: int,
    forward: list[float],
    backward: list[float],
    reached: Sequence[int],
) -> tuple[list[float], list[float], list[int]]:
    """The norms of the first `calls` recorded outputs with each one's carried tensors (positions
    `calls` on, in `carried`'s order) taken together: the L2 norm of the whole state (h and c), and
    of its gradient; a call is reached where any of its tensors' gradients is. A carried norm that is
    not finite is left out, and counts as no non-finite value of the step (`run_step`): a tensor
    passed on from call to call may hold -inf on purpose (an additive mask of used slots), and a
    non-finite cell state that reaches the loss shows in h, the loss and the weight gradients (one
    that reaches nothing read a finite model as non-finite)."""
    forward, backward = forward[:], backward[:]
    got = set(reached)
    for k, (pos, _) in enumerate(carried):
        if math.isfinite(forward[calls + k]):
            forward[pos] = math.hypot(forward[pos], forward[calls + k])
        if math.isfinite(backward[calls + k]):
            backward[pos] = math.hypot(backward[pos], backward[calls + k])
        if calls + k in got:
            got.add(pos)
    return forward[:calls], backward[:calls], sorted(i for i in got if i < calls)


def _groups(calls: Sequence[int], g: int, reached: Sequence[int]) -> list[list[int]]:
    """Per block called STACK_MIN or more times in a step (a recurrent cell, once per token): the
    positions of its outputs, then of their gradients, in `run_step`'s norm list (g weight
    gradients, the outputs, the gradients of the `reached` outputs), to be normed as stacks. `calls`
    holds each output's block (-1: the entry), -2 - b for a tensor a call of block b carries beside
    its chain's (`_together`), a stack of their own."""
    many = {b for b, count in Counter(calls).items() if count >= STACK_MIN}
    if not many:
        return []
    outputs: dict[int, list[int]] = {b: [] for b in many}
    grads: dict[int, list[int]] = {b: [] for b in many}
    for pos, b in enumerate(calls):
        if b in many:
            outputs[b].append(g + pos)
    for j, pos in enumerate(reached):
        if calls[pos] in many:
            grads[calls[pos]].append(g + len(calls) + j)
    return [*outputs.values(), *grads.values()]


def _in_call_order(order: list[int], n: int) -> list[int]:
    """The n blocks in the order of their first calls (`order`), those never called after them (a
    never-called block 0 first kept the entry's hook on a block that never runs)."""
    return order + [b for b in range(n) if b not in order]


class OutOfOrder(Exception):
    """Step 0's first forward called the blocks out of the order given, another one before block 0 (a
    stack run in reverse, blocks declared output side first): block 0's input hook saw no entry, and
    the first block's gain went unread (growth 2.31 for torch's 127 on a pre-norm stack run
    backwards). `order`: the blocks in the order of their first calls, to probe again in. Raised
    before any update (a LayerDrop draw at a later step changes nothing)."""

    def __init__(self, order: list[int]) -> None:
        super().__init__("blocks called out of order")
        self.order = order
