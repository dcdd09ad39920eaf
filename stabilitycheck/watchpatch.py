"""How a watcher closes each step from the user's own optimizer and GradScaler, and undoes it: a step
pre-hook (or, for skip=True on a non-fused optimizer, a wrapped step() that syncs once to decide),
the scaler's update() (which closes a step the scaler skipped), GradScaler.step wrapped while a
watcher seeks its scaler, and the first state a skipped fused SGD step would leave unfilled."""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable
from typing import Any, Protocol

import torch

from stabilitycheck.hooking import callers_level


class Closer(Protocol):
    """What the hooks need of a watcher (watching.Watcher)."""

    host_reads: int

    @property
    def is_open(self) -> bool: ...

    def before_step(self) -> torch.Tensor | None: ...

    def close_skipped(self) -> None: ...

    def adopt(self, scaler: torch.amp.GradScaler) -> None: ...


def closure_of(
    args: tuple[Any, ...], kwargs: dict[str, Any], at: int
) -> tuple[Any, Callable[[Any], tuple[tuple[Any, ...], dict[str, Any]]]]:
    """optimizer.step()'s closure, by keyword or as positional argument `at` (1 in a step pre-hook's
    (optimizer, closure), 0 in a call of the bound step), and a function giving step()'s arguments
    with another closure in its place, every other argument as step() got it."""
    if "closure" not in kwargs and len(args) > at:
        return args[at], lambda c: ((*args[:at], c, *args[at + 1 :]), kwargs)
    return kwargs.get("closure"), lambda c: (args, {**kwargs, "closure": c})


