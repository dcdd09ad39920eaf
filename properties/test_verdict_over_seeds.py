"""A verdict over seeds reads the distribution of its seeds' values: its quantile and spread are those of
each seed's growth computed by a plain backward. Oracle: autograd with retain_grad, sorted by hand.
"""

from __future__ import annotations

import math

import pytest

from stabilitycheck.config import Config
from stabilitycheck.seeds import assess
from stabilitycheck.zoo import Family


def _own_growth(c: Config) -> float:
    """||dL/dx|| / ||dL/d(last block's output)|| of the zoo resmlp at `c`, by a plain backward."""
    b = Family(c.subject).build(c)
    x = b.inputs.clone().requires_grad_(True)
    h, last = x, x
    for layer in b.model.layers:
        h = layer(h)
        h.retain_grad()
        last = h
    b.loss_fn(b.model.ln_f(h), x).backward()
    return float(x.grad.double().norm() / last.grad.double().norm())  # type: ignore[union-attr]


@pytest.mark.parametrize(("seeds", "q"), [(5, 0.5), (8, 0.75), (8, 0.25)])
def test_assess_spread_is_the_nearest_rank_quantile_of_own_autograd(seeds: int, q: float) -> None:
    """The verdict's growth is the nearest-rank q-quantile (the ceil(q K)-th smallest) of the K seeds' own
    growths, its low and high their extremes, and the same call gives the same seeds and numbers."""
    c = Config.of("resmlp", depth=22, init_scale=1.0, width=32, batch_size=8, norm="none", activation="relu")
    j = assess(c.with_run(seeds=seeds, quantile=q))
    own = sorted(_own_growth(c.with_run(seed=s)) for s in j.seeds)
    assert j.growth.mid == pytest.approx(own[max(1, math.ceil(q * len(own))) - 1], rel=1e-5)
    assert (j.growth.low, j.growth.high) == pytest.approx((own[0], own[-1]), rel=1e-5)
    again = assess(c.with_run(seeds=seeds, quantile=q))
    assert again.growth == j.growth and again.seeds == j.seeds
