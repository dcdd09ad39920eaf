"""A user's model file as a Subject: knobs from the factory's signature, bounds from SPACE, inputs
from batch() / example_input, the user's loss or the default one."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn
from torch.jit import ScriptModule
from torch.nn.parameter import UninitializedParameter

from stabilitycheck._tree import tensors
from stabilitycheck._validation import article, describe, knob_refusal, knob_value, raised_at
from stabilitycheck.blockcalls import floating
from stabilitycheck.blocks import find_blocks
from stabilitycheck.config import Config
from stabilitycheck.errors import StabilityCheckError
from stabilitycheck.families import Knob, Scalar
from stabilitycheck.junctions import made_from, taken_outputs
from stabilitycheck.loops import looped_blocks, on_a_copy
from stabilitycheck.losses import DefaultLoss, Inputs, LossFn, OutputLoss, call_model
from stabilitycheck.memory import meta_bytes, parameter_bytes
from stabilitycheck.modelfile.convention import (
    Bound,
    Factory,
    Fixed,
    check_blocks,
    check_bounds,
    factory_source,
    fixed_source,
    parse_space,
)
from stabilitycheck.modelfile.importer import ModelFileError
from stabilitycheck.modelfile.inputs import move
from stabilitycheck.rng import SALT_BATCH, SALT_INFER, SALT_LOSS, derived, host_rng_kept, seed_all
from stabilitycheck.space import INIT_SCALES, Axis, Space
from stabilitycheck.subject import Built, torch_dtype

SCALE = "init_scale"
INIT_NAMES = (SCALE, "initializer_range", "init_std", "initializer_factor", "init_gain")
"""Knob names recognised as the init scale when the file declares no INIT; the critical value is the
knob's default (the init the model was designed with), unless INIT = (name, value) says otherwise."""
_RESOURCE: tuple[type[BaseException], ...] = (MemoryError, torch.cuda.OutOfMemoryError)
_PASS_THROUGH: tuple[type[BaseException], ...] = (StabilityCheckError, *_RESOURCE)


