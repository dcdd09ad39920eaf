"""A Counterexample (counterexample) round trips through JSON, limits of its own included."""

from __future__ import annotations

import json

from stabilitycheck.config import Config
from stabilitycheck.verdicts import Limits


def test_a_counterexample_with_its_own_limits_round_trips_through_json() -> None:
    """The limits a counterexample was judged on are part of it: read back, they are the ones given
    (a report read back with the defaults says the wrong thresholds). Oracle: identity of the round trip."""
    from stabilitycheck.counterexample import Counterexample
    from stabilitycheck.seeds import assess

    config = Config.of("mlp", depth=2, width=4, batch_size=1).with_run(seeds=1)
    limits = Limits(grad_norm=None, growth=7.5, divergence=1.5, vanishing=40.0, stall=0.9, nonfinite=False)
    cx = Counterexample("mlp", config, assess(config, limits=limits), limits, ())
    back = Counterexample.from_dict(json.loads(json.dumps(cx.to_dict())))
    assert back.limits == limits
    assert back.config == config
