"""The norms' accumulator dtype (norms.accumulator), a pure function of (dtype, exact, device) that CPU
runs only ever call with a CPU device: float64 when exact, for float64 tensors and, on CUDA, for RANGED
ones (float32, bfloat16); else float32 (float16 on CUDA included: its squares stay in float32's range).
Oracle: the docstring. torch.device('cuda') is only a descriptor here: no GPU is needed."""

from __future__ import annotations

import pytest
import torch

from stabilitycheck.norms import accumulator, norm_values

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
