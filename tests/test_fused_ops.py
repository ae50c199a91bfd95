"""The fused ops' Triton kernels give the eager ops' numbers.

On a GPU the ops run their kernels. On the CPU the ops are the eager ops, so in Triton's interpreter
(`triton_interpreter`) the cases call the kernels' launchers (`row_kernels`) instead.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from triton_interpreter import DEVICE, INTERPRETED, interpreter_rerun, runs_here

from vnp_core.models import fused_ops

# ESM-2 3B's and DNABERT-S's widths, ragged ones, none
SHAPES = [(1000, 2560), (1000, 768), (1000, 3072), (7, 100), (3, 64), (0, 64)]
if INTERPRETED:  # a program per row, each interpreted: fewer rows, the same row shapes
    SHAPES = [(5 if rows == 1000 else rows, width) for rows, width in SHAPES]
# The interpreter computes in NumPy, which has no bfloat16.
DTYPES = [(torch.float16, 2e-3), (torch.float32, 1e-5)] + ([] if INTERPRETED else [(torch.bfloat16, 1.6e-2)])


def add_layer_norm(x, delta, weight, bias, eps):
    if DEVICE == "cuda":
        return fused_ops.add_layer_norm(x, delta, weight, bias, eps)
    from vnp_core.models import row_kernels

    total, out = torch.empty_like(x), torch.empty_like(x)
    if x.shape[0]:
        row_kernels.add_layer_norm_rows(x, delta, weight, bias, eps, total, out)
    return total, out


def gelu_mul(x):
    if DEVICE == "cuda":
        return fused_ops.gelu_mul(x)
    from vnp_core.models import row_kernels

    out = x.new_empty(x.shape[0], x.shape[1] // 2)
    if x.shape[0]:
        row_kernels.gelu_mul_rows(x, out)
    return out


@runs_here
@pytest.mark.parametrize("rows, width", SHAPES)
@pytest.mark.parametrize("dtype, tolerance", DTYPES)
def test_add_layer_norm_gives_the_eager_ops_numbers(rows, width, dtype, tolerance):
    torch.manual_seed(0)
    x, delta = (torch.randn(rows, width) * 2).to(DEVICE, dtype), torch.randn(rows, width).to(DEVICE, dtype)
    weight, bias = (torch.randn(width) * 0.1 + 1).to(DEVICE, dtype), (torch.randn(width) * 0.1).to(DEVICE, dtype)
    total, out = add_layer_norm(x, delta, weight, bias, 1e-5)
    assert torch.equal(total, x + delta)
    # The kernel sums in another order than PyTorch's: a value may round one step apart.
    torch.testing.assert_close(out, F.layer_norm(x + delta, (width,), weight, bias, 1e-5), atol=tolerance, rtol=tolerance)


@runs_here
@pytest.mark.parametrize("rows, width", SHAPES)
@pytest.mark.parametrize("dtype, tolerance", DTYPES)
def test_gelu_mul_gives_the_eager_ops_numbers(rows, width, dtype, tolerance):
    torch.manual_seed(0)
    x = (torch.randn(rows, 2 * width) * 2).to(DEVICE, dtype)
    gate, up = x.chunk(2, dim=-1)
    # Rounded as the eager ops round; the erf itself may differ in its last bit.
    torch.testing.assert_close(gelu_mul(x), F.gelu(gate) * up, atol=tolerance, rtol=tolerance)


test_every_case_passes_in_tritons_interpreter = interpreter_rerun(__file__)
