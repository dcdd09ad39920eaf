"""The spike rule: a value is flagged when it is non-finite, or, once its series has warmed up,
above the mean of the last `window` accepted values by more than max(sigmas x std, floor x |mean|).
A norm is judged so on its logarithm, the floor then ln(1 + floor): its noise is a factor, and a
weight gradient's right tail is long (block 0's of a clean pre-norm transformer reached 2.7-3.8x its
window mean; on the values, 21 of 32 clean 2,000-step runs, two models at batch 32 and 128, flagged
one, on the logarithm none). So is a loss whose first value is positive (a batch-32 squared error
reached 2.6-3.2x its window mean: 6 of those runs flagged it on its values); a loss that starts
negative is judged on its values, OLMo-core's rule, and so is one from its first negative value on.
A value of exactly 0 is no measurement (the gradient of a frozen block, a part that did not run): it is
never flagged and never enters the window, which a run of zeros would leave with mean and std 0, so
that the first real value, and every one after it, was flagged.

Two fixes over the rule as OLMo-core publishes it (mean + 6 sigma of the last 128 losses): a
non-finite value never enters the window (one NaN would otherwise poison the mean for the next 128
steps), and a flagged value enters clamped to the threshold (a x10 spike would otherwise inflate the
std so much that a x4 spike 20 steps later passes). The rule is written in torch ops on a vector of
series, so it runs on the device inside a training step (no host sync) or on the host at a flush.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from stabilitycheck.errors import ConfigError


@dataclass(frozen=True)
class SpikeRule:
    """Defaults: `window` 128 and `sigmas` 6 are OLMo-core's published values (rare enough on a
    clean run's noise that 2,000 steps raise nothing); `warmup` 32 accepted values before a finite
    value can be flagged (a std from fewer is itself too noisy); `floor` 1.0: the excess must also be
    at least |mean|, i.e. only values above twice the recent mean are spikes (a norm's: twice its
    geometric mean), so a series with almost no noise (a normalised activation) is not flagged for
    drifting by a few percent."""

    window: int = 128
    sigmas: float = 6.0
    warmup: int = 32
    floor: float = 1.0

    def __post_init__(self) -> None:
        for name in ("window", "warmup"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"SpikeRule needs a whole number for {name}, got {value!r}")
        for name in ("sigmas", "floor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"SpikeRule needs a number for {name}, got {value!r}")
        if self.window < 2 or not 1 <= self.warmup <= self.window:
            raise ConfigError(
                f"SpikeRule needs window >= 2 and 1 <= warmup <= window, got window={self.window}, "
                f"warmup={self.warmup}"
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

    def _threshold(self, mean: torch.Tensor, var: torch.Tensor, logged: torch.Tensor) -> torch.Tensor:
        floor = torch.where(logged, math.log1p(self.floor), self.floor * mean.abs())
        return mean + torch.maximum(self.sigmas * var.clamp(min=0).sqrt(), floor)

    def update(self, state: SpikeState, x: torch.Tensor) -> Judged:
        """Flag each entry of `x` (one value per series) and let the accepted ones (finite, non-zero)
        enter the window;
        with the mean and threshold each was judged against. Only tensor ops: no host synchronisation."""
        x = x.to(torch.float64)
        _decide(state, x.unsqueeze(0))
        _unlog(state, x)
        y = _units(state.logged, x)
        finite = torch.isfinite(x)
        valid = state.slots >= self.window - state.count.unsqueeze(1)
        n = state.count.clamp(min=1).to(torch.float64)
        mean = torch.where(valid, state.values, 0.0).sum(1) / n
        var = torch.where(valid, (state.values - mean.unsqueeze(1)) ** 2, 0.0).sum(1) / n
        threshold = self._threshold(mean, var, state.logged)
        warm = state.count >= self.warmup
        flagged = ~finite | (warm & (y > threshold) & (x != 0))
        entering = torch.where(warm, torch.minimum(y, threshold), y)
        shifted = torch.cat([state.values[:, 1:], entering.unsqueeze(1)], 1)
        accepted = finite & (x != 0)
        state.values = torch.where(accepted.unsqueeze(1), shifted, state.values)
        state.count = (state.count + accepted.long()).clamp(max=self.window)
        return Judged(flagged, _shown(state.logged, mean), _shown(state.logged, threshold))

    def update_many(self, state: SpikeState, xs: torch.Tensor) -> Judged:
        """`update` over the rows of xs (steps x series), with the same flags, in a few vectorised
        passes: each assumes every later value enters the window as it is (rolling sums over the
        window and the new values), which holds up to the first step flagging anything; that step
        is then run through `update`, and the next pass starts after it. Reads the host (once per
        pass), so it is for host tensors: 1 + (flagged steps) passes."""
        xs = xs.to(torch.float64)
        flags = torch.zeros(xs.shape, dtype=torch.bool, device=xs.device)
        means, thresholds = torch.full_like(xs, math.nan), torch.full_like(xs, math.nan)
        w, start = self.window, 0
        while start < xs.shape[0]:
            rest = xs[start:]
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
            zero = torch.zeros(seq.shape[0], 1, dtype=torch.float64, device=seq.device)
            s1 = torch.cat([zero, seq.cumsum(1)], 1)
            s2 = torch.cat([zero, (seq * seq).cumsum(1)], 1)
            taken = torch.cat([zero.long(), accepted.long().cumsum(1)], 1)  # accepted before each column
            end = (w + torch.arange(m, device=xs.device)).expand(seq.shape[0], m)
            sizes = taken.gather(1, end).clamp(max=w)  # window size at each step
            # where each step's window starts: the column after which `sizes` accepted values remain
            first = torch.searchsorted(taken, taken.gather(1, end) - sizes)
            n = sizes.clamp(min=1).to(torch.float64)
            mean_shift = (s1.gather(1, end) - s1.gather(1, first)) / n
            var = (s2.gather(1, end) - s2.gather(1, first)) / n - mean_shift**2
            mean = torch.where(sizes > 0, ref.unsqueeze(1) + mean_shift, 0.0)
            threshold = self._threshold(mean, var, logged)
            pass_flags = ~torch.isfinite(x) | ((sizes >= self.warmup) & (y > threshold) & (x != 0))
            turns = logged & torch.isfinite(x) & (x < 0)  # `update` takes that step: _unlog
            hit = (pass_flags | turns).any(0).nonzero()
            stop = int(hit[0, 0]) if hit.numel() else m  # the pass's only host read
            if stop:  # the accepted values, in order, right-aligned (a stable sort puts them last)
                order = torch.sort(accepted[:, : w + stop].to(torch.uint8), dim=1, stable=True).indices
                state.values = torch.cat([state.values, y[:, :stop]], 1).gather(1, order)[:, -w:]
                state.count = taken[:, w + stop].clamp(max=w)
                means[start : start + stop] = _shown(logged, mean)[:, :stop].T
                thresholds[start : start + stop] = _shown(logged, threshold)[:, :stop].T
            if stop < m:
                judged = self.update(state, rest[stop])
                flags[start + stop] = judged.flags
                means[start + stop], thresholds[start + stop] = judged.mean, judged.threshold
            start += stop + 1
        return Judged(flags, means, thresholds)


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
    """A mean or threshold in the series' own units: a logged series' geometric mean, its threshold."""
    return torch.where(logged, t.exp(), t)


@dataclass(frozen=True)
class Judged:
    """What the rule said of values (one per series, or steps x series): `flags`, and the `mean` of
    the window each was judged against and its `threshold` (mean + max(sigmas x std, floor x |mean|);
    a flagged finite value is above it, a report shows both beside it)."""

    flags: torch.Tensor
    mean: torch.Tensor
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
    x6.6 its window's geometric mean), logged but not judged."""
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
