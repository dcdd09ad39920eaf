"""watch() under torch.distributed: 2 ranks on the CPU (gloo), DDP and FSDP2 `fully_shard`, against
the same model trained in one process on the whole batch (float64, so rounding stays far below the
1e-6 asked). Also: one collective per flush, none per step; the rank of a NaN named; and the
clip_grad_norm_ invariant, which a local-shard norm fails.
Also the merge of ranks' rows (to_series) and the full grad norm counting a replicated gradient once."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import spawn
from watch_models import MLP, Fault, batch, compute_loss

from stabilitycheck.errors import StabilityError
from stabilitycheck.invariants import check_clip_grad_norm
from stabilitycheck.watching import Watcher, watch

pytestmark = pytest.mark.slow  # two spawned processes importing torch: ~10 s on an idle 2-core machine

STEPS, HALF = 4, 16
KINDS = ("loss", "grad_norm", "activation", "activation_grad", "gradient", "weight")
COLLECTIVES = (
    "all_gather_single",
    "all_gather_into_tensor",
    "all_gather",
    "all_reduce",
    "broadcast",
    "reduce_scatter_tensor",
)


def _data(step: int, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch(torch.Generator().manual_seed(step), model, 2 * HALF)
    return x.double(), y.double()


def _run(
    model: torch.nn.Module,
    log: Path | None,
    rank: int | None,
    fault: Fault | None = None,
    passed: list[float] | None = None,
    clipped: list[float] | None = None,
) -> Watcher:
    """STEPS SGD steps on the whole batch (rank None) or on this rank's half of it; with `passed`,
    the loss is given to w.loss() on rank 0 alone and kept there in `passed`; with `clipped`, the
    gradients are clipped to 0.01 before each step, the total norm clip_grad_norm_ returns kept."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    inner = getattr(model, "module", model)  # DDP's forward must run (it syncs the gradients)
    handle = inner.blocks[1].register_forward_hook(fault) if fault is not None else None
    with watch(model, opt, log=log, flush_every=2, report=None) as w:
        for step in range(STEPS):
            if fault is not None:
                fault.step = step
            x, y = _data(step, model)
            if rank is not None:
                x, y = x[rank * HALF : (rank + 1) * HALF], y[rank * HALF : (rank + 1) * HALF]
            loss = compute_loss(model, (x, y))
            if passed is None:
                w.loss(loss)
            elif rank == 0:
                w.loss(loss)
                passed.append(loss.item())
            opt.zero_grad()
            loss.backward()
            if clipped is not None:  # under FSDP2 a DTensor: its full value
                total = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
                full = getattr(total, "full_tensor", None)
                clipped.append(float(full() if full is not None else total))
            opt.step()
    if handle is not None:
        handle.remove()
    return w


