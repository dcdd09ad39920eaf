"""Mean-field theory of a bias-free tanh net (Poole et al. 2016), computed here for the tests as their
oracle, independent of stabilitycheck: Gaussian expectations by Simpson's rule on [-12, 12] (step
1e-3), the fixed point q* by bisection rather than by iterating the map (which crawls near sigma = 1)."""

from __future__ import annotations

import math

import torch

Z = torch.linspace(-12, 12, 24_001, dtype=torch.float64)
_S = torch.ones_like(Z)
_S[1:-1:2], _S[2:-1:2] = 4.0, 2.0
_W = _S * (Z[1] - Z[0]) / 3 * torch.exp(-0.5 * Z**2) / math.sqrt(2 * math.pi)


def mean(values: torch.Tensor) -> float:
    """E[f(z)], z ~ N(0, 1), from the values f(Z)."""
    return float((_W * values).sum())


def tanh_fixed_point(sigma: float) -> float:
    """The q > 0 with q = sigma^2 E[tanh(sqrt(q) z)^2] for sigma > 1, by bisection (below it the map
    raises q, above it lowers q); ~0 (1e-12) for sigma <= 1, where the only fixed point is 0."""
    lo, hi = 1e-12, sigma**2
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        if sigma**2 * mean(torch.tanh(math.sqrt(mid) * Z) ** 2) > mid:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def tanh_chi1(sigma: float) -> float:
    """chi_1 = sigma^2 E[tanh'(sqrt(q*) z)^2]: the squared gain per block at the fixed point."""
    q = tanh_fixed_point(sigma)
    return sigma**2 * mean((1 - torch.tanh(math.sqrt(q) * Z) ** 2) ** 2)


def tanh_log_growth(sigma: float, depth: int) -> float:
    """ln of the mean-field growth of a bias-free tanh net on N(0, 1) inputs, measured from the input:
    sum over blocks 0..depth-1 of 0.5 ln chi_l, chi_l = sigma^2 E[tanh'(sqrt(q_l) z)^2], q_0 = sigma^2."""
    q, total = sigma**2, 0.0
    for _ in range(depth):
        h = math.sqrt(q) * Z
        total += 0.5 * math.log(sigma**2 * mean((1 - torch.tanh(h) ** 2) ** 2))
        q = sigma**2 * mean(torch.tanh(h) ** 2)
    return total
