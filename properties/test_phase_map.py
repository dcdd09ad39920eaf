"""The phase map against an exact frontier: g x orthogonal linear layers under a loss linear in the output
grow by exactly g^depth, so the stable/exploding frontier at each g is the smallest depth with g^depth
above the limit. Oracle: that closed form.
"""

from __future__ import annotations

from collections.abc import Callable

from stabilitycheck.phasemap import phase_map
from stabilitycheck.space import Axis
from stabilitycheck.verdicts import Limits

ORTHO_FILE = """
import torch
from torch import nn

SPACE = {"depth": (1, 64), "g": (1.1, 2.0, 0.1)}


def build(depth=4, g=1.1):
    gen = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(depth):
        lin = nn.Linear(8, 8, bias=False)
        with torch.no_grad():
            lin.weight.copy_(nn.init.orthogonal_(torch.empty(8, 8), gain=g, generator=gen))
        layers.append(lin)
    return nn.Sequential(*layers)


def batch(model):
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(1))


def loss(output, inputs):
    return (output * torch.randn(output.shape, generator=torch.Generator().manual_seed(2))).sum()
"""


def test_phase_map_frontier_of_orthogonal_linear_stack_is_exact_and_repeatable(
    model_file: Callable[[str, str], str],
) -> None:
    """g x orthogonal layers under a loss linear in the output grow by exactly g^depth: the frontier at each
    g is the smallest depth with g^depth > limit; the same call gives the same map."""
    spec = model_file("ortho", ORTHO_FILE)
    gs = (1.1, 1.3, 1.6, 2.0)
    lim = Limits(grad_norm=None, divergence=None, nonfinite=False, growth=100.0)
    kw = dict(x=Axis("depth", tuple(range(1, 65))), y=Axis("g", gs), limits=lim, seeds=1)
    pm = phase_map(spec, **kw)  # type: ignore[arg-type]
    exact = [next((d for d in range(1, 65) if g**d > 100 * (1 + 1e-4)), None) for g in gs]
    assert [None if e.x is None else pm.x.values[e.x] for e in pm.explode] == exact
    again = phase_map(spec, **kw)  # type: ignore[arg-type]
    assert again.points == pm.points and again.explode == pm.explode
