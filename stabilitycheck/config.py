"""Config(subject, knobs, run): one point to probe, validated once, frozen, and JSON round-trippable.

`subject` names what is built (a zoo family, 'path/model.py[:factory]' or 'hf:<model type>'),
`knobs` are that subject's own values (nothing it ignores), and `run` holds the settings every
subject shares. Torch-free: a Config is data, and printing, comparing or loading one imports nothing.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from stabilitycheck._validation import describe
from stabilitycheck.errors import ConfigError, did_you_mean
from stabilitycheck.families import FAMILIES, RECURRENT, Scalar, knob_specs

SCHEMA = 2
"""Version of the Config JSON; 1 was the zoo record with a `params` side-pocket (before subjects)."""

DTYPES = ("float32", "float64", "bfloat16", "float16")
OPTIMIZERS = ("sgd", "adam")
AMPS = ("none", "bfloat16", "float16")


def choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    """`value` is one of `allowed` (a Run field's names), else a ConfigError with a did-you-mean."""
    if value not in allowed:
        hint = did_you_mean(value, allowed) if isinstance(value, str) else ""
        raise ConfigError(f"Run.{name}={value!r} is not allowed; expected one of {allowed}{hint}")


def _int(name: str, value: object, lo: int, hi: int = 2**63 - 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"Run.{name} expected int but got {name}={value!r} (type={type(value).__name__})")
    if not lo <= value <= hi:
        raise ConfigError(f"Run.{name}={value} must be in {lo}..{hi}")


def _positive(name: str, value: object, hi: float = math.inf) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"Run.{name} expected float but got {name}={value!r} (type={type(value).__name__})")
    if not (math.isfinite(value) and 0 < value <= hi):
        raise ConfigError(f"Run.{name}={value!r} must be a finite number in (0, {hi:g}]")


