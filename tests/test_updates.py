"""The optimizer updates counted (updates): a step the GradScaler skips, a clip of zero refused."""

from __future__ import annotations

import math

import pytest
import torch


@pytest.mark.parametrize(("bad", "overflowed"), [(False, False), (True, False), (True, True)])
def test_an_update_the_gradscaler_skips_is_counted_as_skipped(bad: bool, overflowed: bool) -> None:
    """updates.update returns 1 for an update a GradScaler skipped, 0 for one it took: what
    Measurement.skipped_steps adds up. Skipped: a non-finite total, or scaled gradients that
    `overflowed` while the unscaled total the caller measured is finite (docstring). Oracle: torch's
    GradScaler's own record (it backs its scale off exactly on a skipped step), weights unchanged."""
    from stabilitycheck.updates import Training, update

    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    direction = torch.tensor([1.0, math.inf if bad else 2.0, 0.0])
    scaler.scale((p * direction).sum()).backward()
    assert p.grad is not None
    total = 1.0 if overflowed else float(torch.linalg.vector_norm(p.grad / scaler.get_scale()))
    before, weights = scaler.get_scale(), p.detach().clone()
    settings = Training(1, 0, 0, 0.1, "sgd", "none", 1.0)
    skipped = update(opt, scaler, [p], 0, total, settings, overflowed=overflowed)
    backed_off = scaler.get_scale() < before
    assert skipped == int(backed_off) == int(bad)
    assert torch.equal(p.detach(), weights) == bad


def test_a_clip_of_zero_is_refused() -> None:
    """probe_module's clip must be None or a finite number > 0 (training_settings' contract and its
    message): a clip of 0 would zero every update. Oracle: that documented contract."""
    from stabilitycheck.errors import UsageError
    from stabilitycheck.updates import Training, training_settings

    assert training_settings(1, 0, 0, 0.1, "sgd", "none", 0.5) == Training(1, 0, 0, 0.1, "sgd", "none", 0.5)
    for bad in (0, 0.0, -1.0, math.inf, math.nan):
        with pytest.raises(UsageError, match="clip must be None or a finite number > 0"):
            training_settings(1, 0, 0, 0.1, "sgd", "none", bad)
