"""The model-file convention: a factory `build(**knobs)` with optional SPACE, `batch` and `loss`, or
a module-level `model` with `example_input` (and SEQ_DIM); reading it into knobs and their bounds."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import sys
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from stabilitycheck._tree import tensors
from stabilitycheck._validation import article, describe, is_number
from stabilitycheck.blocks import declared_blocks, declared_pairs
from stabilitycheck.config import RUN_FIELDS
from stabilitycheck.errors import UsageError
from stabilitycheck.families import Knob
from stabilitycheck.losses import Inputs
from stabilitycheck.modelfile.importer import ModelFileError, import_file, top_level_names
from stabilitycheck.modelfile.inputs import check_inputs, infer, resize

if TYPE_CHECKING:
    from stabilitycheck.modelfile.subject import ModelFile

Bound = tuple[Knob, ...]  # (lo, hi) or (lo, hi, step)

FACTORY = "build"
INFER_BATCH, INFER_SEQ = 16, 16  # inputs inferred from the first layer: (16, in) or (16, 16) token ids


def call_args(values: Mapping[str, Knob], params: Mapping[str, inspect.Parameter]) -> dict[str, Knob]:
    """The knobs a function accepts by its signature (all of them when it takes **kwargs)."""
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(values)
    return {k: v for k, v in values.items() if k in params}


def show(values: Mapping[str, Knob]) -> str:
    """'depth=4, width=8': knob values for messages."""
    return ", ".join(f"{k}={v!r}" for k, v in values.items())


def parse_space(given: str, module: ModuleType) -> dict[str, Bound]:
    """SPACE as {name: (lo, hi[, step])}, each bound well formed; knob names are checked later."""
    space = getattr(module, "SPACE", None)
    if space is None:
        return {}
    example = "e.g. SPACE = {'depth': (1, 64), 'init_scale': (0.25, 4.0, 0.25)}"
    if not isinstance(space, Mapping):
        raise ModelFileError(
            f"{given}: SPACE is {article(space)}; expected a dict of name -> (lo, hi), {example}"
        )
    out: dict[str, Bound] = {}
    for name, bound in space.items():
        ok = (
            isinstance(bound, tuple | list)
            and len(bound) in (2, 3)
            and all(is_number(b) and math.isfinite(b) for b in bound)
        )
        if not isinstance(name, str) or not ok:
            raise ModelFileError(
                f"{given}: SPACE[{name!r}]={bound!r} is malformed; expected (lo, hi) or (lo, hi, step) "
                f"of numbers, {example}"
            )
        if bound[0] > bound[1]:
            raise ModelFileError(
                f"{given}: SPACE[{name!r}]={tuple(bound)!r} is empty (lo > hi); "
                f"expected lo <= hi, e.g. {name!r}: {(bound[1], bound[0])!r}"
            )
        if len(bound) == 3 and bound[2] <= 0:
            raise ModelFileError(
                f"{given}: SPACE[{name!r}]={tuple(bound)!r} has step {bound[2]!r}; expected a step > 0, "
                f"e.g. {name!r}: {(bound[0], bound[1], 1)!r}"
            )
        out[name] = tuple(bound)
    return out


def _signature(given: str, label: str, fn: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"{given}: cannot read the signature of {label}: {describe(exc)}") from None


def _knobs_of(
    given: str, label: str, params: Mapping[str, inspect.Parameter], space: Mapping[str, Bound]
) -> dict[str, Knob]:
    """The knobs among a function's parameters: numeric defaults, or no default but bounded by SPACE."""
    knobs: dict[str, Knob] = {}
    for name, p in params.items():
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        if p.default is inspect.Parameter.empty:
            if name not in space or p.kind is inspect.Parameter.POSITIONAL_ONLY:
                raise ModelFileError(
                    f"{given}: {label} parameter {name!r} has no default and SPACE does not bound it; "
                    f"give it a default (e.g. {name}=4) or add SPACE = {{{name!r}: (1, 64)}}"
                )
            lo = space[name][0]
            knobs[name] = lo if all(isinstance(b, int) for b in space[name]) else float(lo)
        elif is_number(p.default) and p.kind is not inspect.Parameter.POSITIONAL_ONLY:
            knobs[name] = p.default
        elif name in space:
            raise ModelFileError(
                f"{given}: SPACE bounds {name!r} but {label} has {name}={p.default!r}, not an int or float; "
                f"knobs are int/float parameters, e.g. def build({name}=4)"
            )
    return knobs


