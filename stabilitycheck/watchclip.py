"""Gradient norm clipping heard while a watcher is open: the total norm torch.nn.utils.clip_grad_norm_
returns, or that torch.nn.utils.clip_grads_with_norm_ is given (accelerate's clipping, the Hugging
Face Trainer's, computes it with get_total_norm and calls that), is the gradient's before clipping,
which the watcher's own norms, read at the optimizer step, cannot see (a clipped run's logged
grad_norm read max_norm at every step while the norm before it reached 4e8).

The wrappers below stand in for torch's two functions while any watcher is open, and tell each
listener which parameters were clipped, the total norm (a plain tensor copy: a DTensor's full value)
and max_norm (a copy, where a tensor). Each is put back once the last listener goes, unless
something else has replaced it since (then that is left alone); one left behind (a mock.patch
restored after the watcher closed) is found again, not wrapped twice. A function bound before the
watcher opened (`from torch.nn.utils import clip_grad_norm_` at import) is not heard."""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import torch

CLIPPED_RTOL = 1e-3  # the watcher's float64 norm against torch's float32 total (`ClipLog.take`)
Clipped = list[torch.Tensor]


class Listener(Protocol):
    """Told of each clip: `wants` before it (the gradients as they were), `take` after, if it did."""

    def wants(self, clipped: Clipped, max_norm: Any) -> bool: ...

    def take(self, total: torch.Tensor, max_norm: Any) -> None: ...


_LISTENERS: list[Listener] = []
_WRAPPED: dict[str, Callable[..., Any]] = {}  # what each wrapper calls while installed
_NAMES = ("clip_grad_norm_", "clip_grads_with_norm_")
_TORCH: dict[str, Callable[..., Any]] = {name: getattr(torch.nn.utils, name) for name in _NAMES}  # torch's


