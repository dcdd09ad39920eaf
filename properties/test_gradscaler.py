"""torch.amp.GradScaler skips every step whose gradients hold Inf or NaN, over every zoo family."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from stabilitycheck.config import Config
from stabilitycheck.invariants import assert_gradscaler_guards
from stabilitycheck.invariants_gradscaler import UNHIDDEN
from stabilitycheck.strategies import configs
from stabilitycheck.subject import Built
from stabilitycheck.zoo import Family

models = configs(
    max_depth=4, max_width=16, max_seq_len=6, max_batch_size=3, init_scales=(1.0, 0.5), dtypes=("float32",)
)


def build(c: Config) -> Built:
    """The zoo model, inputs and loss of `c`."""
    return Family(c.subject).build(c)


@given(models, st.integers(0, 16), st.sampled_from(["sgd", "adam"]))
def test_gradscaler_skips_nonfinite_steps_and_takes_clean_ones(c: Config, log2_scale: int, opt: str) -> None:
    b = build(c)
    scaler = torch.amp.GradScaler(c.run.device, init_scale=2.0**log2_scale)

    def optimizer(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=1e-3) if opt == "adam" else torch.optim.SGD(params, lr=0.01)

    assert_gradscaler_guards(b.model, b.inputs, b.loss_fn, scaler, optimizer=optimizer, seed=c.run.seed)
    n = sum(p.requires_grad for p in b.model.parameters())  # every zoo parameter gets a gradient
    poisoned = 3 * 2 * min(n, 2) + max(n - 2, 0)  # Inf, -Inf, NaN x first, last x end, middle entry
    halved = 2.0 ** (log2_scale - poisoned)  # halved per poisoned step; at 1 or below, set above it for
    # the clean step at it (where it hides nothing), then one more skip after it: halved again
    assert scaler.get_scale() == (UNHIDDEN if halved <= 1.0 else halved) / 2
