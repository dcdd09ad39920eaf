"""Which block to blame for a Config's growth, over its seeds' measurements: the block a non-finite
value was made in, one block whose gain stands out in most seeds, or none (a uniform stack)."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence

from stabilitycheck.measurement import AFTER_LAST, INPUT, Measurement, shown
from stabilitycheck.spread import quantile

SPREAD = 4.0  # the widest ratio between two blocks' median gains that still reads 'uniform'


def culprit_of(ms: Sequence[Measurement], nonfinite: bool | None = None, q: float = 0.5) -> str:
    """The block to blame, over seeds: where the first non-finite value was made where `nonfinite` (the
    verdict's nonfinite criterion fired: 2 of 5 seeds at q=0.9), or, None (no verdict says), where half the
    seeds or more went non-finite; else the rules below, on the finite seeds (one seed's Inf named a block
    on a growth verdict a x1000 block caused in every seed); else the blocks whose backward log-gain exceeds
    the stack's median log-gain by more than log 2 and by more than 3x the spread of the other blocks'
    excesses (the median of their absolute values, the lower of two), in the median over seeds
    (`_standing_out`), block 0's gain from the input times the median gain of what the model computes
    between blocks (Measurement.between_gain), which it has none of; where the growth over seeds (its
    q-quantile, the verdict's) is under 1 (vanishing), the same below the median (a block whose
    backward passes 1e-4 of the gradient, beside gains of 0.85, read 'uniform'); else, when the typical
    gain G (the nearest-rank median over seeds, as the verdict's quantiles, of each stack's median) is
    over 1, or the growth vanishes, 'uniform, median gain xG' (`_none_alone`: with the blocks' range
    where it spreads past 4x); else `_beside_gains_of_one`'s block, or that reading where it has none. A
    stack with fewer than three gains cannot show a uniform rate: there the seeds vote for their largest
    amplifying block, a tie going to the block of the earliest seed among the tied (a set's order, which
    varies with PYTHONHASHSEED, named layers.0 or layers.1 from one process to the next)."""
    bad = [m for m in ms if m.first_nonfinite is not None]
    by_nan = 2 * len(bad) >= len(ms) if nonfinite is None else nonfinite
    if bad and (by_nan or len(bad) == len(ms)):  # every seed non-finite: no finite one to read
        return _single(bad[0])
    ms = [m for m in ms if m.first_nonfinite is None]  # a minority's NaN named a block that the others'
    first = ms[0]  # growth did not blame (an Inf in 1 seed of 4 over a x1000 block in every seed)
    # the step gains alone (Measurement.law_gains): the last call on a carried state (an LSTM's h and c)
    # passes the loss what it takes from that state, no step's rate, and read as the block shrinking
    # the gradient most (an LSTM's steps at x0.57 each, its last at x0.27: 'cell[7]')
    n = min(len(m.law_gains) for m in ms)
    logs = [[math.log(g) if g > 0 and math.isfinite(g) else math.nan for g in m.law_gains[:n]] for m in ms]
    if n < 3 or any(all(math.isnan(x) for x in row) for row in logs):
        votes = [_largest_gain(m) for m in ms]  # too few gains to tell a uniform stack from one block
        return max(votes, key=Counter(votes).__getitem__)  # a tie: the earliest seed's, never set order
    # block 0's gain from the model's input has none of what the model computes between blocks in it
    # (a tanh around bare Linear blocks: its first gain is sigma_w, 2.5x the others at 4, and read
    # 'layers.0' where every layer is alike); it is compared as if that ran before block 0 too, times the
    # median gain of what runs between the later blocks (Measurement.between_gain; 1 where they take the
    # output as returned: a residual stream, a Sequential)
    for m, row in zip(ms, logs, strict=True):
        if m.activation_names[:1] == (INPUT,) and 0 < m.between_gain < math.inf:
            row[0] += math.log(m.between_gain)
    excess = []
    for row in logs:
        mid = _median(row)
        excess.append([x - mid for x in row])
    named = _standing_out(first, excess, len(ms))
    if named is not None:
        return named
    typical = statistics.median_low(_median(row) for row in logs)
    growth = quantile([m.growth for m in ms], q)  # the verdict's: an interpolated median read 1.01 for 0.95
    vanishing = growth < 1
    if vanishing:  # a block that shrinks the gradient far more than the rest: by the same rules, below
        named = _standing_out(first, [[-x for x in e] for e in excess], len(ms))
        if named is not None:
            return named
    if typical <= 0 and not vanishing:  # no typical block amplifies
        return _beside_gains_of_one(first, logs, growth) or _none_alone(logs, typical)
    return _none_alone(logs, typical)


def _none_alone(logs: Sequence[Sequence[float]], typical: float) -> str:
    """What is said where no block is named: 'uniform, median gain xG' where each block's median gain
    over the seeds is within SPREAD of every other's, else with their range ('no block alone, gains
    xA-xB, median gain xG'): gains of 1, 10, 10, 1 read 'uniform, median gain x3.16', of a stack
    that is not. The zoo's uniform stacks spread x1.15-x2.9 at and past their crossings (3 seeds
    each); a post-norm transformer's gains fall from x3.5 at its input to x0.4 at its last layer."""
    per_block = [x for x in _per_block(logs) if not math.isnan(x)]
    low, high = (min(per_block), max(per_block)) if per_block else (typical, typical)
    median = f"median gain x{math.exp(typical):.3g}"
    if high - low <= math.log(SPREAD):
        return f"uniform, {median}"
    return f"no block alone, gains x{math.exp(low):.3g}-x{math.exp(high):.3g}, {median}"


