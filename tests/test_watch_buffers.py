"""watchbuffers.Buffers: a flagged step's buffers put back as its first model call found them, per
dtype, and nothing put back where no model call was seen or the step was not flagged."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.parameter import is_lazy
from watch_models import MLP, WIDTH, BatchNormed, Fault, batch, compute_loss

from stabilitycheck.watchbuffers import Buffers
from stabilitycheck.watching import watch


class _Kinds(nn.Module):
    """Buffers of three dtypes and shapes (a 0-d count among them), as BatchNorm and masks hold."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.arange(6.0).reshape(2, 3))
        self.register_buffer("count", torch.tensor(7))
        self.register_buffer("mask", torch.tensor([True, False]))
        self.register_buffer("low", torch.ones(4, dtype=torch.float16))

    def write(self) -> None:
        self.mean.mul_(torch.nan)
        self.count.add_(1)
        self.mask.logical_not_()
        self.low.add_(1)


def _values(model: nn.Module) -> list[torch.Tensor]:
    return [b.clone() for b in model.buffers()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x.nan_to_num(), y.nan_to_num()) for x, y in zip(a, b, strict=True))


def test_a_flagged_step_gets_every_buffer_back_and_an_unflagged_one_keeps_what_it_wrote() -> None:
    model = _Kinds()
    buffers = Buffers(model)
    before = _values(model)
    buffers.take()
    model.write()
    buffers.take()  # a second model call of the step takes nothing: the first call's state stands
    buffers.close(torch.tensor(True))
    assert _same(_values(model), before)
    buffers.take()
    model.write()
    written = _values(model)
    buffers.close(torch.tensor(False))
    assert _same(_values(model), written) and not _same(written, before)


def test_nothing_is_put_back_where_no_model_call_was_seen_since_the_last_close() -> None:
    """A step whose model call no hook saw (its state never taken) is left as it is, not set to an
    earlier step's state."""
    model = _Kinds()
    buffers = Buffers(model)
    buffers.take()
    buffers.close(torch.tensor(False))
    model.write()
    written = _values(model)
    buffers.close(torch.tensor(True))
    assert _same(_values(model), written)


def test_a_model_without_buffers_has_nothing_to_take() -> None:
    assert not Buffers(nn.Linear(2, 2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none on this machine")
def test_a_buffer_left_on_the_cpu_of_a_cuda_model_costs_one_counted_read_per_step() -> None:
    """The flag is on the GPU; putting back a CPU buffer needs it on the host: one read, counted,
    and the buffers of both devices put back."""
    model = _Kinds().cuda()
    model.count = torch.tensor(7)  # assigned after .cuda(): stays on the CPU
    buffers = Buffers(model)
    before = _values(model)
    buffers.take()
    model.write()
    assert buffers.close(torch.tensor(True, device="cuda")) == 1
    assert _same(_values(model), before)
    buffers.take()
    assert buffers.close(torch.tensor(False, device="cuda")) == 1


# ------------------------------------------------------------------ under watch(skip=True), with an oracle

STEPS, AT = 14, 10  # past the rule's warm-up a NaN is flagged at any step; 10 keeps the runs short


class _Resized(nn.Module):
    """A block whose buffer starts empty and is resized in place at its first call (a quantization
    observer's min/max), then updated at every call in training mode."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(WIDTH, WIDTH)
        self.register_buffer("seen", torch.empty(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                if self.seen.numel() == 0:
                    self.seen.resize_(x.shape[-1]).zero_()
                self.seen.add_(x.mean(0))
        return torch.tanh(self.linear(x))


class _Odd(nn.Module):
    """BatchNorm beside buffers no dense copy can write back: an expand()ed one, an inference tensor
    and a sparse one, which the model only reads."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.BatchNorm1d(WIDTH), nn.Tanh()) for _ in range(3)
        )
        self.head = nn.Linear(WIDTH, 1)
        self.register_buffer("wide", torch.ones(1, WIDTH).expand(4, WIDTH))
        with torch.inference_mode():
            self.register_buffer("fixed", torch.ones(WIDTH))
        self.register_buffer("adjacency", torch.eye(WIDTH).to_sparse())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.sparse.mm(self.adjacency, x.T).T * self.fixed * self.wide[0]
        for block in self.blocks:
            x = block(x)
        return self.head(x).squeeze(-1)


def _resized() -> nn.Module:
    model = MLP(depth=3)
    model.blocks = nn.ModuleList(_Resized() for _ in range(3))
    return model


def _lazy() -> nn.Module:
    """BatchNorm whose buffers are a lazy module's, uninitialised until the first call (affine=False:
    no lazy parameter for the optimizer to refuse)."""
    model = MLP(depth=3)
    model.blocks = nn.ModuleList(
        nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.LazyBatchNorm1d(affine=False), nn.Tanh()) for _ in range(3)
    )
    return model


