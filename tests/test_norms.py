"""The norms' accumulator dtype (norms.accumulator), a pure function of (dtype, exact, device) that CPU
runs only ever call with a CPU device: float64 when exact, for float64 tensors and, on CUDA, for RANGED
ones (float32, bfloat16); else float32 (float16 on CUDA included: its squares stay in float32's range).
Oracle: the docstring. torch.device('cuda') is only a descriptor here: no GPU is needed.
Also the norms themselves (norm, norm_values): exact where squares leave the dtype's range, every element
counted, sparse and mixed dtypes, against float64 and math.hypot."""

from __future__ import annotations

import math

import pytest
import torch

from stabilitycheck import norms
from stabilitycheck.norms import CHUNK, LOW, STACK_MIN, accumulated, accumulator, norm, norm_values

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.mark.parametrize(
    ("dtype", "exact", "device", "acc"),
    [
        (torch.float16, False, CUDA, torch.float32),
        (torch.float32, False, CUDA, torch.float64),
        (torch.bfloat16, False, CUDA, torch.float64),
        (torch.float64, False, CUDA, torch.float64),
        (torch.float32, False, CPU, torch.float32),
        (torch.bfloat16, False, CPU, torch.float32),
        (torch.float16, False, CPU, torch.float32),
        (torch.float64, False, CPU, torch.float64),
        (torch.float16, True, CPU, torch.float64),
        (torch.float32, False, None, torch.float32),
    ],
)
def test_the_accumulator_dtype_follows_the_documented_table(
    dtype: torch.dtype, exact: bool, device: torch.device | None, acc: torch.dtype
) -> None:
    assert accumulator(dtype, exact, device) == acc


@pytest.mark.parametrize("small_first", [True, False])
def test_a_large_tensors_subnormal_squares_are_refined_whatever_comes_before_it(small_first: bool) -> None:
    """1M float32 values of 1e-21: their squares (1e-42) are subnormal, and a float32 sum of them is off
    by ~6e-4 relative; the norm (1e-18) lies under LOW * sqrt(1M) though above LOW * sqrt(1), so only
    the largest tensor's size tells it may be spoiled. Oracle: torch's float64 norm, to the module's
    documented 5e-5."""
    big = torch.full((1_000_000,), 1e-21, dtype=torch.float32)
    exact = float(torch.linalg.vector_norm(big.double()))
    assert abs(float(torch.linalg.vector_norm(big)) / exact - 1) > 5e-5  # float32 alone is spoiled
    tensors = [torch.ones(1), big] if small_first else [big, torch.ones(1)]
    got = norm_values(tensors, False)
    assert abs(got[1 if small_first else 0] / exact - 1) < 5e-5


def _hypot(t: torch.Tensor) -> float:
    """Brute-force exact L2 norm: Python's math.hypot scales internally, correct for any finite values."""
    return math.hypot(*t.double().flatten().tolist())


@pytest.mark.parametrize("how", ["fused", "norm", "values"])
def test_float32_values_whose_squares_overflow_have_a_finite_exact_norm(how: str) -> None:
    t = torch.full((10,), 1e20)  # finite in float32 (max 3.4e38); its float32 squares overflow
    want = torch.linalg.vector_norm(t.double()).item()
    if how == "fused":
        got = norms.fused_norms([t], exact=False)[0].item()
    elif how == "norm":
        got = norms.norm(t).item()
    else:
        got = norms.norm_values([t], exact=False)[0]
    assert got == pytest.approx(want, rel=1e-12, abs=0)


