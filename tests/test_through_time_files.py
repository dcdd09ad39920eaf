"""The through-time growth of a model file whose blocks are called per step (a cell of its own,
an nn.RNNCell): the default loss on the last call's output alone. Oracles: a linear cell at
g x orthogonal grows exactly g^(T-1) through time, whatever the per-token loss adds; torch's own
gradients of every step's h under that loss."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from stabilitycheck.config import Config
from stabilitycheck.configprobe import probe
from stabilitycheck.losses import DefaultLoss
from stabilitycheck.phasemap import phase_map
from stabilitycheck.rng import SALT_LOSS, derived
from stabilitycheck.seeds import assess
from stabilitycheck.space import Axis
from stabilitycheck.subjects import resolve
from stabilitycheck.verdicts import Limits

LINEAR_CELL = """
import torch
from torch import nn


class Cell(nn.Module):
    def __init__(self, width, gain):
        super().__init__()
        self.w = nn.Linear(width, width, bias=False)
        self.u = nn.Linear(3, width, bias=False)
        with torch.no_grad():
            q, _ = torch.linalg.qr(torch.randn(width, width, dtype=torch.float64))
            self.w.weight.copy_(gain * q)

    def forward(self, x, h):
        return self.w(h) + self.u(x)


class Net(nn.Module):
    def __init__(self, width, gain):
        super().__init__()
        self.cell, self.width = Cell(width, gain), width

    def forward(self, x):
        h = x.new_zeros(x.shape[0], self.width)
        ys = []
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
            ys.append(h)
        return torch.stack(ys, 1)


def build(gain=1.0, width=16):
    return Net(width, gain)


def batch(model, seq_len=30, batch_size=4):
    return torch.randn(batch_size, seq_len, 3)
"""

TORCH_CELL = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.cell, self.width = nn.RNNCell(3, width), width

    def forward(self, x):
        h = x.new_zeros(x.shape[0], self.width)
        hs = []
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
            hs.append(h)
        return torch.stack(hs, 1)


def build(width=16):
    return Net(width)


def batch(model, seq_len=12, batch_size=4):
    return torch.randn(batch_size, seq_len, 3)
"""

STACK = """
from torch import nn


def build(depth=4):
    return nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(depth)])


example_input = __import__("torch").randn(4, 8)
"""