def _beside_gains_of_one(first: Measurement, logs: Sequence[Sequence[float]], growth: float) -> str | None:
    """Where no typical block amplifies: the block whose median gain over seeds makes half the log
    growth or more, no other's log-gain over half its own (x1.9 among gains of exactly 1, not twice
    their median: blamed on the largest weight gradient, a block of gain 1); else, where one block's
    weight gradient is over twice every other's or there is one block, that block (the growth was
    inside it: an nn.RNN over time); else None (gains of 1 alike, weight gradients equal but for
    rounding, which named one: an audit)."""
    per_block = _per_block(logs)
    ranked = sorted(range(len(per_block)), key=lambda i: _ordered(per_block[i]), reverse=True)
    top, second = per_block[ranked[0]], per_block[ranked[1]] if len(ranked) > 1 else -math.inf
    alone = not second > top / 2  # not one of several alike (four at x1.5 beside shrinking ones: a review)
    if growth > 1 and top > 0 and top >= math.log(growth) / 2 and alone:
        return first.activation_names[ranked[0] + 1]
    weights = sorted((v for v in first.layer_grad_norms if not math.isnan(v)), reverse=True)
    if len(first.layer_names) == 1 or (len(weights) > 1 and weights[0] > 2 * weights[1]):
        return _single(first)
    return None


def _standing_out(first: Measurement, excess: Sequence[Sequence[float]], seeds: int) -> str | None:
    """The blocks whose log-gain over the stack's median (`excess`, per seed) stands out (`culprit_of`,
    each past the spread of those outside them): those standing out alike (each past half the largest
    excess: a gain within the square root of the largest's) where they are two to a third of the
    stack and hold the largest excess in 80% of the seeds (two blocks planted at x30 each were named
    as the larger alone, a fault left behind); else the largest alone where it does (100x beside
    others' 2.5x); else every one standing out, up to a third of the stack, taking turns at the largest
    (a ResNet's two last blocks, 12-28 each against 1.3 elsewhere: 'layer4.0, layer4.1'); else None."""
    per_block = _per_block(excess)
    ranked = sorted(range(len(per_block)), key=lambda i: _ordered(per_block[i]), reverse=True)
    largest = [max(range(len(e)), key=lambda i: _ordered(e[i])) for e in excess]  # per seed
    k = 0  # the blocks ranked[:k] stand out
    while k < len(ranked) and _stands_out(per_block, ranked[: k + 1]):
        k += 1
    third = len(per_block) // 3
    alike = [i for i in ranked[:k] if per_block[i] >= per_block[ranked[0]] / 2]  # within sqrt of the top
    groups = [alike] if 1 < len(alike) <= third else []
    groups += [ranked[:1], ranked[:k]] if 1 < k <= third else [ranked[:1]]
    for group in groups:
        if k and sum(1 for i in largest if i in group) >= math.ceil(0.8 * seeds):
            return ", ".join(first.activation_names[i + 1] for i in sorted(group))
    return None


