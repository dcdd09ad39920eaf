"""Pre-norm residual stacks (resmlp, transformer) of depth 1..64 train finite at standard init and lr."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stabilitycheck.config import Config
from stabilitycheck.invariants import assert_bounded_growth, assert_finite_training
from stabilitycheck.strategies import configs

LR = {"adam": 1e-3, "sgd": 0.01}
"""The usual learning rates of each optimiser."""


def pre_norm_stacks(family: str) -> st.SearchStrategy[Config]:
    """Pre-norm stacks of `family` at init 1.0, each optimiser at its usual learning rate, at widths of 16
    and more: the growth is a ratio of two random gradient norms whose spread falls with the width, and at
    width 8 with a few tokens its tail is heavy (Hypothesis found growth 1382 at depth 47, width 8, seq_len 2,
    batch 2, seed 2985, where the median at depth 64 is 8)."""
    return configs(
        family=family,
        max_depth=64,
        min_width=16,
        max_width=32,
        max_seq_len=8,
        max_batch_size=4,
        init_scales=(1.0,),
        norms=("pre",),
        dtypes=("float32",),
        min_steps=3,
        max_steps=5,
        optimizers=("adam", "sgd"),
    ).map(lambda c: c.with_run(lr=LR[c.run.optimizer]))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["resmlp", "transformer"])  # two tests, so xdist can split them
@given(data=st.data())
def test_pre_norm_stacks_train_finite_with_bounded_growth(family: str, data: st.DataObject) -> None:
    """Pre-norm keeps an identity skip path and normalises only the branch input, so at init 1.0 the
    backward gain per block is 1 + O(1/depth) and the growth is polynomial in depth, not exponential
    (the median growth at init follows sqrt(depth): 8-10 at depth 64. In 300 random draws at depths 1-64 the
    largest was 51 at width 16 and 20 at width 32 for transformer, 29 at width 16 for resmlp: the limit 1e3
    leaves a margin of 20)."""
    c = data.draw(pre_norm_stacks(family), label="config")
    m = assert_finite_training(c)
    assert_bounded_growth(m, 1e3)