def check_bounds(given: str, label: str, bounds: Mapping[str, Bound], knobs: Mapping[str, Knob]) -> None:
    """Every SPACE name is a knob, and an int knob has int bounds."""
    for name, bound in bounds.items():
        if name not in knobs:
            raise ModelFileError(
                f"{given}: SPACE names {name!r}, which is not a parameter of {label}; "
                f"its knobs are {sorted(knobs)} (e.g. SPACE = {{'depth': (1, 64)}} for def build(depth=4))"
            )
        if isinstance(knobs[name], int) and not all(isinstance(b, int) for b in bound):
            raise ModelFileError(
                f"{given}: SPACE[{name!r}]={bound!r} has float bounds but {name} is an int knob "
                f"(default {knobs[name]!r}); use ints, e.g. {name!r}: (1, 64)"
            )


@dataclasses.dataclass
class Factory:
    """A factory `build(**knobs)` with optional `batch(model, **knobs)`."""

    fn: Callable[..., Any]
    params: dict[str, inspect.Parameter]
    batch: Callable[..., Any] | None
    batch_params: dict[str, inspect.Parameter]
    example_input: object

    def make_model(self, owner: ModelFile, values: Mapping[str, Knob]) -> nn.Module:
        args = call_args(values, self.params)
        label = f"{owner.attr}({show(args)})"
        model = owner.call_user(label, self.fn, **args)
        if not isinstance(model, nn.Module):
            raise ModelFileError(
                f"{owner.given}: {label} returned {article(model)}, not an nn.Module; "
                "a factory must return the model, e.g. `return nn.Sequential(nn.Linear(16, 16), nn.Tanh())`"
            )
        return model

    def make_inputs(
        self, owner: ModelFile, model: nn.Module, values: Mapping[str, Knob], seed: int
    ) -> Inputs:
        if self.batch is not None:
            args = call_args(values, self.batch_params)
            label = f"batch(model, {show(args)})" if args else "batch(model)"
            return check_inputs(owner.given, label, owner.call_user(label, self.batch, model, **args))
        if self.example_input is not None:
            return check_inputs(owner.given, "example_input", self.example_input)
        return infer(owner.given, model, INFER_BATCH, INFER_SEQ, seed)


def check_blocks(owner: ModelFile, model: nn.Module) -> None:
    """The model's `stability_blocks()`, where it defines one, returns (name, module) pairs of its own
    submodules, input side first: anything else is a one-line error saying so, not a failed probe."""
    try:  # a list given as the attribute: said of the model file
        declared = declared_blocks(model)
    except UsageError as exc:
        raise owner.error(str(exc)) from None
    if declared is None:
        return
    got = owner.call_user("stability_blocks()", declared)
    try:  # said of stability_blocks(), not of a call the user made
        declared_pairs(model, got)
    except UsageError as exc:
        raise owner.error(str(exc)) from None


@dataclasses.dataclass
class Fixed:
    """A module-level `model` and `example_input`, the file run again on each build under the
    verdict's seed, so that each seed is an initialisation, as a factory's (one copy of the import's
    model gave every seed the same weights: a 'distribution' of the loss's readouts alone); a file
    loading its weights reads the same model at every seed. `SEQ_DIM` adds seq_len."""

    model: nn.Module
    example_input: Inputs
    seq_dim: int | None
    drawn: tuple[nn.Module, Inputs] | None = None  # the last model built and the input drawn with it

    def make_model(self, owner: ModelFile, values: Mapping[str, Knob]) -> nn.Module:
        if torch.get_default_device().type == "meta":  # a memory estimate's shapes: the import's model
            found, inputs = self.model, self.example_input  # (the file run on meta warned, or failed)
        else:
            module = import_file(owner.path, owner.given, seeded=False)  # the caller seeded the draws
            sys.modules.pop(module.__name__, None)  # one per build: it holds its model
            found, inputs = _fixed_parts(owner.given, owner.attr, module)
        try:  # a copy: a model the file imports from a module of its own is the same object each time
            model = copy.deepcopy(found)
        except Exception as exc:
            raise ModelFileError(
                f"{owner.given}: the module-level `model` cannot be copied ({describe(exc)}); "
                "define a factory instead, e.g. `def build(): return MyModel()`"
            ) from None
        self.drawn = (model, inputs)
        return model

    def make_inputs(
        self, owner: ModelFile, model: nn.Module, values: Mapping[str, Knob], seed: int
    ) -> Inputs:
        drawn, self.drawn = self.drawn, None
        example = drawn[1] if drawn is not None and drawn[0] is model else self.example_input
        if self.seq_dim is None:
            return example
        seq_len = int(values["seq_len"])
        if seq_len < 1:
            raise owner.error(f"knob seq_len={seq_len} must be >= 1; e.g. SPACE = {{'seq_len': (1, 512)}}")
        return resize(example, self.seq_dim, seq_len)


