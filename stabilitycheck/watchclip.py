"""Gradient norm clipping heard while a watcher is open: the total norm torch.nn.utils.clip_grad_norm_
returns, or that torch.nn.utils.clip_grads_with_norm_ is given (accelerate's clipping, the Hugging
Face Trainer's, computes it with get_total_norm and calls that), is the gradient's before clipping,
which the watcher's own norms, read at the optimizer step, cannot see (a clipped run's logged
grad_norm read max_norm at every step while the norm before it reached 4e8: a user's trial). One
wrapper of each serves every open watcher; each is put back once the last one closes, unless
something else has replaced it since (then that is left alone). A function bound before the watcher
opened (`from torch.nn.utils import clip_grad_norm_` at import) is not heard."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

Listener = Callable[[torch.Tensor, Any], None]  # (the total norm before clipping, the max_norm given)

_LISTENERS: list[Listener] = []
_WRAPPED: dict[str, Callable[..., Any]] = {}  # torch.nn.utils' functions the wrappers call


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


def _tell(total: Any, max_norm: Any) -> None:
    if isinstance(total, torch.Tensor):
        for listener in list(_LISTENERS):
            listener(total, max_norm)


def _install() -> None:
    utils = torch.nn.utils
    norm_, with_norm_ = utils.clip_grad_norm_, utils.clip_grads_with_norm_

    @functools.wraps(norm_)
    def clip_grad_norm_(parameters: Any, max_norm: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        total = norm_(parameters, max_norm, *args, **kwargs)
        _tell(total, max_norm)
        return total

    @functools.wraps(with_norm_)
    def clip_grads_with_norm_(
        parameters: Any, max_norm: Any, total_norm: Any, *args: Any, **kwargs: Any
    ) -> Any:
        _tell(total_norm, max_norm)
        return with_norm_(parameters, max_norm, total_norm, *args, **kwargs)

    _WRAPPED.update(clip_grad_norm_=norm_, clip_grads_with_norm_=with_norm_)
    utils.clip_grad_norm_, utils.clip_grads_with_norm_ = clip_grad_norm_, clip_grads_with_norm_


def _uninstall() -> None:
    for name, original in _WRAPPED.items():
        if getattr(getattr(torch.nn.utils, name), "__wrapped__", None) is original:
            setattr(torch.nn.utils, name, original)
    _WRAPPED.clear()
