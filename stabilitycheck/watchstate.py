"""The replay bundle of `watch`: the state before the first flagged step, kept on the device
without a host sync, then written with that step's micro-batches and RNG state once a flush names it.

A bundle is a directory: meta.json (step, block names, the norms measured, import roots) and
data.pt (the model, its parameters and buffers before the step, every micro-batch of the step with
the loss passed for it to `w.loss`, the RNG states, each module's training mode at the micro-batch's
forward (a frozen BatchNorm kept in eval), the GradScaler's loss scale, and the compute_loss function,
which must be
importable: defined in a module, not in a script run as __main__). `stabilitycheck replay DIR`
re-runs the step from it (stabilitycheck.replay).
"""

from __future__ import annotations

import hashlib
import inspect
import os
import pickle
import sys
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stabilitycheck._json import strict_json
from stabilitycheck._tree import tensors
from stabilitycheck._validation import describe
from stabilitycheck.errors import UsageError
from stabilitycheck.rng import rng_state

PAIRED = 512  # autograd nodes searched from a loss for the model call it came from
FORMAT = "stabilitycheck-watch-bundle/5"  # 2: micro-batches, losses; 3: RNG; 4: modes, scale, autocast;
# 5: the gradient clipping
OLDER = ("stabilitycheck-watch-bundle/3", "stabilitycheck-watch-bundle/4")  # replayed as written then
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def check_loadable(compute_loss: Any) -> str | None:
    """Why `stabilitycheck replay` could not load `compute_loss` (or a class) by name (a lambda, a
    local function, one defined in the script run as __main__), or None when it can."""
    name = getattr(compute_loss, "__name__", compute_loss)
    if getattr(compute_loss, "__module__", None) == "__main__":
        return f"{name!r} is defined in the script run as __main__"
    try:
        pickle.dumps(compute_loss)
    except Exception as exc:
        return f"{name!r} cannot be pickled by name ({describe(exc)})"
    return None


def check_replayable(model: nn.Module, compute_loss: Any) -> None:
    """Refuse, when watch() starts, a bundle `stabilitycheck replay` could not load: compute_loss or a
    class of the model's modules (torch.save pickles them by name) not loadable (`check_loadable`)."""
    if not callable(compute_loss):
        raise UsageError(
            f"watch: compute_loss must be a function fn(model, batch) -> loss, got {compute_loss!r}; pass "
            "the function itself (a module-level one), not its name"
        )
    why = check_loadable(compute_loss)
    if why is not None:
        raise UsageError(
            f"watch: compute_loss cannot be replayed: {why}; define it at the top level of a module "
            "you import (e.g. losses.py), so `stabilitycheck replay` can load it by name"
        )
    for cls in dict.fromkeys(type(module) for module in model.modules()):
        why = check_loadable(cls)
        if why is not None:
            raise UsageError(
                f"watch: the model cannot be replayed: its class {why}; define the model's classes in a "
                "module you import (e.g. model.py), so `stabilitycheck replay` can load the bundle"
            )


def sources(model: nn.Module, compute_loss: Any) -> dict[str, str]:
    """A digest of the source of compute_loss and of each class of the model's modules defined
    outside torch, by qualified name: replay says which changed since the bundle was written (an
    edited forward read as a step that does not reproduce). Code whose source
    cannot be read (built in, or its file gone) is left out."""
    found: dict[str, str] = {}
    for obj in (compute_loss, *dict.fromkeys(type(m) for m in model.modules())):
        module = getattr(obj, "__module__", "") or ""
        if module.split(".")[0] == "torch":
            continue
        try:
            text = inspect.getsource(obj)
        except (OSError, TypeError, SyntaxError):  # a file being edited does not parse: no digest, and
            continue  # the bundle is still written
        found[f"{module}.{getattr(obj, '__qualname__', obj)}"] = hashlib.sha256(text.encode()).hexdigest()
    return found


def import_root(obj: Any) -> str | None:
    """The sys.path entry from which the module defining `obj` imports (None for __main__ or builtins)."""
    module = sys.modules.get(getattr(obj, "__module__", "") or "")
    file = getattr(module, "__file__", None)
    if module is None or file is None or module.__name__ == "__main__":
        return None
    root = Path(file).resolve().parent
    for _ in range(module.__name__.count(".")):
        root = root.parent
    return str(root)


@contextmanager
def _without_hooks(model: nn.Module) -> Iterator[None]:
    """The model with no module hooks (they hold the watcher, which cannot be pickled), restored after."""
    saved = [(m, name, getattr(m, name)) for m in model.modules() for name in _HOOKS if hasattr(m, name)]
    for m, name, _ in saved:
        setattr(m, name, OrderedDict())
    try:
        yield
    finally:
        for m, name, value in saved:
            setattr(m, name, value)


