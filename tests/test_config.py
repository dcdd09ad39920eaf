"""Config(subject, knobs, run): validation at construction, and an exact JSON round trip."""

from __future__ import annotations

import json

import pytest
from hypothesis import given

from stabilitycheck import strategies
from stabilitycheck.config import RUN_FIELDS, SCHEMA, Config, Run
from stabilitycheck.errors import ConfigError
from stabilitycheck.families import FAMILIES


@given(strategies.configs())
def test_json_round_trip_is_exact_for_every_drawn_config(config: Config) -> None:
    again = Config.from_json(config.to_json())
    assert again == config
    assert again.to_json() == config.to_json()
    assert json.loads(config.to_json())["schema"] == SCHEMA


@pytest.mark.parametrize(
    "config",
    [
        Config.of("mlp"),
        Config.of("rnn", init_scale=1.1, clip=0.1, lr=1e-3, seed=2**32 - 1, dtype="bfloat16"),
        Config.of("/abs/model.py:build", init_scale=0.30000000000000004, d=3, p=0.5, act="relu"),
        Config.of("hf:gpt2", n_layer=2, seeds=3, quantile=0.9),
    ],
)
def test_json_round_trip_is_exact(config: Config) -> None:
    again = Config.from_json(config.to_json())
    assert again == config
    assert again.to_json() == config.to_json()


def test_schema_1_json_is_a_clear_error() -> None:
    old = json.dumps({"family": "mlp", "depth": 3, "width": 8, "init_scale": 2.0, "seed": 0})
    with pytest.raises(ConfigError) as info:
        Config.from_json(old)
    message = str(info.value)
    assert "schema 1" in message and "'family'" in message
    assert "run the search again" in message


def test_from_json_rejects_other_schemas_unknown_keys_and_non_objects() -> None:
    record = Config.of("mlp").to_dict()
    with pytest.raises(ConfigError, match="schema 3"):
        Config.from_dict({**record, "schema": 3})
    with pytest.raises(ConfigError, match="unknown keys"):
        Config.from_dict({**record, "depht": 3})
    with pytest.raises(ConfigError, match="run has unknown keys"):
        Config.from_dict({**record, "run": {"stpes": 3}})
    with pytest.raises(ConfigError, match="must be a JSON object"):
        Config.from_json("[1]")
    with pytest.raises(ConfigError, match=r"not valid JSON: JSONDecodeError: .*; give what Config.to_json"):
        Config.from_json("{")


@pytest.mark.parametrize(
    ("family", "knob", "hint"), [("mlp", "detph", "depth"), ("rnn", "seqlen", "seq_len")]
)
def test_a_misspelt_knob_says_did_you_mean(family: str, knob: str, hint: str) -> None:
    """A misspelt knob got its family's knob list and no hint, where the README promised one (found
    in an audit: 'detph', and 'mpl' for a family, whose first two letters were compared)."""
    with pytest.raises(ConfigError, match=f"has no knob {knob!r} \\(did you mean {hint!r}\\?\\)"):
        Config.of(family, **{knob: 3})


