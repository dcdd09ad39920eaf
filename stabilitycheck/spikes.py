"""The spike rule: a value is flagged when it is non-finite, or, once its series has warmed up,
above the mean of the last `window` accepted values by more than max(sigmas x std, floor x |mean|).

Two fixes over the rule as OLMo-core publishes it (mean + 6 sigma of the last 128 losses): a
non-finite value never enters the window (one NaN would otherwise poison the mean for the next 128
steps), and a flagged value enters clamped to the threshold (a x10 spike would otherwise inflate the
std so much that a x4 spike 20 steps later passes). The rule is written in torch ops on a vector of
series, so it runs on the device inside a training step (no host sync) or on the host at a flush.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SpikeRule:
    """Defaults: `window` 128 and `sigmas` 6 are OLMo-core's published values (rare enough on a
    clean run's noise that 2,000 steps raise nothing); `warmup` 32 accepted values before a finite
    value can be flagged (a std from fewer is itself too noisy); `floor` 1.0: the excess must also be
    at least |mean|, i.e. only values above twice the recent mean are spikes, so a series with almost
    no noise (a normalised activation) is not flagged for drifting by a few percent."""

    window: int = 128
    sigmas: float = 6.0
    warmup: int = 32
    floor: float = 1.0

    def __post_init__(self) -> None:
        if self.window < 2 or not 1 <= self.warmup <= self.window:
            raise ValueError(
                f"SpikeRule needs window >= 2 and 1 <= warmup <= window, got window={self.window}, "
                f"warmup={self.warmup}"
            )
        if self.sigmas <= 0 or self.floor < 0:
            raise ValueError(f"SpikeRule needs sigmas > 0 and floor >= 0, got {self.sigmas}, {self.floor}")

    def state(self, n_series: int, device: torch.device | str = "cpu") -> SpikeState:
        """An empty window for `n_series` series, in float64 on `device`."""
        return SpikeState(
            values=torch.zeros(n_series, self.window, dtype=torch.float64, device=device),
            pos=torch.zeros(n_series, dtype=torch.long, device=device),
            count=torch.zeros(n_series, dtype=torch.long, device=device),
            slots=torch.arange(self.window, device=device),
            rows=torch.arange(n_series, device=device),
        )

    def update(self, state: SpikeState, x: torch.Tensor) -> torch.Tensor:
        """Flag each entry of `x` (one value per series) and let the accepted ones enter the window.
        Returns a bool tensor; only tensor ops, so no host synchronisation."""
        x = x.to(torch.float64)
        finite = torch.isfinite(x)
        valid = state.slots < state.count.unsqueeze(1)
        n = state.count.clamp(min=1).to(torch.float64)
        mean = torch.where(valid, state.values, 0.0).sum(1) / n
        var = torch.where(valid, (state.values - mean.unsqueeze(1)) ** 2, 0.0).sum(1) / n
        threshold = mean + torch.maximum(self.sigmas * var.sqrt(), self.floor * mean.abs())
        warm = state.count >= self.warmup
        flagged = ~finite | (warm & (x > threshold))
        entering = torch.where(warm, torch.minimum(x, threshold), x)
        old = state.values[state.rows, state.pos]
        state.values[state.rows, state.pos] = torch.where(finite, entering, old)
        step = finite.long()
        state.pos = (state.pos + step) % self.window
        state.count = (state.count + step).clamp(max=self.window)
        return flagged


@dataclass
class SpikeState:
    """The rolling windows: a ring buffer per series, its write position and fill count."""

    values: torch.Tensor
    pos: torch.Tensor
    count: torch.Tensor
    slots: torch.Tensor
    rows: torch.Tensor