def user_hooked(model: nn.Module) -> list[str]:
    """The modules holding hooks of the user's own (not this package's): a bundle does not save them,
    so what they did (a fault planted by a forward hook) a replay does not do."""
    named = []
    for name, m in model.named_modules():
        hooks = [h for attr in _HOOKS for h in getattr(m, attr, {}).values()]
        if any(not _ours(h) for h in hooks):
            named.append(name or "(model)")
    return named


def _ours(hook: Any) -> bool:
    """A hook this package registered (its function, or the one a partial or bound method wraps)."""
    fn = getattr(hook, "func", getattr(hook, "__func__", hook))
    return str(getattr(fn, "__module__", "")).startswith("stabilitycheck.")


Micro = tuple[Any, torch.Tensor, dict[str, Any] | None, list[bool] | None, torch.Tensor | None, str | None]
"""A micro-batch as the bundle keeps it: batch, loss passed, RNG state and module modes at its forward,
the GradScaler's loss scale (None without one) and the autocast dtype the loop ran it under (None: off)."""


class Snapshot:
    """Keeps, on the device, the parameters and buffers the current step's forward began with (`prev`,
    copied at the first model call after an update: what the loop did to them after the optimizer's
    step, weight clipping or an EMA swap, is in it) and those of the first flagged step (`kept`, chosen
    by torch.where on the device flag); the batches (each step's micro-batches, with the losses passed
    for them) and RNG states of the steps not yet flushed stay as references."""

    def __init__(
        self, model: nn.Module, compute_loss: Any, path: Path, given: bool = False, clip: float | None = None
    ) -> None:
        self.model, self.compute_loss, self.path = model, compute_loss, path
        self.given = given  # the blocks are the user's (blocks=): replay takes them by module name
        self.clip = clip  # the max_norm the loop clips the gradients to before each step: replay does too
        self.tensors = [t for t in (*model.parameters(), *model.buffers())]
        self.prev = [t.detach().clone() for t in self.tensors]
        self.stale = True  # `prev` is taken again at the next model call
        self.kept = [torch.zeros_like(t) for t in self.tensors]
        device = self.tensors[0].device
        self.have = torch.zeros((), dtype=torch.bool, device=device)
        self.batches: dict[int, list[Micro]] = {}
        self.modules = list(model.modules())
        # per model call since the last micro-batch: the RNG state, each module's .training and the
        # autocast dtype (None: off) as it began, and the autograd nodes of its outputs (`on_output`),
        # to pair the loss with its call
        self._calls: list[tuple[dict[str, Any], list[bool], set[Any], str | None]] = []
        self._start = rng_state()  # since the last micro-batch or update: draws before the model call
        self.written = False
        self.under: tuple[torch.dtype | None] | None = None  # `run_under`'s autocast; None: the open one

    def on_call(self) -> None:
        """The RNG state, the modules' modes and the autocast dtype at a model call (what the replay
        restores before the micro-batch: the loop may draw random numbers between micro-batches,
        batches or augmentations, and open torch.autocast around compute_loss; the dtype `run_under`
        told, where the loop opens it out of a hook's sight), and at the first call of a step the
        state its forward begins with."""
        if self.stale:
            torch._foreach_copy_(self.prev, [t.detach() for t in self.tensors])
            self.stale = False
        kind = self.tensors[0].device.type
        if self.under is not None:
            autocast = self.under[0]
        else:
            autocast = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
        amp = None if autocast is None else str(autocast).removeprefix("torch.")
        self._calls.append(
            ({**rng_state(), "start": self._start}, [m.training for m in self.modules], set(), amp)
        )

    def between(self) -> None:
        """Between micro-batches, told by a loop whose loss carries no graph to its model call (the HF
        callback's): the model calls told so far belong to none (a metric's with gradients after a
        step was taken for the next micro-batch's: 20 norms off on replay)."""
        self._calls = []
        self._start = rng_state()

    def run_under(self, autocast: torch.dtype | None) -> None:
        """Every model call runs under this autocast dtype, opened where no hook sees it (accelerate
        opens Trainer's inside the model's forward, Lightning its precision plugin's after the batch
        is told: a bf16 step replayed in float32)."""
        self.under = (autocast,)

    def on_start(self) -> None:
        """A micro-batch begins, told by a loop that calls the model by another way than its forward
        (a LightningModule's training_step calling self.net, where no model call is seen: the state
        before the step was never taken and each step replayed the first's weights): `between`, then
        `on_call`'s record of a model call (model calls told before belong to no micro-batch: a
        training_step returning None runs no backward and passes no loss)."""
        self.between()
        self.on_call()

    def on_output(self, output: Any) -> None:
        """The autograd nodes of a model call's outputs (`_made_by` finds the loss's call by them)."""
        if self._calls:
            self._calls[-1][2].update(t.grad_fn for t in tensors(output) if t.grad_fn is not None)

    def _made_by(self, loss: Any) -> tuple[dict[str, Any] | None, list[bool] | None, str | None]:
        """The RNG state, modes and autocast dtype of the first model call the loss is computed from,
        found within PAIRED nodes of its graph; else the first call's state and the last call's modes.
        Read at the first call alone, a validation pass with gradients on before the forward
        (model.eval(), a call, model.train()) replayed the step in eval mode; at the last, one after
        it did."""
        if not self._calls:
            return None, None, None
        owner = {node: i for i, (_, _, nodes, _) in enumerate(self._calls) for node in nodes}
        found: list[int] = []
        top = getattr(loss, "grad_fn", None)  # a loss passed detached, or as a number: no graph
        frontier, seen = [top] if top is not None else [], set[Any]()
        while frontier and len(seen) < PAIRED:
            node = frontier.pop(0)
            if node in owner:
                found.append(owner[node])
                continue
            for child, _ in node.next_functions:
                if child is not None and child not in seen:
                    seen.add(child)
                    frontier.append(child)
        if found:
            rng, modes, _, amp = self._calls[min(found)]
            return rng, modes, amp
        return self._calls[0][0], self._calls[-1][1], self._calls[0][3]

    def on_batch(
        self, step: int, batch: Any, loss: torch.Tensor, scale: torch.Tensor | None, graph: Any
    ) -> None:
        """One micro-batch of the step (None when not given), the loss passed for it (detached; `graph`
        as passed) and the RNG state its forward began with, and the one at the end of the micro-batch
        or update before it ('start': what compute_loss drew from before calling the model, a masking
        loss's mask, where the loop drew nothing in between)."""
        kept = None if scale is None else scale.detach().clone()  # on the device: no host read
        rng, modes, amp = self._made_by(graph)
        self.batches.setdefault(step, []).append((batch, loss, rng, modes, kept, amp))
        self._calls = []
        self._start = rng_state()

    def on_flag(self, flagged: torch.Tensor) -> None:
        """Keep `prev` when this is the first flagged step (decided on the device)."""
        first = flagged & ~self.have
        self.have |= first
        for kept, prev in zip(self.kept, self.prev, strict=True):
            kept.copy_(torch.where(first, prev, kept))

    def after_update(self) -> None:
        self.stale = True
        self._calls = []  # a model call no micro-batch followed (an evaluation) starts nothing
        self._start = rng_state()

    def write_if_flagged(
        self,
        flagged: int | None,
        first: int,
        n: int,
        values: list[float],
        blocks: list[str],
        sizes: dict[int, int],
    ) -> None:
        """Write the bundle when the first flagged step is among the `n` steps just flushed; `sizes`
        are the reference element counts its norms were read at (Capture.sizes)."""
        if not self.written and flagged is not None and first <= flagged < first + n:
            self.written = True
            try:
                self._write(flagged, values, blocks, sizes)
            except Exception as exc:  # the user's training goes on: a bundle is never worth a crash
                warnings.warn(
                    f"watch: the replay bundle for step {flagged} could not be written to {self.path} "
                    f"({describe(exc)}); training goes on without it",
                    stacklevel=2,
                )
        for step in [s for s in self.batches if s < first + n]:
            del self.batches[step]

    def _write(self, step: int, values: list[float], blocks: list[str], sizes: dict[int, int]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        roots = {import_root(type(self.model)), import_root(self.compute_loss)}
        micro = self.batches.get(step, [])
        meta = {
            "format": FORMAT,
            "step": step,
            "batch_index": step,
            "blocks": blocks,
            "blocks_given": self.given,
            "user_hooks": user_hooked(self.model),
            "values": values,
            "sizes": {str(slot): numel for slot, numel in sizes.items()},
            "import_roots": sorted(r for r in roots if r is not None),
            "has_batch": bool(micro) and all(batch is not None for batch, *_ in micro),
            "micro_batches": len(micro),
            "clip_grad_norm": self.clip,
            "sources": sources(self.model, self.compute_loss),
        }
        data = {
            "model": self.model,
            "state": [t.detach().clone() for t in self.kept],
            "batches": [batch for batch, *_ in micro],
            "losses": [loss.cpu() for _, loss, *_ in micro],
            "rng": [rng for _, _, rng, *_ in micro],
            "modes": [modes for *_, modes, _, _ in micro],
            "scales": [None if scale is None else float(scale) for *_, scale, _ in micro],
            "autocast": [amp for *_, amp in micro],
            "compute_loss": self.compute_loss,
        }
        partial = self.path / "data.pt.partial"
        with _without_hooks(self.model):
            torch.save(data, partial)
        os.replace(partial, self.path / "data.pt")  # never a half-written data.pt
        (self.path / "meta.json").write_text(strict_json(meta, indent=1))