@pytest.mark.parametrize(
    ("name", "hint"),
    [("mlpp", "mlp"), ("lstn", "lstm"), ("transformr", "transformer"), ("mpl", "mlp"), ("Rnn", "rnn")],
)
def test_unknown_zoo_name_says_did_you_mean(name: str, hint: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config(name)
    assert f"{name!r} is not a zoo family" in str(info.value)
    assert f"did you mean {hint!r}?" in str(info.value)
    with pytest.raises(ConfigError, match=f"did you mean {hint!r}"):
        Config.of(name, depth=3, seeds=1)


@pytest.mark.parametrize(
    ("family", "knob", "value"),
    [("mlp", "norm", "pre"), ("mlp", "seq_len", 8), ("rnn", "depth", 3), ("lstm", "activation", "relu")],
)
def test_a_knob_the_family_lacks_is_rejected(family: str, knob: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        Config.of(family, **{knob: value})
    assert f"{family} has no knob {knob!r}" in str(info.value)
    assert str([s.name for s in FAMILIES[family]]) in str(info.value)
    with pytest.raises(ConfigError, match=f"no knob {knob!r}"):
        Config.of(family).with_knobs(**{knob: value})


def test_a_zoo_config_holds_exactly_its_familys_knobs() -> None:
    for family, specs in FAMILIES.items():
        config = Config.of(family)
        assert [k for k, _ in config.knobs] == [s.name for s in specs]
        assert config.values == {s.name: s.default for s in specs}


@pytest.mark.parametrize(
    ("subject", "field", "value", "message"),
    [
        ("", None, None, "Config.subject=''"),
        ("hf:", None, None, "names no model type"),
        ("mlp", "depth", 0, "mlp knob depth=0 must be a finite number >= 1"),
        ("mlp", "depth", "5", "expected int but got depth='5' (type=str)"),
        ("mlp", "depth", 2.5, "expected int but got depth=2.5"),
        ("mlp", "width", True, "expected int but got width=True"),
        ("mlp", "init_scale", -1.0, "init_scale=-1.0 must be a finite number > 0"),
        ("mlp", "init_scale", 0.0, "init_scale=0.0 must be > 0"),
        ("mlp", "init_scale", float("nan"), "init_scale=nan"),
        ("mlp", "init_scale", float("inf"), "init_scale=inf"),
        ("resmlp", "norm", "prenorm", "did you mean 'pre'?"),
        ("mlp", "activation", "Relu", "did you mean 'relu'?"),
        ("/m.py:build", "layers", True, "knob layers=True must be an int, float or str"),
    ],
)
def test_bad_subject_or_knob_names_the_value(
    subject: str, field: str | None, value: object, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        Config.of(subject, **({} if field is None else {field: value}))
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("lr", 0, "Run.lr=0 must be a finite number"),
        ("lr", float("nan"), "Run.lr=nan"),
        ("clip", 0.0, "Run.clip=0.0"),
        ("clip", "1", "Run.clip expected float but got clip='1' (type=str)"),
        ("quantile", 1.5, "Run.quantile=1.5 must be a finite number in (0, 1]"),
        (
            "dtype",
            "fp16",
            "Run.dtype='fp16' is not allowed; expected one of ('float32', 'float64', 'bfloat16', 'float16')",
        ),
        ("optimizer", "adamw", "did you mean 'adam'?"),
        ("amp", "fp16", "Run.amp='fp16'"),
        ("device", "gpu", "Run.device='gpu' is not allowed; expected 'cpu', 'cuda' or 'cuda:N'"),
        ("device", "cuda:x", "Run.device='cuda:x'"),
        ("device", "meta", "Run.device='meta' is not allowed"),  # was accepted: a raw RuntimeError later
        ("steps", -1, "Run.steps=-1 must be in 0..1000000"),
        ("steps", 1.0, "Run.steps expected int but got steps=1.0 (type=float)"),
        ("warmup", True, "Run.warmup expected int but got warmup=True"),
        ("seed", -1, "Run.seed=-1 must be in 0..4294967295"),
        ("seed", 2**40, "Run.seed=1099511627776"),
        ("seeds", 0, "Run.seeds=0 must be in 1..1000"),
    ],
)
def test_bad_run_values_are_rejected_with_the_value(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config.of("mlp", **{field: value})
    assert message in str(info.value)
    with pytest.raises(ConfigError) as again:
        Config.of("mlp").with_run(**{field: value})
    assert message in str(again.value)


def test_amp_needs_float32() -> None:
    with pytest.raises(ConfigError, match=r"Run\.amp='float16' needs dtype='float32'"):
        Run(amp="float16", dtype="float16")
    assert Run(amp="bfloat16").amp == "bfloat16"


def test_cuda_index_is_a_valid_device() -> None:
    assert Config.of("mlp", device="cuda:1").run.device == "cuda:1"


def test_malformed_knobs_are_an_error() -> None:
    with pytest.raises(ConfigError, match=r"must be \(name, value\) pairs or a dict"):
        Config("/m.py:build", (("a",),))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="must be a Run"):
        Config("mlp", run={"steps": 1})  # type: ignore[arg-type]


def test_of_splits_knobs_from_run_settings() -> None:
    c = Config.of("mlp", depth=8, init_scale=2.0, seed=3, seeds=1, steps=2)
    assert c.values["depth"] == 8 and c.knob("init_scale") == 2.0
    assert (c.run.seed, c.run.seeds, c.run.steps) == (3, 1, 2)
    assert not set(c.values) & set(RUN_FIELDS)
    assert c.family == "mlp" and not c.recurrent
    assert Config.of("gru").recurrent and Config.of("/m.py:f").family is None


def test_with_knobs_routes_run_names_and_rejects_unknown() -> None:
    c = Config.of("/m.py:build", layers=3)
    assert c.knob("layers") == 3
    d = c.with_knobs(layers=5, steps=4)
    assert d.knob("layers") == 5 and d.run.steps == 4 and "steps" not in d.values
    assert c.with_run(steps=2).run.steps == 2 and c.with_run(steps=2).knobs == c.knobs
    with pytest.raises(ConfigError, match="no knob 'nope'"):
        c.with_knobs(nope=1)
    with pytest.raises(ConfigError, match="no knob 'nope'"):
        c.knob("nope")
    with pytest.raises(ConfigError, match="Run has no setting 'depth'"):
        c.with_run(depth=3)
    z = Config.of("mlp").with_knobs(depth=3, seed=7)
    assert z.knob("depth") == 3 and z.run.seed == 7


def test_package_import_is_cheap_and_exports_resolve() -> None:
    import subprocess
    import sys

    code = (
        "import sys, stabilitycheck as sc; assert 'torch' not in sys.modules; "
        "from stabilitycheck.config import Config; Config.from_json(Config.of('mlp').to_json()); "
        "assert 'torch' not in sys.modules; "
        "[getattr(sc, name) for name in sc.__all__]; assert 'torch' in sys.modules; "
        # torch._dynamo costs ~1.5 s to import; only a compiled model needs it (and has loaded it)
        "sc.probe(Config.of('mlp', depth=2, width=4)); assert 'torch._dynamo' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_label_is_the_subjects_last_path_part_with_its_norm() -> None:
    assert Config.of("resmlp", norm="post").label() == "resmlp-post"
    assert Config.of("resmlp", norm="none").label() == "resmlp"
    assert Config.of("mlp").label() == "mlp"
    assert Config("models/deep/net.py:build", ()).label() == "net.py:build"
