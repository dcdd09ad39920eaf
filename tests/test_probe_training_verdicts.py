"""The probe's runs and verdicts: determinism, JSON round trip, training against plain torch
(warmup, clipping), its settings and usage errors, and each criterion's value and bound."""

from __future__ import annotations

import copy
import json
import math
import re
from typing import Any

import pytest
import torch
from probe_models import _blocks, _Chain, _loss, build, zoo
from torch import nn

from stabilitycheck.config import FAMILIES, Config
from stabilitycheck.configprobe import probe
from stabilitycheck.errors import UsageError
from stabilitycheck.probing import Measurement, probe_module
from stabilitycheck.verdicts import Limits, values, verdict


@pytest.mark.parametrize("family", FAMILIES)
def test_same_config_gives_bit_identical_measurements(family: str) -> None:
    c = zoo(family, norm="pre", depth=3, width=16, seq_len=6, batch_size=4, steps=3, optimizer="adam")
    assert probe(c) == probe(c)


@pytest.mark.parametrize("family", FAMILIES)
def test_measurement_json_round_trip(family: str) -> None:
    m = probe(zoo(family, depth=2, width=8, seq_len=3, batch_size=2, steps=1))
    assert Measurement.from_dict(json.loads(json.dumps(m.to_dict()))) == m


@pytest.mark.parametrize("max_norm", [1e-3, 0.5, 1e6])
def test_clipped_training_matches_clip_grad_norm(max_norm: float) -> None:
    c = Config.of("mlp", depth=4, width=16, init_scale=2.0, steps=3, lr=0.5, clip=max_norm)
    built = build(c)
    reference = copy.deepcopy(built.model)
    probe_module(
        built.model, built.inputs, built.loss_fn, blocks=built.blocks, steps=3, lr=0.5, clip=max_norm
    )
    opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        built.loss_fn(reference(built.inputs), built.inputs).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)
        opt.step()
    for ours, theirs in zip(built.model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs)


def test_deep_tanh_at_sigma_3_is_flagged_by_growth_and_at_sigma_1_is_not() -> None:
    for family, norm in [("mlp", "none"), ("resmlp", "post"), ("resmlp", "none")]:
        hot = verdict(probe(zoo(family, norm=norm, depth=32, width=128, init_scale=3.0)))
        assert "growth" in hot.names, (family, norm, hot)
        cool = verdict(probe(zoo(family, norm=norm, depth=8, width=128, init_scale=1.0)))
        assert not cool.exploded, (family, norm, cool)


def test_usage_errors_are_one_line_messages() -> None:
    x = torch.randn(2, 3)
    with pytest.raises(UsageError, match="no parameters that require grad"):
        probe_module(nn.ReLU(), x, lambda out, _: out.sum())
    with pytest.raises(UsageError, match="float tensor, got a tensor of dtype float32 and shape \\(2, 3\\)"):
        probe_module(nn.Linear(3, 3), x, lambda out, _: out)
    with pytest.raises(UsageError, match="does not require grad"):
        probe_module(nn.Linear(3, 3), x, lambda out, _: out.detach().sum())
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available"):
            probe(Config.of("mlp", device="cuda"))


def test_verdict_criteria_and_limits() -> None:
    m = probe(Config.of("mlp", depth=3, width=8, steps=2))
    assert not verdict(m).exploded
    tight = verdict(m, Limits(grad_norm=1e-9, growth=1e-9, divergence=1e-9))
    assert tight.names == ("grad_norm", "growth", "divergence")
    # vanishing fires when growth < 1 / limit
    assert verdict(m, Limits(vanishing=0.5 / m.growth)).names == ("vanishing",)
    assert verdict(m, Limits(vanishing=2.0 / m.growth)).names == ()
    with pytest.raises(ValueError, match=r"Limits\.growth=-1"):
        Limits(growth=-1)
    with pytest.raises(ValueError, match=r"Limits\.stall=0 must be a number > 0"):
        Limits(stall=0)  # a 0 bound is no limit: "off" is None


def test_stall_fires_when_the_loss_barely_moves_and_is_off_by_default() -> None:
    frozen = probe(Config.of("mlp", depth=3, width=16, steps=5, lr=1e-6))  # the loss cannot move at lr 1e-6
    learning = probe(Config.of("mlp", depth=3, width=16, steps=5, lr=0.5, optimizer="sgd"))
    assert frozen.loss[-1] / frozen.loss[0] > 0.999
    assert verdict(frozen).names == ()
    assert verdict(frozen, Limits(stall=0.99)).names == ("stall",)
    assert learning.loss[-1] < 0.99 * learning.loss[0]
    assert "stall" not in verdict(learning, Limits(stall=0.99)).names


