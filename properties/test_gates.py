"""Gated recurrences with constant gates, whose backward through time is exactly known.

GRU with the update gate forced to a constant z (every weight zero, the update gate's bias
logit(z)) and the candidate cut (n_t = tanh(0) = 0): h_t = z h_(t-1) exactly, so over the probe's
steps cell[0]..cell[T-1] every gain is z and the growth z**(T-1), whatever the inputs.

LSTM with constant gates i = o = 1/2 and forget f, the candidate's recurrent matrix w*I and every
other weight zero, fed zeros from a zero state: the trajectory stays at 0, where tanh' = 1, so the
backward is linear. With the loss on h_(T-1): c_(T-1)'s whole gradient is o g, and going back,
C_t = r C_(t+1) with r = f + i o w, C_t c_t's whole gradient (through h_t = o tanh(c_t) too). The
probe reads the cell's state (h, c), which its next call takes, each on its uses after the call
(what reaches c_t through h_t is h_t's): dL/dh_t = i w C_(t+1) and c_t's, through the next step
alone here, f C_(t+1); their norm is hypot(i w, f) |C_(t+1)| before the last step, |g| at it (c_(T-1) goes on
to no step). Gains r for cell[0]..cell[T-3], o hypot(i w, f) for the last step, growth r**(T-2) o
hypot(i w, f). (Read on h alone the rate is r too, but at f = 0.999, w = 0 it read growth 0, a dead
layer, where the cell state carries 0.999 a step.) The gate values are taken as torch computes
them from the biases in float64 (sigmoid of the logit), so the oracle does not depend on any number
the tool prints.

Tolerances: float64 1e-12 relative (measured <= 5e-15 at T <= 60), float32 1e-5 (measured <= 3e-7).
Gates from 0.5 and T <= 30 keep float32 gradients above 1e-10: smaller ones would send the probe
into its float64 re-run (gradients below ~1e-19), which takes up to a second an example.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from stabilitycheck import probe_module
from stabilitycheck.seeds import _kind

WIDTH = 5
DTYPES = {"float32": (torch.float32, 1e-5), "float64": (torch.float64, 1e-12)}


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _gate(p: float) -> float:
    """The gate value sigmoid(logit(p)) as the cell computes it, in float64."""
    return torch.sigmoid(torch.tensor(_logit(p), dtype=torch.float64)).item()


class _Loop(nn.Module):
    def __init__(self, cell: nn.Module, lstm: bool) -> None:
        super().__init__()
        self.cell = cell
        self.lstm = lstm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], WIDTH)
        c = x.new_zeros(x.shape[0], WIDTH)
        outputs = []
        for x_t in x.unbind(1):
            if self.lstm:
                h, c = self.cell(x_t, (h, c))
            else:
                h = self.cell(x_t, h)
            outputs.append(h)
        return torch.stack(outputs, 1)


def _probe(model: _Loop, x: torch.Tensor, seed: int):  # type: ignore[no-untyped-def]
    g = torch.randn(WIDTH, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(x.dtype)
    return probe_module(model, x, lambda out, inp: (out[:, -1] * g).sum(), blocks=[("cell", model.cell)])


def _gru(z: float, dtype: torch.dtype) -> _Loop:
    cell = nn.GRUCell(WIDTH, WIDTH, dtype=dtype)
    with torch.no_grad():
        for p in cell.parameters():
            p.zero_()
        cell.bias_ih[WIDTH : 2 * WIDTH] = _logit(z)  # gates r, z, n
    return _Loop(cell, lstm=False)


def _lstm(f: float, w: float, dtype: torch.dtype) -> _Loop:
    cell = nn.LSTMCell(WIDTH, WIDTH, dtype=dtype)
    with torch.no_grad():
        for p in cell.parameters():
            p.zero_()
        cell.bias_ih[WIDTH : 2 * WIDTH] = _logit(f)  # gates i, f, g, o: i and o at bias 0, 1/2
        cell.weight_hh[2 * WIDTH : 3 * WIDTH] = w * torch.eye(WIDTH, dtype=dtype)
    return _Loop(cell, lstm=True)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@settings(max_examples=10, deadline=None)
@given(z=st.floats(0.5, 0.99), seq_len=st.integers(2, 30), seed=st.integers(0, 2**16))
def test_gru_constant_update_gate_grows_z_per_step(dtype: str, z: float, seq_len: int, seed: int) -> None:
    torch_dtype, rtol = DTYPES[dtype]
    x = torch.randn(2, seq_len, WIDTH, generator=torch.Generator().manual_seed(seed), dtype=torch_dtype)
    m = _probe(_gru(z, torch_dtype), x, seed)
    zz = _gate(z)
    assert m.growth == pytest.approx(zz ** (seq_len - 1), rel=rtol)
    assert list(m.gains) == pytest.approx([zz] * (seq_len - 1), rel=rtol)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@settings(max_examples=10, deadline=None)
@given(
    f=st.floats(0.5, 0.999), w=st.floats(0.05, 1.0), seq_len=st.integers(3, 30), seed=st.integers(0, 2**16)
)
def test_lstm_constant_gates_grow_by_forget_plus_candidate(
    dtype: str, f: float, w: float, seq_len: int, seed: int
) -> None:
    torch_dtype, rtol = DTYPES[dtype]
    x = torch.zeros(2, seq_len, WIDTH, dtype=torch_dtype)
    m = _probe(_lstm(f, w, torch_dtype), x, seed)
    i = o = _gate(0.5)
    r = _gate(f) + i * o * w
    last = o * math.hypot(i * w, _gate(f))
    assert m.growth == pytest.approx(last * r ** (seq_len - 2), rel=rtol)
    assert list(m.gains) == pytest.approx([r] * (seq_len - 2) + [last], rel=rtol)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@settings(max_examples=10, deadline=None)
@given(f=st.floats(0.5, 0.999), seq_len=st.integers(3, 30), seed=st.integers(0, 2**16))
def test_lstm_cell_state_alone_carries_the_gradient(dtype: str, f: float, seq_len: int, seed: int) -> None:
    """No recurrent weight (w = 0): dL/dh_t is 0 before the last step, the gradient goes back through
    c alone, x f a step. Read on h alone, this read growth 0 and a dead layer."""
    torch_dtype, rtol = DTYPES[dtype]
    x = torch.zeros(2, seq_len, WIDTH, dtype=torch_dtype)
    m = _probe(_lstm(f, 0.0, torch_dtype), x, seed)
    o, ff = _gate(0.5), _gate(f)
    last = o * ff
    assert m.growth == pytest.approx(last * ff ** (seq_len - 2), rel=rtol)
    assert list(m.gains) == pytest.approx([ff] * (seq_len - 2) + [last], rel=rtol)


@settings(max_examples=10, deadline=None)
@given(f=st.floats(0.5, 0.999), w=st.floats(0.0, 1.0), seq_len=st.integers(6, 30), seed=st.integers(0, 2**16))
def test_lstm_constant_gates_read_their_rate(f: float, w: float, seq_len: int, seed: int) -> None:
    """The kind of a constant-gate LSTM is its rate r per step, fitted without the last step's
    gain (o hypot(i w, f), the loss's share of the state there), or flat where r**(T-2) and the
    growth are both within x2. With the last gain in the fit, the offset ln(o hypot(i w, f) / r)
    broke the law check beyond x2 and the kind read irregular."""
    x = torch.zeros(2, seq_len, WIDTH, dtype=torch.float64)
    m = _probe(_lstm(f, w, torch.float64), x, seed)
    r = _gate(f) + _gate(0.5) ** 2 * w
    kind = _kind([m], 0.5)
    if abs(math.log(m.growth)) < math.log(2) and abs((seq_len - 2) * math.log(r)) < math.log(2):
        assert kind.kind == "flat", kind
    else:
        assert kind.kind == "exponential", (kind, r)
        assert math.exp(kind.rate.mid) == pytest.approx(r, rel=1e-9)


def _rolled_out(cell: nn.Module, lstm: bool, x: torch.Tensor, t: int, c_t: torch.Tensor):  # type: ignore[no-untyped-def]
    """h_t -> (h_t, ..., h_(T-1)) with c_t and the inputs held: the Jacobians dL/dh_t is made of."""

    def run(h_t: torch.Tensor) -> torch.Tensor:
        h, c, outputs = h_t, c_t, [h_t]
        for s in range(t + 1, x.shape[1]):
            if lstm:
                h, c = cell(x[:, s], (h, c))
            else:
                h = cell(x[:, s], h)
            outputs.append(h)
        return torch.stack(outputs, 1)

    return run


@pytest.mark.parametrize("family", ["lstm", "gru"])
@settings(max_examples=6, deadline=None)
@given(scale=st.sampled_from([0.5, 1.0, 4.0]), last=st.booleans(), seed=st.integers(0, 2**16))
def test_zoo_gated_gains_are_ratios_of_jacobian_products(
    family: str, scale: float, last: bool, seed: int
) -> None:
    """The zoo's gated cells at init, float64: each step's gain |dL/ds_t| / |dL/ds_(t+1)| against
    dL/dh_t = sum over s >= t of J_(t->s)^T g_s, J from torch.autograd.functional.jacobian of the
    rolled-out cell and g_s the readout's gradient on step s (only the last with `last`); an LSTM's
    state s_t is (h_t, c_t), its dL/dc_t the same Jacobian product of the rolled-out cell with
    respect to c_t, h_t held (the partial derivative: what reaches c_t through h_t is h_t's)."""
    from torch.autograd.functional import jacobian

    from stabilitycheck import Config, probe
    from stabilitycheck.zoo import Family

    config = Config.of(family, seq_len=6, width=4, batch_size=2, init_scale=scale, seed=seed, dtype="float64")
    m = probe(config, last_step=last)
    built = Family(family).build(config, last=last)
    cell, x, lstm = built.model.cell, built.inputs, family == "lstm"
    h, c = x.new_zeros(2, 4), x.new_zeros(2, 4)
    hs, cs = [], []
    with torch.no_grad():
        for x_t in x.unbind(1):
            h, c = cell(x_t, (h, c)) if lstm else (cell(x_t, h), c)
            hs.append(h)
            cs.append(c)
    out = torch.stack(hs, 1).requires_grad_(True)
    (g,) = torch.autograd.grad(built.loss_fn(out, x), out)
    norms = []
    for t in range(len(hs)):
        J = jacobian(_rolled_out(cell, lstm, x, t, cs[t]), hs[t])  # (batch, T - t, width, batch, width)
        dh = torch.einsum("bsw,bswcv->cv", g[:, t:], J)
        if not lstm:
            norms.append(dh.norm().item())
            continue
        Jc = jacobian(lambda c_t, t=t: _rolled_out(cell, lstm, x, t, c_t)(hs[t]), cs[t])
        dc = torch.einsum("bsw,bswcv->cv", g[:, t:], Jc)
        norms.append(math.hypot(dh.norm().item(), dc.norm().item()))
    assert list(m.gains) == pytest.approx([a / b for a, b in itertools.pairwise(norms)], rel=1e-10)
    assert m.growth == pytest.approx(norms[0] / norms[-1], rel=1e-10)
