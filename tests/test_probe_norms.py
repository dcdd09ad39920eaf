"""The probe's norms against float64 and torch's own: totals, per-block and weight-gradient norms,
squares out of float range, sparse tensors, and output gradients unscaled under AMP's GradScaler."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from probe_models import F64, _blocks, _Chain, _loss, _square_mean, build
from torch import nn

from stabilitycheck import norms
from stabilitycheck.config import Config
from stabilitycheck.configprobe import probe
from stabilitycheck.probing import probe_module
from stabilitycheck.subjects import resolve


def test_total_and_per_block_norms_match_torch() -> None:
    built = build(Config.of("resmlp", norm="post", depth=5, width=32, init_scale=1.3))
    m = probe_module(built.model, built.inputs, built.loss_fn, blocks=built.blocks)
    model = built.model
    model.zero_grad()
    built.loss_fn(model(built.inputs), built.inputs).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert m.grad_norm[0] == pytest.approx(float(torch.nn.utils.get_total_norm(grads)), rel=1e-5)
    for (_, block), norm in zip(built.blocks, m.layer_grad_norms, strict=True):
        block_grads = [p.grad for p in block.parameters() if p.grad is not None]
        assert norm == pytest.approx(float(torch.nn.utils.get_total_norm(block_grads)), rel=1e-5)
    assert m.growth == pytest.approx(math.prod(m.gains), rel=1e-9)


@pytest.mark.parametrize(("factor", "loss_scale"), [(1e20, 1e22), (1e-22, 1e-25)])
def test_huge_and_tiny_finite_norms_are_measured_exactly(factor: float, loss_scale: float) -> None:
    """Oracle: float64 torch.linalg.vector_norm of the same float32 tensors. Block 1's output x1e20
    and the loss x1e22 (float32 squares overflow), or x1e-22 and x1e-25 (subnormal squares): every
    norm is finite and exact, as it is for norms of ordinary size."""
    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3)])
    net[1].register_forward_hook(lambda module, args, out: out * factor)
    x = torch.randn(16, 8)
    blocks = [(str(b), net[b]) for b in range(3)]
    m = probe_module(net, x, lambda out, _: loss_scale * out.square().mean(), blocks=blocks)
    outs, h = [], x.clone().requires_grad_()
    entry = h
    for b in range(3):
        h = net[b](h)
        outs.append(h)
    grads = torch.autograd.grad(loss_scale * h.square().mean(), [entry, *outs])
    expect_out = [float(torch.linalg.vector_norm(t.detach().double())) for t in [x, *outs]]
    expect_grad = [float(torch.linalg.vector_norm(g.double())) for g in grads]
    assert m.first_nonfinite is None
    assert m.activation_norms == pytest.approx(expect_out, rel=1e-6, abs=0)
    assert m.activation_grad_norms == pytest.approx(expect_grad, rel=1e-6, abs=0)
    net.zero_grad()
    (loss_scale * net(x).square().mean()).backward()
    weight_grads = [torch.cat([p.grad.double().reshape(-1) for p in net[b].parameters()]) for b in range(3)]
    assert m.layer_grad_norms == pytest.approx([float(g.norm()) for g in weight_grads], rel=1e-6, abs=0)
    extreme = [v for v in (*m.activation_norms, *m.activation_grad_norms) if v > 1.8e19 or 0 < v < 1e-19]
    assert len(extreme) >= 2  # the ranges float32 squares cannot hold were measured


def test_norm_values_stacked_and_fused_equal_float64_norms() -> None:
    """Oracle: float64 torch.linalg.vector_norm of each tensor. 70 float32 tensors of one shape (a
    recurrent cell's outputs: normed as one stack) and 64 bfloat16 ones (another), at magnitudes whose float32
    squares overflow or go subnormal, mixed with tensors of other shapes (one fused call), after two
    head scalars of different dtypes: every value exact to float32 rounding, in the given order."""
    gen = torch.Generator().manual_seed(0)
    scales = [1.0, 1e20, 1e-22, 3e-3, 1e30]

    def tensor(shape: tuple[int, ...], scale: float, dtype: torch.dtype) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    tensors = [tensor((4, 8), scales[i % 5], torch.float32) for i in range(70)]
    tensors += [tensor((3,), scales[i % 5], torch.bfloat16) for i in range(64)]
    tensors += [tensor((5, 2), s, torch.float32) for s in scales] + [tensor((7,), 1e100, torch.float64)]
    order = torch.randperm(len(tensors), generator=gen).tolist()
    tensors = [tensors[i] for i in order]  # the groups interleaved
    where = {old: new for new, old in enumerate(order)}
    groups = [
        [where[i] for i in range(70)],
        [where[i] for i in range(70, 134)],
        [where[i] for i in range(134, 140)],
    ]
    groups.append(
        [where[i] for i in range(60, 74)] + [where[i] for i in range(74, 134)]
    )  # shapes differ: fused
    head = [torch.tensor(2.5, dtype=torch.bfloat16), torch.tensor(1e300, dtype=torch.float64)]
    got = norms.norm_values(tensors, False, head, groups[:2])
    fused = norms.norm_values(tensors, False, head, groups[2:])  # no stack there
    assert fused == pytest.approx(got, rel=1e-6, abs=0)
    assert got[:2] == [2.5, 1e300]
    expect = [float(torch.linalg.vector_norm(t.double())) for t in tensors]
    assert got[2:] == pytest.approx(expect, rel=1e-6, abs=0)
    assert norms.norm_values(tensors, True)[:3] == pytest.approx(expect[:3], rel=1e-12, abs=0)


def test_norms_on_cuda_sum_float32_and_bfloat16_in_float64() -> None:
    """The accumulator contract (no device needed: it is a choice of dtype): on CUDA, whose fused norm
    sums in its output dtype at memory-bound cost, float32 and bfloat16 tensors (squares can leave
    float32's range) are summed in float64; float16 in float32 (its squares cannot); on the CPU in
    float32, refined after (norms.refine); float64 always, and everything when exact."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert [norms.accumulator(d, False, cuda) for d in (torch.float32, torch.bfloat16, torch.float16)] == [
        torch.float64,
        torch.float64,
        torch.float32,
    ]
    assert norms.accumulator(torch.float32, False, cpu) == norms.accumulator(torch.bfloat16, False, cpu)
    assert norms.accumulator(torch.float32, False, cpu) == torch.float32
    assert norms.accumulator(torch.float64, False, cpu) == norms.accumulator(torch.float16, True, cpu)
    assert norms.accumulator(torch.float64, False, cpu) == torch.float64


def test_output_gradients_under_a_gradscaler_are_the_unscaled_ones() -> None:
    """Oracle: dL/d(output) of each block (forward hooks, retain_grad) in a float32 run of the same
    model without autocast; float16 autocast under a GradScaler (scale 65536, a step it does not skip)
    gives the same norms to float16 precision (2%), not x65536 or /65536, and its total gradient norm
    too. The loss is taken in float32 (a float16 loss x65536 overflows: a skipped step, re-run unscaled)."""
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(3)))
    x = torch.randn(8, 16)
    blocks = list(model.named_children())
    m = probe_module(model, x, lambda o, _: o.float().square().mean(), blocks=blocks, amp="float16")
    assert m.loss_scale == (65536.0,) and m.skipped_steps == 0 and m.first_nonfinite is None
    outs: list[torch.Tensor] = []

    def keep(module: nn.Module, args: Any, out: torch.Tensor) -> None:
        out.retain_grad()
        outs.append(out)

    hooks = [b.register_forward_hook(keep) for _, b in blocks]
    model.zero_grad()
    model(x).square().mean().backward()
    for h in hooks:
        h.remove()
    expect = [float(torch.linalg.vector_norm(o.grad.double())) for o in outs]
    assert m.activation_grad_norms[1:] == pytest.approx(expect, rel=2e-2)
    total = torch.linalg.vector_norm(torch.cat([p.grad.double().reshape(-1) for p in model.parameters()]))
    assert m.grad_norm[0] == pytest.approx(float(total), rel=2e-2)


