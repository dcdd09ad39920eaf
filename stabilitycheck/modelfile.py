"""A user's model file as a Subject: `path/model.py[:factory]` turned into (model, inputs, loss).

The file is imported like pytest imports a test file (it runs the user's code) and searched, in order,
for (1) a factory `build(**knobs) -> nn.Module` (or the `:factory` named in the spec) with optional
`SPACE`, `batch(model, **knobs)` and `loss(output, inputs)`; (2) a module-level `model` and
`example_input`, whose knob is `seq_len` when the file sets `SEQ_DIM`. Every failure to find or use
these is a `ModelFileError`: one line naming the file, what was wrong and what to do.

init_scale. A factory with an `init_scale` parameter gets it as a knob, like any other. Otherwise
(and always for a module-level model) `Config.init_scale`, the field, multiplies every parameter of
rank >= 2 after the model's own init (skipped at 1.0); SPACE may bound it as `init_scale` all the same.

Knobs. A factory's knobs are its parameters with int or float defaults (bool is not a knob), plus
those of `batch` after its first (the model); a parameter without a default is a knob only when
`SPACE` bounds it, and its default is then the lower bound. Each function gets only the knobs its
signature accepts. Knob values are read from `Config.params`; a knob missing there keeps its default.

Inputs. `batch(model, **knobs)` if defined, else a module-level `example_input`, else inferred from
the first layer (an `nn.Linear` gets `randn(batch_size, in_features)`, an `nn.Embedding` gets token
ids of shape (batch_size, seq_len), both from the Config). `batch` runs with the model on the CPU;
its tensors are then moved to `config.device`, and floating ones cast to `config.dtype`.
With `SEQ_DIM`, the example input is resized along that dimension to `seq_len`: cut to the first
`seq_len` entries, or tiled end to end (repeated whole, then cut) to lengthen it. Every tensor whose
size along `SEQ_DIM` equals that of the first tensor is resized alike (e.g. ids and attention mask).

Determinism. The file is imported with torch seeded to 0, so a module-level model is the same on every
run; the factory and `batch` run with torch seeded from `config.seed` inside a forked RNG state, and
the module-level `model` is deep-copied on each build, so one Config always builds the same thing.

Loss. A user `loss(output, inputs)` gets the model's output as returned. Without one, the output is
unpacked: a tensor as is; a tuple/list gives its first tensor; a dict or an object with attributes
gives its `loss` (Hugging Face style, used as the loss) or else its `logits` (or first tensor). The
default loss (DESIGN.md "Which loss") is cross-entropy against fixed random labels over the last
dimension when it has >= 2 entries, else mean squared error to fixed random targets; never the mean
of squared outputs. Labels and targets come from the seed and are cached per shape and device.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import inspect
import itertools
import sys
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.jit import ScriptModule
from torch.nn import functional as F

from stabilitycheck.config import Config
from stabilitycheck.errors import StabilityCheckError, UsageError
from stabilitycheck.space import Axis, Space
from stabilitycheck.subject import Built, Inputs, LossFn, find_blocks, generator, torch_dtype

if TYPE_CHECKING:
    from stabilitycheck.probing import Measurement

Knob = int | float
Bound = tuple[Knob, ...]  # (lo, hi) or (lo, hi, step)

FACTORY = "build"
MAX_MESSAGE = 300  # characters kept of a user exception's message
_SALT_BATCH, _SALT_LOSS, _SALT_INFER = 1, 2, 3
_counter = itertools.count()
_RESOURCE: tuple[type[BaseException], ...] = (MemoryError, torch.cuda.OutOfMemoryError)
# exceptions passed on as they are, never reworded as a mistake in the user's code
_PASS_THROUGH: tuple[type[BaseException], ...] = (StabilityCheckError, *_RESOURCE)


class ModelFileError(UsageError):
    """The user's model file cannot be loaded or used: one line naming the file and the fix."""


# --- small helpers -------------------------------------------------------------------------------


def _one_line(text: str) -> str:
    """Whitespace collapsed and cut to MAX_MESSAGE characters, so a message stays one line."""
    flat = " ".join(text.split())
    return flat if len(flat) <= MAX_MESSAGE else flat[: MAX_MESSAGE - 3] + "..."