def _lazy_unused() -> nn.Module:
    """BatchNorm beside a lazy module the training forward never calls (an evaluation-only head): its
    buffers stay uninitialised, and the others were never put back while one did (found by a review)."""
    model = BatchNormed()
    model.unused = nn.LazyBatchNorm1d(affine=False)
    return model


def _state(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    tensors = [t.detach().clone() for t in model.state_dict().values() if not t.is_sparse and not is_lazy(t)]
    return tensors + [v.clone() for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]


def _run(
    make: Any,
    optimizer: Any,
    watched: bool,
    closure: bool = False,
    metric: bool = False,
    kind: str = "nan",
    at: int = AT,
    steps: int = STEPS,
) -> tuple[list[torch.Tensor], Any, nn.Module]:
    """`steps` steps with a NaN (or `kind`) on block 1's output at step `at` under watch(skip=True),
    or, the oracle, the same batches with that step's forward, backward and update never run; the
    state, the steps skipped and the model. `closure`: steps through step(closure); `metric`: a pass
    in training mode under no_grad after each update (it writes the BatchNorm statistics; the oracle
    runs it at step `at` too)."""
    torch.manual_seed(0)
    model = make()
    opt = optimizer(model)
    gen = torch.Generator().manual_seed(0)
    fault = Fault(at, kind)
    model.blocks[1].register_forward_hook(fault)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a non-fused optimizer's one sync per step, said
        w = watch(model, opt, skip=True, report=None).__enter__() if watched else None
        for step in range(steps):
            data, extra = batch(gen, model, 32), batch(gen, model, 16)
            fault.step = step if watched else -1
            if watched or step != at:

                def loss_of(data: Any = data, w: Any = w) -> torch.Tensor:
                    opt.zero_grad(set_to_none=True)
                    loss = compute_loss(model, data)
                    if w is not None:
                        w.loss(loss)
                    loss.backward()
                    fault.step = -1  # the step's later closure passes run clean
                    return loss

                opt.step(loss_of) if closure else (loss_of(), opt.step())
            if metric:
                with torch.no_grad():
                    compute_loss(model, extra)
        skipped = w.close().skipped_steps if w is not None else None
    return _state(model, opt), skipped, model


def _adam(fused: bool) -> Any:
    return lambda model: torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)


@pytest.mark.parametrize(
    ("make", "optimizer", "closure", "metric"),
    [
        (_resized, _adam(True), False, False),  # a buffer resized at the first call: crashed
        (_lazy, _adam(True), False, False),  # a lazy module's buffers: crashed at watch()
        (_lazy_unused, _adam(True), False, False),  # one never materialised: nothing was put back
        (_Odd, _adam(True), False, False),  # expand(), inference, sparse buffers: crashed
        (_Odd, _adam(False), False, False),
        # LBFGS evaluates the closure again after the step closed: those passes are the step's
        (BatchNormed, lambda m: torch.optim.LBFGS(m.parameters(), lr=0.1, max_iter=3), True, False),
        (BatchNormed, lambda m: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9), True, False),
        # a no_grad pass in training mode after each update belongs to the step it follows
        (BatchNormed, _adam(True), False, True),
    ],
)
def test_a_skipped_step_leaves_the_model_as_a_run_that_never_ran_it(
    make: Any, optimizer: Any, closure: bool, metric: bool
) -> None:
    """Oracle: the same batches with step AT never run, bit for bit (parameters, buffers, optimizer
    state); each case crashed the run or differed (LBFGS's BatchNorm counts by 2, the metric pass's
    by 1) before its fix (found by a review)."""
    got, skipped, _ = _run(make, optimizer, watched=True, closure=closure, metric=metric)
    want, _, _ = _run(make, optimizer, watched=False, closure=closure, metric=metric)
    assert skipped == [AT]
    assert len(got) == len(want)
    assert [i for i, (a, b) in enumerate(zip(got, want, strict=True)) if not torch.equal(a, b)] == []


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kind", ["nan", "scale"])
def test_a_skipped_step_leaves_the_batchnorm_statistics_as_a_run_without_that_step(
    fused: bool, kind: str
) -> None:
    """skip=True puts back what a skipped step's forward wrote to the model's buffers (BatchNorm's
    running statistics and batch count): a NaN there left every later BatchNorm's statistics NaN, and
    the model in eval() gave NaN. Oracle: a run in which step 40's batch is drawn and never run, equal
    bit for bit (parameters, buffers, optimizer state), on the device path (fused) and the synced one
    (a x50 is flagged once the rule's warm-up has passed: step 40 of 45)."""
    got, skipped, model = _run(BatchNormed, _adam(fused), True, kind=kind, at=40, steps=45)
    want, _, _ = _run(BatchNormed, _adam(fused), False, kind=kind, at=40, steps=45)
    assert skipped == [40]
    assert [i for i, (a, b) in enumerate(zip(got, want, strict=True)) if not torch.equal(a, b)] == []
    model.eval()
    assert torch.isfinite(model(torch.randn(8, WIDTH))).all()