@pytest.mark.parametrize("n", [1000, 65536, 65537, 1 << 22])
@pytest.mark.parametrize("fill", ["1/3", "0.1", "randn"])
def test_a_float32_norm_is_within_the_documented_5e_5_of_float64(n: int, fill: str) -> None:
    """The README's and norms.py's bound, against torch's float64 norm: one value repeated is the worst
    case of float32 sums (its equal squares round alike: 4.6e-5 measured, where 3e-8 was claimed),
    random data ~1e-7; the same from every entry point."""
    t = (
        torch.randn(n, generator=torch.Generator().manual_seed(0))
        if fill == "randn"
        else torch.full((n,), 1 / 3 if fill == "1/3" else 0.1)
    )
    want = float(torch.linalg.vector_norm(t.double()))
    bound = 5e-5 if fill != "randn" else 1e-6
    assert float(norms.norm(t)) == pytest.approx(want, rel=bound, abs=0)
    assert float(norms.fused_norms([t], exact=False)[0]) == pytest.approx(want, rel=bound, abs=0)
    assert norms.norm_values([t], exact=False)[0] == pytest.approx(want, rel=bound, abs=0)


@pytest.mark.parametrize("value", [1e200, 1e-200])
def test_float64_values_whose_squares_leave_float64_have_their_exact_norm(value: float) -> None:
    d = torch.full((7,), value, dtype=torch.float64)
    d[3] = 2 * value
    got = norms.norm_values([torch.ones(3), d], exact=False)
    assert got[0] == pytest.approx(math.sqrt(3), rel=1e-7, abs=0)
    assert got[1] == pytest.approx(_hypot(d), rel=1e-12, abs=0)


def test_a_zero_float64_tensor_beside_a_tiny_one_has_norm_zero() -> None:
    tiny = torch.full((4,), 1e-200, dtype=torch.float64)
    got = norms.norm_values([torch.zeros(5, dtype=torch.float64), tiny], exact=False)
    assert got[0] == 0.0
    assert got[1] == pytest.approx(_hypot(tiny), rel=1e-12, abs=0)


def test_subnormal_float32_squares_beside_a_normal_tensor_are_refined() -> None:
    # 1.1e-21 squared is 1.2e-42, subnormal in float32 (spacing 1.4e-45): a float32 sum is off ~2e-4;
    # the norm 1.1e-18 lies between LOW and LOW * sqrt(numel), so only the per-numel bound catches it
    small = torch.full((10**6,), 1.1e-21)
    big = torch.ones(10)
    for tensors in ([small], [big, small]):
        got = norms.norm_values(tensors, exact=False)[-1]
        want = torch.linalg.vector_norm(small, dtype=torch.float64).item()
        assert got == pytest.approx(want, rel=1e-9, abs=0)


def test_a_large_cpu_tensor_is_normed_over_every_element_including_the_tail() -> None:
    n = norms.CHUNK * 2 + 10
    t = torch.ones(n)
    t[norms.CHUNK * 2] = 1000.0  # the first element past the whole pieces
    want = math.sqrt(n - 1 + 1000.0**2)
    assert norms.norm(t).item() == pytest.approx(want, rel=1e-6, abs=0)
    assert norms.fused_norms([torch.ones(3), t], exact=False)[1].item() == pytest.approx(
        want, rel=1e-6, abs=0
    )


def test_a_large_float32_tensor_among_small_ones_is_summed_accurately() -> None:
    g = torch.Generator().manual_seed(0)
    big = torch.rand(1 << 23, generator=g) + 0.5
    small = torch.ones(3)
    want = torch.linalg.vector_norm(big, dtype=torch.float64).item()
    got = norms.accumulated([small, big], exact=False)
    assert got[1].item() == pytest.approx(want, rel=3e-7, abs=0)
    assert norms.norm_values([small, big], exact=False)[1] == pytest.approx(want, rel=3e-7, abs=0)


def test_mixed_dtypes_each_get_their_own_accumulator() -> None:
    d = torch.full((5,), 1e-30, dtype=torch.float64)  # its squares underflow in float32
    d[0] = 1e-30 * (1 + 1e-12)
    f = torch.ones(4)
    got = norms.fused_norms([f, d], exact=False)
    assert got[0].item() == pytest.approx(2.0, rel=1e-7, abs=0)
    assert got[1].dtype == torch.float64
    assert got[1].item() == pytest.approx(_hypot(d), rel=1e-14, abs=0)