def _describe(exc: BaseException) -> str:
    """`Type: message` of an exception, on one line."""
    message = _one_line(str(exc))
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _a(value: object) -> str:
    """The type of `value` with its article: 'an int', 'a str'."""
    name = type(value).__name__
    return f"an {name}" if name[:1].lower() in "aeiou" else f"a {name}"


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _derived(seed: int, salt: int) -> int:
    """A seed for one purpose (inputs, labels), distinct from the factory's so draws don't coincide."""
    return (seed + salt * 0x9E3779B97F4A7C15) % 2**63


def _call_args(values: Mapping[str, Knob], params: Mapping[str, inspect.Parameter]) -> dict[str, Knob]:
    """The knobs a function accepts by its signature (all of them when it takes **kwargs)."""
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(values)
    return {k: v for k, v in values.items() if k in params}


def _show(values: Mapping[str, Knob]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in values.items())


# --- finding the file and importing it -----------------------------------------------------------


def _split_spec(spec: str) -> tuple[str, str | None]:
    """`path/model.py:factory` -> (path, factory); a spec without `:name` gives (spec, None)."""
    head, sep, tail = spec.rpartition(":")
    if sep and head.endswith(".py") and tail and "/" not in tail and "\\" not in tail:
        return head, tail
    return spec, None


def _check_path(given: str) -> Path:
    path = Path(given)
    example = "e.g. `stabilitycheck examples/mlp.py` or `stabilitycheck model.py:build`"
    if not path.exists():
        raise ModelFileError(f"{given}: no such file; expected a path to a Python model file, {example}")
    if not path.is_file() or path.suffix != ".py":
        raise ModelFileError(f"{given}: not a .py file; expected a Python model file, {example}")
    return path.resolve()


def _line_in(exc: BaseException, path: Path) -> int | None:
    """The line of `path` where the exception was raised (the deepest frame in that file)."""
    lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename) == path]
    return lines[-1] if lines else None


def _import(path: Path, given: str) -> ModuleType:
    """Run the file as a fresh module (its directory on sys.path meanwhile, torch seeded to 0)."""
    name = f"stabilitycheck_modelfile_{next(_counter)}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelFileError(f"{given}: cannot be imported as a Python module; expected a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling in the user's code look themselves up here
    folder = str(path.parent)
    sys.path.insert(0, folder)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            spec.loader.exec_module(module)
    except SyntaxError as exc:
        del sys.modules[name]
        inside = exc.filename and Path(exc.filename) != path
        where = f"{given} (in {exc.filename}:{exc.lineno})" if inside else f"{given}:{exc.lineno}"
        raise ModelFileError(
            f"{where}: syntax error: {exc.msg}; the model file must be valid Python (try `python {given}`)"
        ) from None
    except SystemExit as exc:
        del sys.modules[name]
        raise ModelFileError(
            f"{given}: the file called sys.exit({exc.code!r}) on import; "
            "put script code under `if __name__ == '__main__':`"
        ) from None
    except Exception as exc:
        del sys.modules[name]
        line = _line_in(exc, path)
        where = f"{given}:{line}" if line else given
        raise ModelFileError(
            f"{where}: importing the file raised {_describe(exc)}; "
            f"it must import without error (try `python {given}`)"
        ) from None
    finally:
        if sys.path and sys.path[0] == folder:
            del sys.path[0]
        elif folder in sys.path:
            sys.path.remove(folder)
    return module


def _top_level_names(module: ModuleType) -> list[str]:
    """The public names the file itself defines (imports left out), for 'found these' messages."""
    names = []
    for key, value in vars(module).items():
        if key.startswith("_") or isinstance(value, ModuleType) or type(value).__module__ == "__future__":
            continue
        owner = getattr(value, "__module__", module.__name__) if callable(value) else module.__name__
        if owner == module.__name__:
            names.append(key)
    return names


# --- SPACE and knobs -----------------------------------------------------------------------------


