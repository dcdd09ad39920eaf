"""Hooks that survive torch.compile and TorchScript: each hook runs outside a compiled graph on the
real tensors (one graph break per hooked call), and a module that runs no Python hooks is a one-line
UsageError naming it. The probe's recorder and the watcher both register their hooks this way."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from stabilitycheck.errors import UsageError

Hook = TypeVar("Hook", bound=Callable[..., Any])
GRAPH_BREAK = (  # torch's error gives it as the reason where fullgraph=True refuses the break
    "stabilitycheck records each block outside the compiled graph, a graph break per block: compile "
    "the model without fullgraph=True, or measure it uncompiled"
)


def stabilitycheck_hook(hook: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run `hook`: the one function torch.compile is told to leave out of its graph."""
    return hook(*args, **kwargs)


_EAGER: list[Callable[..., Any]] = []  # the disabled trampoline, once built


def _eager() -> Callable[..., Any]:
    """`stabilitycheck_hook` disabled for torch.compile, built on first need: torch.compiler.disable
    imports torch._dynamo (~1.5 s), which only a compiled model needs, and which has it loaded."""
    if not _EAGER:
        try:
            _EAGER.append(torch.compiler.disable(stabilitycheck_hook, reason=GRAPH_BREAK))  # type: ignore[no-untyped-call]
        except TypeError:  # torch before 2.8 takes no reason; its error then names this function alone
            _EAGER.append(torch.compiler.disable(stabilitycheck_hook))  # type: ignore[no-untyped-call]
    return _EAGER[0]


def outside_graph(hook: Hook) -> Hook:
    """`hook` as it is, and under torch.compile run outside the graph (torch.compiler.disable: a graph
    break) on the real tensors: traced, it would read version counters and requires_grad at trace
    time, and a tensor made to require grad cannot leave a graph. One disabled trampoline serves every
    hook (disabling each hook anew cost ~20 us, 4% of a 16-block probe), built here, outside any
    trace, once torch._dynamo is loaded (a compiled model loads it when it is made)."""
    if "torch._dynamo" in sys.modules:
        _eager()

    def run(*args: Any, **kwargs: Any) -> Any:
        return _eager()(hook, *args, **kwargs) if torch.compiler.is_compiling() else hook(*args, **kwargs)

    return run  # type: ignore[return-value]


_OURS = tuple(os.path.join(os.path.dirname(f), "") for f in (torch.__file__, __file__))  # torch/, ours/


def callers_level() -> int:
    """The stacklevel of the first frame outside torch and this package, for a warnings.warn in the
    function calling this: the line of the caller's own code that led to it (a hook runs under
    torch's frames, an optimizer calls a closure through its wrappers: a fixed level pointed into
    torch/utils/_contextlib.py or this package)."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_OURS):
        frame, level = frame.f_back, level + 1
    return level


def hooked(registrations: Sequence[tuple[str, nn.Module, Callable[[], Any]]]) -> list[Any]:
    """The handles of the hooks each (block name, module, registration) makes, in order. A TorchScript
    module (torch.jit.script refuses hooks, a torch.jit.trace one takes them and never calls them:
    growth 1, nothing measured) is a one-line UsageError naming the block, the hooks made so far
    removed, none left on the model."""
    handles: list[Any] = []
    for name, module, register in registrations:
        try:
            if isinstance(module, torch.jit.ScriptModule):
                raise RuntimeError("a TorchScript module runs no Python hooks")
            handles.append(register())
        except RuntimeError as exc:
            for handle in handles:
                handle.remove()
            raise UsageError(
                f"block {name!r} cannot be hooked to measure it ({exc}); list blocks torch can hook "
                "(blocks=... or stability_blocks()), e.g. the eager module rather than its "
                "torch.jit.script/trace"
            ) from None
    return handles