def test_every_norm_entry_point_is_exact_for_float32_squares_out_of_range() -> None:
    """Oracle: float64 torch.linalg.vector_norm of the same tensors. Finite float32 tensors whose
    squares overflow (x1e20) or go subnormal (x1e-20 on 8192 elements: a norm 1-90x LOW, and x1e-22)
    have exact norms from every entry point (a million squares of 1e-21 each, subnormal, sum to a norm
    above LOW: the threshold scales with sqrt(numel), found by mutation testing): norm(),
    fused_norms(), norm_values() with a stack of 70,
    in exact mode too; a sparse gradient with a repeated index norms as its dense sum."""
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(8192, generator=gen) * s for s in (1e20, 1e-20, 1e-22, 1.0)]
    tensors.append(torch.full((1 << 20,), 1e-21))  # a norm of 1e-18, above LOW but not LOW x sqrt(n)
    expect = [float(torch.linalg.vector_norm(t.double())) for t in tensors]
    assert [float(norms.norm(t)) for t in tensors] == pytest.approx(expect, rel=1e-6, abs=0)
    assert [float(v) for v in norms.fused_norms(tensors, False)] == pytest.approx(expect, rel=1e-6, abs=0)
    stack = [torch.randn(8192, generator=gen) * 1e-20 for _ in range(70)] + [
        torch.randn(64, generator=gen) * 1e20 for _ in range(70)
    ]
    groups = [list(range(70)), list(range(70, 140))]
    expect = [float(torch.linalg.vector_norm(t.double())) for t in stack]
    for exact in (False, True):
        got = norms.norm_values(stack, exact, groups=groups)
        assert got == pytest.approx(expect, rel=1e-6, abs=0), exact
    grad = torch.sparse_coo_tensor(
        torch.tensor([[0, 0, 2]]), torch.tensor([3.0, 4.0, 1.0]), (4,), check_invariants=True
    )
    assert float(torch.linalg.vector_norm(norms.dense(grad))) == pytest.approx(math.sqrt(50.0), rel=1e-7)


