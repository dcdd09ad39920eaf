"""Memory: what a probe would need (measured on the meta device: shapes, no data) and what is free."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from stabilitycheck._tree import tensors
from stabilitycheck.losses import Inputs

PER_PARAMETER = 4  # weight, gradient and two Adam moments
PER_ACTIVATION = 2  # the output kept for backward, and its gradient
STEPPED = (nn.RNN.forward, nn.LSTM.forward, nn.GRU.forward)  # run on their first step alone on meta


def meta_bytes(make: Callable[[], tuple[nn.Module, Inputs]], call: Callable[[nn.Module, Inputs], Any]) -> int:
    """Bytes of a probe of the model `make()` builds under the meta device: parameters x 4 plus the
    output of every module call x 2, from a forward on the meta device (no memory is touched)."""
    total = 0

    def count(module: nn.Module, args: Any, output: Any) -> None:
        nonlocal total
        total += PER_ACTIVATION * sum(t.numel() * t.element_size() for t in tensors(output))

    with torch.device("meta"):
        model, inputs = make()
        model = _on_meta(model)
        handles = [m.register_forward_hook(count) for m in model.modules()]
        for m in model.modules():  # torch's own recurrent forward: a subclass's may take other arguments
            if isinstance(m, nn.RNNBase) and type(m).forward in STEPPED:
                m.forward = _one_step_shapes(m)
        try:
            call(model, inputs)
        finally:
            for handle in handles:
                handle.remove()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return PER_PARAMETER * params + total


def parameter_bytes(make: Callable[[], nn.Module]) -> int:
    """Bytes of the parameters of a probe of the model `make()` builds under the meta device (x 4, as
    `meta_bytes` counts them): its lower bound where the forward cannot run there (code reading tensor
    data: .item(), numpy), which else went unchecked (hf:t5gemma's sub-configs, out of the small
    defaults' reach, built 5.6e9 parameters, 21 GiB of float32 weights, and the process was killed)."""
    with torch.device("meta"):
        model = _on_meta(make())
    return PER_PARAMETER * sum(p.numel() * p.element_size() for p in model.parameters())


def _on_meta(model: nn.Module) -> nn.Module:
    """`model` moved to the meta device, or where it holds data a copy of it made on meta (its
    parameters and buffers never copied: a large model costs no memory): a factory returning one
    object at every call (a module-level model) lost its weights to the estimate, and the build that
    followed failed with 'Cannot copy out of meta tensor'."""
    if all(t.device.type == "meta" for t in (*model.parameters(), *model.buffers())):
        return model.to("meta")
    memo: dict[int, Any] = {
        id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for p in model.parameters()
    }
    memo.update({id(b): torch.empty_like(b, device="meta") for b in model.buffers()})
    return copy.deepcopy(model, memo).to("meta")


def _one_step_shapes(rnn: nn.RNNBase) -> Callable[..., Any]:
    """`rnn`'s forward on the meta device run on the first step alone, its output widened to every step:
    the same shapes, in a fraction of the time (torch computes an nn.LSTM's meta forward step by step
    through Python decompositions: 1 s at 128 steps, the search's estimate of every point of an LSTM
    language model's file, 55 of its 57 s). A packed sequence runs whole."""
    forward = rnn.forward

    def shapes(input: Any, hx: Any = None) -> Any:
        if not isinstance(input, torch.Tensor) or input.dim() < 2:
            return forward(input, hx)
        time = 1 if rnn.batch_first and input.dim() == 3 else 0
        out, state = forward(input.narrow(time, 0, 1), hx)
        size = list(out.shape)
        size[time] = input.shape[time]
        return out.new_empty(size), state

    return shapes


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
