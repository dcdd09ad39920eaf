"""What one probe step's host-side numbers say: each chain's growth, the model's growth, the
backward gain of each block, and the first non-finite value in the order it came to be."""

from __future__ import annotations

import dataclasses
import itertools
import math
import statistics
from collections.abc import Mapping, Sequence
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
    feeds: dict[int, frozenset[int]]  # per break, the first calls of the chains its call takes
    unreached: frozenset[int]  # calls whose output the loss does not depend on: no gradient, no gain
    forward: list[float]
    backward: list[float]
    entering: list[float] = dataclasses.field(default_factory=list)  # per call, ||its input|| (exact runs)
    given_finite: bool = True  # every floating tensor given to the model is finite (exact runs)
    scale: float = 1.0
    finite: bool = True  # every number above is finite
    made: tuple[int, ...] = ()  # parameters in the order the backward made their gradients (exact runs)
    carried: frozenset[int] = frozenset()  # calls read on a state they carry beside it (an LSTM's h, c)
    cuts: frozenset[int] = frozenset()  # breaks where a cell's call took its last output detached
    severed: frozenset[int] = frozenset()  # calls taking their chain's input with no gradient (cut_before)
    between: float = 1.0  # see Measurement.between_gain
    ran: frozenset[int] = frozenset()  # the blocks a recorded call was made of (hooked runs)


def between_gain(
    backward: Sequence[float],
    crossed: Sequence[tuple[int, float]],
    as_returned: Sequence[int],
    breaks: frozenset[int],
) -> float:
    """The median backward gain, over the later block calls of block 0's chain (up to the first break:
    a decoder's function between its blocks is none of an encoder's), of what the model computes
    between a block's output and the next block's input: ||dL/d out_i-1|| / ||dL/d x_i|| for each call
    that took x_i computed from the output before it (`crossed`: (its position, ||dL/d x_i||)), 1 for
    each that took that output as returned (their positions `as_returned`); 1 where no ratio is a
    positive finite number (no later call, or no gradient crossed)."""
    end = min((b for b in breaks if b > 0), default=len(backward))
    gains = [ratio(backward[at - 1], v) for at, v in crossed if 0 < at < end]
    gains = [x for x in gains if 0 < x < math.inf] + [1.0 for at in as_returned if at < end]
    return statistics.median(gains) if gains else 1.0


def chains_of(
    act: Sequence[float],
    breaks: frozenset[int],
    unreached: frozenset[int],
    feeds: Mapping[int, frozenset[int]],
) -> tuple[tuple[float, ...], tuple[tuple[int, ...], ...]]:
    """Each chain's own growth, its first over its last output-gradient norm, and the earlier chains
    whose outputs it takes (`feeds`: per junction, the first positions of those chains): a junction
    (`breaks`) starts another chain (a decoder after its encoder, a second tower beside the first),
    and no ratio is taken across it (it would read the encoder's dL/d input against the decoder's
    last output). Outputs the loss does not depend on (`unreached`: a block computed only for
    logging) have no gradient, not a zero one, and are left out; a chain of them alone has no growth,
    nor has one where a single output of several was reached (no gain between two of its outputs
    could be read: its growth is unknown, not 1), and a chain taking one takes what that one took."""
    starts = [0, *sorted(b for b in breaks if 0 < b < len(act))]
    index: dict[int, int] = {}  # a readable chain's first position: its place in the result
    took: dict[int, set[int]] = {}  # per chain's first position, the readable chains it takes
    chains: list[float] = []
    feeders: list[tuple[int, ...]] = []
    for k, (a, b) in enumerate(itertools.pairwise([*starts, len(act)])):
        fed = feeds.get(a, frozenset(starts[k - 1 : k]))  # a junction of no record follows the last
        took[a] = set().union(*({index[f]} if f in index else took.get(f, set()) for f in fed))
        chain = [act[i] for i in range(a, b) if i not in unreached]
        if len(chain) > 1 or (chain and b - a == 1):  # one call alone grows by 1 (no gain to take);
            # one reached among several has no growth that could be read (a (y, h) step's y)
            index[a] = len(chains)
            chains.append(ratio(chain[0], chain[-1]))
            feeders.append(tuple(sorted(took[a])))
    return tuple(chains), tuple(feeders)


