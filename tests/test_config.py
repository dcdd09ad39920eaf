"""Config validation and exact JSON round trip."""

from __future__ import annotations

import pytest

from stabilitycheck.config import Config
from stabilitycheck.errors import ConfigError


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("family", "", "Config.family=''"),
        ("depth", 0, "Config.depth=0 must be >= 1"),
        ("depth", "5", "expected int but got depth='5' (type=str)"),
        ("depth", 2.5, "expected int but got depth=2.5"),
        ("width", True, "expected int but got width=True"),
        ("init_scale", -1.0, "Config.init_scale=-1.0 must be a finite number > 0"),
        ("init_scale", float("nan"), "init_scale=nan"),
        ("lr", 0, "Config.lr=0"),
        ("clip", 0.0, "Config.clip=0.0"),
        ("norm", "prenorm", "did you mean 'pre'?"),
        ("activation", "Relu", "did you mean 'relu'?"),
        ("dtype", "fp16", "expected one of ('float32', 'float64', 'bfloat16', 'float16')"),
        ("optimizer", "adamw", "did you mean 'adam'?"),
        ("device", "gpu", "expected 'cpu', 'cuda' or 'cuda:N'"),
        ("steps", -1, "Config.steps=-1 must be >= 0"),
        ("params", (("a",),), "tuple of (name, value) pairs"),
    ],
)
def test_bad_field_names_field_value_and_allowed(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=None) as info:
        Config(**{field: value})  # type: ignore[arg-type]
    assert message in str(info.value)
    assert isinstance(info.value, ConfigError)


def test_cuda_index_is_a_valid_device() -> None:
    assert Config.of("mlp", device="cuda:1").device == "cuda:1"


@pytest.mark.parametrize(
    "config",
    [
        Config.of("mlp"),
        Config.of("rnn", init_scale=1.1, clip=0.1, lr=1e-3, seed=2**40, dtype="bfloat16"),
        Config.of("model.py:build", init_scale=0.30000000000000004, params=(("d", 3), ("p", 0.5))),
    ],
)
def test_json_round_trip_is_exact(config: Config) -> None:
    again = Config.from_json(config.to_json())
    assert again == config
    assert again.to_json() == config.to_json()


def test_from_json_rejects_unknown_keys_and_non_objects() -> None:
    with pytest.raises(ConfigError, match="unknown keys"):
        Config.from_json('{"depht": 3}')
    with pytest.raises(ConfigError, match="must be an object"):
        Config.from_json("[1]")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Config.from_json("{")


def test_knobs_cover_fields_and_params() -> None:
    c = Config.of("f.py", params=(("layers", 3),))
    assert c.knob("layers") == 3 and c.knob("depth") == 4
    d = c.with_knobs(layers=5, depth=7)
    assert d.knob("layers") == 5 and d.depth == 7
    with pytest.raises(ConfigError, match="no knob 'nope'"):
        c.with_knobs(nope=1)
    with pytest.raises(ConfigError, match="no knob 'nope'"):
        c.knob("nope")


def test_package_import_is_cheap_and_exports_resolve() -> None:
    import subprocess
    import sys

    code = (
        "import sys, stabilitycheck as sc; assert 'torch' not in sys.modules; "
        "[getattr(sc, name) for name in sc.__all__]; assert 'torch' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
