"""GELU, then FP8 row quantisation, in one pass over each row: the input of ESM-2's fc2 in FP8.

torch.compile fuses `quantize_rows(F.gelu(x))` as well, but for rows 10,240 wide it makes a looped
reduction, which reads each row twice and computes its GELU twice (bench/BENCHMARKS.md). Here one
program holds a whole row in registers: it reads it once and writes it once, in e4m3.

The row is held as two power-of-two blocks, the largest that fits and one for the rest (10,240 =
8,192 + 2,048): one padded block of 16,384 left 37% of the lanes computing an erf for nothing, and
took 1.41x as long. As in eager `quantize_rows(F.gelu(x))`, the GELU is rounded to x's dtype before
the row maximum, so the scales are the same; the values are multiplied by the scale's reciprocal
rather than divided by the scale (an IEEE divide made the kernel 1.8x slower), which moves about 1
in 25,000 of them by one e4m3 step. CUDA only (Triton); `Fp8Gelu` runs the eager ops elsewhere.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vnp_core.models.fp8 import E4M3, E4M3_MAX

TINY = torch.finfo(torch.float32).tiny


@triton.jit
def _store_quantized(out_ptr, scale_ptr, row, head, tail, head_cols, tail_cols, in_tail, n_cols,
                     E4M3_MAX: tl.constexpr, TINY: tl.constexpr):
    """Row `row`, held as its two blocks (fp32, already rounded as x's dtype), in e4m3 with its scale."""
    peak = tl.maximum(tl.max(tl.abs(head), axis=0), tl.max(tl.abs(tail), axis=0))
    scale = tl.maximum(peak, TINY) / E4M3_MAX
    inverse = 1.0 / scale
    tl.store(out_ptr + row * n_cols + head_cols, (head * inverse).to(out_ptr.dtype.element_ty))
    tl.store(out_ptr + row * n_cols + tail_cols, (tail * inverse).to(out_ptr.dtype.element_ty), mask=in_tail)
    tl.store(scale_ptr + row, scale)


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _gelu_quantize_rows_kernel(x_ptr, out_ptr, scale_ptr, n_cols, E4M3_MAX: tl.constexpr, TINY: tl.constexpr,
                               HEAD: tl.constexpr, TAIL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    head_cols, tail_cols = tl.arange(0, HEAD), HEAD + tl.arange(0, TAIL)
    in_tail = tail_cols < n_cols
    dtype = x_ptr.dtype.element_ty
    head = _gelu(tl.load(x_ptr + row * n_cols + head_cols).to(tl.float32)).to(dtype).to(tl.float32)
    tail = _gelu(tl.load(x_ptr + row * n_cols + tail_cols, mask=in_tail, other=0.0).to(tl.float32)).to(dtype).to(tl.float32)
    _store_quantized(out_ptr, scale_ptr, row, head, tail, head_cols, tail_cols, in_tail, n_cols, E4M3_MAX, TINY)


# The GELU's 10,240 in 8 warps: the fastest of 4, 8 and 16 (bench/BENCHMARKS.md).
ELEMENTS_PER_THREAD = 40


def row_blocks(n_cols: int) -> dict[str, int]:
    """A row of `n_cols` as its largest power-of-two block and a power-of-two block for the rest,
    and the warps that give each thread about `ELEMENTS_PER_THREAD` of it."""
    head = 1 << (n_cols.bit_length() - 1)
    tail = triton.next_power_of_2(n_cols - head) if n_cols > head else 1
    return {"HEAD": head, "TAIL": tail, "num_warps": min(16, max(1, triton.next_power_of_2(n_cols // ELEMENTS_PER_THREAD) // 32))}


def gelu_quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows(F.gelu(x))` for a CUDA (M, K) x, in one kernel."""
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=E4M3, device=x.device)
    scale = torch.empty((x.shape[0], 1), dtype=torch.float32, device=x.device)
    if x.shape[0]:
        _gelu_quantize_rows_kernel[(x.shape[0],)](x, out, scale, x.shape[1], E4M3_MAX=E4M3_MAX, TINY=TINY,
                                                  **row_blocks(x.shape[1]))
    return out, scale
