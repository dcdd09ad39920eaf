"""What a probe measured: the Measurement and its first non-finite value, as plain Python numbers.

No torch here: a Measurement read back from JSON, judged or rendered, never needs it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

AFTER_LAST = "(after the last block)"
"""Where a non-finite value no block made came from: the model's code after its last block (a head, a
log) or the loss function; the loss is the first value found non-finite."""

AFTER_LAST_SAID = "the loss after the last block"
"""AFTER_LAST in a sentence: what made a value, where no block did."""

TENSOR_KINDS = ("weight", "activation", "loss", "activation_grad", "gradient")

INPUT = "(input)"
"""The name of block 0's input, the first entry of a chain (activation_names) when the probe took it."""


def shown(names: str) -> str:
    """Block names ('a, b' for a group) as a message shows them: each quoted where it starts with a
    digit (an nn.Sequential's children '0', '70', called again '0[3]'), which bare read as a count or
    an index (culprit '1', 'weight of 0', 'block 70' beside '36 layers')."""
    return ", ".join(repr(n) if n[:1].isdigit() else n for n in names.split(", "))


@dataclass(frozen=True)
class NonFinite:
    """The first NaN/Inf seen: its step, the block, which tensor, and the offending norm."""

    step: int
    layer: str
    tensor: str  # one of TENSOR_KINDS; "activation_grad" is dL/d(output of `layer`)
    value: float
    reproduced: bool = True  # False: the step's float64 re-run stayed finite, this is the step's own

    def describe(self) -> str:
        """'step 1: activation of layers.2, L2 norm nan' (the loss is a value, every other tensor a norm)."""
        what = "" if self.tensor == "loss" else "L2 norm "
        again = (
            ""
            if self.reproduced
            else " (a re-run of the step stayed finite: the model draws on state the probe does not "
            "restore, Python's or numpy's random, a counter)"
        )
        return f"step {self.step}: {self.tensor} of {shown(self.layer)}, {what}{self.value:.4g}{again}"


@dataclass(frozen=True)
class Measurement:
    """Everything the probe measured; numbers are Python floats, per-call lists input side first."""

    layer_names: tuple[str, ...]
    activation_names: tuple[str, ...]
    loss: tuple[float, ...]
    grad_norm: tuple[float, ...]
    layer_grad_norms: tuple[float, ...]
    activation_norms: tuple[float, ...]
    activation_grad_norms: tuple[float, ...]
    gains: tuple[float, ...]
    growth: float
    weight_norms: tuple[float, ...]  # per block, after the last update; () at steps=0 (the caller's own)
    first_nonfinite: NonFinite | None
    steps_run: int
    loss_scale: tuple[float, ...] = ()
    skipped_steps: int = 0
    allow_tf32: bool = False
    overflow: NonFinite | None = None
    blocks_note: str = ""  # how the blocks were chosen (the Subject's line), and the output entry used
    chain_starts: tuple[int, ...] = ()  # calls (in activation_names) starting a new chain: no gain across
    chain_growths: tuple[float, ...] = ()  # each chain's own growth, where there are several
    chain_feeds: tuple[tuple[int, ...], ...] = ()  # per chain, the earlier chains whose outputs it takes
    profile_step: int = 0  # the step the per-block numbers are from (see probing.probe_module)
    state_end: bool = False  # the last reached call was read on a carried state: see `law_gains`
    # the median backward gain over the later block calls of block 0's chain of what the model computes
    # between a block's output and the next block's input from that output alone, ||dL/d out_i-1|| /
    # ||dL/d x_i|| (x = tanh(layer(x)) around bare Linear blocks: ~E[tanh']), 1 for a call taking the
    # output as returned; block 0's gain from the model's input has none of it (culprit.culprit_of)
    between_gain: float = 1.0
    cut_before: tuple[int, ...] = ()  # calls (in activation_names) taking their input detached: no
    # gradient reaches the blocks before them (readings.cut_before)

    @property
    def per_call(self) -> bool:
        """More block calls than blocks, each call a block, with no chain starting among them as the
        recorder read them (a recurrent cell stepped per token, stacked cells taking turns): where a
        per-token loss may add every later call's gradient to the product of Jacobians. Truncated
        backpropagation's windows start chains of their own, and a loss on the last call reaches only
        the last one; whether every call takes what the one before returned (not a Siamese model's
        shared tower) is the model file's own check (modelfile.subject._reading)."""
        calls = sum(n != INPUT for n in self.activation_names)
        return calls > len(self.layer_names) >= 1 and not self.chain_starts

    @property
    def law_gains(self) -> tuple[float, ...]:
        """The gains a rate or depth law is fitted on (growthkind): all of them but, where the output
        end is a carried state (an LSTM's h and c), its last reached call's, whose gain is what the loss
        takes from the state there (h's share, c none), not the step's rate: with constant gates every
        other step multiplies the state's gradient by r = f + i o w and the last by o hypot(i w, f)."""
        if not self.state_end:
            return self.gains
        reached = [i for i, g in enumerate(self.gains) if not math.isnan(g)]
        return self.gains[: reached[-1]] if reached else self.gains

    @property
    def fitted_gains(self) -> tuple[float, ...]:
        """`law_gains` from the last chain start before which every gain is 0 / 0 (NaN): chains that
        no gradient reached, as truncated backpropagation's earlier windows under a loss on the last
        token, measured no gain, and fitted as gains of 1 they read a cell at exactly x2 a step, 30 of
        39 calls unreached, 'irregular'. The laws of growthkind are fitted on these."""
        gains = self.law_gains
        dead = [s for s in self.chain_starts if s <= len(gains) and all(math.isnan(g) for g in gains[:s])]
        return gains[max(dead) :] if dead else gains

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (non-finite floats are kept: report.strict_json writes NaN as null)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Measurement:
        """Inverse of `to_dict`."""
        kwargs: dict[str, Any] = {
            k: tuple(map(_nan, v)) if isinstance(v, list) else v for k, v in data.items()
        }
        kwargs["growth"] = _nan(data["growth"])
        kwargs["chain_feeds"] = tuple(tuple(fed) for fed in data.get("chain_feeds", ()))
        for key in ("first_nonfinite", "overflow"):
            nf = data.get(key)
            kwargs[key] = NonFinite(**{**nf, "value": _nan(nf["value"])}) if nf else None
        return cls(**kwargs)


def _nan(x: Any) -> Any:
    """null, how strict JSON writes NaN, read back as NaN."""
    return math.nan if x is None else x


def ratio(num: float, den: float) -> float:
    """num / den where 0/0 is NaN and x/0 is +Inf, instead of raising."""
    if den == 0.0:
        return math.nan if num == 0.0 else math.inf
    return num / den
