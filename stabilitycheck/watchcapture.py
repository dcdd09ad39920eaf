"""What the watcher measures in a step, reduced to one row of squared norms on the device: block
outputs and their gradients (hooks), the parameters' gradients and, when asked, their weights.

Norms are taken lazily: a block call only keeps its output, and a pre-hook on the autograd node that
made it keeps dL/d(output) when the backward pass reaches that node (no tensor hook, whose Python
setup costs more than the norm). Everything kept is normed in one fused call per dtype when the step
closes, or sooner once PENDING_CAP elements are held, so the memory kept stays bounded and a large
output costs what an eager norm costs. A recurrent cell called 256 times then costs one fused call,
not 512 norm kernels. A kept output modified in place before its norm is taken is caught by its
version counter; the watcher then warns and takes output norms eagerly from then on.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from stabilitycheck import distributed
from stabilitycheck.recording import _first_tensor

PENDING_CAP = 1 << 22  # elements kept for lazy norms (16 MiB in float32) before they are normed

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
    ) -> None:
        self.blocks, self.params, self.width = blocks, list(params), width
        self.param_slots, self.param_scale = list(param_slots), list(param_scale)
        self.sharded = any(distributed.is_dtensor(p) for p in self.params)
        self.eager = False  # set once a kept output was modified in place before its norm
        self._pending: list[torch.Tensor] = []
        self._pending_slots: list[int] = []
        self._versions: list[tuple[torch.Tensor, int]] = []
        self._held = 0
        self._norms: list[torch.Tensor] = []
        self._norm_slots: list[int] = []
        self._index: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._groups: list[tuple[tuple[int, ...], list[torch.Tensor]]] = []
        self._dtypes: set[torch.dtype] = set()  # of the norms in _norms
        self._zeros: dict[torch.dtype, torch.Tensor] = {}  # the loss of a step without one
        self.device = self.params[0].device
        n = len(blocks)
        self._grad_hooks: dict[tuple[int, int], GradHook] = {}
        self._out_slot = [1 + b for b in range(n)]
        self._grad_slot = [1 + n + b for b in range(n)]

    def attach(self) -> list[Any]:
        """Register the forward hooks on the blocks; returns their handles."""
        return [m.register_forward_hook(self._forward_hook(b)) for b, (_, m) in enumerate(self.blocks)]

    def _forward_hook(self, b: int) -> Callable[[nn.Module, Any, Any], None]:
        slot = self._out_slot[b]

        def on_forward(module: nn.Module, args: Any, output: Any) -> None:
            out = output if isinstance(output, torch.Tensor) else _first_tensor(output)
            if out is None or not out.is_floating_point() or not torch.is_grad_enabled():
                return
            kept = out.detach()
            if self.eager:
                self._norms += _norms([kept], self._dtypes)
                self._norm_slots.append(slot)
            else:
                self._versions.append((kept, kept._version))
                self._keep(kept, slot)
            if out.requires_grad:
                node = out.grad_fn
                if node is None:  # a leaf: only a tensor hook sees its gradient
                    out.register_hook(self._grad_hook(b, 0))
                else:
                    node.register_prehook(self._grad_hook(b, out.output_nr))

        return on_forward

    def _grad_hook(self, b: int, index: int) -> GradHook:
        """The hook keeping the gradient of output `index` of a node as block b's (built once)."""
        key = (b, index)
        if key not in self._grad_hooks:
            slot = self._grad_slot[b]

            def on_grad(grads: Any) -> None:
                grad = grads[index] if isinstance(grads, tuple) else grads
                if grad is not None:
                    self._keep(grad, slot)

            self._grad_hooks[key] = on_grad
        return self._grad_hooks[key]

    def _keep(self, tensor: torch.Tensor, slot: int) -> None:
        self._pending.append(tensor)
        self._pending_slots.append(slot)
        self._held += tensor.numel()
        if self._held >= PENDING_CAP:
            self._reduce()

    def _reduce(self, extra: Sequence[torch.Tensor] = (), extra_slots: Sequence[int] = ()) -> None:
        """Norm what is kept (and `extra`) in one fused call per dtype; forget the tensors."""
        for kept, version in self._versions:
            if kept._version != version and not self.eager:
                warnings.warn(
                    "watch: a block's output was modified in place after the block returned; its norm "
                    "is that of the modified values this step, and output norms are taken eagerly "
                    "(at each block call, which costs more) from now on",
                    stacklevel=2,
                )
                self.eager = True
        tensors = self._pending + list(extra)
        if tensors:
            self._norms += _norms(tensors, self._dtypes)
            self._norm_slots.extend(self._pending_slots)
            self._norm_slots.extend(extra_slots)
        self._pending, self._pending_slots, self._versions, self._held = [], [], [], 0

    def close_step(self, row: torch.Tensor, loss: torch.Tensor | None, weights: bool) -> None:
        """Norm this step's captures and gradients and keep them (one stacked tensor) until `settle`;
        the weight norms, when `weights`, are added into `row` (this step's zeroed row) at once."""
        with torch.no_grad():
            n = len(self.params)
            grads: list[torch.Tensor] = []
            which: list[int] = []
            for i, p in enumerate(self.params):
                if p.grad is not None:
                    grads.append(distributed.local(p.grad)[0] if self.sharded else p.grad)
                    which.append(i)
            self._reduce(grads, [self.param_slots[i] for i in which])
            norms, slots, dtypes = self._norms, self._norm_slots, self._dtypes
            self._norms, self._norm_slots, self._dtypes = [], [], set()
            dtype = torch.float64 if torch.float64 in dtypes else torch.float32
            if loss is None:
                loss = self._zeros.get(dtype)
                if loss is None:
                    loss = self._zeros[dtype] = torch.zeros((), dtype=dtype, device=self.device)
            if loss.dtype != dtype:
                loss = loss.to(dtype)
            if len(dtypes) > 1:
                norms = [t.to(dtype) for t in norms]
            key = (*slots[: len(slots) - len(which)], -1, *which)
            if not self._groups or self._groups[-1][0] != key:
                self._groups.append((key, []))
            self._groups[-1][1].append(torch.stack([loss, *norms]))
            if weights:
                tensors = [distributed.local(p)[0] for p in self.params] if self.sharded else self.params
                index, factors = self._lookup((-2, *range(n, 2 * n)))
                squares = torch.stack([t.double() for t in _norms(tensors, set())]).square()
                row.index_add_(0, index, squares if factors is None else squares * factors)

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
        """The slots and scale factors of a step's norms: `key` is the captures' slots, then -1 (or
        -2 for weights only) and the indices of the parameters normed (gradients, then weights)."""
        if key not in self._index:
            cut = key.index(-1) if -1 in key else key.index(-2)
            params = key[cut + 1 :]
            slots = [*key[:cut], *(self.param_slots[i] for i in params)]
            scale = [1.0] * cut + [self.param_scale[i] for i in params]
            factors = None if all(f == 1.0 for f in scale) else torch.tensor(scale, dtype=torch.float64)
            self._index[key] = (
                torch.tensor(slots, device=self.device),
                None if factors is None else factors.to(self.device),
            )
        return self._index[key]


def _norms(tensors: Sequence[torch.Tensor], dtypes: set[torch.dtype]) -> list[torch.Tensor]:
    """The L2 norm of each tensor as a 0-d tensor, in float32 or wider: one fused call per dtype
    (dtype= passed only where it widens: on CPU it makes the fused call half as slow again). The
    dtypes of the norms are added to `dtypes`."""
    kinds = {t.dtype for t in tensors}
    if len(kinds) == 1:
        kind = kinds.pop()
        dtypes.add(_widened(kind) or kind)
        return list(torch._foreach_norm(list(tensors), 2, dtype=_widened(kind)))
    out = list(tensors)
    for kind in kinds:
        dtypes.add(_widened(kind) or kind)
        idx = [i for i, t in enumerate(tensors) if t.dtype == kind]
        norms = torch._foreach_norm([tensors[i] for i in idx], 2, dtype=_widened(kind))
        for i, norm in zip(idx, norms, strict=True):
            out[i] = norm
    return out


def _widened(dtype: torch.dtype) -> torch.dtype | None:
    """The dtype= for a fused norm of `dtype` tensors: None for float32 and float64 (kept as is)."""
    return None if dtype in (torch.float32, torch.float64) else torch.float32