def _fixed_parts(given: str, attr: str, module: ModuleType) -> tuple[nn.Module, Inputs]:
    """The module-level model and its example input, checked."""
    model = getattr(module, attr)
    if not isinstance(model, nn.Module):
        raise ModelFileError(
            f"{given}: `{attr}` is {article(model)}, not an nn.Module; "
            "expected e.g. `model = nn.Sequential(nn.Linear(16, 16), nn.Tanh())`"
        )
    if not hasattr(module, "example_input"):
        raise ModelFileError(
            f"{given}: defines `{attr}` but no `example_input`; add e.g. `example_input = torch.randn(8, 16)`"
        )
    return model, check_inputs(given, "example_input", module.example_input)


def fixed_source(given: str, attr: str, module: ModuleType) -> tuple[Fixed, dict[str, Knob]]:
    """The module-level model, its example input and knobs (seq_len, with SEQ_DIM)."""
    model, inputs = _fixed_parts(given, attr, module)
    knobs: dict[str, Knob] = {}
    seq_dim = getattr(module, "SEQ_DIM", None)
    if seq_dim is not None:
        first = tensors(inputs)[0]
        ok = isinstance(seq_dim, int) and not isinstance(seq_dim, bool) and 0 <= seq_dim < first.dim()
        if not ok or first.shape[seq_dim] == 0:
            raise ModelFileError(
                f"{given}: SEQ_DIM={seq_dim!r} is not a dimension of example_input (shape "
                f"{tuple(first.shape)}); expected a dimension in 0..{first.dim() - 1} of size >= 1, "
                "e.g. SEQ_DIM = 1"
            )
        knobs["seq_len"] = int(first.shape[seq_dim])
    return Fixed(model, inputs, seq_dim), knobs


def factory_source(
    given: str, attr: str, module: ModuleType, space: Mapping[str, Bound]
) -> tuple[Factory, dict[str, Knob]]:
    """The factory, its optional batch(), and their knobs (the factory's defaults win on a clash)."""
    fn = getattr(module, attr)
    params = _signature(given, f"{attr}()", fn)
    batch = getattr(module, "batch", None)
    if batch is not None and not callable(batch):
        raise ModelFileError(
            f"{given}: `batch` is {article(batch)}, not a function; "
            "expected e.g. `def batch(model, batch_size=8): return torch.randn(batch_size, 16)`"
        )
    batch_params = _signature(given, "batch()", batch) if batch is not None else {}
    if batch is not None and not batch_params:
        raise ModelFileError(
            f"{given}: batch() takes no arguments; it must take the model first, "
            "e.g. `def batch(model, batch_size=8): ...`"
        )
    batch_params = dict(list(batch_params.items())[1:])
    knobs = _knobs_of(given, f"{attr}()", params, {k: v for k, v in space.items() if k in params})
    _no_run_names(given, f"{attr}()", knobs)
    own = {k: p for k, p in batch_params.items() if k not in knobs}  # the rest get the factory's knob
    batch_knobs = _knobs_of(given, "batch()", own, {k: v for k, v in space.items() if k in own})
    _no_run_names(given, "batch()", batch_knobs)
    for name, default in batch_knobs.items():
        knobs.setdefault(name, default)
    return Factory(fn, params, batch, batch_params, getattr(module, "example_input", None)), knobs


def _no_run_names(given: str, label: str, knobs: Mapping[str, Knob]) -> None:
    """A knob named like a run setting (`steps`, `clip`, `seed`, ...) would be read as that setting by
    Config.of: its value never reached the function, and its default set the probe's own (a factory's
    `steps=2` ran two SGD steps, `clip=5.0` clipped the gradients): refused, to be renamed."""
    clash = [name for name in knobs if name in RUN_FIELDS]
    if clash:
        name = clash[0]
        raise ModelFileError(
            f"{given}: {label} parameter {name!r} has the name of a run setting "
            f"({', '.join(RUN_FIELDS)}), which stabilitycheck sets itself and would never pass to "
            f"{label}; rename the parameter, e.g. model_{name}={knobs[name]!r}"
        )


def find(given: str, attr: str | None, module: ModuleType) -> tuple[str, bool]:
    """(name, is_factory): the factory to call, or the module-level model; errors list what exists."""
    if attr is None and callable(getattr(module, FACTORY, None)):
        return FACTORY, True
    if attr is None and hasattr(module, "model"):
        return "model", False
    wanted = attr or FACTORY
    value = getattr(module, wanted, None)
    if attr is not None and isinstance(value, nn.Module):
        return attr, False
    if attr is not None and callable(value):
        return attr, True
    what = f"no top-level `{wanted}`" if value is None else f"`{wanted}` is {article(value)}"
    fallback = "" if attr else " and no module-level `model`"
    raise ModelFileError(
        f"{given}: {what}{fallback}; found top-level names {top_level_names(module)[:12]}; expected a "
        f"factory `def {wanted}(depth=4): return nn.Sequential(...)` "
        "or `model = ...` with `example_input = ...`"
    )