@pytest.mark.parametrize(
    ("options", "said"),
    [
        (
            {"optimizer": "Adam", "steps": 2},
            "optimizer='Adam' is not allowed; expected one of ('sgd', 'adam') (did you mean 'adam'?)",
        ),  # ran SGD, silently
        (
            {"optimizer": "adamw", "steps": 2},
            "optimizer='adamw' is not allowed; expected one of ('sgd', 'adam')",
        ),
        (
            {"amp": "fp16"},
            "amp='fp16' is not allowed; expected one of ('none', 'bfloat16', 'float16')",
        ),  # ran float32, silently
        ({"clip": -1.0, "steps": 1}, "clip must be None or a finite number > 0, got -1.0"),  # reversed
        ({"steps": -1}, "steps must be >= 0, got -1"),  # UnboundLocalError from inside the probe
        ({"steps": 1.5}, "steps must be a whole number, got 1.5"),
        ({"steps": True}, "steps must be a whole number, got True"),  # ran one step, silently
        ({"lr": "x", "steps": 1}, "lr must be a finite number >= 0, got 'x'"),
    ],
)
def test_probe_module_refuses_training_settings_a_config_refuses(options: dict, said: str) -> None:
    built = build(zoo("mlp", depth=2))
    with pytest.raises(UsageError, match=re.escape(f"probe_module: {said}")) as caught:
        probe_module(built.model, built.inputs, built.loss_fn, **options)
    assert "\n" not in str(caught.value)
    with pytest.raises(UsageError, match="the first argument must be the model"):
        probe_module(built.inputs, built.model, built.loss_fn)  # type: ignore[arg-type]


def test_probe_module_takes_what_torch_takes_for_its_settings() -> None:
    """The settings' check first imposed a Config's limits on a plain module (found in review): a
    64-bit seed, numpy counts and rates, and lr 0 (a probe that does not move the weights) all ran
    before it and run again."""
    import numpy as np

    built = build(zoo("mlp", depth=2))
    for options in (
        {"seed": 2**40},
        {"seed": np.int64(3), "steps": np.int64(1)},
        {"steps": 1, "lr": np.float32(0.01), "clip": np.float32(1.0)},
        {"steps": 1, "lr": 0.0},
    ):
        m = probe_module(built.model, built.inputs, built.loss_fn, **options)
        assert m.steps_run == int(options.get("steps", 0)) and math.isfinite(m.growth)


@pytest.mark.parametrize(("warmup", "clip"), [(3, None), (4, 0.05)])
def test_training_with_warmup_and_clipping_matches_plain_torch(warmup: int, clip: float | None) -> None:
    """Oracle: a plain torch loop on a copy of the model: SGD whose lr at step k is lr x min(1, (k + 1) /
    warmup) (LambdaLR), after torch.nn.utils.clip_grad_norm_. Every step's loss and total gradient norm
    (float64 norms of torch's gradients), the weights after the last step, the per-block weight norms
    and the step-0 per-block gradient and activation norms (forward hooks, retain_grad) all match."""
    c = Config.of("mlp", depth=4, width=16, init_scale=2.0, steps=5, lr=0.5)
    built = build(c)
    reference = copy.deepcopy(built.model)
    m = probe_module(
        built.model,
        built.inputs,
        built.loss_fn,
        blocks=built.blocks,
        steps=5,
        lr=0.5,
        clip=clip,
        warmup=warmup,
    )
    opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / warmup))
    blocks = [dict(reference.named_modules())[name] for name, _ in built.blocks]
    losses, totals = [], []
    outs: list[torch.Tensor] = []

    def keep(module: nn.Module, args: Any, out: torch.Tensor) -> None:
        out.retain_grad()
        outs.append(out)

    for step in range(6):
        opt.zero_grad()
        outs.clear()
        hooks = [b.register_forward_hook(keep) for b in blocks]
        loss = built.loss_fn(reference(built.inputs), built.inputs)
        for h in hooks:
            h.remove()
        loss.backward()
        grads = [p.grad for p in reference.parameters() if p.grad is not None]
        losses.append(float(loss.detach()))
        totals.append(float(torch.linalg.vector_norm(torch.cat([g.double().reshape(-1) for g in grads]))))
        if step == 0:
            per_block = [
                float(
                    torch.linalg.vector_norm(torch.cat([p.grad.double().reshape(-1) for p in b.parameters()]))
                )
                for b in blocks
            ]
            forward = [float(torch.linalg.vector_norm(o.detach().double())) for o in outs]
            backward = [float(torch.linalg.vector_norm(o.grad.double())) for o in outs]
        if step == 5:
            break
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(reference.parameters(), clip)
        opt.step()
        sched.step()
    assert m.steps_run == 5
    assert m.loss == pytest.approx(losses, rel=1e-5)
    assert m.grad_norm == pytest.approx(totals, rel=1e-5)
    assert m.layer_grad_norms == pytest.approx(per_block, rel=1e-5)
    assert m.activation_norms[1:] == pytest.approx(forward, rel=1e-5)
    assert m.activation_grad_norms[1:] == pytest.approx(backward, rel=1e-5)
    assert m.chain_starts == () and m.chain_growths == ()  # one chain: its growth is the growth
    for ours, theirs in zip(built.model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs)
    weights = [
        float(torch.linalg.vector_norm(torch.cat([p.detach().double().reshape(-1) for p in b.parameters()])))
        for b in blocks
    ]
    assert m.weight_norms == pytest.approx(weights, rel=1e-6)
    assert probe_module(built.model, built.inputs, built.loss_fn, blocks=built.blocks).weight_norms == ()