def _parse_space(given: str, module: ModuleType) -> dict[str, Bound]:
    """SPACE as {name: (lo, hi[, step])}, each bound well formed; knob names are checked later."""
    space = getattr(module, "SPACE", None)
    if space is None:
        return {}
    example = "e.g. SPACE = {'depth': (1, 64), 'init_scale': (0.25, 4.0, 0.25)}"
    if not isinstance(space, Mapping):
        raise ModelFileError(f"{given}: SPACE is {_a(space)}; expected a dict of name -> (lo, hi), {example}")
    out: dict[str, Bound] = {}
    for name, bound in space.items():
        ok = isinstance(bound, tuple | list) and len(bound) in (2, 3) and all(_is_number(b) for b in bound)
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
        raise ModelFileError(f"{given}: cannot read the signature of {label}: {_describe(exc)}") from None


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
        elif _is_number(p.default) and p.kind is not inspect.Parameter.POSITIONAL_ONLY:
            knobs[name] = p.default
        elif name in space:
            raise ModelFileError(
                f"{given}: SPACE bounds {name!r} but {label} has {name}={p.default!r}, not an int or float; "
                f"knobs are int/float parameters, e.g. def build({name}=4)"
            )
    return knobs


def _check_bounds(given: str, label: str, bounds: Mapping[str, Bound], knobs: Mapping[str, Knob]) -> None:
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


# --- inputs --------------------------------------------------------------------------------------


def _check_inputs(given: str, label: str, inputs: object) -> Inputs:
    """Inputs are a tensor, or a tuple/list/dict holding at least one tensor (other leaves scalars)."""
    example = "e.g. `return torch.randn(batch_size, 16)` or `return {'input_ids': ids}`"
    if isinstance(inputs, torch.Tensor):
        return inputs
    items: list[object] = []
    if isinstance(inputs, tuple | list):
        items = list(inputs)
    elif isinstance(inputs, Mapping) and all(isinstance(k, str) for k in inputs):
        inputs = dict(inputs)  # a plain dict, so the probe calls model(**inputs) (e.g. a BatchEncoding)
        items = list(inputs.values())
    else:
        raise ModelFileError(
            f"{given}: {label} is {_a(inputs)}, not tensors; expected a tensor, "
            f"a tuple/list of tensors or a dict of str -> tensor, {example}"
        )
    leaves = (torch.Tensor, int, float, bool, str, type(None))
    if not any(isinstance(v, torch.Tensor) for v in items) or not all(isinstance(v, leaves) for v in items):
        raise ModelFileError(
            f"{given}: {label} is {_a(inputs)} of {[type(v).__name__ for v in items]}, "
            f"not tensors; expected tensors (plain scalars allowed beside them), {example}"
        )
    return inputs


def _move(inputs: Inputs, device: torch.device, dtype: torch.dtype) -> Inputs:
    """Inputs on `device`, floating tensors cast to `dtype`, each a fresh tensor (never the user's)."""

    def one(x: object) -> object:
        if not isinstance(x, torch.Tensor):
            return x
        moved = x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device=device)
        return moved.clone() if moved is x else moved

    if isinstance(inputs, dict):
        return {k: one(v) for k, v in inputs.items()}
    if isinstance(inputs, tuple | list):
        return type(inputs)(one(v) for v in inputs)
    return one(inputs)


def _tensors(inputs: Inputs) -> list[torch.Tensor]:
    values = inputs.values() if isinstance(inputs, dict) else inputs
    values = [values] if isinstance(values, torch.Tensor) else values
    return [v for v in values if isinstance(v, torch.Tensor)]


