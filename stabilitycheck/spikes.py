"""The spike rule: a value is flagged when it is non-finite, or, once its series has warmed up, above
what the trend of its recent values expects by more than max(sigmas x noise, floor x |expected|).
Expected is the least-squares line through the last `trend` accepted values, read one step on, or the
smaller of the last two values where that is higher (a line through a fall that has just levelled off
reads below the level: synthetic norms falling x100 over 30 steps, then flat with 5% noise, were
flagged at the turn in 5 of 5 runs without it). The noise is the spread of the differences between
successive values over the last `window` (sqrt(mean d^2 / 2), the standard deviation for independent
noise, which a trend moves little), or the standard deviation of the line's values about it where
that is larger: a norm that wanders slowly (the output of the README example's head, each step's ln
x 0.93-0.99 correlated with the last) has small differences, and without it an ordinary climb back
from a dip passed twice what the line expected (31 clean steps flagged over 10 runs of 1,000 steps:
a review). A norm is judged so on its logarithm, the floor then ln(1 + floor): its noise is a factor,
and a weight gradient's right tail is long (on the logged series of 28 clean 2,000-step runs,
ci/spike_rule.py, the rule on the values flagged a weight gradient in 12 runs, on the logarithm
none). So is a loss whose first value is positive (on its values the loss was flagged in 3 of those
runs); a loss that starts negative is judged on its values, and so is one from its first negative
value on. A value of exactly 0 is no measurement (the gradient of a frozen block, a part that did not
run): it is never flagged and never enters the window, which a run of zeros would leave with no
noise, so that the first real value, and every one after it, was flagged.

Three changes over the rule as OLMo-core publishes it (mean + 6 sigma of the last 128 losses): a
non-finite value never enters the window (one NaN would otherwise poison the mean for the next 128
steps); a flagged value enters clamped to the threshold (a x10 spike would otherwise inflate the std
so much that a x4 spike 20 steps later passes); and the level and noise are the trend's, not the
window's mean and std, which a series still trending early in training widens (a norm that fell x50
over 60 steps held the threshold near x100 its level 90 steps later, and a x50 spike passed; on those
28 runs a x50 at steps 40-150 was missed on a block's output 56 times in 936, on its gradient 73, on
a weight gradient 304 in 1,080, by the trend's rule 13, 0 and 153, neither rule flagging a clean
value). The rule is written in torch ops on a vector of series, so it runs on the device inside a
training step (no host sync) or on the host at a flush.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from stabilitycheck.errors import ConfigError

PASS = 1024  # steps of one vectorised pass of update_many at most


@dataclass(frozen=True)
class SpikeRule:
    """Defaults: `window` 128 and `sigmas` 6 are OLMo-core's published values (rare enough on a
    clean run's noise that 2,000 steps raise nothing); `warmup` 32 accepted values before a finite
    value can be flagged (a spread from fewer is itself too noisy); `floor` 1.0: the excess must also
    be at least |expected|, i.e. only values above twice what the trend expects are spikes (a norm's:
    on its logarithm, twice), so a series with almost no noise (a normalised activation) is not
    flagged for drifting by a few percent; `trend` 32: the values the trend's line goes through (on
    the 28 runs of the module docstring none of 16, 32 and 64 flags a clean value; a line through
    64 lags behind norms rising x150 over the first 80 steps of training, catching a x3 on an output
    gradient at steps 40-150 850 times in 936 where 32 catch 924; 16 catch 934, but flag a second
    clean step of the ViT run the README names)."""

    window: int = 128
    sigmas: float = 6.0
    warmup: int = 32
    floor: float = 1.0
    trend: int = 32

    def __post_init__(self) -> None:
        for name in ("window", "warmup", "trend"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"SpikeRule needs a whole number for {name}, got {value!r}")
        for name in ("sigmas", "floor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"SpikeRule needs a number for {name}, got {value!r}")
        if self.window < 2 or not 1 <= self.warmup <= self.window or self.trend < 1:
            raise ConfigError(
                "SpikeRule needs window >= 2, 1 <= warmup <= window and trend >= 1 (a trend longer than "
                f"the window goes through the window), got window={self.window}, warmup={self.warmup}, "
                f"trend={self.trend}"
            )
        if not (0 < self.sigmas < math.inf and 0 <= self.floor < math.inf):  # NaN fails too
            raise ConfigError(
                f"SpikeRule needs finite sigmas > 0 and floor >= 0, got {self.sigmas}, {self.floor}"
            )

    def state(
        self, n_series: int, device: torch.device | str = "cpu", logged: Sequence[bool | None] | None = None
    ) -> SpikeState:
        """An empty window for `n_series` series, in float64 on `device`. `logged`: per series, True
        where it is judged on its logarithm (a norm), False on its values, None as its first accepted
        value says (a loss: on its logarithm if that is positive); default: every series on its values."""
        modes = list(logged or [False] * n_series)
        return SpikeState(
            values=torch.zeros(n_series, self.window, dtype=torch.float64, device=device),
            count=torch.zeros(n_series, dtype=torch.long, device=device),
            slots=torch.arange(self.window, device=device),
            logged=torch.tensor([m is True for m in modes], dtype=torch.bool, device=device),
            pending=torch.tensor([m is None for m in modes], dtype=torch.bool, device=device),
        )

    def _threshold(self, expected: torch.Tensor, noise: torch.Tensor, logged: torch.Tensor) -> torch.Tensor:
        floor = torch.where(logged, math.log1p(self.floor), self.floor * expected.abs())
        return expected + torch.maximum(self.sigmas * noise, floor)

    def _level(self, state: SpikeState) -> tuple[torch.Tensor, torch.Tensor]:
        """Per series, what the trend expects next and the noise, from its window (the last n accepted
        values): the least-squares line through the last min(n, trend) values read one position on
        (flat through one value), or the smaller of the last two where that is higher; and
        sqrt(sum d^2 / (2 (n - 1))) over the n - 1 successive differences d of the n values (0 for
        one value), or the standard deviation of the line's values about it where that is larger."""
        w, values, count, slots = self.window, state.values, state.count, state.slots
        d = values[:, 1:] - values[:, :-1]
        pairs = torch.where(slots[1:] > (w - count).unsqueeze(1), d * d, 0.0).sum(1)
        noise = (pairs / (2 * (count - 1).clamp(min=1))).sqrt()
        t = min(self.trend, w)  # the trend's values: the last c of the window's last t slots
        c = count.clamp(max=t)
        start = (t - c).unsqueeze(1)
        line = torch.where(slots[:t] >= start, values[:, w - t :], 0.0)
        size = c.clamp(min=1).to(torch.float64)
        total = line.sum(1)
        mid = (size - 1) / 2  # the mean position, positions 0 .. size - 1
        sxy = (line * (slots[:t] - start)).sum(1) - mid * total  # sum of (position - mid) x value
        syy = (line * line).sum(1) - total * total / size
        trend, off = _fit(total, sxy, syy, size)
        return _at_least_recent(trend, values[:, -1], values[:, -2], count), torch.maximum(noise, off)

    def update(self, state: SpikeState, x: torch.Tensor) -> Judged:
        """Flag each entry of `x` (one value per series) and let the accepted ones (finite, non-zero)
        enter the window; with what the trend expected of each and the threshold it was judged
        against. Only tensor ops: no host synchronisation."""
        x = x.to(torch.float64)
        _decide(state, x.unsqueeze(0))
        _unlog(state, x)
        y = _units(state.logged, x)
        finite = torch.isfinite(x)
        expected, noise = self._level(state)
        threshold = self._threshold(expected, noise, state.logged)
        warm = state.count >= self.warmup
        flagged = ~finite | (warm & (y > threshold) & (x != 0))
        entering = torch.where(warm, torch.minimum(y, threshold), y)
        shifted = torch.cat([state.values[:, 1:], entering.unsqueeze(1)], 1)
        accepted = finite & (x != 0)
        state.values = torch.where(accepted.unsqueeze(1), shifted, state.values)
        state.count = (state.count + accepted.long()).clamp(max=self.window)
        return Judged(flagged, _shown(state.logged, expected), _shown(state.logged, threshold))

    def update_many(self, state: SpikeState, xs: torch.Tensor) -> Judged:
        """`update` over the rows of xs (steps x series), with the same flags, in a few vectorised
        passes: each assumes every later value enters the window as it is (prefix sums over the
        window's and the new accepted values, in order), which holds up to the first step flagging
        anything (or a loss turning negative); that step is then run through `update`, and the next
        pass starts after it. A pass spans at most PASS steps (a prefix sum's rounding grows with its
        length: 1.7e-6 relative off `update` after 100,000 steps in one pass, 2e-12 in passes of 50).
        Reads the host once per pass, so it is for host tensors."""
        xs = xs.to(torch.float64)
        flags = torch.zeros(xs.shape, dtype=torch.bool, device=xs.device)
        expects, thresholds = torch.full_like(xs, math.nan), torch.full_like(xs, math.nan)
        w, start = self.window, 0
        while start < xs.shape[0]:
            rest = xs[start : start + PASS]  # prefix sums over a bounded run: their rounding too
            _decide(state, rest)
            m, y = rest.shape[0], _units(state.logged, rest).T
            logged = state.logged.unsqueeze(1)  # series x steps, as the pass holds them
            valid = state.slots >= w - state.count.unsqueeze(1)
            ref = torch.where(valid, state.values, 0.0).sum(1) / state.count.clamp(min=1)
            x = rest.T
            # the window, then the new values: those accepted (finite, non-zero) enter; the pass stops
            # before a non-finite value (it is flagged)
            accepted = torch.cat([valid, torch.isfinite(x) & (x != 0)], 1)
            seq = torch.where(accepted, torch.cat([state.values, y], 1) - ref.unsqueeze(1), 0.0)
            # the accepted values in order, right-aligned (a stable sort puts them last): each step's
            # window is the run of them before its own column
            order = torch.sort(accepted.to(torch.uint8), dim=1, stable=True).indices
            line = seq.gather(1, order)
            taken = accepted.long().cumsum(1)
            before = taken[:, w - 1 : w - 1 + m]  # accepted before each step's own column
            end = line.shape[1] - taken[:, -1:] + before  # where each step's window ends in `line`
            sizes = before.clamp(max=w)
            expected, noise = self._levels(line, end, sizes)
            expected = ref.unsqueeze(1) + expected
            threshold = self._threshold(expected, noise, logged)
            pass_flags = ~torch.isfinite(x) | ((sizes >= self.warmup) & (y > threshold) & (x != 0))
            turns = logged & torch.isfinite(x) & (x < 0)  # `update` takes that step: _unlog
            hit = (pass_flags | turns).any(0).nonzero()
            stop = int(hit[0, 0]) if hit.numel() else m  # the pass's only host read
            if stop:
                kept = torch.sort(accepted[:, : w + stop].to(torch.uint8), dim=1, stable=True).indices
                state.values = torch.cat([state.values, y[:, :stop]], 1).gather(1, kept)[:, -w:]
                state.count = taken[:, w + stop - 1].clamp(max=w)
                expects[start : start + stop] = _shown(logged, expected)[:, :stop].T
                thresholds[start : start + stop] = _shown(logged, threshold)[:, :stop].T
            if stop < m:
                judged = self.update(state, rest[stop])
                flags[start + stop] = judged.flags
                expects[start + stop], thresholds[start + stop] = judged.expected, judged.threshold
            start += stop + 1 if stop < m else m
        return Judged(flags, expects, thresholds)

    def _levels(
        self, line: torch.Tensor, end: torch.Tensor, sizes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`_level` at many steps at once: per series and step, the window is line[end - sizes : end]
        (`line` the accepted values in order), from prefix sums of the values, their squares, position
        x value and the squared successive differences."""
        zero = torch.zeros(line.shape[0], 1, dtype=torch.float64, device=line.device)
        pos = torch.arange(line.shape[1], device=line.device, dtype=torch.float64)
        sums = torch.cat([zero, line.cumsum(1)], 1)
        moments = torch.cat([zero, (line * pos).cumsum(1)], 1)
        powers = torch.cat([zero, (line * line).cumsum(1)], 1)
        d = line[:, 1:] - line[:, :-1]
        squares = torch.cat([zero, zero, (d * d).cumsum(1)], 1)  # squares[k]: differences ending before k
        c = sizes.clamp(max=self.trend)
        size = c.clamp(min=1).to(torch.float64)
        first = end - c
        total = sums.gather(1, end) - sums.gather(1, first)
        mean = total / size
        mid = (size - 1) / 2
        # sum over the trend's values of (position from its first) x value, minus mid x their sum
        sxy = moments.gather(1, end) - moments.gather(1, first) - (first.to(torch.float64) + mid) * total
        pairs = squares.gather(1, end) - squares.gather(1, (end - sizes + 1).clamp(max=end))
        noise = (pairs / (2 * (sizes - 1).clamp(min=1))).sqrt()
        syy = powers.gather(1, end) - powers.gather(1, first) - total * mean
        trend, off = _fit(total, sxy, syy, size)
        last, before = line.gather(1, (end - 1).clamp(min=0)), line.gather(1, (end - 2).clamp(min=0))
        return _at_least_recent(trend, last, before, sizes), torch.maximum(noise, off)


def _at_least_recent(
    trend: torch.Tensor, last: torch.Tensor, before: torch.Tensor, count: torch.Tensor
) -> torch.Tensor:
    """What the trend expects, or the smaller of the window's last two values (`last`, and `before`
    it, read where the window holds two) where that is higher; the trend's alone in an empty window."""
    recent = torch.where(count >= 2, torch.minimum(last, before), last)
    return torch.where(count >= 1, torch.maximum(trend, recent), trend)


