"""What one probe step's host-side numbers say: each chain's growth, the model's growth, the
backward gain of each block, and the first non-finite value in the order it came to be."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from stabilitycheck.measurement import AFTER_LAST, INPUT, NonFinite, ratio


@dataclass
class Step:
    """The host-side numbers of one step (after the single synchronisation); one entry per
    parameter in `grads` and `weights` (0.0 for a parameter that got no gradient)."""

    loss: float
    grads: list[float]
    weights: list[float]
    calls: tuple[str, ...]
    breaks: frozenset[int]  # calls (positions in `calls`) that start a new chain: no gain across
    unreached: frozenset[int]  # calls whose output the loss does not depend on: no gradient, no gain
    forward: list[float]
    backward: list[float]
    entering: list[float] = dataclasses.field(default_factory=list)  # per call, ||its input|| (exact runs)
    given_finite: bool = True  # every floating tensor given to the model is finite (exact runs)
    scale: float = 1.0
    finite: bool = True  # every number above is finite


def chains_of(act: Sequence[float], breaks: frozenset[int], unreached: frozenset[int]) -> tuple[float, ...]:
    """Each chain's own growth, its first over its last output-gradient norm: a junction (`breaks`)
    starts another chain (a decoder after its encoder), and no ratio is taken across it (it would
    read the encoder's dL/d input against the decoder's last output). Outputs the loss does not depend
    on (`unreached`: a block computed only for logging) have no gradient, not a zero one, and are left
    out; a chain of them alone has no growth, nor has one where a single output of several was reached
    (no gain between two of its outputs could be read: its growth is unknown, not 1)."""
    starts = [0, *sorted(b for b in breaks if 0 < b < len(act)), len(act)]
    chains = []
    for a, b in itertools.pairwise(starts):
        chain = [act[i] for i in range(a, b) if i not in unreached]
        if len(chain) > 1 or (chain and b - a == 1):  # one call alone grows by 1 (no gain to take);
            # one reached among several has no growth that could be read (a (y, h) step's y)
            chains.append(ratio(chain[0], chain[-1]))
    return tuple(chains)


def growth_of(chains: Sequence[float], calls: int) -> float:
    """The growth of a model whose chains grow as `chains`: their product (the product of the gains),
    or, where a chain grows (above 1) more than that, the largest chain's own, so that one chain's
    vanishing does not hide another's explosion (a prophetnet encoder growing 2558 beside its decoder
    at 1.4e-16 read 3.5e-13); the vanishing criterion reads the smallest (verdicts.values). NaN where
    calls were recorded but no gradient reached any (hf:bart with no decoder layers read 1)."""
    if calls and not chains:
        return math.nan
    product = math.prod(chains)
    largest = max(chains, default=product)
    return largest if len(chains) > 1 and largest > max(product, 1.0) else product


def gains_of(act: Sequence[float], breaks: frozenset[int], unreached: frozenset[int]) -> tuple[float, ...]:
    """The backward gain of each entry's block after the first, act[i] / act[i + 1]: NaN across a
    junction (`breaks`) and next to an output no gradient reached (there is no gain to take)."""
    return tuple(
        math.nan if i + 1 in breaks or i in unreached or i + 1 in unreached else ratio(act[i], act[i + 1])
        for i in range(len(act) - 1)
    )


def locate(
    step: int, s: Step, names: Sequence[str], owner: Sequence[int], grads_count: bool = True
) -> NonFinite | None:
    """The first non-finite value of a step, in the order it came to be: the weights (at step k, after
    k updates: the update of step k - 1 made them), forward outputs, the loss, output gradients
    (output side first), weight grads.
    Under a GradScaler (`grads_count` False) non-finite gradients are a skipped step, not a finding."""

    def block(b: int) -> str:
        return names[b] if b >= 0 else "(outside blocks)"

    for value, b in zip(s.weights, owner, strict=False):  # weights are measured on request only
        if not math.isfinite(value):
            return NonFinite(step, block(b), "weight", value)
    for i, (value, name) in enumerate(zip(s.forward, s.calls, strict=True)):
        if s.entering and not math.isfinite(s.entering[i]):  # every output before it is finite
            return NonFinite(step, f"(outside blocks, before {name})", "activation", s.entering[i])
        if not math.isfinite(value):
            if name == INPUT and s.given_finite and len(s.calls) > 1:  # the model's code made it
                return NonFinite(step, f"(outside blocks, before {s.calls[1]})", "activation", value)
            return NonFinite(step, name, "activation", value)
    if not math.isfinite(s.loss):
        return NonFinite(step, AFTER_LAST, "loss", s.loss)
    if not grads_count:
        return None
    for value, name in reversed(list(zip(s.backward, s.calls, strict=True))):
        if not math.isfinite(value):
            return NonFinite(step, name, "activation_grad", value)
    for value, b in zip(s.grads, owner, strict=True):
        if not math.isfinite(value):
            return NonFinite(step, block(b), "gradient", value)
    return None
