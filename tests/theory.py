"""Mean-field predictions computed independently of the harness (numerical Gaussian integrals)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

_Z = torch.linspace(-12, 12, 200_001, dtype=torch.float64)
_W = torch.exp(-0.5 * _Z**2) / math.sqrt(2 * math.pi) * (_Z[1] - _Z[0])


def gauss(f: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """E[f(z)] for z ~ N(0, 1) by a fine Riemann sum."""
    return float((f(_Z) * _W).sum())


def chi(sigma_w: float, phi: str, q0: float = 1.0, layers: int = 200) -> tuple[float, float]:
    """(q*, chi) for a bias-free net: q <- sigma_w^2 E[phi(sqrt(q) z)^2] iterated from the input's
    second moment q0, and chi = sigma_w^2 E[phi'(sqrt(q*) z)^2], the per-layer squared gain."""
    f: Callable[[torch.Tensor], torch.Tensor]
    if phi == "tanh":
        f, df = torch.tanh, (lambda h: 1 - torch.tanh(h) ** 2)
    else:
        f, df = torch.relu, (lambda h: (h > 0).to(h.dtype))
    q = sigma_w**2 * q0
    for _ in range(layers):
        scale = math.sqrt(q)
        q = sigma_w**2 * gauss(lambda z, s=scale: f(s * z) ** 2)  # type: ignore[misc]
    scale = math.sqrt(q)
    return q, sigma_w**2 * gauss(lambda z: df(scale * z) ** 2)