class ModelFile:
    """A user's model file as a Subject. `knobs` are the defaults; `bounds` come from SPACE."""

    draws_numpy = True  # its forward may draw from np.random, seeded per probe (configprobe._probe)

    def __init__(self, given: str, attr: str, module: ModuleType, *, is_factory: bool = True) -> None:
        self.given = given
        self.path = Path(given).resolve()
        self.attr = attr
        self.module = module
        self.name = f"{self.path}:{attr}"
        space = parse_space(given, module)
        self.source: Factory | Fixed
        if is_factory:
            self.source, self.knobs = factory_source(given, attr, module, space)
            label = f"{attr}() or batch()"
        else:
            self.source, self.knobs = fixed_source(given, attr, module)
            label = f"the module-level `{attr}` (its knob is seq_len, with SEQ_DIM)"
        self.init_knob: str | None
        declared = getattr(module, "INIT", None)
        self.init_knob, self.critical = self._init(declared)
        self.critical_note = (  # a file's own init at sigma_w 2 read 'at its critical value' (an audit)
            "its critical value (INIT)"
            if isinstance(declared, tuple) and len(declared) == 2 and isinstance(declared[1], int | float)
            else f"the model's own init, which critical-init takes as critical; INIT = ({self.init_knob!r}, "
            "value) in the file names the critical value"
        )
        self.scales_weights = self.init_knob == SCALE and SCALE not in self.knobs
        if self.scales_weights:
            self.knobs[SCALE] = 1.0  # multiplies every weight of rank >= 2 after the model's own init
        check_bounds(given, label, space, self.knobs)
        self.bounds: dict[str, Bound] = dict(space)
        user_loss = getattr(module, "loss", None)
        if user_loss is not None and not callable(user_loss):
            raise self.error(
                f"`loss` is {article(user_loss)}, not a function; expected "
                "`def loss(output, inputs): return F.cross_entropy(output, labels)` (a scalar)"
            )
        self.user_loss: Callable[..., Any] | None = user_loss
        # per Config (seed aside: how the model runs, not what it draws), `_reading`'s answer, which a
        # copy's forward finds: a verdict's later seeds reuse it
        self.readings: dict[Config, str] = {}

    def _init(self, declared: object) -> tuple[str, Knob]:
        """The init knob and its critical value: INIT = name or (name, value), else a known name."""
        if declared is not None:
            name, value = declared if isinstance(declared, tuple) and len(declared) == 2 else (declared, None)
            if not isinstance(name, str) or (name not in self.knobs and name != SCALE):
                raise self.error(
                    f"INIT={declared!r} names no knob; its knobs are {sorted(self.knobs)}, "
                    "e.g. INIT = 'initializer_range' or INIT = ('initializer_range', 0.02)"
                )
            default = self.knobs.get(name, 1.0)
            if not isinstance(default, float):  # its grid is the default times factors like 0.5, 1.25
                raise self.error(
                    f"INIT={declared!r} names {name}, whose default {default!r} is no float; INIT names "
                    "the factory's float init-scale parameter (e.g. def build(depth=4, init_scale=1.0))"
                )
            return name, value if isinstance(value, int | float) else default
        name = next((n for n in INIT_NAMES if n in self.knobs), SCALE)
        return name, self.knobs.get(name, 1.0)

    def __repr__(self) -> str:
        return f"ModelFile({self.name!r}, knobs={self.knobs!r}, bounds={self.bounds!r})"

    def error(self, what: str) -> ModelFileError:
        """A ModelFileError naming this file."""
        return ModelFileError(f"{self.given}: {what}")

    def call_user(self, label: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call the user's code; an exception it raises (or sys.exit) becomes a one-line ModelFileError."""
        try:
            return fn(*args, **kwargs)
        except _PASS_THROUGH:
            raise
        except SystemExit as exc:
            raise self.error(
                f"{label} called sys.exit({exc.code!r}); a factory must return a model"
            ) from None
        except Exception as exc:
            raise self.error(
                f"{label} raised {describe(exc)}{raised_at(exc)}; fix the code, or narrow SPACE to values "
                "it accepts"
            ) from exc  # the user's frames, which --debug shows

    def config(self, **values: Scalar) -> Config:
        """A Config of this file: every knob at its default unless given (run settings by name)."""
        return Config.of(self.name, **self.knobs).with_knobs(**values)

    def values(self, config: Config) -> dict[str, Knob]:
        """The knob values of `config`, each coerced to its knob's type."""
        given = config.values
        unknown = sorted(set(given) - set(self.knobs))
        if unknown:
            raise self.error(
                f"{unknown[0]!r} is not a knob of {self.given}; its knobs are {sorted(self.knobs)}"
            )
        values = {n: self._coerce(n, given.get(n, d), d) for n, d in self.knobs.items()}
        scale = float(values.get(SCALE, 1.0))
        if self.scales_weights and not (math.isfinite(scale) and scale > 0):  # the weights' multiplier
            raise self.error(
                f"knob {SCALE}={scale!r} must be a finite number > 0 (it multiplies the weights)"
            )
        return values

    def _coerce(self, name: str, value: object, default: Knob) -> Knob:
        """`value` as the knob's type (_validation.knob_value), or a one-line ModelFileError."""
        got = knob_value(name, value, default)
        if got is None:
            raise self.error(knob_refusal(name, value, default))
        return got

    def space(self) -> Space:
        """SPACE's bounds as axes (in SPACE order); without SPACE, the init knob over x0.5..x4 its
        default (init_scale: 0.5..4.0)."""
        axes = tuple(Axis.range(name, *bound) for name, bound in self.bounds.items())
        if not axes:
            default = float(self.knobs[self.init_knob or SCALE])
            axes = (Axis(self.init_knob or SCALE, tuple(round(default * s, 12) for s in INIT_SCALES)),)
        return Space(self.given, self.config(), axes)

    def _make(
        self, config: Config, find: bool = True
    ) -> tuple[nn.Module, Inputs, tuple[tuple[str, nn.Module], ...], str]:
        """The user's model (weights scaled if asked), blocks and inputs, seeded from config.run.seed;
        without `find`, no blocks (the memory estimate: looking for loops runs a forward, on the meta
        device an nn.LSTM's costs 1 s at 128 steps, every point of a search)."""
        values, seed = self.values(config), config.run.seed
        with self._seeded(config):
            model = self.source.make_model(self, values)
            blocks: tuple[tuple[str, nn.Module], ...] = ()
            note = ""
            if find:
                check_blocks(self, model)
                blocks, note = find_blocks(model)
                self.check_eager(model, blocks)
            seed_all(derived(seed, SALT_BATCH))
            inputs = self.source.make_inputs(self, model, values, derived(seed, SALT_INFER))
            _materialize(model, inputs)  # drawn alike at every init_scale, which then scales them
            looped, note = looped_blocks(model, inputs, blocks, note) if find else (blocks, note)
            if looped != blocks:
                self.check_eager(model, looped)
                blocks = looped
            if self.scales_weights and values[SCALE] != 1.0:
                _scale_weights(model, float(values[SCALE]))
        return model, inputs, blocks, note

    @contextlib.contextmanager
    def _seeded(self, config: Config) -> Iterator[None]:
        """The file's draws seeded from config.run.seed, and the caller's random states given back
        after: not theirs (a batch() drawing with np.random drew from wherever the process stood:
        other inputs at every call)."""
        cuda = [torch.device(config.run.device)] if config.run.device.startswith("cuda") else []
        with torch.random.fork_rng(devices=cuda), host_rng_kept():
            seed_all(config.run.seed)
            yield

    def _model_alone(self, config: Config) -> nn.Module:
        """The user's model of `config` alone, seeded as `_make` seeds it."""
        with self._seeded(config):
            return self.source.make_model(self, self.values(config))

    def build(self, config: Config) -> Built:
        """The model and inputs of `config` on its device and dtype, with the loss and blocks."""
        return self._built(config, self._make(config), self.loss_fn(config.run.seed))

    def last_step(self, config: Config) -> Built | None:
        """Where the model's blocks are called per step along one chain (a cell of its own stepped per
        token, or stacked cells taking turns) and its output is made from earlier calls too
        (`_reading` BESIDE): the model with the default loss on the last call's output alone, whatever
        loss() the file gives, so that each earlier call's gradient is the product of the Jacobians,
        which a per-token loss adds every later token's gradient to. None for other models: their
        calls do not chain, or their loss is on the last step already."""
        model, inputs, blocks, note = self._make(config)
        # not a compiled model, whose forward the hooks put on at every call would compile again
        compiled = type(model).__name__ == "OptimizedModule"
        if compiled:
            return None
        key = config.with_run(seed=0)
        if key not in self.readings:
            self.readings[key] = _reading(model, inputs, [name for name, _ in blocks])
        if self.readings[key] != BESIDE:
            return None
        loss = OutputLoss(DefaultLoss(derived(config.run.seed, SALT_LOSS)), self.given, guard=self.call_user)
        return self._built(config, (_LastCall(model, [m for _, m in blocks]), inputs, blocks, note), loss)

    def _built(
        self,
        config: Config,
        parts: tuple[nn.Module, Inputs, tuple[tuple[str, nn.Module], ...], str],
        loss: LossFn,
    ) -> Built:
        """What `_make` made, on the device and dtype of `config`, with `loss`."""
        model, inputs, blocks, note = parts
        device, dtype = torch.device(config.run.device), torch_dtype(config.run.dtype)
        made = sorted(
            {str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.is_floating_point()}
        )
        model.to(device=device, dtype=dtype)
        if made not in ([], ["float32"], [config.run.dtype]):  # a dtype the factory chose: said, never
            # silently replaced (torch's default, float32, is no choice: --dtype float64 casts it unsaid)
            cast = f"the factory made {' and '.join(made)} weights, cast to {config.run.dtype} (--dtype)"
            note = f"{note}; {cast}" if note else cast
        return Built(model, move(inputs, device, dtype), loss, blocks, note)

    def memory_estimate(self, config: Config) -> int | None:
        """Bytes from a build and forward on the meta device; where the model cannot run there, its
        parameters' alone (memory.parameter_bytes); None where it cannot even be built there."""

        try:
            return meta_bytes(lambda: self._make(config, find=False)[:2], call_model)
        except (Exception, SystemExit):  # data-dependent code (.item(), numpy) cannot run on meta
            pass
        try:
            return parameter_bytes(lambda: self._model_alone(config))
        except (Exception, SystemExit):
            return None

    def critical_init(self, config: Config) -> Scalar:
        return self.critical

    def variants(self, config: Config) -> dict[str, Config | None]:
        return {}

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
        user = self.user_loss
        if user is None:
            return OutputLoss(DefaultLoss(derived(seed, SALT_LOSS)), self.given, guard=self.call_user)
        line = getattr(getattr(user, "__code__", None), "co_firstlineno", None)
        where = f"loss(output, inputs) (line {line})" if line else "loss(output, inputs)"

        def loss(output: Any, inputs: Any) -> Any:
            value = self.call_user("loss(output, inputs)", user, output, inputs)
            if isinstance(value, torch.Tensor) and value.numel() != 1:  # named here, where the file is known
                raise self.error(
                    f"{where} returned a tensor of shape {tuple(value.shape)}, not a scalar; return one, "
                    "e.g. out.mean()"
                )
            return value

        return loss


class _LastCall(nn.Module):
    """`model`, returning the tensor of the last block call in its forward that the chain runs
    through (the model's own output is left unused): a loss on it is a loss on the last step alone.
    That tensor is the first of the call's outputs that its block's next call takes, h of (h, c), h of
    (y, h) (a loss on y, which h's chain does not read at the last call, read one Jacobian fewer)."""

    def __init__(self, model: nn.Module, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.model = model
        self.blocks = tuple(blocks)  # not submodules: their parameters are the model's, named there

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        last: list[torch.Tensor] = []  # the last call's floating outputs
        kept: dict[int, list[torch.Tensor]] = {}  # per block, its last call's floating outputs
        fed: dict[int, set[int]] = {}  # per block, the places of a call's outputs its next call took
        lasts: list[int] = []  # the block of the last call

        def before(b: int) -> Any:
            def hook(module: nn.Module, given: tuple[Any, ...], named: dict[str, Any]) -> None:
                if b in kept:
                    fed.setdefault(b, set()).update(taken_outputs(kept[b], (given, named)))

            return hook

        def keep(b: int) -> Any:
            def hook(module: nn.Module, given: Any, output: Any) -> None:
                kept[b] = last[:] = floating(output)
                lasts[:] = [b]

            return hook

        # registered at each call, after the probe's hooks: they see the call as the next one takes it
        handles = [
            handle
            for b, block in enumerate(self.blocks)
            for handle in (
                block.register_forward_pre_hook(before(b), with_kwargs=True),
                block.register_forward_hook(keep(b)),
            )
        ]
        try:
            self.model(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        places = fed.get(lasts[0], set()) if lasts else set()
        return (
            last[min(places)] if last and places and min(places) < len(last) else (last[0] if last else None)
        )


BESIDE, LAST, APART = "beside", "last", "apart"  # what `_reading` finds


def _reading(model: nn.Module, inputs: Inputs, names: list[str]) -> str:
    """How the model's blocks `names` run and what its output is made from, seen in one forward of a
    copy (loops.on_a_copy: the model and the random states unchanged). BESIDE: a block is called
    again along one chain, every call after the first taking what the call before it returned, or
    what its own block's call before returned (stacked cells taking turns per token: c0 at t + 1
    takes c0's h at t), and the output is made from an earlier call's output other than through the
    last call's (a head on every step's h): its loss reaches earlier calls beside the chain. LAST:
    each block is called once, or the output is made from the last call's output alone (a head on
    h_T): its loss is on the last step already. APART: the calls do not chain (a Siamese model's
    shared tower, a second pass from a fresh state, truncated backpropagation's windows: a loss on
    the last call would reach the last chain alone), no block is called, or the copy cannot be made
    or run (its own loss is then read alone)."""
    calls: list[list[torch.Tensor]] = []
    mine: dict[str, list[torch.Tensor]] = {}  # per block, its last call's floating outputs
    chained = [True]

    def before(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if calls:
                given = (args, kwargs)
                took = bool(taken_outputs(calls[-1], given)) or (
                    name in mine and bool(taken_outputs(mine[name], given))
                )
                chained[0] = chained[0] and took

        return hook

    def after(name: str) -> Any:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            calls.append(floating(out))
            mine[name] = calls[-1]

        return hook

    def run(copy: nn.Module, given: Inputs) -> Any:
        for name in names:
            block = copy.get_submodule(name)
            block.register_forward_pre_hook(before(name), with_kwargs=True)
            block.register_forward_hook(after(name))
        return call_model(copy, given)

    try:
        output = on_a_copy(model, inputs, run)
    except _PASS_THROUGH:
        raise
    except Exception:  # the probe's own forward says what is wrong, in its own words
        return APART
    if not calls or not chained[0]:
        return APART
    if len(calls) == len(mine):  # each block called once: a stack, no steps
        return LAST
    past = {t.grad_fn for t in calls[-1] if t.grad_fn is not None}
    earlier = {t.grad_fn for made in calls[:-1] for t in made if t.grad_fn is not None}
    return BESIDE if any(made_from(t, earlier, past) for t in tensors(output)) else LAST


def _materialize(model: nn.Module, inputs: Inputs) -> None:
    """Give lazy modules (nn.LazyLinear, ...) their weights, made at their first call, by one forward
    without gradients, so that they exist to be scaled; nothing for a model without them."""
    if any(isinstance(p, UninitializedParameter) for p in model.parameters()):
        with torch.no_grad():
            call_model(model, inputs)


def _scale_weights(model: nn.Module, scale: float) -> None:
    """Multiply every parameter of rank >= 2 (the weights, not biases or norms' gains) by `scale`."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(scale)