def measured(**fields: Any) -> Measurement:
    """A Measurement of a 3-block stack with the given fields (the rest of a finite, flat run)."""
    base: dict[str, Any] = {
        "layer_names": ("a", "b", "c"),
        "activation_names": ("(input)", "a", "b", "c"),
        "loss": (1.0,),
        "grad_norm": (1.0,),
        "layer_grad_norms": (1.0, 1.0, 1.0),
        "activation_norms": (1.0, 1.0, 1.0, 1.0),
        "activation_grad_norms": (1.0, 1.0, 1.0, 1.0),
        "gains": (1.0, 1.0, 1.0),
        "growth": 1.0,
        "weight_norms": (),
        "first_nonfinite": None,
        "steps_run": len(fields.get("loss", (1.0,))) - 1,
    }
    return Measurement(**(base | fields))


def test_each_criterion_reads_its_documented_value_and_bound() -> None:
    """Oracle: the definitions in Limits' docstring, by hand. grad_norm is the peak over the steps (an
    unscaled Inf counts, a GradScaler's skipped Inf does not); divergence and stall are the last over
    the first loss, from one step on; vanishing reads the smallest of the chains and their product and
    fires strictly below 1/limit; a finding float32 does not make is overflow, not nonfinite; each
    limit is passed strictly, and the defaults are 1e3, 1e2 and 2."""
    from stabilitycheck.measurement import NonFinite

    assert values(measured(grad_norm=(2.0, 50.0, 7.0), loss=(1.0, 2.0, 3.0)))["grad_norm"] == 50.0
    assert values(measured(grad_norm=(2.0, math.inf)))["grad_norm"] == math.inf
    assert values(measured(grad_norm=(2.0, math.inf), loss_scale=(1.0, 2.0)))["grad_norm"] == 2.0
    two = values(measured(loss=(2.0, 5.0)))
    assert two["divergence"] == two["stall"] == 2.5
    assert math.isnan(values(measured())["divergence"])
    three = values(measured(loss=(2.0, 8.0, 5.0)))  # the last over the first, not over the one before
    assert three["divergence"] == three["stall"] == 2.5
    chains = measured(growth=50.0, chain_growths=(50.0, 0.1), chain_starts=(2,))
    assert values(chains)["vanishing"] == pytest.approx(0.1)
    assert values(measured(growth=0.5, chain_growths=(0.5, 0.2), chain_starts=(2,)))["vanishing"] == 0.1
    assert verdict(measured(growth=0.01), Limits(vanishing=100.0)).names == ()  # 0.01 is not < 1/100
    assert verdict(measured(growth=0.0099), Limits(vanishing=100.0)).names == ("vanishing",)
    nf = NonFinite(0, "b", "activation", math.inf)
    both = verdict(measured(first_nonfinite=nf, overflow=nf))
    assert both.names == ("overflow",) and both.criteria[0].limit == math.inf
    alone = verdict(measured(first_nonfinite=nf))
    assert alone.names == ("nonfinite",) and alone.criteria[0].limit == math.inf
    assert verdict(measured(first_nonfinite=nf), Limits(nonfinite=False)).names == ()
    at = measured(growth=100.0, grad_norm=(1000.0,), loss=(1.0, 2.0))
    assert verdict(at).names == ()  # every value exactly at its default limit
    over = measured(growth=100.0001, grad_norm=(1000.001,), loss=(1.0, 2.0001))
    assert verdict(over).names == ("grad_norm", "growth", "divergence")
    assert [c.limit for c in verdict(over).criteria] == [1e3, 1e2, 2.0]
    # a point that vanishes and nothing else vanishes; one chain growing beside another vanishing explodes
    fading = verdict(measured(growth=0.001), Limits(vanishing=100.0))
    split = measured(growth=500.0, chain_growths=(500.0, 1e-6), chain_starts=(2,))
    assert fading.how == "vanishes" and verdict(split, Limits(vanishing=100.0)).how == "explodes"
    assert verdict(split, Limits(vanishing=100.0)).names == ("growth", "vanishing")


def test_steps_run_and_weight_norms_follow_the_steps() -> None:
    model, x = _Chain(scale=0.5), torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    m0 = probe_module(model, x, _loss, blocks=_blocks(model))
    assert m0.steps_run == 0 and len(m0.loss) == 1 and m0.weight_norms == ()
    m2 = probe_module(model, x, _loss, blocks=_blocks(model), steps=2)
    assert m2.steps_run == 2 and len(m2.loss) == 3 and len(m2.weight_norms) == 4