class Listening:
    """A listener's registration: remove() stops it, and the last one out restores the functions."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        if not _LISTENERS:
            _install()
        _LISTENERS.append(listener)

    def remove(self) -> None:
        if self.listener in _LISTENERS:
            _LISTENERS.remove(self.listener)
            if not _LISTENERS:
                _uninstall()


def _no_limit(max_norm: Any) -> bool:
    """max_norm is infinite (it clips nothing): a number, or a tensor on the CPU (read at no sync; one
    on a device is read with the flush, and its row dropped there)."""
    if isinstance(max_norm, torch.Tensor):
        return max_norm.device.type == "cpu" and max_norm.numel() == 1 and math.isinf(float(max_norm))
    try:
        return math.isinf(float(max_norm))
    except (TypeError, ValueError):
        return False


def _is_two(norm_type: Any) -> bool:
    """norm_type is 2 (L2); anything else, whatever torch makes of it, is not."""
    try:
        return float(norm_type) == 2.0
    except (TypeError, ValueError):
        return False


def _listed(parameters: Any) -> Clipped:
    """The parameters as a list (a generator, model.parameters(), is read once: torch gets the list)."""
    return [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)


def _takers(params: Clipped, max_norm: Any) -> list[Listener]:
    """The listeners that want this clip, asked before it changes the gradients."""
    return [listener for listener in list(_LISTENERS) if listener.wants(params, max_norm)]


def _tell(takers: list[Listener], total: Any, max_norm: Any) -> None:
    """Each taker gets a copy of the total (a DTensor's full value: its .tolist() raises) and of a
    tensor max_norm (a schedule may change it in place before the watcher reads it)."""
    if not takers or not isinstance(total, torch.Tensor):
        return
    full = getattr(total, "full_tensor", None)
    value = (full() if callable(full) else total).detach().clone()
    limit = max_norm.detach().clone() if isinstance(max_norm, torch.Tensor) else max_norm
    for listener in takers:
        listener.take(value, limit)


def clip_grad_norm_(
    parameters: Iterable[torch.Tensor] | torch.Tensor, max_norm: Any, *args: Any, **kwargs: Any
) -> Any:
    """torch.nn.utils.clip_grad_norm_, heard by the open watchers (its total: before clipping)."""
    params = _listed(parameters)
    if _CALLING:  # entered again through a wrapper of ours left behind: torch's own, not told twice
        return _TORCH["clip_grad_norm_"](params, max_norm, *args, **kwargs)
    l2 = _is_two(kwargs.get("norm_type", args[0] if args else 2.0))
    takers = _takers(params, max_norm) if l2 else []  # the watcher's norms are L2
    with _calling():
        total = _WRAPPED.get("clip_grad_norm_", _TORCH["clip_grad_norm_"])(params, max_norm, *args, **kwargs)
    _tell(takers, total, max_norm)
    return total


def clip_grads_with_norm_(
    parameters: Iterable[torch.Tensor] | torch.Tensor,
    max_norm: Any,
    total_norm: Any,
    *args: Any,
    **kwargs: Any,
) -> Any:
    """torch.nn.utils.clip_grads_with_norm_, heard by the open watchers (the total it is given)."""
    params = _listed(parameters)
    if _CALLING:
        return _TORCH["clip_grads_with_norm_"](params, max_norm, total_norm, *args, **kwargs)
    _tell(_takers(params, max_norm), total_norm, max_norm)
    with _calling():
        return _WRAPPED.get("clip_grads_with_norm_", _TORCH["clip_grads_with_norm_"])(
            params, max_norm, total_norm, *args, **kwargs
        )


_CALLING: list[bool] = []  # a wrapper of ours is running: one left behind, wrapped by another tool and
# that wrapped by ours again, recursed for good; a list, which torch.compile traces (a
# threading.local subclass stopped a compiled clip with InternalTorchDynamoError)


@contextlib.contextmanager
def _calling() -> Iterator[None]:
    _CALLING.append(True)
    try:
        yield
    finally:
        _CALLING.pop()


_OURS: dict[str, Callable[..., Any]] = {
    "clip_grad_norm_": clip_grad_norm_,
    "clip_grads_with_norm_": clip_grads_with_norm_,
}


def _install() -> None:
    for name, ours in _OURS.items():
        current = getattr(torch.nn.utils, name)
        _WRAPPED[name] = _TORCH[name] if current is ours else current
        setattr(torch.nn.utils, name, ours)


def _uninstall() -> None:
    for name, original in _WRAPPED.items():
        if getattr(torch.nn.utils, name) is _OURS[name]:
            setattr(torch.nn.utils, name, original)
    _WRAPPED.clear()


class ClipLog:
    """A watcher's clips, one per step and row of its buffer: the first call after the step's last
    backward that clips all its model's trainable parameters in L2 with a finite max_norm. So not
    another model's clip (a GAN's critic) nor a clip per submodule or group (a part's norm); not a
    second clip of the same gradients (a logging call, a callback's clip after the Trainer's: they
    see the clipped norm, and so read max_norm for a spike); not a clip of an update the
    loop then skipped, nor an earlier micro-batch's (a later backward came). A clip after the step
    closed and before the next backward clips what that step measured (the step was closed before
    the clip, as Lightning's callback closes it): that step's, not taken, its norms are before
    clipping already. A backward came where both the count of gradients that reached block outputs
    (`fed`; None where none ever did: frozen blocks under a trained head) and a parameter's gradient
    (its identity and version) moved since the last close or clip taken (`_same`). The log keeps a
    clip only where the gradient the step measured is what it left (watchlog.clipped_to)."""

    def __init__(self, params: list[torch.nn.Parameter], rows: int, fed: Callable[[], int | None]) -> None:
        self.params, self.fed = params, fed
        self.rows: list[tuple[torch.Tensor, Any, float] | None] = [None] * rows
        self.now: tuple[torch.Tensor, Any, float] | None = None
        self.seen: Any = None  # the backward mark at the last close or clip taken (`_mark`)

    def wants(self, clipped: Clipped, max_norm: Any) -> bool:
        """Whether this clip is the step's, asked before it changes the gradients."""
        if _no_limit(max_norm) or self._same(self._mark()):
            return False  # no backward since the last close or clip taken
        mine = {id(p) for p in self.params if p.requires_grad}
        return mine <= {id(p) for p in clipped}

    def _mark(self) -> Any:
        """(the count of block-output gradients, None where blocks get none; and (a parameter, its
        gradient, that gradient's version), None where no parameter has one)."""
        param = next((p for p in self.params if p.requires_grad and p.grad is not None), None)
        grad = param.grad if param is not None else None
        return self.fed(), None if grad is None else (param, weakref.ref(grad), grad._version)

    def _same(self, mark: Any) -> bool:
        """No backward since `seen`: the block-output count has not moved, or the parameters' gradient
        has not. A pass moving the count and no .grad (torch.autograd.grad of the input, a saliency
        map) is no backward: a clip after it saw the clipped gradients, 0.1 logged for 0.24 (a
        review); an edit in place after the close moves the version, not the count."""
        if self.seen is None:
            return False
        (fed, grad), (fed_seen, grad_seen) = mark, self.seen
        if fed is not None and fed == fed_seen:
            return True
        if grad is None or grad_seen is None:
            return False
        return bool(grad[0] is grad_seen[0] and grad[1]() is grad_seen[1]() and grad[2] == grad_seen[2])

    def take(self, total: torch.Tensor, max_norm: Any) -> None:
        """The clip's total, its max_norm and the tolerance its check gets: its gradients' precision
        (bfloat16 parameters are clipped on a bfloat16 total, 0.2% off the watcher's float64 one)."""
        eps = max(
            torch.finfo(p.dtype).eps for p in self.params if p.requires_grad and p.dtype.is_floating_point
        )
        self.now = (total, max_norm, max(CLIPPED_RTOL, 2 * eps))
        self.seen = self._mark()  # after the clip: its own change in place is no backward

    def close_row(self, row: int) -> None:
        """The step closes into `row`: its clip, and the backward mark of what it measured."""
        self.rows[row], self.now = self.now, None
        self.seen = self._mark()

    def values(self, n: int, device: torch.device) -> list[torch.Tensor]:
        """The first n rows' clip norms, and their tensor max_norms, to read with the flush."""
        out = []
        for clip in self.rows[:n]:
            if clip is not None:
                out.append(clip[0].to(device, torch.float64).reshape(()))
                if isinstance(clip[1], torch.Tensor):
                    out.append(clip[1].to(device, torch.float64).reshape(()))
        return out

    def read(self, first: int, n: int, read: list[float]) -> dict[int, tuple[float, float, float]]:
        """{step: (norm before clipping, max_norm, rtol)} of the first n rows from `read` (what
        `values` gave, as read), the rows emptied; a max_norm read as inf clipped nothing: left out."""
        out: dict[int, tuple[float, float, float]] = {}
        at = 0
        for i, clip in enumerate(self.rows[:n]):
            if clip is None:
                continue
            norm, at = read[at], at + 1
            if isinstance(clip[1], torch.Tensor):
                limit, at = read[at], at + 1
            else:
                limit = float(clip[1])
            if not math.isinf(limit):
                out[first + i] = (norm, limit, clip[2])
        self.rows[:n] = [None] * n
        return out
