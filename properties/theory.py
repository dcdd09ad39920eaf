"""Mean-field signal propagation (Poole et al. 2016, Schoenholz et al. 2017), computed by numerical
Gaussian integrals independently of the harness: the prediction its measurements are held to."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Fn = Callable[[torch.Tensor], torch.Tensor]

_Z = torch.linspace(-10, 10, 20_001, dtype=torch.float64)
_W = torch.exp(-0.5 * _Z**2) / math.sqrt(2 * math.pi) * (_Z[1] - _Z[0])
"""Riemann weights of N(0, 1) on [-10, 10], step 1e-3: exact to float64 rounding for smooth integrands
(the tails beyond 10 weigh 1.5e-23), to about the step for ReLU's step derivative."""

PHI: dict[str, tuple[Fn, Fn]] = {
    "tanh": (torch.tanh, lambda h: 1 - torch.tanh(h) ** 2),
    "relu": (torch.relu, lambda h: (h > 0).to(h.dtype)),
}


def gauss(f: Fn) -> float:
    """E[f(z)] for z ~ N(0, 1)."""
    return float((f(_Z) * _W).sum())


def layer_chis(sigma_w: float, phi: str, q_in: float, depth: int) -> list[float]:
    """chi_l = sigma_w^2 E[phi'(sqrt(q_l) z)^2], the expected squared backward gain through block l,
    for the blocks l = 0..depth-1 of a bias-free net y_l = phi(W_l y_(l-1)), W_l ~ N(0, sigma_w^2 / n),
    whose input has second moment q_in: q_0 = sigma_w^2 q_in, q_(l+1) = sigma_w^2 E[phi(sqrt(q_l) z)^2]."""
    f, df = PHI[phi]
    q, chis = sigma_w**2 * q_in, []
    for _ in range(depth):
        s = math.sqrt(q)
        chis.append(sigma_w**2 * gauss(lambda z, s=s: df(s * z) ** 2))  # type: ignore[misc]
        q = sigma_w**2 * gauss(lambda z, s=s: f(s * z) ** 2)  # type: ignore[misc]
    return chis
