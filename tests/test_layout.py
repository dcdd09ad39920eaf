"""The parameter layout (layout), checked on its functions directly. Oracles: the docstrings (the
*first* block owning a parameter; -1 for none; only trainable parameters; a cache rebuilt when a
parameter is frozen) and math.hypot / torch's own total norm for per-block norms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from stabilitycheck import layout


def layout_of(model: nn.Module, blocks: list[tuple[str, nn.Module]]) -> layout._Layout:
    return layout.layout_of(model, blocks, layout.trainable(tuple(model.modules())))


def test_a_shared_parameter_belongs_to_the_first_block_owning_it() -> None:
    shared = nn.Linear(2, 2)
    other = nn.Linear(2, 2)
    blocks = [("a", shared), ("b", nn.Sequential(shared, other))]
    params = [*shared.parameters(), *other.parameters(), nn.Parameter(torch.zeros(1))]
    assert layout.block_of(params, blocks) == [0, 0, 1, 1, -1]


def test_block_0s_parameters_count_in_its_norm() -> None:
    norms = [3.0, 4.0, 12.0, 7.0]
    owner = [0, 0, 1, -1]
    got = layout.per_block(norms, owner, 2)
    assert got[0] == math.hypot(3.0, 4.0)  # 5
    assert got[1] == 12.0
    grads = [torch.full((1,), 3.0), torch.full((1,), 4.0)]
    assert math.isclose(got[0], float(torch.linalg.vector_norm(torch.cat(grads))), rel_tol=1e-6)


def test_trainable_is_model_parameters_less_the_frozen() -> None:
    """One walk of model.modules() gives model.parameters()' trainable ones in its order, each once:
    a parameter shared by two modules, a module at two places, a frozen one, a None slot.
    Oracle: torch's own model.parameters()."""
    shared = nn.Linear(3, 3)
    model = nn.Sequential(nn.Linear(2, 3), shared, nn.ReLU(), shared, nn.Linear(3, 1, bias=False))
    model[4].register_parameter("extra", None)
    tied = nn.Linear(3, 3)
    tied.weight = model[0].weight  # the same tensor again, later in the walk
    model.append(tied)
    model[0].bias.requires_grad_(False)
    expect = [p for p in model.parameters() if p.requires_grad]
    got = layout.trainable(tuple(model.modules()))
    assert len(got) == len(expect) == 5 and all(a is b for a, b in zip(got, expect, strict=True))


def test_the_layout_holds_trainable_parameters_and_follows_a_freeze() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    blocks = [("0", model[0]), ("1", model[1])]
    first = layout_of(model, blocks)
    assert len(first.params) == 4 and first.owner == (0, 0, 1, 1)
    model[0].weight.requires_grad_(False)
    frozen = layout_of(model, blocks)
    assert [p is model[0].weight for p in frozen.params] == [False] * 3
    assert frozen.owner == (0, 1, 1)
    model[0].weight.requires_grad_(True)
    assert layout_of(model, blocks).owner == (0, 0, 1, 1)


def test_norms_combine_as_torchs_total_norm_does_nan_first() -> None:
    """math.hypot reads inf beside NaN as inf; torch's total norm of such gradients is NaN, and so is
    the probe's (found in review). Oracle: torch.nn.utils.get_total_norm."""
    from stabilitycheck.layout import combined

    for values in ([math.inf, math.nan], [math.nan, 2.0], [3.0, 4.0], [math.inf, 1.0]):
        expect = float(
            torch.nn.utils.get_total_norm([torch.tensor([v], dtype=torch.float64) for v in values])
        )
        got = combined(values)
        assert got == expect or (math.isnan(got) and math.isnan(expect)), values
    assert combined([1e200, 1e200]) == math.sqrt(2) * 1e200  # where torch's squares overflow


def test_a_shared_parameter_counts_in_the_first_of_its_blocks_that_ran() -> None:
    """Tied adapter lists, one per layer, each layer calling one adapter of its own list (Zamba2's):
    a tied weight's gradient was put on the first list's copy, which never ran, and the adapter that
    ran read 0 (found by an audit of hf:zamba2). Oracle: torch's own .grad of each tied weight, on
    the block that called it; 0 on the copies that never ran."""
    from stabilitycheck.probing import probe_module

    torch.manual_seed(0)
    lists = [nn.ModuleList(nn.Linear(4, 4) for _ in range(3)) for _ in range(3)]
    for other in lists[1:]:
        for a, b in zip(other, lists[0], strict=True):
            a.weight, a.bias = b.weight, b.bias

    class Layer(nn.Module):
        def __init__(self, adapters: nn.ModuleList, i: int) -> None:
            super().__init__()
            self.adapters, self.i = adapters, i

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.adapters[self.i](x))

    model = nn.Sequential(*(Layer(lists[i], i) for i in range(3)))
    blocks = [(f"a{k}.{i}", lists[k][i]) for k in range(3) for i in range(3)]
    x = torch.randn(2, 4)
    m = probe_module(model, x, lambda out, _: out.sum(), blocks=blocks)
    model.zero_grad()
    model(x).sum().backward()
    torchs = [math.hypot(*(float(p.grad.norm()) for p in lists[0][i].parameters())) for i in range(3)]
    got = dict(zip(m.layer_names, m.layer_grad_norms, strict=True))
    assert [got["a0.0"], got["a1.1"], got["a2.2"]] == [pytest.approx(t, rel=1e-6) for t in torchs]
    assert all(v == 0.0 for name, v in got.items() if name not in ("a0.0", "a1.1", "a2.2"))
    assert layout.block_of(list(lists[0][1].parameters()), blocks, frozenset({0, 4, 8})) == [4, 4]