def test_a_sparse_gradient_with_repeated_indices_has_the_dense_gradients_norm() -> None:
    emb = torch.nn.Embedding(10, 3, sparse=True)
    ids = torch.tensor([1, 1, 1, 4, 1])
    emb(ids).sum().backward()
    g = emb.weight.grad
    assert g.is_sparse
    want = torch.linalg.vector_norm(g.to_dense().double()).item()  # row 1 took 4 ones per column
    assert want == pytest.approx(math.sqrt(3 * 16 + 3))
    assert norms.norm_values([norms.dense(g)], exact=False)[0] == pytest.approx(want, rel=1e-7, abs=0)


def test_an_exact_stack_of_many_small_tensors_is_summed_in_float64() -> None:
    g = torch.Generator().manual_seed(1)
    ts = [torch.randn(257, generator=g) for _ in range(norms.STACK_MIN)]
    got = norms.norm_values(ts, exact=True, groups=[list(range(len(ts)))])
    want = [torch.linalg.vector_norm(t.double()).item() for t in ts]
    assert got == pytest.approx(want, rel=1e-14, abs=0)


@pytest.mark.parametrize("tail", [1, 2, 7])
def test_a_large_float32_norm_taken_in_pieces_counts_every_element_of_its_last_piece(tail: int) -> None:
    """A float32 CPU tensor of more than CHUNK elements is normed in CHUNK-element pieces and a last,
    shorter one: a last piece of one element counts as much as a longer one. Oracle: the norm in
    float64 by hand (every element 1 but the last, 1000)."""
    n = 2 * CHUNK + tail
    x = torch.ones(n)
    x[-1] = 1000.0
    want = math.sqrt(n - 1 + 1000.0**2)
    assert float(norm(x)) == pytest.approx(want, rel=1e-6)
    assert float(accumulated([x], False)[0]) == pytest.approx(want, rel=1e-6)


F64 = torch.float64


def test_a_stacked_groups_norm_spoiled_by_float32_squares_is_taken_again_in_float64() -> None:
    """A stacked group's float32 norm below LOW * sqrt(numel) (squares under float32's subnormals) is
    spoilable and taken again in float64. Oracle: torch's float64 norms."""
    n = 8192
    tensors = []
    for _ in range(STACK_MIN):
        t = torch.full((n,), 2.6e-23)
        t[0] = 1e-18
        tensors.append(t)
    want = [torch.linalg.vector_norm(t, dtype=F64).item() for t in tensors]
    assert LOW < want[0] < LOW * math.sqrt(n)
    assert norm_values(tensors, False, groups=[list(range(STACK_MIN))]) == pytest.approx(
        want, rel=1e-9, abs=0
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_tensor_holding_inf_has_an_infinite_norm_and_one_holding_nan_a_nan_one(dtype: torch.dtype) -> None:
    """The first non-finite value is reported with its value: a tensor holding +-inf has norm inf, not
    NaN (the scaled float64 path divides by the largest magnitude, inf / inf), and one holding NaN,
    NaN; beside them a finite tensor whose float64 squares overflow (norm 5e200) is still read exactly."""
    inf = torch.tensor([1.0, -math.inf], dtype=dtype)
    nan = torch.tensor([1.0, math.nan], dtype=dtype)
    big = torch.tensor([3e200, 4e200], dtype=torch.float64)
    tiny = torch.full((100,), 1e-170, dtype=torch.float64)  # squares 1e-340: below float64's range
    values = [float(v) for v in norms.fused_norms([inf, nan, big, tiny], exact=False)]
    assert values[0] == math.inf and math.isnan(values[1])
    assert values[2] == pytest.approx(5e200, rel=1e-15)
    assert values[3] == pytest.approx(1e-169, rel=1e-15)
    assert [float(norm(t)) for t in (big, tiny)] == pytest.approx([5e200, 1e-169], rel=1e-15)
    # the watch mode's step: its float64 norms on the CPU are among those `refine` is asked to check
    assert norms.narrow([big], accumulated([big], exact=False))