def _fit(
    total: torch.Tensor, sxy: torch.Tensor, syy: torch.Tensor, size: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The least-squares line through `size` values at positions 0 .. size - 1, from their sum, their
    centred cross-product with the positions `sxy` and their centred sum of squares `syy`: its value
    one position on (flat through a single value), and the standard deviation of the values about it
    (sqrt(residual sum of squares / (size - 2)); 0 through two values or fewer)."""
    sxx = size * (size * size - 1) / 12
    fitted = sxx > 0
    slope = torch.where(fitted, sxy / torch.where(fitted, sxx, 1.0), 0.0)
    residual = (syy - slope * sxy).clamp(min=0)  # syy - sxy^2 / sxx
    off = torch.where(size > 2, residual / (size - 2).clamp(min=1), 0.0).sqrt()
    mid = (size - 1) / 2
    return total / size + slope * (size - mid), off


def _decide(state: SpikeState, xs: torch.Tensor) -> None:
    """A series whose mode waits on its first accepted value (`pending`, at an empty window) is
    judged on its logarithm if the first of `xs` (steps x series) it accepts is positive: the values
    before it do not enter, so deciding at the pass's start is deciding at that value."""
    ok = torch.isfinite(xs) & (xs != 0)
    first = xs.gather(0, ok.to(torch.uint8).argmax(0, keepdim=True)).squeeze(0)
    take = state.pending & (state.count == 0) & ok.any(0)
    state.logged = torch.where(take, first > 0, state.logged)
    state.pending = state.pending & ~take


def _unlog(state: SpikeState, x: torch.Tensor) -> None:
    """A series judged on its logarithm (a loss that started positive) taking a negative value is
    judged on its values from then on, its window's ln values turned back into values: read as ln 1,
    a loss of -0.008 after a window near 0.025 was flagged over 14 steps, and skipped with skip=True."""
    turns = state.logged & torch.isfinite(x) & (x < 0)
    state.values = torch.where(turns.unsqueeze(1), state.values.exp(), state.values)
    state.logged = state.logged & ~turns


def _units(logged: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Values in the units the rule judges: a logged series' logarithm (a zero, no measurement, and a
    NaN, flagged on the value itself, read 0; +Inf stays +Inf), any other series as it is."""
    return torch.where(logged, torch.where(x > 0, x, 1.0).log(), x)


def _shown(logged: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """An expected value or threshold in the series' own units (a logged series' exp of it)."""
    return torch.where(logged, t.exp(), t)


@dataclass(frozen=True)
class Judged:
    """What the rule said of values (one per series, or steps x series): `flags`, what the trend of
    its window `expected` of each and the `threshold` it was judged against (expected + max(sigmas x
    noise, floor x |expected|), a norm's on its logarithm, both given back in its units); a flagged
    finite value is above it, a report shows both beside it."""

    flags: torch.Tensor
    expected: torch.Tensor
    threshold: torch.Tensor


@dataclass
class SpikeState:
    """The rolling windows: per series the accepted values, oldest first, right-aligned in `values`
    (the last `count` columns hold them)."""

    values: torch.Tensor
    count: torch.Tensor
    slots: torch.Tensor
    logged: torch.Tensor  # per series, judged on its logarithm (a norm; a positive loss)
    pending: torch.Tensor  # per series, its mode set by its first accepted value (a loss)


def unmeasured(series: torch.Tensor, cols: slice, rows: torch.Tensor | None = None) -> torch.Tensor:
    """`series` (one row, or steps x series with `rows` the unmeasured steps' mask) with `cols` set to
    0, which the rule neither flags nor lets into its window: values not measured at a step (weight
    norms between `weights_every` steps). Judged, their stand-in, the last measured value repeated,
    filled the window with one value of no spread, and a weight norm that grew over 50 steps of a
    clean SGD run was flagged, the step skipped under skip=True."""
    return _unjudged(series, [cols], rows, finite_only=False)


def noisier(series: torch.Tensor, cols: Sequence[slice], rows: torch.Tensor | None = None) -> torch.Tensor:
    """`series` with the finite values of `cols` set to 0 (neither flagged nor let into the window;
    a non-finite one is still flagged), in every row or the `rows` masked: the loss and weight
    gradients of a step of fewer samples than the reference (an epoch's short last batch), means
    over fewer samples and noisier (a batch of 8 after batches of 512: block 0's weight gradient read
    x6.6 the geometric mean of its last 128 values), logged but not judged."""
    return _unjudged(series, cols, rows, finite_only=True)


def _unjudged(
    series: torch.Tensor, cols: Sequence[slice], rows: torch.Tensor | None, finite_only: bool
) -> torch.Tensor:
    """A copy of `series` with `cols` (of every row, or of the `rows` masked) set to 0, the rule's
    'no measurement'; with `finite_only`, their non-finite values kept (still flagged)."""
    out = series.clone()
    for c in cols:
        where = (..., c) if rows is None else (rows, c)
        part = out[where]
        out[where] = torch.where(part.isfinite(), 0.0, part) if finite_only else 0.0
    return out