def test_float64_norms_whose_squares_leave_float64s_range_are_exact_in_the_probe() -> None:
    """Oracle: math.hypot over the values (scaled, exact to rounding). Float64 tensors whose squares
    overflow (x1e200) or go subnormal (x1e-200), alone, fused and stacked, in exact mode too; and a
    float64 linear MLP at sigma_w 10, 160 blocks deep, every value finite with norms up to 7e154: its
    activation norms read inf there, a non-finite value where there was none (found in an audit)."""
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(300, generator=gen, dtype=torch.float64) * s for s in (1e200, 1e-200, 1.0)]
    stack = [torch.randn(64, generator=gen, dtype=torch.float64) * 1e200 for _ in range(70)]
    for given, groups in ((tensors, []), (stack, [list(range(70))])):
        expect = [math.hypot(*t.tolist()) for t in given]
        for exact in (False, True):
            assert norms.norm_values(given, exact, groups=groups) == pytest.approx(expect, rel=1e-12, abs=0)
    c = Config.of(
        "mlp", activation="linear", init_scale=10.0, depth=160, width=16, batch_size=2, dtype="float64"
    )
    built = resolve("mlp").build(c)
    outputs: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _a, o: outputs.append(o)) for _, m in built.blocks]
    built.loss_fn(built.model(built.inputs), built.inputs).backward()
    for h in hooks:
        h.remove()
    assert (
        all(bool(o.isfinite().all()) for o in outputs)
        and max(math.hypot(*o.flatten().tolist()) for o in outputs) > 1e154
    )
    m = probe(c)
    assert m.first_nonfinite is None
    expect = [math.hypot(*o.flatten().tolist()) for o in outputs]
    assert m.activation_norms[1:] == pytest.approx(expect, rel=1e-12, abs=0)
    grads = [math.hypot(*p.grad.flatten().tolist()) for p in built.model.parameters()]
    assert m.grad_norm[0] == pytest.approx(math.hypot(*grads), rel=1e-12)


