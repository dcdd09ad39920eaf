"""Memory: what a probe would need (measured on the meta device: shapes, no data) and what is free."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from stabilitycheck._tree import tensors
from stabilitycheck.losses import Inputs

PER_PARAMETER = 4  # weight, gradient and two Adam moments
PER_ACTIVATION = 2  # the output kept for backward, and its gradient


def meta_bytes(make: Callable[[], tuple[nn.Module, Inputs]], call: Callable[[nn.Module, Inputs], Any]) -> int:
    """Bytes of a probe of the model `make()` builds under the meta device: parameters x 4 plus the
    output of every module call x 2, from a forward on the meta device (no memory is touched)."""
    total = 0

    def count(module: nn.Module, args: Any, output: Any) -> None:
        nonlocal total
        total += PER_ACTIVATION * sum(t.numel() * t.element_size() for t in tensors(output))

    with torch.device("meta"):
        model, inputs = make()
        model = model.to("meta")
        handles = [m.register_forward_hook(count) for m in model.modules()]
        try:
            call(model, inputs)
        finally:
            for handle in handles:
                handle.remove()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return PER_PARAMETER * params + total


def free_memory(device: str) -> int:
    """Bytes free on the device (CUDA: the driver's figure; CPU: MemAvailable)."""
    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62
