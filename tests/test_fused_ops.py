"""The fused ops' Triton kernels give the eager ops' numbers.

On a GPU the ops run their kernels. Without one, the ops run the eager ops themselves, so
`test_every_case_passes_in_tritons_interpreter` runs this file again with `TRITON_INTERPRET=1`, where
the cases call the kernels' launchers (`row_kernels`) on the CPU.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from vnp_core.models import fused_ops

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
runs_here = pytest.mark.skipif(not (torch.cuda.is_available() or INTERPRETED),
                               reason="on a GPU; without one, test_every_case_passes_in_tritons_interpreter runs it")
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


@pytest.mark.skipif(torch.cuda.is_available() or INTERPRETED, reason="runs the cases above where they cannot run: without a GPU, outside the interpreter")
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs the triton package (the dev extra)")
def test_every_case_passes_in_tritons_interpreter():
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                            env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert "1 skipped" in summary and "failed" not in summary, summary  # every case ran but this one