def test_a_parameter_fed_to_block_0_under_float16_amp_has_its_gradient_unscaled_once() -> None:
    """A learned query fed to block 0 is the chain's entry, and its gradient is the parameter's own
    .grad, which the GradScaler unscales in place: it was divided by the loss scale a second time.
    Oracle: the query is the model's only parameter, so the entry's gradient norm is the total
    gradient norm (and the scale, 65536, is far from 1)."""

    class Query(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query = nn.Parameter(torch.randn(4, 8))
            self.layers = nn.ModuleList([nn.Tanh(), nn.Tanh()])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.query
            for layer in self.layers:
                h = layer(h)
            return h * x

    torch.manual_seed(0)
    m = probe_module(Query(), torch.randn(4, 8), _square_mean, amp="float16")
    assert m.activation_names[0] == "(input)"
    assert m.activation_grad_norms[0] == pytest.approx(m.grad_norm[0], rel=1e-6)


class _Shift(nn.Module):
    """x + b: a parameter of its own beside a shared layer."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.randn(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.shift


def test_a_parameter_two_blocks_share_is_counted_in_the_first_blocks_weight_gradient() -> None:
    """Two blocks holding one Linear (tied): its gradient belongs to the first block that owns it,
    input side first, never to both or to the last. Oracle: torch's gradients of a plain backward,
    the shared weight's in block 0's L2 norm, block 1 holding only its own shift."""
    torch.manual_seed(0)
    shared = nn.Linear(8, 8, bias=False)

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(
                [nn.Sequential(shared, nn.Tanh()), nn.Sequential(shared, nn.Tanh(), _Shift(8))]
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                x = block(x)
            return x

    model, x = Tied(), torch.randn(4, 8)
    blocks = [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)]
    m = probe_module(model, x, lambda o, _: o.square().sum(), blocks=blocks)
    weight, shift = torch.autograd.grad(model(x).square().sum(), [shared.weight, model.blocks[1][2].shift])
    assert m.layer_grad_norms == pytest.approx([float(weight.norm()), float(shift.norm())], rel=1e-6)


def test_a_parameter_replaced_or_frozen_or_other_blocks_between_probes_reach_the_next_probe() -> None:
    """The probe caches which block owns each trainable parameter; a weight replaced by a new one,
    then a weight frozen, then other blocks given, between probes of one model, must each reach the
    next probe, as on a fresh model. Oracle: torch's gradients of the trainable parameters, summed
    per block (the first block owning each) and in all."""
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3)))
    x = torch.randn(4, 8)

    def loss_fn(o: torch.Tensor, _: object) -> torch.Tensor:
        return o.square().sum()

    def check(blocks: list[tuple[str, nn.Module]]) -> None:
        m = probe_module(model, x, loss_fn, blocks=blocks)
        trainable = [p for p in model.parameters() if p.requires_grad]
        grads = dict(
            zip(map(id, trainable), torch.autograd.grad(loss_fn(model(x), x), trainable), strict=True)
        )
        per_block = [
            math.sqrt(sum(float(grads[id(p)].norm()) ** 2 for p in b.parameters() if id(p) in grads))
            for _, b in blocks
        ]
        assert m.layer_grad_norms == pytest.approx(per_block, rel=1e-6)
        assert m.grad_norm[0] == pytest.approx(
            math.sqrt(sum(float(g.norm()) ** 2 for g in grads.values())), rel=1e-6
        )

    blocks = [(str(i), b) for i, b in enumerate(model)]
    check(blocks)
    model[2][0].weight = nn.Parameter(3 * model[2][0].weight.detach())
    check(blocks)
    model[0][0].weight.requires_grad_(False)
    check(blocks)
    check(blocks[1:])


def test_output_gradients_under_a_gradscaler_are_unscaled() -> None:
    model, x = _Chain(scale=1.0), torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    plain = probe_module(model, x, _loss, blocks=_blocks(model))
    scaled = probe_module(
        model, x, lambda o, _: o.float().pow(2).mean(), blocks=_blocks(model), amp="float16"
    )
    assert scaled.loss_scale and scaled.loss_scale[0] > 1
    # float16 autocast rounds to ~1e-3; a scale left in would be off by 65536x
    assert list(scaled.activation_grad_norms) == pytest.approx(
        list(plain.activation_grad_norms), rel=3e-2, abs=0
    )
    assert scaled.grad_norm[0] == pytest.approx(plain.grad_norm[0], rel=3e-2, abs=0)


def test_a_block_output_read_sparsely_has_its_gradient_norm_taken_densely() -> None:
    """A block returning a weight that the model reads with F.embedding(sparse=True): dL/d output is a
    sparse tensor (the norm raised NotImplementedError); its norm is the dense gradient's, torch's."""

    class Table(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(
                torch.randn(10, 8, dtype=F64, generator=torch.Generator().manual_seed(0))
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.weight

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.b = Table(), nn.Sequential(nn.Linear(8, 8, dtype=F64), nn.Tanh())
            self.idx = torch.tensor([1, 3, 3, 7])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(nn.functional.embedding(self.idx, self.q(x), sparse=True)) * x

    model = Model()
    x = torch.randn(4, 8, dtype=F64)

    def loss(out: torch.Tensor, _: object) -> torch.Tensor:
        return out.square().mean()

    m = probe_module(model, x, loss, blocks=[("q", model.q), ("b", model.b)])
    w = model.q.weight
    own = torch.autograd.grad(loss(model.b(nn.functional.embedding(model.idx, w)) * x, x), w)[0]
    assert m.activation_grad_norms[1] == pytest.approx(float(own.norm()), rel=1e-12)


def test_sparse_block_outputs_are_normed_as_their_dense_values() -> None:
    """A block returning a sparse tensor: its forward norm is its values' (torch's vector_norm takes
    no sparse tensor: the probe crashed, a review found). Oracle: the same tensors made dense."""

    class Sparse(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x.to_dense() if x.is_sparse else x).to_sparse()

    torch.manual_seed(0)
    layers = nn.ModuleList(Sparse() for _ in range(4))

    def run(x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        outs = []
        for layer in layers:
            x = layer(x)
            outs.append(x)
        return x.to_dense(), outs

    model = nn.Module()
    model.layers = layers
    model.forward = lambda x: run(x)[0]  # type: ignore[method-assign]
    x = torch.randn(3, 8)
    m = probe_module(model, x, lambda out, _: out.pow(2).mean(), blocks=list(layers.named_children()))
    y, outs = run(x)
    grads = torch.autograd.grad(y.pow(2).mean(), outs)
    dense = [float(o.detach().to_dense().norm()) for o in outs]
    assert m.activation_norms[1:] == pytest.approx(dense, rel=1e-6)
    assert m.activation_grad_norms[1:] == pytest.approx([float(g.to_dense().norm()) for g in grads], rel=1e-6)