def _count_collectives(phases: dict[str, int], watcher_phase: list[str]) -> None:
    """Wrap torch.distributed's collectives to count calls by the watcher's phase."""
    for name in COLLECTIVES:
        original = getattr(dist, name, None)
        if original is None:
            continue

        def counted(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            phases[watcher_phase[0]] = phases.get(watcher_phase[0], 0) + 1
            return _original(*args, **kwargs)

        setattr(dist, name, counted)
    for method in ("flush", "before_step"):
        original = getattr(Watcher, method)

        def phased(self: Watcher, *args: Any, _original: Any = original, _name: str = method) -> Any:
            outer, watcher_phase[0] = watcher_phase[0], _name
            try:
                return _original(self, *args)
            finally:
                watcher_phase[0] = outer

        setattr(Watcher, method, phased)


def _worker(rank: int, out: str) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    # the ranks meet through a file of the test's own directory, not a port picked free beforehand: a
    # port closed by the parent is free for any process to take until rank 0 binds it, seconds later
    store = Path(out) / "store"
    dist.init_process_group("gloo", init_method=store.as_uri(), rank=rank, world_size=2)
    torch.set_num_threads(1)
    phases: dict[str, int] = {}
    phase = ["other"]
    _count_collectives(phases, phase)
    result: dict[str, Any] = {}
    torch.manual_seed(0)
    ddp = DistributedDataParallel(MLP(depth=3).double())
    _run(ddp, Path(out) / "ddp.jsonl" if rank == 0 else None, rank)
    result["ddp_phases"] = dict(phases)
    phases.clear()
    torch.manual_seed(0)
    model = MLP(depth=3).double()
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    _run(model, Path(out) / "fsdp.jsonl" if rank == 0 else None, rank)
    result["fsdp_phases"] = dict(phases)
    result["fsdp_clipped"] = clipped = []
    _run(model, Path(out) / "fsdp_clipped.jsonl" if rank == 0 else None, rank, clipped=clipped)
    torch.manual_seed(0)
    result["rank0_losses"] = losses = []
    log = Path(out) / "rank0.jsonl" if rank == 0 else None
    _run(DistributedDataParallel(MLP(depth=3).double()), log, rank, passed=losses)
    loss = compute_loss(model, tuple(t[rank * HALF : (rank + 1) * HALF] for t in _data(0, model)))
    loss.backward()
    params = list(model.parameters())
    result["clip"] = check_clip_grad_norm(params)
    local = torch.linalg.vector_norm(torch.stack([p.grad.to_local().norm() for p in params]))  # type: ignore[union-attr]
    real_clip = torch.nn.utils.clip_grad_norm_
    torch.nn.utils.clip_grad_norm_ = lambda *_a, **_k: local  # a clip that forgets the other shards
    try:
        check_clip_grad_norm(params)
        result["broken_clip"] = "passed"
    except StabilityError as exc:
        result["broken_clip"] = str(exc)
    finally:
        torch.nn.utils.clip_grad_norm_ = real_clip
    torch.manual_seed(0)
    fault = Fault(2, "nan") if rank == 1 else None
    w = _run(DistributedDataParallel(MLP(depth=3).double()), None, rank, fault)
    assert w.report is not None
    result["nan"] = None if w.report.first_spike is None else w.report.first_spike.__dict__
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()  # both ranks' results are written before either tears its process group down
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """Both ranks' results. A rank that gloo aborts ('terminate called without an active exception',
    SIGABRT) once its results are written leaves them standing; one aborted before is run again, once:
    seen in 2 of 3 full-suite runs on a loaded 2-core machine, never in 28 runs of this file alone, and
    in torch's C++ teardown, not in this package's code, whose every figure is still asserted below."""
    if not dist.is_available() or sys.platform == "win32":
        pytest.skip("torch.distributed with gloo is not available here")
    for attempt in range(2):
        out = tmp_path_factory.mktemp("ranks")
        try:
            mp.spawn(_worker, args=(str(out),), nprocs=2, join=True)
        except mp.ProcessExitedException:
            if attempt == 1 and not all((out / f"rank{r}.json").exists() for r in range(2)):
                raise
        if all((out / f"rank{r}.json").exists() for r in range(2)):
            break
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_per_block_norms_equal_the_single_process_values(ranks: Any, mode: str, tmp_path: Path) -> None:
    out, _ = ranks
    torch.manual_seed(0)
    _run(MLP(depth=3).double(), tmp_path / "single.jsonl", None)
    single, both = _rows(tmp_path / "single.jsonl"), _rows(out / f"{mode}.jsonl")
    assert len(single) == len(both) == STEPS
    assert [r["weight"] is not None for r in single] == [True, False, True, False]
    for one, two in zip(single, both, strict=True):
        for kind in KINDS:
            expect, got = one[kind], two[kind]
            if expect is None:  # weights not measured at this step (weights_every = flush_every = 2)
                assert got is None and kind == "weight"
                continue
            for a, b in zip(
                expect if isinstance(expect, list) else [expect],
                got if isinstance(got, list) else [got],
                strict=True,
            ):
                assert b == pytest.approx(a, rel=1e-6, abs=1e-12), (mode, one["step"], kind)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_one_collective_per_flush_and_none_per_step(ranks: Any, mode: str) -> None:
    _, results = ranks
    for result in results:
        phases = result[f"{mode}_phases"]
        assert phases.get("flush") == STEPS // 2  # flush_every=2
        assert "before_step" not in phases


def test_the_rank_of_a_nan_is_named(ranks: Any) -> None:
    _, results = ranks
    for result in results:
        assert result["nan"] is not None
        assert (result["nan"]["step"], result["nan"]["block"], result["nan"]["rank"]) == (
            2,
            "module.blocks.1",
            1,
        )
        assert math.isnan(result["nan"]["value"])


def test_clip_grad_norm_returns_the_full_model_norm_under_fsdp2(ranks: Any) -> None:
    _, results = ranks
    assert results[0]["clip"] == pytest.approx(results[1]["clip"], rel=1e-12)
    for result in results:
        assert result["broken_clip"].startswith("clip_grad_norm_ returned")


def test_a_clipped_fsdp2_loop_logs_the_norm_before_clipping(ranks: Any) -> None:
    """Under FSDP2 clip_grad_norm_ returns a DTensor, whose .tolist() raises: read at the flush, it
    stopped the training loop (a review). Oracle: the full value of what clip_grad_norm_ returned, at
    each step, and each step clipped (0.01 is under every norm here)."""
    out, results = ranks
    logged = [row["grad_norm_before_clip"] for row in _rows(out / "fsdp_clipped.jsonl")]
    assert logged == pytest.approx(results[0]["fsdp_clipped"], rel=1e-12) and len(logged) == STEPS
    assert min(logged) > 0.01


def test_a_loss_passed_on_one_rank_alone_is_that_ranks_loss(ranks: Any) -> None:
    """Logging on rank 0 alone (a common habit): the loss read half of rank 0's, the other rank's
    missing loss counted as 0 in a mean over both ranks (found by a trial). The mean is over the
    ranks that passed one."""
    out, results = ranks
    rows = _rows(out / "rank0.jsonl")
    assert [r["loss_passed"] for r in rows] == [True] * STEPS
    assert [r["loss"] for r in rows] == pytest.approx(results[0]["rank0_losses"], rel=1e-12)


def test_to_series_combines_two_ranks_as_one_full_batch_would() -> None:
    """D1: with the full-batch loss the mean of W rank losses, dL/d(out) on rank r is dL_r/d(out_r) / W:
    output-gradient squares add up divided by W^2 (3^2 + 4^2 over 2^2: norm 2.5); block outputs and
    weights add up as they are; the loss is the mean. Checked against torch autograd on a real split."""
    from stabilitycheck.distributed import Layout, to_series

    lay = Layout(n_blocks=1)
    p = lay.parts()
    rows = torch.zeros(2, lay.width, dtype=torch.float64)
    rows[:, p["loss"]] = torch.tensor([[1.0], [3.0]], dtype=torch.float64)
    rows[:, p["activation"]] = torch.tensor([[4.0], [5.0]], dtype=torch.float64)
    rows[:, p["activation_grad"]] = torch.tensor([[9.0], [16.0]], dtype=torch.float64)
    out = to_series(rows, lay)
    assert float(out[p["loss"]]) == 2.0
    assert float(out[p["activation"]]) == 3.0
    assert float(out[p["activation_grad"]]) == pytest.approx(2.5)
    # the same from autograd: a batch of two halves, loss = mean of the halves' losses
    y = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    halves = [(y[r] ** 2).sum() * (r + 1) for r in range(2)]
    (sum(halves) / 2).backward()
    local = [torch.autograd.grad((y[r] ** 2).sum() * (r + 1), y)[0][r] for r in range(2)]
    rows[:, p["activation_grad"]] = torch.stack([(g**2).sum() for g in local]).unsqueeze(1)
    assert float(to_series(rows, lay)[p["activation_grad"]]) == pytest.approx(float(y.grad.norm()))


def test_the_rank_behind_a_non_finite_total_grad_norm_is_the_first_with_a_bad_weight_gradient() -> None:
    """D2: the total grad norm is the series after a row's last column (index width, parts()'s
    grad_norm), which no rank logs: its culprit rank is the lowest whose weight-gradient entries hold a
    non-finite value; a block series' own column is read for every other series."""
    from stabilitycheck.distributed import Layout, nonfinite_rank

    lay = Layout(n_blocks=2)
    assert lay.parts()["grad_norm"] == slice(lay.width, lay.width + 1)
    grad = lay.parts()["gradient"].start + 1
    rows = [[1.0] * lay.width for _ in range(3)]
    rows[2][grad] = math.inf
    rows[1][0] = math.nan  # a loss column: not the total grad norm's
    assert nonfinite_rank(rows, lay, lay.width) == 2
    assert nonfinite_rank(rows, lay, 0) == 1
    assert nonfinite_rank(rows, lay, grad) == 2
    assert nonfinite_rank(rows, lay, 1) is None


def _grad_norm_worker(rank: int, out: str) -> None:
    """One of two gloo ranks holding the same plain (replicated, as under DDP) gradients: writes
    full_grad_norm and torch's own norm of the one copy."""
    from stabilitycheck.distributed import full_grad_norm

    dist.init_process_group("gloo", init_method=(Path(out) / "store").as_uri(), rank=rank, world_size=2)
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same values on both ranks: one gradient, replicated
    params: list[torch.Tensor] = [torch.nn.Parameter(torch.zeros(n, dtype=torch.float64)) for n in (3, 7)]
    for p in params:
        p.grad = torch.randn_like(p)
    got = full_grad_norm(params)
    want = float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
    Path(out, f"rank{rank}.json").write_text(json.dumps([got, want]))
    dist.destroy_process_group()


def test_the_full_grad_norm_counts_a_replicated_gradient_once(tmp_path: Path) -> None:
    """D3: a plain tensor's gradient is replicated on every rank (DDP), so each rank's squared norm is
    divided by the world size before the all_reduce: on two ranks with the same gradients the full
    norm is that gradient's norm (torch.nn.utils.get_total_norm of one copy), not sqrt(2) times it."""
    if not dist.is_available():
        pytest.skip("torch.distributed with gloo is not available here")
    spawn(_grad_norm_worker, args=(str(tmp_path),), nprocs=2, join=True)
    for rank in range(2):
        got, want = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got == pytest.approx(want, rel=1e-12)
