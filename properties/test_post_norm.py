"""Deep residual MLPs with the LayerNorm after the residual sum (post-norm) or with none are found to
explode, at a counterexample that is 1-minimal, and pre-norm fixes it.

Without a norm each block maps the backward signal through I + J (J the branch's Jacobian), whose
squared gain is about 1 + chi with chi = s**4 E[tanh'(h)**2] at init_scale s: it compounds over depth.
Post-norm divides by the norm of x + branch(x) after each sum but multiplies the gradient by the
Jacobian of LayerNorm as well, which does not undo the branch's gain for s well above 1. Measured
(width 16, batch 8, tanh, the median of 5 seeds, the canonical point: smallest depth first): no norm
explodes first at depth 9, init_scale 3.75; post-norm at depth 15, init_scale 3.0; pre-norm
(x + branch(LN(x))) was stable at both.
"""

from __future__ import annotations

import pytest

from stabilitycheck.config import Config
from stabilitycheck.pytest_plugin import Recorder
from stabilitycheck.searching import search
from stabilitycheck.seeds import assess
from stabilitycheck.space import INIT_SCALES, Axis, Space

AXES = (Axis.range("depth", 1, 40), Axis("init_scale", INIT_SCALES))


def residual_space(norm: str, device: str) -> Space:
    """The residual MLP searched here: small enough for a probe to take milliseconds."""
    base = Config.of("resmlp", norm=norm, activation="tanh", width=16, batch_size=8, device=device)
    return Space(f"resmlp-{norm}", base, AXES)


@pytest.mark.parametrize("norm", ["post", "none"])
def test_residual_stack_without_pre_norm_is_found_to_explode(
    norm: str, stability_device: str, stability_record: Recorder
) -> None:
    space = residual_space(norm, stability_device)
    result = search(space, max_examples=30, seed=0)
    cx = result.counterexample
    assert cx is not None, f"no explosion in {space.size} configs; largest stable {result.largest_stable}"
    stability_record(result)

    index = tuple(a.values.index(cx.config.knob(a.name)) for a in space.axes)
    for k, axis in enumerate(space.axes):  # 1-minimal: one grid step lower on any axis is stable
        if index[k] > 0:  # (judged over the same seeds as the search: the verdict is over seeds)
            lower = space.config((*index[:k], index[k] - 1, *index[k + 1 :]))
            v = assess(lower).verdict
            assert not v.exploded, f"{axis.name} one step lower still explodes ({v.names}): {lower}"
    fixed = {r.name for r in cx.remedies if r.fixed}
    assert "pre-norm" in fixed, f"pre-norm did not fix {cx.config}: {[r.describe() for r in cx.remedies]}"