def _resize(x: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    """`x` cut to `n` entries along `dim`, or tiled end to end and then cut to lengthen it."""
    length = x.shape[dim]
    if n > length:
        x = torch.cat([x] * -(-n // length), dim=dim)
    return x.narrow(dim, 0, n)


def _resize_inputs(inputs: Inputs, dim: int, base: int, n: int) -> Inputs:
    """Resize every tensor whose size along `dim` is `base` (the first tensor's) to `n`."""

    def one(x: object) -> object:
        if isinstance(x, torch.Tensor) and x.dim() > dim and x.shape[dim] == base:
            return _resize(x, dim, n)
        return x

    if isinstance(inputs, dict):
        return {k: one(v) for k, v in inputs.items()}
    if isinstance(inputs, tuple | list):
        return type(inputs)(one(v) for v in inputs)
    return one(inputs)


def _infer_inputs(given: str, model: nn.Module, config: Config) -> torch.Tensor:
    """Inputs for a model without batch() or example_input, read off its first layer."""
    gen = generator(_derived(config.seed, _SALT_INFER))
    for module in model.modules():
        if isinstance(module, nn.Linear):
            return torch.randn(config.batch_size, module.in_features, generator=gen)
        if isinstance(module, nn.Embedding):
            shape = (config.batch_size, config.seq_len)
            return torch.randint(0, module.num_embeddings, shape, generator=gen)
        if not list(module.children()) and any(True for _ in module.parameters(recurse=False)):
            break
    raise ModelFileError(
        f"{given}: has no batch() and its first layer is not nn.Linear or nn.Embedding, so the inputs "
        "cannot be inferred; add e.g. `def batch(model, batch_size=8): return torch.randn(batch_size, 16)`"
    )


# --- outputs and the loss ------------------------------------------------------------------------


def _unpack(output: object) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(output tensor, model-computed loss) of a model output: tensor, tuple/list, dict or object."""
    if isinstance(output, torch.Tensor):
        return output, None
    if isinstance(output, tuple | list):
        for item in output:
            tensor, loss = _unpack(item)
            if tensor is not None or loss is not None:
                return tensor, loss
        return None, None
    if isinstance(output, Mapping):
        fields = dict(output)
    elif hasattr(output, "__dict__"):
        fields = vars(output)
    else:
        return None, None
    first = next((v for v in fields.values() if isinstance(v, torch.Tensor)), None)
    loss, logits = fields.get("loss"), fields.get("logits")
    tensor = logits if isinstance(logits, torch.Tensor) else first
    return tensor, loss if isinstance(loss, torch.Tensor) else None


class DefaultLoss:
    """Cross-entropy against fixed random labels over the last dimension when it has >= 2 entries,
    else MSE to fixed random targets: bounded below and nearly independent of the forward signal."""

    def __init__(self, seed: int) -> None:
        self.seed = _derived(seed, _SALT_LOSS)
        self.cache: dict[tuple[object, ...], torch.Tensor] = {}

    def target(self, kind: str, shape: tuple[int, ...], classes: int, out: torch.Tensor) -> torch.Tensor:
        """Labels or targets for this shape, drawn once from the seed (same for any call order)."""
        key = (kind, shape, classes, out.device, out.dtype)
        if key not in self.cache:
            gen = generator(self.seed)
            if kind == "ce":
                drawn = torch.randint(0, classes, shape, generator=gen)
            else:
                drawn = torch.randn(shape, generator=gen, dtype=torch.float64).to(out.dtype)
            self.cache[key] = drawn.to(out.device)
        return self.cache[key]

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        acc = torch.float64 if output.dtype == torch.float64 else torch.float32
        out = output.to(acc)
        if out.dim() >= 1 and out.shape[-1] >= 2:
            classes = out.shape[-1]
            labels = self.target("ce", tuple(out.shape[:-1]), classes, out)
            return F.cross_entropy(out.reshape(-1, classes), labels.reshape(-1))
        return F.mse_loss(out, self.target("mse", tuple(out.shape), 0, out))


# --- the two kinds of file -----------------------------------------------------------------------


@dataclasses.dataclass
class _Factory:
    """A factory `build(**knobs)` with optional `batch(model, **knobs)`."""

    fn: Callable[..., Any]
    params: dict[str, inspect.Parameter]
    batch: Callable[..., Any] | None
    batch_params: dict[str, inspect.Parameter]
    example_input: object

    def make_model(self, owner: ModelFile, values: Mapping[str, Knob]) -> nn.Module:
        args = _call_args(values, self.params)
        label = f"{owner.attr}({_show(args)})"
        model = owner.call_user(label, self.fn, **args)
        if not isinstance(model, nn.Module):
            raise ModelFileError(
                f"{owner.given}: {label} returned {_a(model)}, not an nn.Module; "
                "a factory must return the model, e.g. `return nn.Sequential(nn.Linear(16, 16), nn.Tanh())`"
            )
        return model

    def make_inputs(
        self, owner: ModelFile, model: nn.Module, values: Mapping[str, Knob], config: Config
    ) -> Inputs:
        if self.batch is not None:
            args = _call_args(values, self.batch_params)
            label = f"batch(model, {_show(args)})" if args else "batch(model)"
            return _check_inputs(owner.given, label, owner.call_user(label, self.batch, model, **args))
        if self.example_input is not None:
            return _check_inputs(owner.given, "example_input", self.example_input)
        return _infer_inputs(owner.given, model, config)


@dataclasses.dataclass
class _Fixed:
    """A module-level `model` and `example_input`, copied on each build; `SEQ_DIM` adds seq_len."""

    model: nn.Module
    example_input: Inputs
    seq_dim: int | None

    def make_model(self, owner: ModelFile, values: Mapping[str, Knob]) -> nn.Module:
        try:
            return copy.deepcopy(self.model)
        except Exception as exc:
            raise ModelFileError(
                f"{owner.given}: the module-level `model` cannot be copied ({_describe(exc)}); "
                "define a factory instead, e.g. `def build(): return MyModel()`"
            ) from None

    def make_inputs(
        self, owner: ModelFile, model: nn.Module, values: Mapping[str, Knob], config: Config
    ) -> Inputs:
        if self.seq_dim is None:
            return self.example_input
        seq_len = int(values["seq_len"])
        if seq_len < 1:
            raise owner.error(f"knob seq_len={seq_len} must be >= 1; e.g. SPACE = {{'seq_len': (1, 512)}}")
        base = _tensors(self.example_input)[0].shape[self.seq_dim]
        return _resize_inputs(self.example_input, self.seq_dim, base, seq_len)


def _fixed_source(given: str, attr: str, module: ModuleType) -> tuple[_Fixed, dict[str, Knob]]:
    """The module-level model, its example input and knobs (seq_len, with SEQ_DIM)."""
    model = getattr(module, attr)
    if not isinstance(model, nn.Module):
        raise ModelFileError(
            f"{given}: `{attr}` is {_a(model)}, not an nn.Module; "
            "expected e.g. `model = nn.Sequential(nn.Linear(16, 16), nn.Tanh())`"
        )
    if not hasattr(module, "example_input"):
        raise ModelFileError(
            f"{given}: defines `{attr}` but no `example_input`; add e.g. `example_input = torch.randn(8, 16)`"
        )
    inputs = _check_inputs(given, "example_input", module.example_input)
    knobs: dict[str, Knob] = {}
    seq_dim = getattr(module, "SEQ_DIM", None)
    if seq_dim is not None:
        first = _tensors(inputs)[0]
        ok = isinstance(seq_dim, int) and not isinstance(seq_dim, bool) and 0 <= seq_dim < first.dim()
        if not ok or first.shape[seq_dim] == 0:
            raise ModelFileError(
                f"{given}: SEQ_DIM={seq_dim!r} is not a dimension of example_input (shape "
                f"{tuple(first.shape)}); expected a dimension in 0..{first.dim() - 1} of size >= 1, "
                "e.g. SEQ_DIM = 1"
            )
        knobs["seq_len"] = int(first.shape[seq_dim])
    return _Fixed(model, inputs, seq_dim), knobs


def _factory_source(
    given: str, attr: str, module: ModuleType, space: Mapping[str, Bound]
) -> tuple[_Factory, dict[str, Knob]]:
    """The factory, its optional batch(), and their knobs (the factory's defaults win on a clash)."""
    fn = getattr(module, attr)
    params = _signature(given, f"{attr}()", fn)
    batch = getattr(module, "batch", None)
    if batch is not None and not callable(batch):
        raise ModelFileError(
            f"{given}: `batch` is {_a(batch)}, not a function; "
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
    batch_space = {k: v for k, v in space.items() if k in batch_params and k not in params}
    for name, default in _knobs_of(given, "batch()", batch_params, batch_space).items():
        knobs.setdefault(name, default)
    return _Factory(fn, params, batch, batch_params, getattr(module, "example_input", None)), knobs


def _find(given: str, attr: str | None, module: ModuleType) -> tuple[str, bool]:
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
    what = f"no top-level `{wanted}`" if value is None else f"`{wanted}` is {_a(value)}"
    fallback = "" if attr else " and no module-level `model`"
    raise ModelFileError(
        f"{given}: {what}{fallback}; found top-level names {_top_level_names(module)[:12]}; expected a "
        f"factory `def {wanted}(depth=4): return nn.Sequential(...)` "
        "or `model = ...` with `example_input = ...`"
    )


# --- the Subject ---------------------------------------------------------------------------------


class ModelFile:
    """A user's model file as a Subject: `knobs` are the defaults, `bounds` come from SPACE."""

    def __init__(self, given: str, attr: str, module: ModuleType, *, is_factory: bool = True) -> None:
        self.given = given
        self.path = Path(given).resolve()
        self.attr = attr
        self.module = module
        self.name = f"{given}:{attr}"
        self.spec = f"{given}:{attr}"
        space = _parse_space(given, module)
        self.source: _Factory | _Fixed
        if not is_factory:
            self.source, self.knobs = _fixed_source(given, attr, module)
            label = f"the module-level `{attr}` (its knob is seq_len, with SEQ_DIM)"
        else:
            self.source, self.knobs = _factory_source(given, attr, module, space)
            label = f"{attr}() or batch()"
        self.scales_weights = "init_scale" not in self.knobs  # then Config.init_scale scales the weights
        _check_bounds(
            given, label, space, {"init_scale": 1.0, **self.knobs} if self.scales_weights else self.knobs
        )
        self.bounds: dict[str, Bound] = dict(space)
        user_loss = getattr(module, "loss", None)
        if user_loss is not None and not callable(user_loss):
            raise ModelFileError(
                f"{given}: `loss` is {_a(user_loss)}, not a function; expected "
                "`def loss(output, inputs): return F.cross_entropy(output, labels)` (a scalar)"
            )
        self.user_loss: Callable[..., Any] | None = user_loss

    def __repr__(self) -> str:
        return f"ModelFile({self.spec!r}, knobs={self.knobs!r}, bounds={self.bounds!r})"

    def error(self, what: str) -> ModelFileError:
        """A ModelFileError naming this file."""
        return ModelFileError(f"{self.given}: {what}")

    def call_user(self, label: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call the user's code; an exception it raises becomes a one-line ModelFileError."""
        try:
            return fn(*args, **kwargs)
        except _PASS_THROUGH:
            raise
        except Exception as exc:
            raise self.error(
                f"{label} raised {_describe(exc)}; fix the code, or narrow SPACE to values it accepts"
            ) from None

    def values(self, config: Config) -> dict[str, Knob]:
        """The knob values of `config`: its `params`, the defaults for knobs it leaves out."""
        params = dict(config.params)
        unknown = sorted(set(params) - set(self.knobs))
        if unknown:
            raise self.error(
                f"Config.params names {unknown[0]!r}, not a knob of {self.name}; its knobs are "
                f"{sorted(self.knobs)} (make the Config with ModelFile.base_config())"
            )
        out: dict[str, Knob] = {}
        for name, default in self.knobs.items():
            value = params.get(name, config.init_scale if name == "init_scale" else default)
            out[name] = self._coerce(name, value, default)
        return out

    def _coerce(self, name: str, value: object, default: Knob) -> Knob:
        """`value` as the knob's type: an int knob takes ints (or integral floats), a float knob numbers."""
        if isinstance(value, int | float) and not isinstance(value, bool):
            if isinstance(default, float):
                return float(value)
            if float(value).is_integer():
                return int(value)
        raise self.error(f"knob {name}={value!r} is not {_a(default)}; expected e.g. {name}={default!r}")

    def base_config(self, **overrides: Any) -> Config:
        """A Config of this file at its defaults (knobs in `params`, sorted); knob names in `overrides`
        go to params, other names (seed, dtype, init_scale when it is no parameter...) to the fields."""
        params = {**self.knobs, **{k: v for k, v in overrides.items() if k in self.knobs}}
        fields = {k: v for k, v in overrides.items() if k not in self.knobs}
        return Config(family=self.name, params=tuple(sorted(params.items())), **fields)

    def build(self, config: Config) -> Built:
        """The model and inputs of `config`, seeded from config.seed, on its device and dtype."""
        values = self.values(config)
        cuda = [torch.device(config.device)] if config.device.startswith("cuda") else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(config.seed)
            model = self.source.make_model(self, values)
            blocks = find_blocks(model)
            self.check_eager(model, blocks)
            if self.scales_weights and config.init_scale != 1.0:
                _scale_weights(model, config.init_scale)
            torch.manual_seed(_derived(config.seed, _SALT_BATCH))
            inputs = self.source.make_inputs(self, model, values, config)
        device, dtype = torch.device(config.device), torch_dtype(config.dtype)
        model.to(device=device, dtype=dtype)
        return Built(model, _move(inputs, device, dtype), self.loss_fn(config.seed), blocks)

    def check_eager(self, model: nn.Module, blocks: tuple[tuple[str, nn.Module], ...]) -> None:
        """The probe hooks the model's blocks; TorchScript modules take no hooks: say so up front."""
        scripted = [name or "the model" for name, m in (("", model), *blocks) if isinstance(m, ScriptModule)]
        if scripted:
            raise self.error(
                f"{scripted[0]} is a TorchScript module (torch.jit.script/trace), which takes no forward "
                "hooks; give the eager nn.Module, e.g. `model = Net()` rather than `torch.jit.script(Net())`"
            )

    def loss_fn(self, seed: int) -> LossFn:
        """The user's loss(output, inputs), or the default loss on the unpacked output."""
        user, default = self.user_loss, DefaultLoss(seed)

        def loss(output: Any, inputs: Inputs) -> torch.Tensor:
            if user is not None:
                return self.call_user("loss(output, inputs)", user, output, inputs)  # type: ignore[no-any-return]
            tensor, model_loss = _unpack(output)
            if model_loss is not None:
                return model_loss
            if tensor is None:
                raise self.error(
                    f"the model's output is {_a(output)} with no tensor in it; return a "
                    "tensor (e.g. logits), a tuple/dict holding one, or define `def loss(output, inputs)`"
                )
            return default(tensor)

        return loss

    def check(self, config: Config | None = None) -> Measurement:
        """Probe once (default: the base config); any failure becomes a one-line ModelFileError."""
        from stabilitycheck.probing import probe

        config = config if config is not None else self.base_config()
        try:
            return probe(config, self)
        except _RESOURCE:
            raise
        except ModelFileError:
            raise
        except UsageError as exc:
            knobs = _show(self.values(config))
            raise self.error(f"{exc} (with {knobs})" if knobs else str(exc)) from None
        except Exception as exc:
            knobs = _show(self.values(config))
            raise self.error(
                f"running the model{f' with {knobs}' if knobs else ''} raised {_describe(exc)}; "
                "check that batch() or example_input matches what forward() expects"
            ) from None


def _scale_weights(model: nn.Module, scale: float) -> None:
    """Multiply every parameter of rank >= 2 (the weights, not biases or norms' gains) by `scale`."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(scale)


def space_of(subject: ModelFile) -> Space:
    """The Space to search for a model file: its SPACE bounds as axes (in SPACE order) around
    `base_config()`; knobs without bounds stay at their defaults."""
    axes = tuple(Axis.range(name, *bound) for name, bound in subject.bounds.items())
    return Space(subject.name, subject.base_config(), axes)


def load(spec: str) -> ModelFile:
    """Import `path/model.py[:factory]` (running the user's code) and return it as a Subject."""
    given, attr = _split_spec(spec)
    path = _check_path(given)
    module = _import(path, given)
    name, is_factory = _find(given, attr, module)
    return ModelFile(given, name, module, is_factory=is_factory)
