"""Devices, dtypes and mixed precision: overflow in float16 before float32, AMP with GradScaler."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from stabilitycheck import report, reporttable
from stabilitycheck.cli import main
from stabilitycheck.config import Config
from stabilitycheck.configprobe import probe
from stabilitycheck.culprit import culprit_of
from stabilitycheck.probing import probe_module
from stabilitycheck.searching import SearchResult, search
from stabilitycheck.seeds import assess
from stabilitycheck.space import Axis, Space
from stabilitycheck.subject import torch_dtype
from stabilitycheck.subjects import resolve
from stabilitycheck.verdicts import Limits, verdict

NONFINITE_ONLY = Limits(grad_norm=None, growth=None, divergence=None)


def linear_mlp(dtype: str) -> Space:
    # a linear MLP at sigma_w = 8 multiplies the forward signal by ~8 per layer: float16's range
    # (65504) runs out after ~5 layers, float32's (3.4e38) after ~40
    base = Config.of("mlp", activation="linear", width=16, batch_size=4, init_scale=8.0, dtype=dtype)
    return Space("mlp-linear", base, (Axis.range("depth", 1, 64),))


def test_float16_explodes_at_a_strictly_smaller_depth_than_float32() -> None:
    wide = search(linear_mlp("float32"), limits=NONFINITE_ONLY, max_examples=30)
    half = search(linear_mlp("float16"), limits=NONFINITE_ONLY, max_examples=30)
    assert wide.counterexample is not None and half.counterexample is not None
    assert half.counterexample.config.knob("depth") < wide.counterexample.config.knob("depth")
    # finite in float32 at that depth
    assert half.counterexample.judgement.verdict.names == ("overflow",)
    assert wide.counterexample.judgement.verdict.names == ("nonfinite",)
    # 1-minimal: one layer less is finite in its own dtype, judged over the same seeds
    for r in (wide, half):
        assert r.counterexample is not None
        cx = r.counterexample.config
        smaller = cx.with_knobs(depth=cx.knob("depth") - 1)
        assert not assess(smaller, limits=NONFINITE_ONLY).exploded
    text = report.text([wide, half])
    assert "float16" in text and "float32" in text and "overflow" in text
    assert {r.name: r.fixed for r in half.counterexample.remedies}["float32"] is True


def cli_results(tmp_path: Path, args: list[str]) -> tuple[int, list[dict[str, Any]]]:
    """Run the CLI with --json; its exit code and the results it wrote (structured, not the table)."""
    out = tmp_path / "results.json"
    code = main([*args, "--json", str(out), "--quiet"])
    data = json.loads(out.read_text())
    return code, data if isinstance(data, list) else data["results"]


def judged(result: dict[str, Any]) -> dict[str, Any]:
    """The Config a result row reports: its counterexample, else the largest stable one tried."""
    cx = result["counterexample"]
    config = cx["config"] if cx else result["largest_stable"]
    assert config is not None, result
    return config  # type: ignore[no-any-return]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_runs_end_to_end_through_the_cli(dtype: str, tmp_path: Path) -> None:
    # each family has its own knobs (an mlp has no seq_len, an rnn no depth): one search each
    rows = []
    for family, knob in [("mlp", "depth=1:12"), ("rnn", "seq_len=1:24")]:
        args = ["zoo", "--family", family, "--dtype", dtype, "--knob", knob]
        code, results = cli_results(tmp_path, [*args, "--max-examples", "10", "--database", "none"])
        assert code in (0, 1)
        rows += [(r["label"], judged(r)["run"]["device"], judged(r)["run"]["dtype"]) for r in results]
    assert rows == [("mlp", "cpu", dtype), ("rnn", "cpu", dtype)]


@pytest.mark.parametrize("family", ["mlp", "resmlp"])
def test_amp_gradscaler_skips_overflowing_steps_and_leaves_weights_unchanged(family: str) -> None:
    # At the initial loss scale 2**16 the scaled float16 gradients of this deep net overflow; the
    # scaler must skip those steps (scale halved, weights untouched: the next loss is identical). The
    # last step has no update after it: whether the scaler would skip it, one step more shows.
    knobs = {"norm": "post"} if family == "resmlp" else {}  # an mlp has no norm
    c = Config.of(family, **knobs, depth=24, width=16, init_scale=3.0, batch_size=4, steps=6, amp="float16")
    m = probe(c)
    assert m.first_nonfinite is None
    halved = [s for s in range(m.steps_run) if m.loss_scale[s + 1] == m.loss_scale[s] / 2]
    longer = probe(c.with_run(steps=c.run.steps + 1))
    last = longer.loss_scale[-1] == longer.loss_scale[-2] / 2
    assert m.skipped_steps == len(halved) + last and halved
    for s in halved:
        assert m.loss[s + 1] == m.loss[s]
        # every skipped step's grad_norm is its unscaled one (a re-run without the scaler), not the
        # overflow: the weights did not move, so the next step's gradient is the same
        assert m.grad_norm[s + 1] == pytest.approx(m.grad_norm[s], rel=1e-2)
    assert all(math.isfinite(x) for x in m.loss + m.layer_grad_norms + m.grad_norm)


def test_amp_bfloat16_on_cpu_has_no_loss_scale() -> None:
    m = probe(Config.of("mlp", depth=4, width=16, steps=2, amp="bfloat16"))
    assert m.loss_scale == () and m.skipped_steps == 0 and m.steps_run == 2


def test_amp_needs_float32_weights() -> None:
    with pytest.raises(ValueError, match="needs dtype='float32'"):
        Config.of("mlp", amp="float16", dtype="float16")


def test_cli_amp_flag_labels_the_precision(tmp_path: Path) -> None:
    _, results = cli_results(
        tmp_path,
        [
            "zoo",
            "--family",
            "mlp",
            "--amp",
            "--knob",
            "depth=1:8",
            "--max-examples",
            "5",
            "--database",
            "none",
        ],
    )
    [result] = results
    run = judged(result)["run"]
    assert (result["label"], run["device"], run["dtype"], run["amp"]) == ("mlp", "cpu", "float32", "bfloat16")
    space = Space("mlp", Config.from_dict(judged(result)), ())
    assert reporttable.row(SearchResult(space, None, 0, 0, 0.0, None))[2] == "amp:bfloat16"  # its label


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none on this machine")
def test_cuda_and_cpu_rows_side_by_side(tmp_path: Path) -> None:
    code, results = cli_results(
        tmp_path,
        [
            "zoo",
            "--family",
            "mlp",
            "--device",
            "all",
            "--knob",
            "depth=1:24",
            "--max-examples",
            "20",
            "--database",
            "none",
        ],
    )
    assert code in (0, 1)
    assert [judged(r)["run"]["device"] for r in results] == ["cpu", "cuda"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none on this machine")
def test_cuda_probe_matches_cpu_in_float64() -> None:
    c = Config.of("resmlp", norm="pre", depth=6, width=32, dtype="float64", steps=2)
    cpu, gpu = probe(c), probe(c.with_run(device="cuda"))
    assert gpu.growth == pytest.approx(cpu.growth, rel=1e-9)
    assert gpu.loss == pytest.approx(cpu.loss, rel=1e-9)


def test_bfloat16_attention_backward_nan_is_an_overflow_blamed_on_its_block() -> None:
    """Found by the rescaling property: in this norm-free transformer the attention scores of the last
    block reach ~1e10, and torch's fused CPU attention backward in bfloat16 turns them into NaN
    (its math kernel, and float32, stay finite). The probe names it `overflow`, culprit the block
    whose backward made the NaN (layers.4: the first NaN is dL/d(output of layers.3)). Whether the
    kernel makes it depends on the CPU (one with AVX512-BF16 and AMX stays finite): the oracle is
    torch's own backward of the same model, on this machine; where it stays finite, so must the
    probe."""
    from stabilitycheck.zoo import Family

    c = Config.of(
        "transformer", depth=5, width=8, init_scale=2.0, seq_len=1, activation="relu",
        dtype="bfloat16", batch_size=1, seed=1,
    )  # fmt: skip
    built = Family("transformer").build(c)
    built.loss_fn(built.model(built.inputs), built.inputs).backward()
    finite = all(p.grad is None or bool(p.grad.isfinite().all()) for p in built.model.parameters())
    m = probe(c)
    if finite:
        assert m.first_nonfinite is None and math.isfinite(m.grad_norm[0])
        return
    assert m.first_nonfinite is not None
    assert (m.first_nonfinite.layer, m.first_nonfinite.tensor) == ("layers.3", "activation_grad")
    assert verdict(m).names == ("overflow",)
    assert culprit_of([m]) == "layers.4"
    wide = probe(c.with_run(dtype="float32"))
    assert wide.first_nonfinite is None and math.isfinite(wide.grad_norm[0])


def test_a_step_0_whose_scaled_gradients_overflow_reports_the_unscaled_norm_and_a_skip() -> None:
    """float16 autocast with GradScaler on the CPU: at the initial scale 65536 the scaled gradients of a
    51-block tanh MLP overflow, so the scaler skips the step. Its gradient norm is the unscaled one
    (oracle: the float32 run's, within 10%; it was NaN, so the grad_norm limit could never fire) and
    the step is counted as skipped, at steps=0 as at steps=3."""
    c = Config.of("mlp", depth=51, init_scale=1.5, width=32, activation="tanh", batch_size=8, amp="float16")
    wide = probe(c.with_run(amp="none")).grad_norm[0]
    for steps, skipped in ((0, 1), (3, 3)):
        m = probe(c.with_run(steps=steps))
        assert m.loss_scale[0] == 65536.0 and m.skipped_steps == skipped and m.first_nonfinite is None
        assert m.grad_norm[0] == pytest.approx(wide, rel=0.1)


def test_the_detail_heading_names_the_autocast_precision_as_the_table_does() -> None:
    """Under amp the weights stay float32; the table said amp:bfloat16 and the heading below it
    [cpu, float32]. Both now say amp:bfloat16."""
    from stabilitycheck.counterexample import Counterexample

    c = Config.of("mlp", depth=12, width=8, batch_size=4, init_scale=4.0, activation="tanh", amp="bfloat16")
    cx = Counterexample("mlp", c, assess(c), Limits(), ())  # the report's input, not a search's luck
    text = report.text([SearchResult(Space("mlp", c, ()), cx, 1, 1, 0.0, None)])
    assert "mlp [cpu, amp:bfloat16]:" in text and "[cpu, float32]" not in text


def test_device_all_without_cuda_says_it_runs_on_the_cpu_only(capsys: pytest.CaptureFixture[str]) -> None:
    """--device all on a machine without CUDA: CPU rows only, and a note saying why (it was silent)."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device all runs both")
    args = ["zoo", "--family", "mlp", "--device", "all", "--knob", "depth=1:4", "--max-examples", "3"]
    assert main([*args, "--database", "none", "--quiet", "--seeds", "1"]) in (0, 1)
    out, err = capsys.readouterr()
    assert "note: --device all: no CUDA device on this machine, CPU only" in err
    assert "cuda" not in out.split("\n", 2)[2]  # no CUDA row under the table's header


