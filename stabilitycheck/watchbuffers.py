"""The buffers a skipped step's forward wrote: with skip=True, what the model keeps outside its
parameters (BatchNorm's running statistics and batch count, spectral_norm's vectors) is put back as
the step's first model call found it, so a skipped step leaves the model as it was (a NaN in one
block's output at a skipped step of timm's resnet18 left 14 BatchNorm buffers NaN, and the model in
eval() gave NaN from then on)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parameter import is_lazy


class Buffers:
    """The model's buffers as the current step's first model call found them, one flat copy per device
    and dtype, put back where the step is flagged, on the device (no host read). A buffer the forward
    replaces by a new tensor, rather than writing it in place as BatchNorm does, is not put back; nor
    one no dense copy can hold or write back (`_copyable`); one resized in place (a quantization
    observer's first call) or materialised (a lazy module's, the same tensor made dense in place) is
    taken at its new size from the next step, and that step puts nothing back."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.taken = False  # a model call of this step was seen: `kept` is this step's
        self._lay_out()

    def _lay_out(self) -> None:
        """The copyable buffers grouped by device and dtype, a flat copy and a flat scratch per group."""
        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        listed = list(self.model.buffers())
        self.waiting = [t for t in listed if is_lazy(t)]  # a lazy module's, until materialised
        for t in listed:
            if _copyable(t):
                groups.setdefault((t.device, t.dtype), []).append(t)
        self.tensors: list[torch.Tensor] = []
        self.kept: list[torch.Tensor] = []  # views of the copy taken at the step's first model call
        self.now: list[torch.Tensor] = []  # views of a scratch for the values at the step's close
        self.flats: list[tuple[torch.Tensor, torch.Tensor]] = []  # per group, those two flat tensors
        for (device, dtype), group in groups.items():
            n = sum(t.numel() for t in group)
            kept, now = (torch.empty(n, dtype=dtype, device=device) for _ in range(2))
            self.flats.append((kept, now))
            self.tensors += group
            self.kept += _views(kept, group)
            self.now += _views(now, group)
        self.shapes = [t.shape for t in self.tensors]

    def _moved(self) -> bool:
        """A buffer was resized in place, or a lazy one may have been materialised, since the layout
        (shapes only: no host read)."""
        # materialize() turns the same tensor object into a dense one in place
        return any(not is_lazy(t) for t in self.waiting) or [t.shape for t in self.tensors] != self.shapes

    def __bool__(self) -> bool:
        return bool(self.tensors) or bool(self.waiting)

    def take(self) -> None:
        """At each model call: the first of a step copies the buffers (one multi-tensor copy)."""
        if self.taken:
            return
        if self._moved():
            self._lay_out()
        if self.tensors:
            with torch.no_grad():
                torch._foreach_copy_(self.kept, self.tensors)
        self.taken = True

    def forget(self) -> None:
        """After the optimizer's update: the next model call is the next step's (an LBFGS closure
        evaluated again inside step(), after the step closed, is this step's)."""
        self.taken = False

    def close(self, flagged: torch.Tensor) -> int:
        """At the step's close: where `flagged` (0-d, on the device) is set, every buffer is made what
        the step's first model call found (nothing where no model call was seen since the last update,
        nor where a buffer changed its shape during the step). Returns the host reads it made: one where
        a buffer is on the CPU and the flag is not (a model moved to the GPU keeping a buffer assigned
        after), which the flag must be copied to."""
        reads = 0
        if self.taken and self.tensors and not self._moved():
            on = {flagged.device: flagged}
            with torch.no_grad():
                torch._foreach_copy_(self.now, self.tensors)
                for kept, now in self.flats:
                    if kept.device not in on:
                        on[kept.device] = flagged.to(kept.device)
                        reads += kept.device.type == "cpu"
                    torch.where(on[kept.device], kept, now, out=now)
                torch._foreach_copy_(self.tensors, self.now)
        self.taken = False
        return reads


def _copyable(t: torch.Tensor) -> bool:
    """A buffer a flat dense copy can hold and write back in place: not a lazy module's uninitialised
    one (its numel() raises), not sparse (a graph's adjacency: its dense copy is n^2), not an inference
    tensor (written in place outside inference mode, it raises), no elements sharing memory (an
    expand(): written back, it raises)."""
    return (
        not is_lazy(t)
        and t.layout == torch.strided
        and not t.is_inference()
        and torch._debug_has_internal_overlap(t) != 1
    )


def _views(flat: torch.Tensor, group: list[torch.Tensor]) -> list[torch.Tensor]:
    """`flat` cut into views shaped as the tensors of `group`, in order."""
    views, at = [], 0
    for t in group:
        views.append(flat[at : at + t.numel()].view(t.shape))
        at += t.numel()
    return views
