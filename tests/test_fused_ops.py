"""The fused ops' Triton kernels give the eager ops' numbers (on the CPU the ops are the eager ops)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vnp_core.models.fused_ops import add_layer_norm, gelu_mul

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton kernels on CUDA; on the CPU the eager ops")
# ESM-2 3B's and DNABERT-S's widths, ragged ones, none
SHAPES = [(1000, 2560), (1000, 768), (1000, 3072), (7, 100), (3, 64), (0, 64)]
DTYPES = [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2), (torch.float32, 1e-5)]


@pytest.mark.parametrize("rows, width", SHAPES)
@pytest.mark.parametrize("dtype, tolerance", DTYPES)
def test_add_layer_norm_gives_the_eager_ops_numbers(rows, width, dtype, tolerance):
    torch.manual_seed(0)
    x, delta = (torch.randn(rows, width, device="cuda") * 2).to(dtype), torch.randn(rows, width, device="cuda").to(dtype)
    weight, bias = (torch.randn(width, device="cuda") * 0.1 + 1).to(dtype), (torch.randn(width, device="cuda") * 0.1).to(dtype)
    total, out = add_layer_norm(x, delta, weight, bias, 1e-5)
    assert torch.equal(total, x + delta)
    # The kernel sums in another order than PyTorch's: a value may round one step apart.
    torch.testing.assert_close(out, F.layer_norm(x + delta, (width,), weight, bias, 1e-5), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("rows, width", SHAPES)
@pytest.mark.parametrize("dtype, tolerance", DTYPES)
def test_gelu_mul_gives_the_eager_ops_numbers(rows, width, dtype, tolerance):
    torch.manual_seed(0)
    x = (torch.randn(rows, 2 * width, device="cuda") * 2).to(dtype)
    gate, up = x.chunk(2, dim=-1)
    # Rounded as the eager ops round; the erf itself may differ in its last bit.
    torch.testing.assert_close(gelu_mul(x), F.gelu(gate) * up, atol=tolerance, rtol=tolerance)