def _file(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return f"{path}:build"


@pytest.mark.parametrize("g", [0.95, 1.05, 1.1])
def test_a_linear_cell_grows_g_to_the_steps_through_time(tmp_path: Path, g: float) -> None:
    """Every seed's through-time growth is g^(T-1) (T calls, T-1 Jacobians g x orthogonal; the
    factory's float32 weights cast to float64 are orthogonal to ~1e-7), the growth judged, its kind
    the rate g per step; the per-token growth, which adds every later token's gradient, is kept
    beside it, larger (3.2, 19 and 64 for g^29 = 0.23, 4.1 and 15.9)."""
    name = _file(tmp_path, "cell.py", LINEAR_CELL)
    config = Config.of(name, gain=g, seq_len=30, dtype="float64", seeds=3)
    j = assess(config, resolve(name))
    assert j.through_time is not None and j.per_token is not None
    exact = g**29
    assert math.isclose(j.growth.low, exact, rel_tol=1e-5)
    assert math.isclose(j.growth.high, exact, rel_tol=1e-5)
    assert j.per_token.low > 1.5 * exact
    assert j.kind.kind == "exponential" and math.isclose(math.exp(j.kind.rate.mid), g, rel_tol=1e-6), j.kind


def test_a_torch_cell_reads_torch_s_gradients_of_the_last_step_loss(tmp_path: Path) -> None:
    """The last-step probe's growth is |dL/dh_1| / |dL/dh_T| by torch's autograd, L the default loss
    (the readout drawn from the seed) on h_T alone, the model and inputs built from the same seed."""
    name = _file(tmp_path, "rnncell.py", TORCH_CELL)
    subject = resolve(name)
    config = Config.of(name, dtype="float64", seed=3)
    built = subject.build(config)
    hs: list[torch.Tensor] = []

    def keep(module: torch.nn.Module, args: object, out: torch.Tensor) -> None:
        out.retain_grad()
        hs.append(out)

    cell = built.model.get_submodule("cell")
    handle = cell.register_forward_hook(keep)
    built.model(built.inputs)
    handle.remove()
    DefaultLoss(derived(3, SALT_LOSS))(hs[-1]).backward()
    grads = [float(h.grad.norm()) for h in hs if h.grad is not None]
    assert len(grads) == 12
    got = probe(config, subject, last_step=True)
    assert math.isclose(got.growth, grads[0] / grads[-1], rel_tol=1e-9)
    per_token = probe(config, subject)
    assert per_token.growth != got.growth


def test_a_stack_has_no_through_time_growth(tmp_path: Path) -> None:
    name = _file(tmp_path, "stack.py", STACK)
    subject = resolve(name)
    config = Config.of(name, seeds=1)
    assert subject.last_step(config) is None
    assert assess(config, subject).through_time is None


def test_the_through_time_loss_is_the_default_one_whatever_loss_the_file_gives(tmp_path: Path) -> None:
    """A file's loss() on every token does not change what the last step reads."""
    text = LINEAR_CELL + "\n\ndef loss(output, inputs):\n    return (output ** 2).sum()\n"
    name = _file(tmp_path, "lossy.py", text)
    config = Config.of(name, gain=1.05, seq_len=30, dtype="float64", seeds=1)
    j = assess(config, resolve(name))
    assert j.through_time is not None and math.isclose(j.through_time.mid, 1.05**29, rel_tol=1e-5)


def test_a_cell_whose_output_is_its_last_h_has_no_second_loss(tmp_path: Path) -> None:
    """Where the model returns the last call's h alone, its loss is on the last step already: no
    through-time probe (the default loss there would only read another direction of the same chain),
    and a head on h_T plus an earlier h is beside the chain again."""
    last = TORCH_CELL.replace("return torch.stack(hs, 1)", "return hs[-1]")
    name = _file(tmp_path, "last.py", last)
    subject = resolve(name)
    config = Config.of(name, seeds=2)
    assert subject.last_step(config) is None
    j = assess(config, subject)
    assert j.through_time is None and j.measurement.per_call
    skip = _file(
        tmp_path, "skip.py", TORCH_CELL.replace("return torch.stack(hs, 1)", "return hs[-1] + hs[2]")
    )
    assert resolve(skip).last_step(Config.of(skip, seeds=1)) is not None


def _variant(old: str, new: str) -> str:
    assert old in LINEAR_CELL
    return LINEAR_CELL.replace(old, new)


def test_a_cell_returning_y_and_h_is_read_through_the_h_the_next_call_takes(tmp_path: Path) -> None:
    """A cell returning (y, h), the next call taking h (an nn.LSTM stepped per token): the last-step
    loss is on h_T, so all T-1 Jacobians are read (on y_T, h_T's gain dropped out: g^(T-2))."""
    text = _variant(
        "return self.w(h) + self.u(x)", "new = self.w(h) + self.u(x)\n        return new.clone(), new.clone()"
    )
    text = text.replace(
        "h = self.cell(x[:, t], h)\n            ys.append(h)",
        "y, h = self.cell(x[:, t], h)\n            ys.append(y)",
    )
    name = _file(tmp_path, "yh.py", text)
    j = assess(Config.of(name, gain=1.1, seq_len=30, dtype="float64", seeds=1), resolve(name))
    assert j.through_time is not None and math.isclose(j.through_time.mid, 1.1**29, rel_tol=1e-5)


@pytest.mark.parametrize(
    ("what", "old", "new"),
    [
        (
            "truncated backpropagation",
            "h = self.cell(x[:, t], h)",
            "h = self.cell(x[:, t], h if t % 4 else h.detach())",
        ),
        (
            "a second pass from a fresh state",
            "return torch.stack(hs, 1)",
            "h = torch.zeros_like(h)\n        for t in range(x.shape[1]):\n"
            "            h = self.cell(x[:, t], h)\n            hs.append(h)\n"
            "        return torch.stack(hs, 1)",
        ),
    ],
)
def test_calls_that_do_not_chain_have_no_through_time_growth(
    tmp_path: Path, what: str, old: str, new: str
) -> None:
    """An nn.RNNCell (the block, found by its type) whose calls do not all take the call before's
    output: a loss on the last call reaches only the last chain (window, pass), no through-time
    reading (it read the last window's, 1 where that window was one call)."""
    assert old in TORCH_CELL
    name = _file(tmp_path, "apart.py", TORCH_CELL.replace(old, new))
    config = Config.of(name, dtype="float64", seeds=1)
    assert resolve(name).last_step(config) is None, what
    assert assess(config, resolve(name)).through_time is None, what


SIAMESE = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, depth):
        super().__init__()
        self.enc = nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(16, 16), nn.Tanh())])

    def forward(self, a, b):
        return torch.cat([self.enc(a), self.enc(b)], -1)

    def stability_blocks(self):
        return [("enc", self.enc)]