def _device(value: object) -> None:
    ok = isinstance(value, str) and (
        value in ("cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit())
    )
    if not ok:
        raise ConfigError(f"Run.device={value!r} is not allowed; expected 'cpu', 'cuda' or 'cuda:N'")


@dataclass(frozen=True)
class Run:
    """The settings every subject shares: precision, device, training steps, and the seeds a verdict
    spends (`seed` is the first; up to `seeds` initialisations, judged on their `quantile`)."""

    dtype: str = "float32"
    device: str = "cpu"
    steps: int = 0
    lr: float = 0.01
    optimizer: str = "sgd"
    clip: float | None = None
    warmup: int = 0
    amp: str = "none"
    seed: int = 0
    seeds: int = 5
    quantile: float = 0.5

    def __post_init__(self) -> None:
        for name in ("steps", "warmup"):
            _int(name, getattr(self, name), 0, 10**6)
        _int("seed", self.seed, 0, 2**32 - 1)
        _int("seeds", self.seeds, 1, 1000)
        _positive("lr", self.lr)
        _positive("quantile", self.quantile, 1.0)
        if self.clip is not None:
            _positive("clip", self.clip)
        choice("dtype", self.dtype, DTYPES)
        choice("optimizer", self.optimizer, OPTIMIZERS)
        choice("amp", self.amp, AMPS)
        if self.amp != "none" and self.dtype != "float32":
            raise ConfigError(
                f"Run.amp={self.amp!r} needs dtype='float32' (autocast lowers the precision itself), "
                f"got dtype={self.dtype!r}"
            )
        _device(self.device)


RUN_FIELDS = tuple(f.name for f in dataclasses.fields(Run))


def kind(subject: str) -> str:
    """'zoo', 'file' or 'hf': which kind of subject a name is (checked, with a 'did you mean')."""
    if not isinstance(subject, str) or not subject:
        raise ConfigError(f"Config.subject={subject!r} must be a non-empty string")
    if subject.startswith("hf:"):
        if not subject[3:]:
            raise ConfigError("Config.subject='hf:' names no model type; expected e.g. 'hf:gpt2'")
        return "hf"
    if "." in subject or "/" in subject:  # a path (no family's name has a dot): `notpy.txt` was said
        return "file"  # to be no zoo family, where a path is told it is no .py file
    knob_specs(subject)
    return "zoo"


def _zoo_knobs(family: str, given: Mapping[str, Scalar]) -> tuple[tuple[str, Scalar], ...]:
    """Every knob of a zoo family, given values checked and the rest at their defaults."""
    specs = knob_specs(family)
    names = [s.name for s in specs]
    unknown = [k for k in given if k not in names]
    if unknown:
        raise ConfigError(
            f"{family} has no knob {unknown[0]!r}{did_you_mean(unknown[0], names)}; its knobs are {names}"
        )
    return tuple((s.name, s.check(family, given.get(s.name, s.default))) for s in specs)


@dataclass(frozen=True)
class Config:
    """One configuration to probe: the subject's name, its knob values, and the run settings."""

    subject: str
    knobs: tuple[tuple[str, Scalar], ...] = ()
    run: Run = field(default_factory=Run)

    def __post_init__(self) -> None:
        pairs = self.knobs.items() if isinstance(self.knobs, Mapping) else self.knobs
        try:
            knobs = tuple((str(k), v) for k, v in pairs)
        except (TypeError, ValueError):
            raise ConfigError(f"Config.knobs={self.knobs!r} must be (name, value) pairs or a dict") from None
        if kind(self.subject) == "zoo":
            knobs = _zoo_knobs(self.subject, dict(knobs))
        for name, value in knobs:
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                raise ConfigError(f"{self.subject} knob {name}={value!r} must be an int, float or str")
        object.__setattr__(self, "knobs", knobs)
        if not isinstance(self.run, Run):
            raise ConfigError(f"Config.run={self.run!r} must be a Run")

    @classmethod
    def of(cls, subject: str, **values: Any) -> Config:
        """A Config from flat keywords: run settings (dtype, seed, steps...) go to `run`, the rest are
        knobs. `Config.of("mlp", depth=8, init_scale=2.0, seed=3)`."""
        run = {k: v for k, v in values.items() if k in RUN_FIELDS}
        return cls(subject, tuple((k, v) for k, v in values.items() if k not in run), Run(**run))

    @property
    def values(self) -> dict[str, Scalar]:
        """The knobs as a dict."""
        return dict(self.knobs)

    @property
    def family(self) -> str | None:
        """The zoo family, or None for other subjects."""
        return self.subject if kind(self.subject) == "zoo" else None

    @property
    def recurrent(self) -> bool:
        """Whether the subject is a zoo recurrent family (its seq_len is time steps)."""
        return self.subject in RECURRENT

    def knob(self, name: str) -> Scalar:
        """The value of one knob, or a ConfigError naming the knobs there are."""
        for key, value in self.knobs:
            if key == name:
                return value
        raise ConfigError(f"{self.subject} has no knob {name!r}; its knobs are {[k for k, _ in self.knobs]}")

    def with_knobs(self, **values: Any) -> Config:
        """A copy with knobs replaced (run settings by name go to `run`); an unknown name is an error."""
        run = {k: v for k, v in values.items() if k in RUN_FIELDS and k not in self.values}
        knobs = {k: v for k, v in values.items() if k not in run}
        for name in knobs:
            self.knob(name)
        merged = tuple((k, knobs.get(k, v)) for k, v in self.knobs)
        return Config(self.subject, merged, dataclasses.replace(self.run, **run) if run else self.run)

    def with_run(self, **changes: Any) -> Config:
        """A copy with run settings replaced."""
        unknown = [k for k in changes if k not in RUN_FIELDS]
        if unknown:
            raise ConfigError(f"Run has no setting {unknown[0]!r}; settings are {list(RUN_FIELDS)}")
        return dataclasses.replace(self, run=dataclasses.replace(self.run, **changes))

    def describe(self) -> str:
        """'mlp depth=8 init_scale=2.0 ...': the subject and its knobs, for labels and messages."""
        return " ".join([self.subject, *(f"{k}={v}" for k, v in self.knobs)])

    def label(self) -> str:
        """The subject as a summary's target column names it: a file's last path part, with the norm
        where there is one ('resmlp-post')."""
        norm = self.values.get("norm", "none")
        return self.subject.rpartition("/")[2] + ("" if norm == "none" else f"-{norm}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with the schema version."""
        return {
            "schema": SCHEMA,
            "subject": self.subject,
            "knobs": dict(self.knobs),
            "run": dataclasses.asdict(self.run),
        }

    def to_json(self) -> str:
        """JSON text that `Config.from_json` turns back into an equal Config (keys in to_dict's fixed
        order, not sorted: a model file's knobs keep their order, which Config equality compares)."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: Any) -> Config:
        """Inverse of `to_dict`; an old or malformed record is a ConfigError saying what to do."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"a Config record must be a JSON object, got {type(data).__name__}")
        if "family" in data and "schema" not in data:
            raise ConfigError(
                "this Config JSON was written by an older stabilitycheck (schema 1, with 'family'); "
                "run the search again to write it in the current schema"
            )
        if data.get("schema") != SCHEMA:
            raise ConfigError(f"Config JSON has schema {data.get('schema')!r}; this version reads {SCHEMA}")
        unknown = set(data) - {"schema", "subject", "knobs", "run"}
        if unknown:
            raise ConfigError(
                f"Config JSON has unknown keys {sorted(unknown)}; expected those Config.to_json writes: "
                "schema, subject, knobs, run"
            )
        run = data.get("run", {})
        if not isinstance(run, Mapping) or not isinstance(data.get("knobs", {}), Mapping):
            raise ConfigError("Config JSON: 'knobs' and 'run' must be objects")
        bad = set(run) - set(RUN_FIELDS)
        if bad:
            raise ConfigError(
                f"Config JSON run has unknown keys {sorted(bad)}; allowed are {list(RUN_FIELDS)}"
            )
        try:
            return cls(str(data.get("subject", "")), tuple(data.get("knobs", {}).items()), Run(**run))
        except TypeError as exc:
            raise ConfigError(
                f"Config JSON is malformed: {describe(exc)}; give what Config.to_json writes"
            ) from None

    @classmethod
    def from_json(cls, text: str) -> Config:
        """Parse the output of `to_json`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"Config JSON is not valid JSON: {describe(exc)}; give what Config.to_json writes"
            ) from None
        return cls.from_dict(data)


__all__ = ["AMPS", "DTYPES", "FAMILIES", "OPTIMIZERS", "RUN_FIELDS", "SCHEMA", "Config", "Run", "kind"]