def cut_before(severed: frozenset[int], unreached: frozenset[int]) -> tuple[int, ...]:
    """The calls taking their chain's input detached (`severed`) where the output before them got no
    gradient at all while theirs did: the blocks before the cut do not learn from this loss (a frozen
    backbone under a trained head, or a detach left in by mistake, which reads as the growth of the
    part after it); not where the loss reaches them another way (an online probe on detached
    features beside the main loss)."""
    return tuple(sorted(s for s in severed if s - 1 in unreached and s not in unreached))


def unscored(
    act: Sequence[float],
    breaks: frozenset[int],
    unreached: frozenset[int],
    cuts: frozenset[int] = frozenset(),
) -> frozenset[int]:
    """The outputs at each chain's output end whose gradient is exactly 0 while no later output of
    the chain has one: reached, but the loss takes nothing from them (an RNN's last step under a
    shifted next-token loss, `logits[:, :-1]`), so read as unreached. Their 0 as the chain's last
    norm read a contracting RNN's growth as ||dL/dh_0|| / 0 = inf, exploding. A zero at the input
    end is kept: there the gradient died on its way back (vanishing). A chain all of zeros is kept
    too (its growth 0 / 0 reads as none, which the report says; dropped, an encoder behind a dead
    link read as flat, a tower behind a zero gate said nothing), but a window that a cut ends (`cuts`:
    calls on the last output detached, truncated BPTT) where another chain has a gradient: the loss
    on the last token takes nothing from the windows before it, by design (their NaN read the
    model's growth as none)."""
    starts = [0, *sorted(b for b in breaks if 0 < b < len(act))]
    live = any(act[i] for i in range(len(act)) if i not in unreached)
    out: set[int] = set()
    for a, b in itertools.pairwise([*starts, len(act)]):
        if not any(act[i] for i in range(a, b) if i not in unreached):
            if live and b in cuts:
                out.update(i for i in range(a, b) if i not in unreached)
            continue  # else read as it is (0 / 0, no growth), not dropped
        for i in range(b - 1, a - 1, -1):
            if i in unreached:
                continue
            if act[i] != 0.0:
                break
            out.add(i)
    return frozenset(out)


def paths_of(chains: Sequence[float], feeds: Sequence[Sequence[int]]) -> tuple[float, float]:
    """The largest and the smallest growth of a path of chains through the model, from one that takes
    no other chain's output to one whose output no other takes: the product of its chains' growths.
    Chains in series (an encoder, then its decoder) make one path, their product; chains side by
    side (two towers, a bidirectional reader's two directions) each make their own, and one gradient
    never crosses both (their product would read g^(2T) for a reader growing g^T each way)."""
    if not feeds:
        feeds = [(k - 1,) if k else () for k in range(len(chains))]  # one chain, or chains in series
    most: list[float] = []
    least: list[float] = []
    for growth, fed in zip(chains, feeds, strict=True):
        most.append(growth * max((most[f] for f in fed), default=1.0))
        least.append(growth * min((least[f] for f in fed), default=1.0))
    taken = {f for fed in feeds for f in fed}
    ends = [k for k in range(len(chains)) if k not in taken]
    return max(most[k] for k in ends), min(least[k] for k in ends)


def growth_of(chains: Sequence[float], feeds: Sequence[Sequence[int]], calls: int) -> float:
    """The growth of a model whose chains grow as `chains`, taking each other's outputs as `feeds`:
    the largest growth of a path of chains through it (`paths_of`: the product of the gains along
    it), or, where a chain grows (above 1) more than that, the largest chain's own, so that one
    chain's vanishing does not hide another's explosion (a prophetnet encoder growing 2558 beside its
    decoder at 1.4e-16 read 3.5e-13); the vanishing criterion reads the smallest (verdicts.values).
    NaN where calls were recorded but no gradient reached any (hf:bart with no decoder layers read
    1), or where a chain's growth is NaN."""
    if (calls and not chains) or any(math.isnan(c) for c in chains):
        return math.nan
    if not chains:
        return 1.0
    worst = paths_of(chains, feeds)[0]
    largest = max(chains)
    return largest if len(chains) > 1 and largest > max(worst, 1.0) else worst


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
    (output side first), weight grads (in the order the backward made them, `made`, on an exact
    re-run; else the parameters in reverse order, a model's being defined input side first).
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
    made = set(s.made)
    for i in (*s.made, *(i for i in reversed(range(len(s.grads))) if i not in made)):
        if not math.isfinite(s.grads[i]):
            return NonFinite(step, block(owner[i]), "gradient", s.grads[i])
    return None
