"""GELU, then FP8 row quantisation, in one pass over each row: the input of ESM-2's fc2 in FP8.

torch.compile fuses `quantize_rows(F.gelu(x))` as well, but for rows 10,240 wide it makes a looped
reduction, which reads each row twice and computes its GELU twice (bench/BENCHMARKS.md). Here one
program holds a whole row in registers: it reads it once and writes it once, in e4m3. As in eager
`quantize_rows(F.gelu(x))`, the GELU is rounded to x's dtype before the row maximum, so the scales
are the same; the values are multiplied by the scale's reciprocal rather than divided by the scale
(an IEEE divide made the kernel 1.8x slower at 16 warps), which moves about 1 in 25,000 of them by one e4m3 step.
CUDA only (Triton); `Fp8Gelu` runs the eager ops elsewhere.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vnp_core.models.fp8 import E4M3, E4M3_MAX

TINY = torch.finfo(torch.float32).tiny


@triton.jit
def _gelu_quantize_rows_kernel(x_ptr, out_ptr, scale_ptr, n_cols, x_row_stride,
                               E4M3_MAX: tl.constexpr, TINY: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    in_row = cols < n_cols
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=in_row, other=0.0).to(tl.float32)
    gelu = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    gelu = gelu.to(x_ptr.dtype.element_ty).to(tl.float32)  # as eager F.gelu returns it
    scale = tl.maximum(tl.max(tl.abs(gelu), axis=0), TINY) / E4M3_MAX
    tl.store(out_ptr + row * n_cols + cols, (gelu * (1.0 / scale)).to(out_ptr.dtype.element_ty), mask=in_row)
    tl.store(scale_ptr + row, scale)


def gelu_quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows(F.gelu(x))` for a CUDA (M, K) x, in one kernel."""
    x = x.contiguous()
    rows, cols = x.shape
    out = torch.empty((rows, cols), dtype=E4M3, device=x.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows:
        block = triton.next_power_of_2(cols)
        # A row per program, 64 elements per thread: 8 warps for ESM-2 3B's 10,240 (the fastest of 4-32).
        num_warps = min(16, max(1, block // 2048))
        _gelu_quantize_rows_kernel[(rows,)](x, out, scale, cols, x.stride(0), E4M3_MAX=E4M3_MAX, TINY=TINY,
                                            BLOCK=block, num_warps=num_warps)
    return out, scale