def test_a_gradient_float16_cannot_hold_even_unscaled_is_an_overflow_under_amp() -> None:
    """Depth 64, sigma 4: the float16 backward overflows at loss scale 1 too, not only at 65536. The
    scaler would skip step after step; that is a finding, the overflow criterion (float32 stays
    finite: the oracle), where it read as a skipped step with NaN growth and no criterion, so the
    zoo's --amp float16 search could not start from its top corner (it reported depth 51, not 13)."""
    c = Config.of("mlp", depth=64, init_scale=4.0, width=32, activation="tanh", batch_size=8, amp="float16")
    assert probe(c.with_run(amp="none")).first_nonfinite is None
    m = probe(c)
    assert m.overflow is not None and m.overflow.tensor == "activation_grad"
    assert verdict(m).names == ("overflow",)


def test_norms_of_large_cpu_tensors_are_exact_to_float32_rounding() -> None:
    """torch's float32 norm on the CPU loses 1e-5 relative at 1M elements and 2e-3 at 33M (found by a
    trial on hf:xlm and hf:qwen3_next). Oracle: float64 norms of the same tensors, and of torch's own
    gradients in a probe of a model with an 8.4M-element weight."""
    from torch import nn

    from stabilitycheck.norms import fused_norms, norm
    from stabilitycheck.probing import probe_module

    def exact(t: torch.Tensor) -> float:
        return float(torch.linalg.vector_norm(t, dtype=torch.float64))

    big = torch.randn(1 << 23, generator=torch.Generator().manual_seed(0))
    assert abs(float(torch.linalg.vector_norm(big)) / exact(big) - 1) > 1e-5  # torch's own: not vacuous
    assert float(norm(big)) == pytest.approx(exact(big), rel=1e-6)
    assert float(fused_norms([big, big[:100]], exact=False)[0]) == pytest.approx(exact(big), rel=1e-6)
    odd = big[: (1 << 23) - 7]  # a tail shorter than a piece
    assert float(norm(odd)) == pytest.approx(exact(odd), rel=1e-6)
    square = big.view(1 << 11, 1 << 12)
    channels_last = big.view(2, 16, 512, 512).to(memory_format=torch.channels_last)
    for strided in (square.t(), big[::2], channels_last, big.view(2, -1)[:, ::2], big.view(-1, 2).t()):
        assert float(norm(strided)) == pytest.approx(exact(strided), rel=1e-6)  # a reviewer's cases
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4096, 2048), nn.Tanh(), nn.Linear(2048, 4))
    m = probe_module(model, torch.randn(2, 4096), lambda out, _: out.pow(2).sum())
    grads = torch.cat([p.grad.reshape(-1) for p in model[0].parameters() if p.grad is not None])
    assert m.layer_grad_norms[0] == pytest.approx(exact(grads), rel=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize(
    ("family", "knobs"),
    [
        ("mlp", {"depth": 2}),
        ("resmlp", {"depth": 2, "norm": "pre"}),
        ("rnn", {"seq_len": 3}),
        ("lstm", {"seq_len": 3}),
        ("gru", {"seq_len": 3}),
        ("transformer", {"depth": 1, "norm": "post", "seq_len": 3}),
    ],
)
def test_a_zoo_build_in_a_reduced_dtype_is_the_float64_build_rounded(
    family: str, knobs: dict[str, Any], dtype: str
) -> None:
    """Every zoo draw is made in float64 whatever the run's dtype, so a build in another dtype holds
    the float64 build's weights and inputs rounded to it, parameter by parameter."""
    config = Config.of(family, width=8, batch_size=2, init_scale=1.5, seed=3, **knobs)
    wide = resolve(family).build(config.with_run(dtype="float64"))
    narrow = resolve(family).build(config.with_run(dtype=dtype))
    want = torch_dtype(dtype)
    pairs = list(zip(wide.model.named_parameters(), narrow.model.named_parameters(), strict=True))
    assert pairs
    for (name, p64), (other, p) in pairs:
        assert name == other and p.dtype == want
        assert torch.equal(p, p64.to(want))
    assert torch.equal(narrow.inputs, wide.inputs.to(want))


@pytest.mark.parametrize(("scale", "overflow"), [(1e3, True), (1e12, False)])
def test_a_float16_failure_is_an_overflow_only_where_float32_holds_that_step(
    scale: float, overflow: bool
) -> None:
    """A float16 run non-finite at step 0 is an overflow of float16 only where float32 stays finite
    there; where float32 goes non-finite at the same step, the model's own (a mutant taking the same
    step as float16's alone passed every test, found by mutation testing). Oracle: torch's float32
    forward and backward of the same Config, finite or not."""
    config = Config.of("mlp", depth=4, width=8, batch_size=4, init_scale=scale, activation="relu")
    built = resolve("mlp").build(config.with_run(seed=config.run.seed))
    torch.manual_seed(config.run.seed)
    loss = built.loss_fn(built.model(built.inputs), built.inputs)
    grads = torch.autograd.grad(loss, list(built.model.parameters()))
    finite32 = bool(loss.isfinite()) and all(bool(g.isfinite().all()) for g in grads)
    assert finite32 is overflow
    m = probe(config.with_run(dtype="float16"))
    assert m.first_nonfinite is not None and m.first_nonfinite.step == 0
    assert (m.overflow is not None) is overflow


def test_a_step_the_scaler_skips_reads_its_unscaled_gradient_norm() -> None:
    """Under amp='float16' the loss scale 65536 overflows this model's float16 backward at step 0 (the
    scaler skips it): the total norm is the unscaled float64-norm re-run's, finite, not the overflowed
    one (a mutant reading it passed every test, found by mutation testing). Oracle: torch's float32
    gradient norm of the same step, within float16's rounding."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(8, 8) for _ in range(3)))
    x = torch.randn(4, 8) * 30

    def loss(out: torch.Tensor, _: Any) -> torch.Tensor:
        return out.float().square().sum()

    m = probe_module(model, x, loss, blocks=[(str(i), model[i]) for i in range(3)], amp="float16")
    grads = torch.autograd.grad(loss(model(x), x), list(model.parameters()))
    want = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
    assert m.skipped_steps == 1 and m.first_nonfinite is None  # the scaled step overflowed, no finding
    assert m.grad_norm[0] == pytest.approx(want, rel=1e-2)


TF32_CASES = """
import json, sys
import torch
from torch import nn
from stabilitycheck.probing import tf32_allowed

cuda, cpu = torch.device("cuda"), torch.device("cpu")
mlp, conv, lstm = nn.Sequential(nn.Linear(2, 2)), nn.Sequential(nn.Conv2d(2, 2, 3)), nn.LSTM(2, 2)
def read():
    models = (("mlp", mlp), ("conv", conv), ("lstm", lstm))
    return {name: tf32_allowed(list(m.modules()), cuda) for name, m in models}
out = {"defaults": read(), "cpu": tf32_allowed(list(conv.modules()), cpu)}
torch.backends.cudnn.conv.fp32_precision = "ieee"
out["conv ieee"] = read()
torch.backends.cudnn.conv.fp32_precision = "tf32"
torch.backends.cudnn.enabled = False  # no cuDNN: convolutions and recurrences run torch's own kernels
out["cudnn off"] = read()
torch.backends.cuda.matmul.fp32_precision = "tf32"  # torch's allow_tf32 read raises from here on
out["matmul tf32"] = read()
json.dump(out, sys.stdout)
"""


@pytest.mark.skipif(
    not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch without fp32_precision settings"
)
def test_tf32_is_read_from_torchs_precision_settings_without_raising() -> None:
    """Measurement.allow_tf32 on CUDA: reading torch.backends.cuda.matmul.allow_tf32 raised once TF32
    was set through torch's fp32_precision settings (after the whole run), and cuDNN, TF32 by
    default, ran a conv stack's convolutions in TF32 while allow_tf32 read False (and read True with
    cuDNN disabled, where they run torch's own kernels: a review). Oracle: torch's own
    settings, set one by one in a process of their own (they are global)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", TF32_CASES], capture_output=True, text=True, check=True)
    got = json.loads(done.stdout)
    assert got["defaults"] == {"mlp": False, "conv": True, "lstm": True}  # cuDNN's TF32 is on by default
    assert got["cpu"] is False
    assert got["conv ieee"] == {"mlp": False, "conv": False, "lstm": True}
    assert got["cudnn off"] == {"mlp": False, "conv": False, "lstm": False}
    assert got["matmul tf32"] == {"mlp": True, "conv": True, "lstm": True}
