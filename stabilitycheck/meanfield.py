"""Mean-field signal propagation (Poole et al. 2016, Schoenholz et al. 2017), torch-free: the growth
a zoo Config's probe should measure, drawn beside a phase map as the theory's frontier (plain and
residual MLPs: residual_log_growth).

In a bias-free net y_l = phi(W_l y_(l-1)), W_l ~ N(0, sigma^2 / n), block l's pre-activations have
variance q_l (q_0 = sigma^2 q_in, q_(l+1) = sigma^2 E[phi(sqrt(q_l) z)^2]) and its backward pass
multiplies the squared gradient norm by chi_l = sigma^2 E[phi'(sqrt(q_l) z)^2]. The probe's growth is
||dL/dx|| / ||dL/dy_(L-1)|| from the input x: the product of sqrt(chi_l) over blocks 0..L-1.
Expectations over z ~ N(0, 1) are Gauss-Hermite sums (100 nodes); tanh'(s z)^2 is peaked for s > 1, so
those are summed in h = s z with the Gaussian's ratio as a weight (relative error < 1e-8 against a
2.4e5-point Riemann sum at s = 0.3..8). The properties suite holds the probe to its own, independent
integrals.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping

NODES = 100
ACTIVATIONS = ("tanh", "relu", "linear")


@functools.cache
def _nodes() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Nodes and weights of the NODES-point Gauss-Hermite rule for E[f(z)], z ~ N(0, 1), found by
    Newton's method on the normalised Hermite recurrence (Numerical Recipes' gauher)."""
    n, x, w = NODES, [0.0] * NODES, [0.0] * NODES
    z = 0.0
    for i in range((n + 1) // 2):
        if i == 0:
            z = math.sqrt(2 * n + 1) - 1.85575 * (2 * n + 1) ** (-1 / 6)
        elif i == 1:
            z -= 1.14 * n**0.426 / z
        elif i in (2, 3):
            z = (1.86 if i == 2 else 1.91) * z - (0.86 if i == 2 else 0.91) * x[i - 2]
        else:
            z = 2 * z - x[i - 2]
        for _ in range(100):
            p1, p2 = math.pi**-0.25, 0.0
            for j in range(n):
                p1, p2 = z * math.sqrt(2 / (j + 1)) * p1 - math.sqrt(j / (j + 1)) * p2, p1
            slope = math.sqrt(2 * n) * p2
            z, previous = z - p1 / slope, z
            if abs(z - previous) <= 1e-14:
                break
        x[i], x[n - 1 - i] = z, -z
        w[i] = w[n - 1 - i] = 2 / slope**2
    return tuple(math.sqrt(2) * v for v in x), tuple(v / math.sqrt(math.pi) for v in w)


def expect(f: Callable[[float], float], scale: float = 1.0) -> float:
    """E[f(scale z)] for z ~ N(0, 1); for scale > 1 summed over h = scale z (f may be peaked at 0)."""
    zs, ws = _nodes()
    if scale <= 1.0:
        return math.fsum(w * f(scale * z) for z, w in zip(zs, ws, strict=True))
    stretch = 0.5 * (1 - 1 / scale**2)
    return math.fsum(w * f(h) * math.exp(stretch * h * h) / scale for h, w in zip(zs, ws, strict=True))


def _sech2(h: float) -> float:
    return 0.0 if abs(h) > 350 else 1 / math.cosh(h) ** 2


def step(sigma: float, activation: str, q: float) -> tuple[float, float]:
    """(q_(l+1), chi_l) of one block whose pre-activations have variance q."""
    s2 = sigma * sigma
    if activation == "tanh":
        s = math.sqrt(q)
        return s2 * (1 - expect(_sech2, s)), s2 * expect(lambda h: _sech2(h) ** 2, s)
    if activation == "relu":
        return s2 * q / 2, s2 / 2
    if activation == "linear":
        return s2 * q, s2
    raise ValueError(f"no mean-field theory for activation {activation!r}; expected one of {ACTIVATIONS}")


_CHAINS: dict[tuple[float, str, float], tuple[list[float], float]] = {}
"""Per (sigma, activation, q_in): ln growth at depths 1..n so far, and q of block n (extended lazily,
so a figure's thousands of (sigma, depth) points cost one pass per sigma)."""


def log_growths(sigma: float, activation: str, depth: int, q_in: float = 1.0) -> tuple[float, ...]:
    """ln of the predicted growth at depths 1..depth (from the input: one block has its own gain)."""
    return tuple(_chain(sigma, activation, depth, q_in)[:depth])


def _chain(sigma: float, activation: str, depth: int, q_in: float = 1.0) -> list[float]:
    """The cached ln growths at depths 1..n, n >= depth, extended as needed (the list itself, not a
    copy: a map's row reads one depth after another, which copies made quadratic in its length)."""
    key = (sigma, activation, q_in)
    out, q = _CHAINS.get(key, ([], sigma * sigma * q_in))
    while len(out) < depth:
        q_next, chi = step(sigma, activation, q)
        # chi 0 where sigma^2 underflows (sigma under ~1.5e-162): ln growth -inf, growth 0, not an error
        out.append((out[-1] if out else 0.0) + (0.5 * math.log(chi) if chi > 0 else -math.inf))
        q = q_next
    _CHAINS[key] = (out, q)
    return out


def q_star(sigma: float, activation: str, q0: float = 1.0, tol: float = 1e-12) -> float:
    """The fixed point of q -> sigma^2 E[phi(sqrt(q) z)^2] reached from q0 (0 in the ordered phase)."""
    if activation == "tanh" and sigma <= 1:
        return 0.0  # tanh(h)^2 < h^2: q shrinks to 0 (as 1/(2l) at sigma = 1, too slowly to iterate)
    if activation == "tanh":
        return _tanh_fixed_point(sigma, tol) if q0 > 0 else 0.0  # 0 is fixed too, unstable: reached from 0
    q = q0
    for _ in range(10_000):
        q_next, _ = step(sigma, activation, q)
        if abs(q_next - q) <= tol * max(1.0, q) or not math.isfinite(q_next):
            return q_next
        q = q_next
    # relu and linear scale q by a constant a = sigma^2 / 2 or sigma^2 per block; not settled after 10,000
    # blocks, a is within ~1e-3 of 1 but not 1 (ReLU at sigma 1.414 had q 0.049, at 1.4143 q 3.4): the
    # limit is 0 below and infinite above
    return 0.0 if q < q0 else math.inf


def _tanh_fixed_point(sigma: float, tol: float) -> float:
    """The q* > 0 of q = sigma^2 E[tanh(sqrt(q) z)^2] for sigma > 1, which every q > 0 is drawn to, by
    bisection: the map's slope at q* tends to 1 as sigma -> 1, so iterating it converges as slowly as
    q_l ~ 1 / (2 l) at sigma = 1 (10,000 steps left q* 16% high at sigma 1.0001 and chi_1 below 1 there,
    the ordered side, up to sigma 1.0003). Below q* the map raises q, above it lowers it. For q <= 1
    tanh^2 is integrated directly, not as 1 - sech^2 (step's form), which cancels for q* ~ (sigma^2 - 1) /
    (2 sigma^2) near 0; above, as 1 - sech^2: expect() sums a wide Gaussian over the nodes' span of h,
    where sech^2 lives and tanh^2 does not."""
    s2 = sigma * sigma

    def rises(q: float) -> bool:
        s = math.sqrt(q)
        mean = expect(lambda h: math.tanh(h) ** 2, s) if s <= 1 else 1 - expect(_sech2, s)
        return s2 * mean > q

    lo, hi = 1e-300, s2  # tanh^2 < 1: q* < sigma^2; rises(lo) for any sigma > 1 (slope sigma^2 at 0)
    while hi > 2 * lo:  # bisect on ln q down to a factor of 2, then on q
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if rises(mid) else (lo, mid)
    while hi - lo > tol * hi:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if rises(mid) else (lo, mid)
    return 0.5 * (lo + hi)


def chi_1(sigma: float, activation: str) -> float:
    """chi at the fixed point q*: the per-block squared gain deep in the stack (1 at criticality)."""
    return step(sigma, activation, q_star(sigma, activation))[1]


MAX_DEPTH = 100_000  # deeper, no prediction: the chain is computed block by block, ~10 us each


def residual_log_growth(sigma: float, activation: str, depth: int, norm: str) -> float:
    """ln of the growth of a bias-free residual stack x + W2 phi(W1 x) (inputs N(0, 1)), `norm` where
    its LayerNorm stands. The branch taking an input of variance v adds c(v) = sigma^2 E[phi^2] to the
    variance (pre-activations sigma^2 v) and multiplies the squared gradient through it by
    c'(v) = sigma^4 E[phi'^2]; W1 and W2 independent, the cross term averages out, so each block
    multiplies the squared gradient norm by 1 + c' over what its input's scale takes back:
    'none': the stream's variance q_l grows by c(q_l), each gain^2 1 + c'(q_l);
    'pre': the branch takes LN(x), variance 1, so c and c' are constants, while the stream grows
    q_l = 1 + c l and the LayerNorm's Jacobian divides by sqrt(q_l): gain^2 1 + c' / (1 + c l), a rate
    that decays along the stack (growth polynomial in depth, ~ L^(c' / 2c) for large L);
    'post': every block's input has variance 1, the sum 1 + c, which the LayerNorm takes back:
    gain^2 (1 + c') / (1 + c), exponential (1 for ReLU and linear, whose c' = c)."""
    if norm not in ("none", "pre", "post"):
        raise ValueError(f"no residual mean field for norm {norm!r}; expected none, pre or post")
    s2 = sigma * sigma
    added, chi = step(sigma, activation, s2)  # a branch on an input of variance 1
    if norm == "post":
        return 0.5 * depth * math.log((1 + s2 * chi) / (1 + added))
    key = (sigma, activation, norm)
    out, q = _RESIDUAL.get(key, ([], 1.0))  # extended lazily, as _chain is: a map reads every depth
    while len(out) < depth:
        if norm == "none":
            added, chi = step(sigma, activation, s2 * q)
            gain2 = 1 + s2 * chi
        else:
            gain2 = 1 + s2 * chi / q
        out.append((out[-1] if out else 0.0) + 0.5 * math.log(gain2))
        q += added
    _RESIDUAL[key] = (out, q)
    return out[depth - 1] if depth > 0 else 0.0


_RESIDUAL: dict[tuple[float, str, str], tuple[list[float], float]] = {}
"""Per (sigma, activation, norm): residual_log_growth at depths 1..n so far, and the stream's variance
after block n."""


def zoo_growth(family: str, knobs: Mapping[str, object]) -> float | None:
    """The growth mean-field theory predicts for a zoo Config, or None where it has no prediction:
    a bias-free mlp (tanh, relu, linear; inputs N(0, 1)) or resmlp (residual_log_growth) up to
    MAX_DEPTH, or a linear rnn, whose growth through time (what it is judged on) is exactly
    sigma^(T - 1) (the recurrence is sigma x orthogonal)."""
    act, sigma = knobs.get("activation"), knobs.get("init_scale")
    if not isinstance(sigma, int | float) or act not in ACTIVATIONS:
        return None
    depth = knobs.get("depth")
    if family in ("mlp", "resmlp") and isinstance(depth, int) and 1 <= depth <= MAX_DEPTH:
        if family == "mlp":
            log = _chain(float(sigma), str(act), depth)[depth - 1]
        else:
            log = residual_log_growth(float(sigma), str(act), depth, str(knobs.get("norm")))
        return math.exp(log) if log < 709.0 else math.inf  # past float64's range: inf, not an error
    if family == "rnn" and act == "linear" and isinstance(t := knobs.get("seq_len"), int):
        return float(sigma) ** (t - 1)
    return None