class _Seeking:
    """The open watchers looking for their GradScaler: while there is one, GradScaler.step is wrapped
    once and offers each call to them all. One wrapper per watcher, each restoring what it found,
    left the first watcher's wrapper installed for good when two closed out of order."""

    def __init__(self) -> None:
        self.hooks: list[StepHooks] = []
        self.original: Any = None
        self.wrapper: Any = None

    def add(self, hooks: StepHooks) -> None:
        if vars(torch.amp.GradScaler).get("step") is not self.wrapper or self.wrapper is None:
            cls = torch.amp.GradScaler
            self.original = original = cls.step

            def step(scaler: torch.amp.GradScaler, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
                for seeker in list(self.hooks):
                    seeker.offer(scaler, optimizer)
                return original(scaler, optimizer, *args, **kwargs)

            cls.step = self.wrapper = step  # type: ignore[method-assign, assignment]
        self.hooks.append(hooks)

    def discard(self, hooks: StepHooks) -> None:
        if hooks in self.hooks:
            self.hooks.remove(hooks)
            # restored unless wrapped since (by another library): our wrapper then passes through
            if not self.hooks and vars(torch.amp.GradScaler).get("step") is self.wrapper:
                torch.amp.GradScaler.step = self.original  # type: ignore[method-assign]


_SEEKING = _Seeking()


class StepHooks:
    """A watcher's hooks on `optimizer` and its scaler: `attach` installs them, `detach` restores
    what it found (unless another library wrapped it since: the wrapper then passes through)."""

    def __init__(
        self, watcher: Closer, optimizer: torch.optim.Optimizer | None, skip: bool, fused: bool
    ) -> None:
        self.watcher, self.optimizer, self.skip, self.fused = watcher, optimizer, skip, fused
        self.stepped = False  # a step was closed since the scaler's last update()
        self.hook_optimizer = True  # the step is closed at the optimizer's step() (`attach`)
        self.scaler: torch.amp.GradScaler | None = None
        self._warned_closure = False  # an optimizer evaluating its closure more than once a step: said once
        self._original_step: Any = None
        self._step: Any = None
        self._original_update: Any = None
        self._own_update: Any = None  # the scaler's own instance attribute `update`, if it had one
        self._update: Any = None
        self._unfilled: list[torch.Tensor] = []  # state a skipped fused step allocated: `_drop_unfilled`
        self._flag: torch.Tensor | None = None  # the flag handed to a fused step the caller closed

    def attach(self, hook_optimizer: bool, after_step: Callable[[], None] | None) -> list[Any]:
        """Close each step at the optimizer's step() (unless `hook_optimizer` is False: a callback
        closes it); `after_step` runs after each update. Returns the hooks' handles."""
        optimizer, handles = self.optimizer, []
        self.hook_optimizer = hook_optimizer
        if optimizer is None:
            return []
        if hook_optimizer and self.skip and not self.fused:
            self._original_step = optimizer.step
            # a method of the optimizer, not of the watcher: an LR scheduler created later takes
            # step.__func__ and binds it to the optimizer again (its 'step called' tracking)
            self._step = types.MethodType(self._synced_step_of(), optimizer)
            optimizer.step = self._step  # type: ignore[method-assign]
        elif hook_optimizer:
            handles.append(optimizer.register_step_pre_hook(self._pre_hook))
        if after_step is not None:
            handles.append(optimizer.register_step_post_hook(lambda *_: after_step()))
        if self.skip and self.fused:
            if not hook_optimizer:  # the caller's flag, again after a GradScaler set its own found_inf
                handles.append(optimizer.register_step_pre_hook(self._flag_again))
            handles.append(optimizer.register_step_post_hook(self._drop_unfilled))
        return handles

    def seek_scaler(self) -> None:
        """Without scaler=: while the watcher is open, GradScaler.step is wrapped (`_Seeking`), and
        the scaler whose step() is first called with the watched optimizer is adopted there, before
        that step closes its row (with float16 the first iterations are often skipped: none is missed)."""
        _SEEKING.add(self)

    def offer(self, scaler: torch.amp.GradScaler, optimizer: Any) -> None:
        """Adopt `scaler` where it steps the watched optimizer and none is adopted yet."""
        if (
            self.watcher.is_open
            and self.scaler is None
            and optimizer is self.optimizer
            and scaler.is_enabled()
        ):
            self.watcher.adopt(scaler)

    def wrap_update(self, scaler: torch.amp.GradScaler) -> bool:
        """scaler.update, closing first an iteration whose optimizer step the scaler skipped (found
        Inf/NaN gradients: a non-fused optimizer's step() is then never called). Returns whether
        this iteration's step is closed already: a caller closing it (before_step() with
        hook_optimizer=False) does so before scaler.step(), where a scaler is found; the optimizer's
        hook closes it after (a closed step seen then is the last iteration's)."""
        closed = self.stepped and not self.hook_optimizer
        self.scaler, self.stepped = scaler, closed
        self._original_update, self._own_update = scaler.update, vars(scaler).get("update")
        original = self._original_update

        def update(*args: Any, **kwargs: Any) -> Any:
            if self.watcher.is_open and not self.stepped:
                self.watcher.close_skipped()
            self.stepped = False
            return original(*args, **kwargs)

        self._update = update
        scaler.update = update  # type: ignore[method-assign]
        return closed

    def detach(self) -> None:
        """Restore the optimizer's step() and the scaler's update(), stop seeking a scaler, and drop
        the found_inf a skipped fused step was given."""
        if self._step is not None and vars(self.optimizer).get("step") is self._step:
            self.optimizer.step = self._original_step  # type: ignore[method-assign, union-attr]
        if self._update is not None and vars(self.scaler).get("update") is self._update:
            if self._own_update is None:
                del self.scaler.update  # type: ignore[union-attr]  # the class's method again
            else:
                self.scaler.update = self._own_update  # type: ignore[method-assign, union-attr]
        _SEEKING.discard(self)
        if self.fused and self.skip and self.optimizer is not None:
            self.optimizer.__dict__.pop("found_inf", None)

    def skip_fused(self, flagged: torch.Tensor, scaled: bool) -> None:
        """Hand a fused optimizer this step's flag as its found_inf (with the scaler's own where
        `scaled`): its kernel skips the update on the device, no host sync."""
        assert self.optimizer is not None  # skip on a fused optimizer needs one
        found = getattr(self.optimizer, "found_inf", None) if scaled else None
        self._flag = flag = flagged.float()
        self.optimizer.found_inf = flag if found is None else torch.maximum(flag, found)  # type: ignore[attr-defined]
        self._unfilled = self._first_state(self.optimizer)

    def _flag_again(self, optimizer: Any, *_: Any) -> None:
        """Before a fused step whose step the caller closed (hook_optimizer=False): the flag handed
        then, with the found_inf a GradScaler's step() set since in its place (a flagged step was
        reported skipped and updated the weights: 7e-4 off)."""
        if self._flag is None:
            return
        found = getattr(optimizer, "found_inf", None)
        flag = self._flag.to(found.device) if found is not None else self._flag
        optimizer.found_inf = flag if found is None else torch.maximum(flag, found)
        self._flag = None

    def _pre_hook(self, optimizer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Close the step before the optimizer's update; `args` are step()'s own, (optimizer, closure?)."""
        closure, placed = closure_of(args, kwargs, 1)
        if closure is None:
            self.watcher.before_step()
            return None
        # step(closure): the closure runs the step's forward and backward, so it runs first and the
        # step closes after it; the optimizer gets its loss (see _closure_once)
        once = self._closure_once(closure)
        self.watcher.before_step()
        return placed(once)

    def _closure_once(self, closure: Any) -> Any:
        """Run `closure` now (the step's passes, before the step closes); returns a closure giving that
        loss at its first call, the real closure after (LBFGS re-evaluates: those passes are in the
        next step's row, said once by a warning)."""
        with torch.enable_grad():
            loss = closure()
        calls = [0]

        def once() -> Any:
            calls[0] += 1
            if calls[0] == 1:
                return loss
            if not self._warned_closure:
                self._warned_closure = True
                warnings.warn(
                    f"watch: {type(self.optimizer).__name__}.step(closure) evaluates the closure more than "
                    "once per step: the passes after the first are counted in the next step's row",
                    stacklevel=callers_level(),
                )
            return closure()

        return once

    def _first_state(self, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
        """Where a skipped step would leave its first state unfilled: torch's fused SGD allocates the
        momentum buffers of a parameter's first step with empty_like, its kernel skips on found_inf
        without filling them, and they are taken as momentum from then on (weights at 1e32 two steps
        after a skipped first step). Without dampening, a zero buffer made before the step is the
        same (0.9 x 0 + g is g, bit for bit, where the first step copies g) and a skipped step
        leaves it 0: no host read. With dampening, the parameters without state where this step is
        skipped (one counted host read, on such a step only), their state taken off after it
        (`_drop_unfilled`)."""
        if not isinstance(optimizer, torch.optim.SGD):
            return []
        fresh: list[torch.Tensor] = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if (
                    p.grad is None
                    or group["momentum"] == 0
                    or "momentum_buffer" in optimizer.state.get(p, {})
                ):
                    continue
                if group["dampening"] == 0:
                    optimizer.state[p]["momentum_buffer"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )
                else:
                    fresh.append(p)
        if not fresh:
            return []
        self.watcher.host_reads += 1
        return fresh if bool(optimizer.found_inf) else []  # type: ignore[attr-defined]

    def _drop_unfilled(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        """After a skipped step: the state it allocated for parameters that had none (`_first_state`)."""
        for p in self._unfilled:
            optimizer.state.pop(p, None)
        self._unfilled = []

    def _synced_step_of(self) -> Any:
        """optimizer.step for skip=True on a non-fused optimizer: one host sync to decide (a plain
        call of the original step once the watcher is closed)."""
        original = self._original_step

        def step(optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
            if self.watcher.is_open:
                closure, placed = closure_of(args, kwargs, 0)
                once = self._closure_once(closure) if closure is not None else None
                flagged = self.watcher.before_step()
                self.watcher.host_reads += 1
                if flagged is not None and bool(flagged):
                    return None if once is None else once()
                if once is not None:
                    args, kwargs = placed(once)
            return original(*args, **kwargs)

        if hasattr(original, "_wrapped_by_lr_sched"):  # an LR scheduler's wrapper, which this calls:
            step.__dict__["_wrapped_by_lr_sched"] = True  # it warned that step() was overridden
        return step
