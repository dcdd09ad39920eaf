"""Hypothesis strategies: configs(), dtypes(), devices(), and the quick/ci/thorough settings profiles.

Every random choice is a Hypothesis draw (the seed too), so every example replays and shrinks.
Arguments are validated when a strategy is first used, never when it is created (Hypothesis's
API style), and raise hypothesis.errors.InvalidArgument showing the value. Importing this module
does not import torch.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from stabilitycheck._options import PROFILES
from stabilitycheck.config import OPTIMIZERS, Config, Run
from stabilitycheck.errors import did_you_mean
from stabilitycheck.families import ACTIVATIONS, FAMILIES, NORMS, Scalar, knob_specs

T = TypeVar("T")

DTYPE_ORDER = ("float32", "float64", "bfloat16", "float16")
"""Simplest first: float32 is the default everywhere; the half types are where things break."""

INIT_SCALES = (1.0, 0.75, 1.25, 0.5, 1.5, 2.0, 0.25, 3.0, 4.0)
"""The design's init_scale grid 0.25..4.0, ordered by distance from the critical 1.0 (tanh) so
examples shrink towards the standard init."""

"""The user-facing profile names (--stability-profile); registered as PROFILE_PREFIX + name."""
PROFILE_PREFIX = "stabilitycheck-"


def _hint(value: object, allowed: Sequence[str]) -> str:
    """errors.did_you_mean for a string value; '' for any other (a number is no misspelt name)."""
    return did_you_mean(value, allowed) if isinstance(value, str) else ""


def _check_int(name: str, value: object, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"Expected int but got {name}={value!r} (type={type(value).__name__})")
    if value < lo:
        raise InvalidArgument(f"{name}={value} must be >= {lo}")
    return value


def _check_range(name: str, lo: object, hi: object, floor: int) -> tuple[int, int]:
    a, b = _check_int(f"min_{name}", lo, floor), _check_int(f"max_{name}", hi, floor)
    if a > b:
        raise InvalidArgument(f"Cannot have max_{name}={b} < min_{name}={a}")
    return a, b


def _check_choices(name: str, values: object, allowed: Sequence[str]) -> tuple[str, ...]:
    if isinstance(values, str):
        values = (values,)
    if not isinstance(values, Sequence) or not values:
        raise InvalidArgument(f"{name}={values!r} must be a non-empty sequence of strings")
    for v in values:
        if v not in allowed:
            raise InvalidArgument(
                f"{name} contains {v!r}, which is not one of {tuple(allowed)}{_hint(v, allowed)}"
            )
    return tuple(values)


def _check_floats(name: str, values: object, allow_none: bool = False) -> tuple[Any, ...]:
    if not isinstance(values, Sequence) or isinstance(values, str) or not values:
        raise InvalidArgument(f"{name}={values!r} must be a non-empty sequence of numbers")
    for v in values:
        if v is None and allow_none:
            continue
        if isinstance(v, bool) or not isinstance(v, int | float) or not (0 < v < math.inf):
            raise InvalidArgument(f"{name} contains {v!r}; every value must be a finite number > 0")
    return tuple(values)


def _as_strategy(name: str, value: object, default: st.SearchStrategy[str], allowed: Sequence[str]) -> Any:
    if value is None:
        return default
    if isinstance(value, st.SearchStrategy):
        return value
    return st.sampled_from(_check_choices(name, value, allowed))


def _cuda_available() -> bool:
    import torch  # deferred: importing stabilitycheck.strategies must stay torch-free

    return bool(torch.cuda.is_available())


def _deferred(
    build: Callable[[], st.SearchStrategy[T]], name: str, args: dict[str, Any]
) -> st.SearchStrategy[T]:
    """st.deferred(build), validated on first use, whose repr is the call that made it."""
    build.__name__ = f"{name}({', '.join(f'{k}={v!r}' for k, v in args.items())})"
    return st.deferred(build)


def dtypes(*, exclude: Sequence[str] = ()) -> st.SearchStrategy[str]:
    """Config dtype names: float32, float64, bfloat16, float16, less those in `exclude`.

    Examples shrink towards "float32".
    """

    if isinstance(exclude, str):  # one name: iterated, it was its letters ('exclude contains "f"')
        exclude = (exclude,)

    def build() -> st.SearchStrategy[str]:
        _check_choices("exclude", tuple(exclude) or ("float32",), DTYPE_ORDER)
        left = [d for d in DTYPE_ORDER if d not in exclude]
        if not left:
            raise InvalidArgument(f"exclude={tuple(exclude)!r} leaves no dtype to draw")
        return st.sampled_from(left)

    return _deferred(build, "dtypes", {"exclude": exclude} if exclude else {})


def devices(*, allow_cuda: bool = True) -> st.SearchStrategy[str]:
    """Config device names: "cpu", and "cuda" when allow_cuda and torch.cuda.is_available().

    Examples shrink towards "cpu".
    """

    def build() -> st.SearchStrategy[str]:
        if not isinstance(allow_cuda, bool):
            raise InvalidArgument(f"Expected bool but got allow_cuda={allow_cuda!r}")
        return st.sampled_from(("cpu", "cuda") if allow_cuda and _cuda_available() else ("cpu",))

    return _deferred(build, "devices", {} if allow_cuda is True else {"allow_cuda": allow_cuda})


def configs(
    *,
    family: str | Sequence[str] | None = None,
    min_depth: int = 1,
    max_depth: int = 8,
    min_width: int = 8,
    max_width: int = 32,
    init_scales: Sequence[float] | st.SearchStrategy[float] = INIT_SCALES,
    min_seq_len: int = 1,
    max_seq_len: int = 16,
    norms: Sequence[str] = NORMS,
    activations: Sequence[str] = ACTIVATIONS,
    dtypes: Sequence[str] | st.SearchStrategy[str] | None = None,
    devices: Sequence[str] | st.SearchStrategy[str] | None = None,
    min_batch_size: int = 1,
    max_batch_size: int = 4,
    min_steps: int = 0,
    max_steps: int = 0,
    lrs: Sequence[float] = (0.01,),
    optimizers: Sequence[str] = ("sgd",),
    clips: Sequence[float | None] = (None,),
    max_seed: int = 2**32 - 1,
) -> st.SearchStrategy[Config]:
    """Zoo Configs within the given bounds, knobs drawn in order of importance (family, depth, width,
    init_scale, seq_len, ...); each Config holds only its family's knobs, and one seed (seeds=1).
    `dtypes`/`devices` take names or a strategy; None means every dtype and every available device.
    `init_scales` takes values to choose from or a strategy (say st.floats(0.5, 2.0) for a continuum).

    Examples shrink towards the first family, min_depth, min_width, init_scales[0], min_seq_len, the
    first of each choice, float32, cpu, min_batch_size, min_steps and seed 0.
    """
    dtype_default, device_default = _all_dtypes(), _all_devices()
    args = {k: v for k, v in locals().items() if k in _CONFIG_DEFAULTS and v != _CONFIG_DEFAULTS[k]}

    def build() -> st.SearchStrategy[Config]:
        fams = tuple(FAMILIES) if family is None else _check_choices("family", family, tuple(FAMILIES))
        depth = _check_range("depth", min_depth, max_depth, 1)
        width = _check_range("width", min_width, max_width, 1)
        seq_len = _check_range("seq_len", min_seq_len, max_seq_len, 1)
        batch = _check_range("batch_size", min_batch_size, max_batch_size, 1)
        steps = _check_range("steps", min_steps, max_steps, 0)
        scale_st = (
            init_scales
            if isinstance(init_scales, st.SearchStrategy)
            else st.sampled_from(_check_floats("init_scales", init_scales))
        )
        lr_values = _check_floats("lrs", lrs)
        clip_values = _check_floats("clips", clips, allow_none=True)
        norm_values = _check_choices("norms", norms, NORMS)
        act_values = _check_choices("activations", activations, ACTIVATIONS)
        opt_values = _check_choices("optimizers", optimizers, OPTIMIZERS)
        dtype_st = _as_strategy("dtypes", dtypes, dtype_default, DTYPE_ORDER)
        if devices is not None and not isinstance(devices, st.SearchStrategy):
            names = _check_choices("devices", devices, ("cpu", "cuda"))
            if "cuda" in names and not _cuda_available():
                raise InvalidArgument(
                    f"devices={names!r} asks for 'cuda' but CUDA is not available here; use devices() "
                    "(which includes cuda only where it is available)"
                )
        device_st = _as_strategy("devices", devices, device_default, ("cpu", "cuda"))
        _check_int("max_seed", max_seed, 0)
        _check_knobs_exist(fams, norms, activations, (min_seq_len, max_seq_len), (min_depth, max_depth))

        @st.composite
        def draw_config(draw: st.DrawFn) -> Config:
            fam = draw(st.sampled_from(fams))
            names = {spec.name for spec in knob_specs(fam)}
            knobs: dict[str, Scalar] = {
                "depth": draw(st.integers(*depth)),
                "width": draw(st.integers(*width)),
                "init_scale": float(draw(scale_st)),
                "seq_len": draw(st.integers(*seq_len)) if "seq_len" in names else seq_len[0],
                "norm": draw(st.sampled_from(norm_values)),
                "activation": draw(st.sampled_from(act_values)),
            }
            run = Run(
                dtype=draw(dtype_st),
                device=draw(device_st),
                steps=draw(st.integers(*steps)),
                lr=float(draw(st.sampled_from(lr_values))),
                optimizer=draw(st.sampled_from(opt_values)),
                clip=draw(st.sampled_from(clip_values)),
                seed=draw(st.integers(0, max_seed)),
                seeds=1,  # a property draws its own seeds: each example is one initialisation
            )
            knobs["batch_size"] = draw(st.integers(*batch))
            return Config(fam, tuple((k, v) for k, v in knobs.items() if k in names), run)

        return draw_config()

    return _deferred(build, "configs", args)


def _check_knobs_exist(
    fams: Sequence[str],
    norms: Sequence[str],
    activations: Sequence[str],
    seq_len: tuple[int, int],
    depth: tuple[int, int],
) -> None:
    """A knob narrowed to exclude what families without it are (no norm, tanh, one step, one layer)
    would be ignored silently where no family drawn has it (configs(family='rnn', norms=('pre',))
    drew no norm at all): an InvalidArgument instead."""
    have = {spec.name for fam in fams for spec in knob_specs(fam)}
    asked = {
        "norm": ("norms", "none" not in norms),
        "activation": ("activations", "tanh" not in activations),
        "seq_len": ("min_seq_len", seq_len[0] > 1),
        "depth": ("min_depth", depth[0] > 1),
    }
    for knob, (argument, narrowed) in asked.items():
        if narrowed and knob not in have:
            raise InvalidArgument(
                f"{argument} given, but no family drawn ({', '.join(fams)}) has a {knob} knob: it would be "
                "ignored; drop it or add a family that has it"
            )


_all_dtypes, _all_devices = dtypes, devices  # configs() has arguments of the same names
_CONFIG_DEFAULTS: dict[str, Any] = {k: v.default for k, v in inspect.signature(configs).parameters.items()}


def profile_name(name: str) -> str:
    """The registered Hypothesis profile of a user-facing name: "ci" -> "stabilitycheck-ci" (prefixed,
    so it cannot clash with Hypothesis' own "ci" profile or a project's)."""
    return f"{PROFILE_PREFIX}{name}"


def register_profiles() -> None:
    """Register the Hypothesis profiles "stabilitycheck-quick" (for local runs), "stabilitycheck-ci"
    (keeps the example database, so a counterexample found by one CI run replays first in the next;
    reproduction blobs printed) and "stabilitycheck-thorough" (a long search). None is derandomised:
    in Hypothesis derandomize=True turns the database off. Runs repeat through the plugin's seed
    instead (--stability-seed, printed in the header; the ci profile's defaults to 0). Probes take
    milliseconds to seconds, so no profile has a deadline. Each derives from Hypothesis' "default"
    profile, not from whatever is loaded (Hypothesis loads its own derandomised "ci" when CI is set)."""
    base = settings.get_profile("default")
    for name, examples in (("quick", 100), ("ci", 50), ("thorough", 300)):
        settings.register_profile(
            profile_name(name), base, max_examples=examples, deadline=None, print_blob=name == "ci"
        )


def load_profile(name: str | None = None) -> str:
    """Register the profiles and load `name` (quick, ci or thorough; default: env HYPOTHESIS_PROFILE,
    else "ci" when the CI variable is set, else "quick"); returns the user-facing name."""
    register_profiles()
    chosen = name or os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "quick")
    chosen = chosen.removeprefix(PROFILE_PREFIX)
    if chosen not in PROFILES:
        raise InvalidArgument(
            f"Unknown stabilitycheck profile {chosen!r}; expected one of {PROFILES}{_hint(chosen, PROFILES)}"
        )
    settings.load_profile(profile_name(chosen))
    return chosen