def build(depth=6):
    return Net(depth)


def batch(model, batch_size=4):
    return torch.randn(batch_size, 16), torch.randn(batch_size, 16)
"""


def test_a_shared_tower_is_judged_on_its_own_loss(tmp_path: Path) -> None:
    """One encoder on two inputs (no recurrence) has no last step: its vanishing, at init_scale 0.25,
    is judged on its own loss and fires (a last-step reading of NaN had hidden it)."""
    name = _file(tmp_path, "siamese.py", SIAMESE)
    config = Config.of(name, init_scale=0.25, seeds=3)
    assert resolve(name).last_step(config) is None
    j = assess(config, resolve(name), Limits(vanishing=10.0))
    assert j.through_time is None and "vanishing" in j.verdict.names, j.verdict


def test_a_map_on_the_last_step_takes_a_single_call_s_own_loss(tmp_path: Path) -> None:
    """At seq_len 1 the cell's one call has no last step beside the model's loss: the map judges that
    loss there (it raised an internal error; called once, the cell is no looped block, its layers are
    the blocks: growth g, w's gain), and from 2 on the last step's growth, g^(T-1): at g = 5 past a
    limit of 10 from T = 3."""
    name = _file(tmp_path, "cell.py", LINEAR_CELL)
    lim = Limits(grad_norm=None, divergence=None, nonfinite=False, growth=10.0)
    pm = phase_map(
        name, x=Axis("seq_len", (1, 2, 3)), y=Axis("gain", (5.0,)), limits=lim, seeds=1, loss="last"
    )
    first = pm.point(0, 0)
    assert first is not None and not first.exploded and math.isclose(first.growth.mid, 5.0, rel_tol=1e-6)
    assert [pm.x.values[e.x] if e.x is not None else None for e in pm.explode] == [3]
    own = [note for note in pm.violations if "judged on the model's own loss" in note]
    assert len(own) == 1 and own[0].startswith("1 point ") and "seq_len=1 gain=5.0" in own[0], pm.violations


def test_whether_a_file_has_a_last_step_is_found_once_for_all_seeds(tmp_path: Path) -> None:
    """A head on the last h alone (no last step beside the model's loss): a verdict over seeds asks the
    subject once, not once per seed (each ask builds the model and runs a copy's forward)."""
    name = _file(tmp_path, "last.py", TORCH_CELL.replace("return torch.stack(hs, 1)", "return hs[-1]"))
    subject = resolve(name)
    asked: list[Config] = []
    real = subject.last_step

    def counted(config: Config) -> object:
        asked.append(config)
        return real(config)

    subject.last_step = counted  # type: ignore[method-assign]
    j = assess(Config.of(name, seeds=3), subject)
    assert len(j.seeds) >= 2 and j.through_time is None and len(asked) == 1


def test_a_stable_search_row_carries_the_through_time_growth(tmp_path: Path) -> None:
    """A search of a linear cell that never explodes: its largest stable point's judgement has the
    through-time growth g^(T-1) over the seeds its verdict used, and its kind, the rate g."""
    from stabilitycheck.searching import search
    from stabilitycheck.space import Space

    name = _file(tmp_path, "cell.py", LINEAR_CELL)
    subject = resolve(name)
    base = subject.config(gain=0.95, dtype="float64", seeds=3)
    result = search(Space(name, base, (Axis("seq_len", (10, 20, 30)),)), subject=subject, max_examples=5)
    j = result.largest_stable_judgement
    assert result.counterexample is None and j is not None and j.through_time is not None
    assert math.isclose(j.through_time.mid, 0.95**29, rel_tol=1e-5) and j.kind.kind == "exponential"


def test_a_map_says_which_criterion_its_frontier_fired_on(tmp_path: Path) -> None:
    """With the default limits a linear cell's weight-gradient norm passes 1e3 before its growth
    g^(T-1) passes 100 at g 1.1: the table's 'fired on' column says grad_norm, not growth."""
    from stabilitycheck.maptext import text

    name = _file(tmp_path, "cell.py", LINEAR_CELL)
    pm = phase_map(
        name, x=Axis("seq_len", tuple(range(2, 62, 4))), y=Axis("gain", (1.1,)), seeds=1, loss="last"
    )
    (edge,) = pm.explode
    assert edge.x is not None
    t = pm.x.values[edge.x]
    assert isinstance(t, int) and 1.1 ** (t - 1) < 100
    row = [line for line in text(pm).splitlines() if line.startswith("1.1 ")][-1]
    assert row.split()[1:3] == [str(t), "grad_norm"], row


def test_a_search_counts_its_last_step_probes_apart(tmp_path: Path) -> None:
    """A linear cell that explodes at its one configuration: the through-time growth takes one
    last-step probe per seed the verdict used, which SearchResult.last_step_probes counts (`probes`
    leaves them out) and the JSON writes."""
    import json

    from stabilitycheck.report import to_json
    from stabilitycheck.searching import search
    from stabilitycheck.space import Space

    name = _file(tmp_path, "cell.py", LINEAR_CELL)
    subject = resolve(name)
    base = subject.config(gain=1.1, seq_len=60, dtype="float64")
    result = search(Space(name, base, ()), subject=subject, max_examples=5)
    assert result.counterexample is not None
    used = result.counterexample.judgement.seeds
    assert result.last_step_probes == len(used) >= 3 and result.probes == len(used)
    assert json.loads(to_json([result]))[0]["last_step_probes"] == len(used)


STACKED_CELLS = (  # LINEAR_CELL with two of its cells stacked, taking turns at every token
    LINEAR_CELL[: LINEAR_CELL.index("class Net(nn.Module):")]
    + """class Upper(Cell):
    def __init__(self, width, gain):
        super().__init__(width, gain)
        self.u = nn.Linear(width, width, bias=False)


class Net(nn.Module):
    def __init__(self, width, gain):
        super().__init__()
        self.c0, self.c1, self.width = Cell(width, gain), Upper(width, gain), width

    def stability_blocks(self):
        return [("c0", self.c0), ("c1", self.c1)]

    def forward(self, x):
        h0 = h1 = x.new_zeros(x.shape[0], self.width)
        ys = []
        for t in range(x.shape[1]):
            h0 = self.c0(x[:, t], h0)
            h1 = self.c1(h0, h1)
            ys.append(h1)
        return torch.stack(ys, 1)
"""
    + LINEAR_CELL[LINEAR_CELL.index("\n\ndef build(") :]
)


def test_stacked_cells_taking_turns_are_judged_on_torchs_last_step_gradients(tmp_path: Path) -> None:
    """Two linear cells stacked, c0 then c1 at every token, a head on every h1: the calls form one
    chain in call order (c0 at t + 1 takes c0's h at t, c1 takes c0's h and its own), so the growth
    judged is |dL/dh0_1| / |dL/dh1_T| under the default loss on h1_T alone, by torch's autograd (it
    was the per-token loss's, which read a stack at g = 1 exploding at 63 tokens: every later token's
    gradient summed in)."""
    name = _file(tmp_path, "stacked.py", STACKED_CELLS)
    subject = resolve(name)
    config = Config.of(name, gain=1.0, seq_len=12, dtype="float64", seed=5, seeds=1)
    built = subject.build(config)
    hs: list[torch.Tensor] = []

    def keep(module: torch.nn.Module, args: object, out: torch.Tensor) -> None:
        out.retain_grad()
        hs.append(out)

    handles = [built.model.get_submodule(b).register_forward_hook(keep) for b in ("c0", "c1")]
    built.model(built.inputs)
    for handle in handles:
        handle.remove()
    DefaultLoss(derived(5, SALT_LOSS))(hs[-1]).backward()
    assert len(hs) == 24 and all(h.grad is not None for h in hs)
    torch_growth = float(hs[0].grad.norm() / hs[-1].grad.norm())  # type: ignore[union-attr]
    j = assess(config, subject)
    assert j.per_token is not None and math.isclose(j.growth.mid, torch_growth, rel_tol=1e-9)
    assert j.per_token.mid != j.growth.mid


def test_a_stepped_files_reading_is_found_once_for_all_seeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cell stepped per token with a head on every h: its last-step builds (one per seed) find how
    the model runs once, not once per seed (each a forward of a deep copy)."""
    from stabilitycheck.modelfile import subject as modelfile

    name = _file(tmp_path, "cell.py", LINEAR_CELL)
    found: list[str] = []
    real = modelfile._reading

    def counted(*args: object) -> str:
        found.append(real(*args))  # type: ignore[arg-type]
        return found[-1]

    monkeypatch.setattr(modelfile, "_reading", counted)
    j = assess(Config.of(name, gain=1.05, seeds=3), resolve(name))
    assert j.through_time is not None and len(j.seeds) >= 2 and found == ["beside"]
