"""Gated cells over long sequences: a tanh RNN's gradient grows more than an LSTM's, and a GRU's stays
bounded up to init_scale 3.

Mean-field theory: the RNN's backward gain per step is chi = s**2 E[tanh'(sqrt(q) z)**2], q the
pre-activation variance s**2 (E[h**2] + 1) (recurrent plus input drive, both at init_scale s).
Solving for the fixed point: chi = 0.80 at s = 2 (ordered: no growth), 1.18 at s = 3 and 1.56 at
s = 4 (chaotic: the gradient of early steps grows geometrically). An LSTM carries its gradient
through c_t = f_t c_(t-1) + ..., multiplied by a forget gate f_t in (0, 1) (about 0.5 at init), and
a GRU through h_t = z_t h_(t-1) + (1 - z_t) n_t with z_t in (0, 1). The GRU is not asserted: its
candidate n_t = tanh(W x_t + r_t * (U h_(t-1))) has its own s x orthogonal recurrent matrix U, and
at s = 4, seq_len 73, seed 73 it was measured to grow more than the RNN (211.6 vs 148.7, growth under
the per-token loss, which this module reads throughout; through time, the zoo's GRU stays below 100
to 256 steps in the median). Measured (width 32, batch 8, seeds 0-14 at seq_len 64
and 128, 0-7 at 80/96/112): the RNN's growth was at least 2.0 times the LSTM's; at s <= 2, or width
8-24, or batch 2 it was not robust, so only s in {3, 4} at width 32 is asserted.

What does hold for the GRU is a bound: its carried path multiplies the gradient by z_t in (0, 1), so
up to s = 3 it stays far below the growth limit. Measured (400 random draws, s 0.5-3, seq_len
1-256, width 8-64, batch 1-8): growth at most 8.0 (s = 3, width 8), 4.3 at width >= 16, 2.4 at
s <= 2; the limit of 100 leaves a margin of 12. A per-example "GRU below RNN" is not a property:
at width 16 and s = 4 the RNN's tanh saturates and it grew less than the GRU in 6 of 150 draws.
"""

from __future__ import annotations

import pytest
from hypothesis import event, given, note

from stabilitycheck.config import Config
from stabilitycheck.configprobe import probe
from stabilitycheck.invariants import assert_bounded_growth
from stabilitycheck.strategies import configs

long_sequences = configs(
    family="rnn",
    min_width=32,
    max_width=32,
    init_scales=(3.0, 4.0),
    min_seq_len=64,
    max_seq_len=128,
    min_batch_size=8,
    max_batch_size=8,
    norms=("none",),
    activations=("tanh",),
    dtypes=("float32",),
)


@pytest.mark.slow
@given(long_sequences)
def test_tanh_rnn_grows_more_than_lstm_at_the_same_init(c: Config) -> None:
    lstm = Config("lstm", tuple((k, v) for k, v in c.knobs if k != "activation"), c.run)  # no activation
    growth = {"rnn": probe(c).growth, "lstm": probe(lstm).growth}
    note(f"growth over {c.describe()}: {growth}")
    event(f"rnn / lstm > 10: {growth['rnn'] > 10 * growth['lstm']}")
    assert growth["rnn"] > growth["lstm"]


gru_sequences = configs(
    family="gru",
    init_scales=(1.0, 0.5, 1.5, 2.0, 2.5, 3.0),
    min_seq_len=64,
    max_seq_len=256,
    max_width=64,
    max_batch_size=8,
    norms=("none",),
    dtypes=("float32",),
)


@pytest.mark.slow
@given(gru_sequences)
def test_gru_growth_stays_bounded_over_long_sequences(c: Config) -> None:
    m = probe(c)
    note(f"growth over {c.describe()}: {m.growth:.3g}")
    assert_bounded_growth(m, 100.0)
