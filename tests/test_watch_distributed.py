"""watch() under torch.distributed: 2 ranks on the CPU (gloo), DDP and FSDP2 `fully_shard`, against
the same model trained in one process on the whole batch (float64, so rounding stays far below the
1e-6 asked). Also: one collective per flush, none per step; the rank of a NaN named; and the
clip_grad_norm_ invariant, which a local-shard norm fails."""

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
from watch_models import MLP, Fault, batch, compute_loss

from stabilitycheck import distributed
from stabilitycheck.errors import StabilityError
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
) -> Watcher:
    """STEPS SGD steps on the whole batch (rank None) or on this rank's half of it; with `passed`,
    the loss is given to w.loss() on rank 0 alone and kept there in `passed`."""
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
    torch.manual_seed(0)
    result["rank0_losses"] = losses = []
    log = Path(out) / "rank0.jsonl" if rank == 0 else None
    _run(DistributedDataParallel(MLP(depth=3).double()), log, rank, passed=losses)
    loss = compute_loss(model, tuple(t[rank * HALF : (rank + 1) * HALF] for t in _data(0, model)))
    loss.backward()
    params = list(model.parameters())
    result["clip"] = distributed.check_clip_grad_norm(params)
    local = torch.linalg.vector_norm(torch.stack([p.grad.to_local().norm() for p in params]))  # type: ignore[union-attr]
    real_clip = torch.nn.utils.clip_grad_norm_
    torch.nn.utils.clip_grad_norm_ = lambda *_a, **_k: local  # a clip that forgets the other shards
    try:
        distributed.check_clip_grad_norm(params)
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


def test_a_loss_passed_on_one_rank_alone_is_that_ranks_loss(ranks: Any) -> None:
    """Logging on rank 0 alone (a common habit): the loss read half of rank 0's, the other rank's
    missing loss counted as 0 in a mean over both ranks (found by a trial). The mean is over the
    ranks that passed one."""
    out, results = ranks
    rows = _rows(out / "rank0.jsonl")
    assert [r["loss_passed"] for r in rows] == [True] * STEPS
    assert [r["loss"] for r in rows] == pytest.approx(results[0]["rank0_losses"], rel=1e-12)
