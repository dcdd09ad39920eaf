"""Config: one point of the search space, validated, frozen and JSON round-trippable."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from stabilitycheck.errors import ConfigError

FAMILIES = ("mlp", "resmlp", "rnn", "lstm", "gru", "transformer")
NORMS = ("none", "pre", "post")
ACTIVATIONS = ("tanh", "relu", "linear", "gelu")
DTYPES = ("float32", "float64", "bfloat16", "float16")
OPTIMIZERS = ("sgd", "adam")
AMPS = ("none", "bfloat16", "float16")
SEQUENCE_FAMILIES = ("rnn", "lstm", "gru", "transformer")

Scalar = int | float | bool | str


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        hint = ""
        if isinstance(value, str):
            close = [a for a in allowed if a.startswith(value[:2].lower())]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"Config.{name}={value!r} is not allowed; expected one of {allowed}{hint}")


def _int(name: str, value: object, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            f"Config.{name} expected int but got {name}={value!r} (type={type(value).__name__})"
        )
    if value < lo:
        raise ConfigError(f"Config.{name}={value} must be >= {lo}")


def _positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(
            f"Config.{name} expected float but got {name}={value!r} (type={type(value).__name__})"
        )
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"Config.{name}={value!r} must be a finite number > 0")


def _device(value: object) -> None:
    ok = isinstance(value, str) and (
        value in ("cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit())
    )
    if not ok:
        raise ConfigError(f"Config.device={value!r} is not allowed; expected 'cpu', 'cuda' or 'cuda:N'")


@dataclass(frozen=True)
class Config:
    """One configuration to probe; `params` holds the knobs of a user's factory (name, value)."""

    family: str = "mlp"
    depth: int = 4
    width: int = 64
    init_scale: float = 1.0
    seq_len: int = 16
    norm: str = "none"
    activation: str = "tanh"
    dtype: str = "float32"
    device: str = "cpu"
    batch_size: int = 16
    steps: int = 0
    lr: float = 0.01
    optimizer: str = "sgd"
    clip: float | None = None
    warmup: int = 0
    amp: str = "none"
    seed: int = 0
    params: tuple[tuple[str, Scalar], ...] = field(default=())

    def __post_init__(self) -> None:
        if not isinstance(self.family, str) or not self.family:
            raise ConfigError(f"Config.family={self.family!r} must be a non-empty string")
        for name in ("depth", "width", "seq_len", "batch_size"):
            _int(name, getattr(self, name), 1)
        for name in ("steps", "warmup", "seed"):
            _int(name, getattr(self, name), 0)
        _positive("init_scale", self.init_scale)
        _positive("lr", self.lr)
        if self.clip is not None:
            _positive("clip", self.clip)
        _choice("norm", self.norm, NORMS)
        _choice("activation", self.activation, ACTIVATIONS)
        _choice("dtype", self.dtype, DTYPES)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("amp", self.amp, AMPS)
        if self.amp != "none" and self.dtype != "float32":
            raise ConfigError(
                f"Config.amp={self.amp!r} needs dtype='float32' (autocast lowers the precision itself), "
                f"got dtype={self.dtype!r}"
            )
        _device(self.device)
        if not isinstance(self.params, tuple) or not all(
            isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in self.params
        ):
            raise ConfigError(f"Config.params={self.params!r} must be a tuple of (name, value) pairs")

    def knob(self, name: str) -> Scalar | None:
        """The value of a knob: a Config field or one of the user's factory `params`."""
        for key, value in self.params:
            if key == name:
                return value
        if name in _FIELD_NAMES and name != "params":
            value = getattr(self, name)
            return None if value is None else value
        raise ConfigError(f"Config has no knob {name!r}; knobs are {sorted(self.knob_names())}")

    def knob_names(self) -> tuple[str, ...]:
        """Every knob name this Config answers to."""
        return tuple(n for n in _FIELD_NAMES if n != "params") + tuple(k for k, _ in self.params)

    def with_knobs(self, **values: Any) -> Config:
        """A copy with knobs replaced; names not among the fields go to `params`."""
        params = dict(self.params)
        fields = {k: v for k, v in values.items() if k in _FIELD_NAMES and k not in params}
        extra = {k: v for k, v in values.items() if k not in fields}
        unknown = set(extra) - set(params)
        if unknown:
            raise ConfigError(
                f"Config has no knob {sorted(unknown)[0]!r}; knobs are {sorted(self.knob_names())}"
            )
        params.update(extra)
        return dataclasses.replace(self, **fields, params=tuple(params.items()))

    @property
    def is_sequence(self) -> bool:
        """Whether the family reads a sequence (seq_len matters)."""
        return self.family in SEQUENCE_FAMILIES

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; `params` becomes an object."""
        out = dataclasses.asdict(self)
        out["params"] = dict(self.params)
        return out

    def to_json(self) -> str:
        """JSON text that `Config.from_json` turns back into an equal Config."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        """Inverse of `to_dict`; unknown keys are an error, not silently dropped."""
        unknown = set(data) - set(_FIELD_NAMES)
        if unknown:
            raise ConfigError(
                f"Config JSON has unknown keys {sorted(unknown)}; allowed are {list(_FIELD_NAMES)}"
            )
        kwargs = dict(data)
        kwargs["params"] = tuple((str(k), v) for k, v in dict(data.get("params", {})).items())
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> Config:
        """Parse the output of `to_json`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"Config JSON is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"Config JSON must be an object, got {type(data).__name__}")
        return cls.from_dict(data)


_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(Config))