def _stands_out(per_block: Sequence[float], group: Sequence[int]) -> bool:
    """The last of `group` exceeds the median by more than log 2 and 3x the spread of the blocks
    outside the group (the median of their absolute excesses, the lower one of two)."""
    others = [abs(x) for i, x in enumerate(per_block) if i not in group and not math.isnan(x)]
    # two others' median is their mean: one shrinking hard (a stage of gain 0.16 beside one of 1.02) set
    # the spread at half its excess, and a block 14x the stack's median gain did not stand out; the
    # lower of the two is the spread one outlier cannot widen (from three on, the median is that). In a
    # stack of three gains one of the two is the median block, excess 0: a block past twice the median
    # gain stands out there
    spread = (
        statistics.median_low(others) if len(others) == 2 else statistics.median(others) if others else 0.0
    )
    return per_block[group[-1]] > max(math.log(2), 3 * spread)


def _per_block(rows: Sequence[Sequence[float]]) -> list[float]:
    """Each block's median over the seeds' rows (one row per seed, a value per block)."""
    return [_median([row[i] for row in rows]) for i in range(len(rows[0]))]


def _median(xs: Sequence[float]) -> float:
    """The median of the numbers among `xs` (NaN is a gain of 0/0: a block no gradient reached, e.g.
    underflowed in float16), NaN where there are none."""
    numbers = [x for x in xs if not math.isnan(x)]
    return statistics.median(numbers) if numbers else math.nan


def _ordered(x: float) -> float:
    """NaN below every number, for max()."""
    return -math.inf if math.isnan(x) else x


def _largest_gain(m: Measurement) -> str:
    """One seed's block with the largest backward gain when it amplifies (> 1), else `_single`."""
    gains = [(g, i) for i, g in enumerate(m.gains) if not math.isnan(g)]
    if m.first_nonfinite is None and gains and max(gains)[0] > 1.0:
        return m.activation_names[max(gains)[1] + 1]
    return _single(m)


def made_by(m: Measurement) -> str | None:
    """Whose backward made a first non-finite dL/d(out_i): call i + 1's, or the loss's after the last
    call; where call i + 1 starts a new chain, whichever blocks take out_i (an encoder's last output
    feeds every decoder layer). None where the first non-finite value is no output gradient."""
    nf = m.first_nonfinite
    if nf is None or nf.tensor != "activation_grad" or nf.layer not in m.activation_names:
        return None
    i = m.activation_names.index(nf.layer) + 1
    if i in m.chain_starts:
        return f"(a block taking {shown(nf.layer)}'s output)"
    return m.activation_names[i] if i < len(m.activation_names) else AFTER_LAST


def _single(m: Measurement) -> str:
    """One seed's culprit: the block that made the first non-finite value (`made_by`), else the block
    with the largest weight gradient (the growth was inside a block, e.g. an nn.RNN over time)."""
    nf = m.first_nonfinite
    if nf is not None:
        return made_by(m) or nf.layer
    weights = [(v, i) for i, v in enumerate(m.layer_grad_norms) if not math.isnan(v)]
    if weights:
        return m.layer_names[max(weights)[1]]
    return m.activation_names[0] if m.activation_names else (m.layer_names or ("(model)",))[0]
