"""Replay bundles: `stabilitycheck replay DIR` re-runs the first flagged step and reproduces its norms."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from watch_models import PreNorm, compute_loss, report_of, train

from stabilitycheck.cli import main
from stabilitycheck.replay import replay


def _bundle(path: Path) -> int:
    torch.manual_seed(0)
    w = train(
        PreNorm(depth=3), 52, bad_batch=(48, 50.0), bundle=path, compute_loss=compute_loss, flush_every=16
    )
    first = report_of(w).first_spike
    assert first is not None and (first.step, first.block) == (48, "blocks.0")
    return first.step


def test_replay_reproduces_the_flagged_steps_norms(tmp_path: Path, capsys: object) -> None:
    step = _bundle(tmp_path / "bundle")
    result = replay(tmp_path / "bundle")
    assert result.step == step and result.mismatches(1e-6) == []
    assert sum(math.isfinite(v) and v > 0 for v in result.replayed) > 10  # real norms were compared
    assert main(["replay", str(tmp_path / "bundle")]) == 0


def test_a_bundle_whose_norms_differ_is_exit_1(tmp_path: Path) -> None:
    _bundle(tmp_path / "bundle")
    meta_path = tmp_path / "bundle" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["values"][2] *= 1 + 1e-5  # one block's output norm, off by 1e-5
    meta_path.write_text(json.dumps(meta))
    assert main(["replay", str(tmp_path / "bundle")]) == 1


def test_a_missing_bundle_is_a_one_line_usage_error(tmp_path: Path, capsys: object) -> None:
    assert main(["replay", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err  # type: ignore[attr-defined]
    assert err.startswith("stabilitycheck: error: replay") and err.count("\n") == 1
