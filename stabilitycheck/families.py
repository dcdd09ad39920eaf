"""The zoo's families and their knobs, torch-free, so a Config names and checks them without building.

Each family has only the knobs its builder reads (an mlp has no `norm`, an rnn no `depth`), listed in
order of importance: the order a Space draws and a search lowers them.
"""

from __future__ import annotations

from dataclasses import dataclass

from stabilitycheck.errors import ConfigError, did_you_mean

Scalar = int | float | bool | str
Knob = int | float  # a numeric knob: a model file's or a Hugging Face model type's


@dataclass(frozen=True)
class KnobSpec:
    """One knob of a family: its default, and either the allowed choices or the smallest value."""

    name: str
    default: Scalar
    choices: tuple[str, ...] = ()
    minimum: float = 1

    def check(self, family: str, value: object) -> Scalar:
        """`value` validated for this knob (an int knob takes integral floats), else a ConfigError."""
        where = f"{family} knob {self.name}"
        if self.choices:
            if value not in self.choices:
                hint = did_you_mean(value, self.choices)
                raise ConfigError(f"{where}={value!r} is not allowed; expected one of {self.choices}{hint}")
            return str(value)
        kind = type(self.default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            got = f"{self.name}={value!r} (type={type(value).__name__})"
            raise ConfigError(f"{where} expected {kind.__name__} but got {got}")
        if kind is int:
            if not float(value).is_integer():
                raise ConfigError(f"{where} expected int but got {self.name}={value!r}")
            value = int(value)
        else:
            value = float(value)
        if not (value >= self.minimum and value < float("inf")):
            op = ">" if self.minimum == 0 else ">="
            raise ConfigError(f"{where}={value!r} must be a finite number {op} {self.minimum:g}")
        if kind is float and self.minimum == 0 and value == 0:
            raise ConfigError(f"{where}={value!r} must be > 0")
        return value


ACTIVATIONS = ("tanh", "relu", "linear", "gelu")
NORMS = ("none", "pre", "post")

_DEPTH = KnobSpec("depth", 4)
_WIDTH = KnobSpec("width", 64)
_SCALE = KnobSpec("init_scale", 1.0, minimum=0)
_SEQ = KnobSpec("seq_len", 16)
_NORM = KnobSpec("norm", "none", NORMS)
_BATCH = KnobSpec("batch_size", 16)


def _act(default: str) -> KnobSpec:
    return KnobSpec("activation", default, ACTIVATIONS)


FAMILIES: dict[str, tuple[KnobSpec, ...]] = {
    "mlp": (_DEPTH, _SCALE, _WIDTH, _act("tanh"), _BATCH),
    "resmlp": (_DEPTH, _SCALE, _WIDTH, _NORM, _act("tanh"), _BATCH),
    "rnn": (_SEQ, _SCALE, _WIDTH, _act("tanh"), _BATCH),
    "lstm": (_SEQ, _SCALE, _WIDTH, _BATCH),
    "gru": (_SEQ, _SCALE, _WIDTH, _BATCH),
    "transformer": (_DEPTH, _SCALE, _WIDTH, _SEQ, _NORM, _act("gelu"), _BATCH),
}
RECURRENT = ("rnn", "lstm", "gru")


def knob_specs(family: str) -> tuple[KnobSpec, ...]:
    """The knobs of a zoo family, or a ConfigError with a 'did you mean'."""
    if family not in FAMILIES:
        hint = did_you_mean(family, list(FAMILIES))
        raise ConfigError(
            f"{family!r} is not a zoo family{hint}; expected one of {', '.join(FAMILIES)}, "
            "a model file 'path/model.py[:factory]' or a Hugging Face model type 'hf:gpt2'"
        )
    return FAMILIES[family]
