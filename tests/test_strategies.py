"""The strategies: lazy validation, shrinking towards the simplest Config, and replayable draws.
Also a learning rate of zero refused and a profile loaded by its registered name."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import find, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from stabilitycheck.config import Config
from stabilitycheck.families import FAMILIES
from stabilitycheck.strategies import INIT_SCALES, configs, devices, dtypes, load_profile, register_profiles


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_depth": "8"}, "Expected int but got max_depth='8' (type=str)"),
        ({"min_depth": True}, "Expected int but got min_depth=True (type=bool)"),
        ({"min_depth": 0}, "min_depth=0 must be >= 1"),
        ({"min_width": 9, "max_width": 4}, "Cannot have max_width=4 < min_width=9"),
        ({"family": "lstn"}, "did you mean 'lstm'?"),
        ({"norms": ("pre", "layer")}, "norms contains 'layer'"),
        ({"init_scales": (1.0, -2.0)}, "init_scales contains -2.0"),
        ({"init_scales": ()}, "must be a non-empty sequence"),
        ({"lrs": (math.nan,)}, "lrs contains nan"),
        ({"dtypes": ("float32", "fp16")}, "dtypes contains 'fp16'"),
        ({"optimizers": ("adamw",)}, "did you mean 'adam'?"),
    ],
)
def test_bad_arguments_raise_invalid_argument_at_draw_time_not_creation(kwargs: Any, message: str) -> None:
    strategy = configs(**kwargs)  # creating it never raises
    with pytest.raises(InvalidArgument) as info:
        strategy.validate()
    assert message in str(info.value)


def test_cuda_device_without_cuda_is_invalid() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(InvalidArgument, match="CUDA is not available"):
        configs(devices=("cuda",)).validate()
    assert find(devices(), lambda d: True) == "cpu"


def test_dtypes_exclude_validation() -> None:
    with pytest.raises(InvalidArgument, match="exclude contains 'float61'"):
        dtypes(exclude=("float61",)).validate()  # a typo of float16
    with pytest.raises(InvalidArgument, match="leaves no dtype"):
        dtypes(exclude=("float32", "float64", "bfloat16", "float16")).validate()


def knobs_of(family: str) -> list[str]:
    return [s.name for s in FAMILIES[family]]


def test_shrinks_to_the_simplest_config() -> None:
    simplest = find(configs(), lambda c: True)
    assert simplest == Config.of(
        "mlp", depth=1, width=8, init_scale=1.0, activation="tanh", batch_size=1,
        dtype="float32", device="cpu", steps=0, lr=0.01, optimizer="sgd", seed=0, seeds=1,
    )  # fmt: skip


def test_shrinks_each_knob_to_the_boundary_of_the_condition() -> None:
    def deep_wide(c: Config) -> bool:
        return c.family == "transformer" and c.knob("depth") >= 7 and c.knob("width") >= 20

    c = find(configs(max_depth=30), deep_wide)
    v = c.values
    assert (c.family, v["depth"], v["width"], v["seq_len"], v["init_scale"], c.run.seed) == (
        "transformer", 7, 20, 1, 1.0, 0,
    )  # fmt: skip
    g = find(configs(max_seq_len=30), lambda c: c.family == "gru" and c.knob("seq_len") >= 7)
    assert (g.values["seq_len"], g.values["width"], g.values["init_scale"], g.run.seed) == (7, 8, 1.0, 0)


def test_dtypes_and_devices_shrink_to_float32_and_cpu() -> None:
    assert find(dtypes(), lambda d: True) == "float32"
    assert find(dtypes(exclude=("float32",)), lambda d: True) == "float64"
    assert find(configs(), lambda c: c.run.dtype != "float32").run.dtype == "float64"


def test_derandomized_draws_are_identical_across_runs() -> None:
    def run() -> list[Config]:
        seen: list[Config] = []

        @settings(derandomize=True, max_examples=20, database=None)
        @given(configs(max_depth=64, dtypes=dtypes()))
        def record(c: Config) -> None:
            seen.append(c)

        record()
        return seen

    first = run()
    assert len(first) >= 10 and first == run()


@settings(max_examples=60, deadline=None)
@given(configs(max_depth=64, min_width=2, max_width=48, max_seq_len=32, max_steps=3))
def test_every_draw_is_within_bounds(c: Config) -> None:
    assert c.family in FAMILIES and [k for k, _ in c.knobs] == knobs_of(c.family)  # only its own knobs
    v = c.values
    assert 1 <= v.get("depth", 1) <= 64 and 2 <= v["width"] <= 48 and 1 <= v.get("seq_len", 1) <= 32
    assert v["init_scale"] in INIT_SCALES and 0 <= c.run.steps <= 3 and c.run.device == "cpu"
    assert c.run.seeds == 1  # one initialisation per example
    assert Config.from_json(c.to_json()) == c


@given(st.data())
@settings(max_examples=20)
def test_a_given_family_and_dtype_strategy_are_honoured(data: st.DataObject) -> None:
    c = data.draw(configs(family=("lstm", "gru"), dtypes=st.just("bfloat16"), init_scales=(2.0,)))
    assert c.family in ("lstm", "gru") and c.run.dtype == "bfloat16" and c.knob("init_scale") == 2.0


@given(st.data())
@settings(max_examples=20)
def test_init_scales_may_be_a_strategy_of_floats(data: st.DataObject) -> None:
    c = data.draw(configs(family="mlp", init_scales=st.floats(0.5, 2.0)))
    assert isinstance(c.knob("init_scale"), float) and 0.5 <= c.knob("init_scale") <= 2.0
    assert data.draw(configs(init_scales=st.just(1.2345))).knob("init_scale") == 1.2345  # off the grid


def test_profiles_register_and_unknown_names_are_rejected() -> None:
    from hypothesis import settings as hs

    register_profiles()
    ci = hs.get_profile("stabilitycheck-ci")
    assert not ci.derandomize and ci.database is not None and ci.print_blob  # the database replays
    assert (
        hs.get_profile("stabilitycheck-quick").max_examples
        < hs.get_profile("stabilitycheck-thorough").max_examples
    )
    with pytest.raises(InvalidArgument, match="did you mean 'quick'"):
        load_profile("quik")


def test_importing_strategies_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, stabilitycheck.strategies; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_knob_narrowed_for_families_without_it_is_an_invalid_argument() -> None:
    """configs(family='rnn', norms=('pre',)) and configs(family='lstm', activations=('relu',)) drew
    Configs with no such knob, the choice silently ignored (found by a trial)."""
    for bad in (
        configs(family="rnn", norms=("pre",)),
        configs(family="lstm", activations=("relu",)),
        configs(family="mlp", min_seq_len=4, max_seq_len=8),
        configs(family=("lstm", "gru"), min_depth=2, max_depth=3),
    ):
        with pytest.raises(InvalidArgument, match=r"has a \w+ knob: it would be ignored"):
            bad.validate()
    configs(family=("rnn", "resmlp"), norms=("pre",)).validate()  # one family has it: fine


@settings(max_examples=30)
@given(dtypes(exclude="float16"))
def test_dtypes_takes_one_name_to_exclude(name: str) -> None:
    """exclude='float16' was iterated as letters: 'exclude contains "f"' (found by a trial)."""
    assert name != "float16"


def test_a_learning_rate_of_zero_is_an_invalid_argument() -> None:
    """lrs must be finite numbers > 0: lr=0 trains nothing, every divergence verdict vacuous."""
    from hypothesis.errors import InvalidArgument

    from stabilitycheck.strategies import configs

    with pytest.raises(InvalidArgument, match="finite number > 0"):
        configs(lrs=(0.0,)).validate()


def test_a_profile_given_by_its_registered_name_loads_it() -> None:
    """load_profile takes the user-facing name or the registered one ('stabilitycheck-ci', as
    HYPOTHESIS_PROFILE may hold it): both load the ci profile and return 'ci'."""
    from hypothesis import settings

    from stabilitycheck.strategies import load_profile

    before = settings._current_profile  # restored: the profile is global to the session
    try:
        assert load_profile("stabilitycheck-ci") == "ci"
        assert settings._current_profile == "stabilitycheck-ci"
        assert settings().max_examples == 50
    finally:
        settings.load_profile(before)
