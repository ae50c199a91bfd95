"""The ops whose output only an FP8 linear layer reads, fused with its e4m3 row quantisation.

ESM-2's linear layers read three things: a LayerNorm's output (q, k, v and fc1), the GELU's (fc2) and
the attention's (out_proj). torch.compile fuses `quantize_rows` into each, but as looped reductions
that read a row more than once (for the GELU's 10,240-wide rows, compute its GELU twice too). Here
one program holds a whole row in registers: it reads it once and writes it once, in e4m3.

A row is held as two power-of-two blocks, the largest that fits and the rest (10,240 = 8,192 + 2,048;
2,560 = 2,048 + 512): one padded block would leave 37% of the lanes computing nothing (the GELU's erf
makes that kernel compute bound). As the eager ops do, each result is rounded to x's dtype before
the row maximum, so the scales are the same; the values are multiplied by the scale's reciprocal
rather than divided by the scale (an IEEE divide made the GELU kernel 1.8x slower), which moves about
1 in 25,000 of them by one e4m3 step. The LayerNorm's sums run in another order than PyTorch's, so
its rounding to x's dtype may differ by one step. CUDA only (Triton); `fp8.py` runs the eager ops elsewhere.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vnp_core.models.fp8 import E4M3, E4M3_MAX

TINY = torch.finfo(torch.float32).tiny


@triton.jit
def _scale(head, tail, E4M3_MAX: tl.constexpr, TINY: tl.constexpr):
    """The row's scale, from its two blocks (fp32, already rounded as x's dtype)."""
    peak = tl.maximum(tl.max(tl.abs(head), axis=0), tl.max(tl.abs(tail), axis=0))
    return tl.maximum(peak, TINY) / E4M3_MAX


@triton.jit
def _store_quantized(out_ptr, scale_ptr, row, head, tail, head_cols, tail_cols, in_tail, n_cols,
                     E4M3_MAX: tl.constexpr, TINY: tl.constexpr):
    scale = _scale(head, tail, E4M3_MAX, TINY)
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


@triton.jit
def _add_layer_norm_quantize_rows_kernel(x_ptr, delta_ptr, sum_ptr, weight_ptr, bias_ptr, out_ptr, scale_ptr, n_cols,
                                         eps, E4M3_MAX: tl.constexpr, TINY: tl.constexpr,
                                         HEAD: tl.constexpr, TAIL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    head_cols, tail_cols = tl.arange(0, HEAD), HEAD + tl.arange(0, TAIL)
    in_tail = tail_cols < n_cols
    dtype = x_ptr.dtype.element_ty
    x_row, delta_row, sum_row = x_ptr + row * n_cols, delta_ptr + row * n_cols, sum_ptr + row * n_cols
    head = (tl.load(x_row + head_cols).to(tl.float32) + tl.load(delta_row + head_cols).to(tl.float32)).to(dtype)
    tail = (tl.load(x_row + tail_cols, mask=in_tail, other=0.0).to(tl.float32)
            + tl.load(delta_row + tail_cols, mask=in_tail, other=0.0).to(tl.float32)).to(dtype)
    tl.store(sum_row + head_cols, head)
    tl.store(sum_row + tail_cols, tail, mask=in_tail)
    head, tail = head.to(tl.float32), tail.to(tl.float32)
    mean = (tl.sum(head, axis=0) + tl.sum(tail, axis=0)) / n_cols
    head, tail = head - mean, tl.where(in_tail, tail - mean, 0.0)
    rstd = tl.math.rsqrt((tl.sum(head * head, axis=0) + tl.sum(tail * tail, axis=0)) / n_cols + eps)
    head = head * rstd * tl.load(weight_ptr + head_cols).to(tl.float32) + tl.load(bias_ptr + head_cols).to(tl.float32)
    tail = (tail * rstd * tl.load(weight_ptr + tail_cols, mask=in_tail, other=0.0).to(tl.float32)
            + tl.load(bias_ptr + tail_cols, mask=in_tail, other=0.0).to(tl.float32))
    head, tail = head.to(dtype).to(tl.float32), tail.to(dtype).to(tl.float32)
    _store_quantized(out_ptr, scale_ptr, row, head, tail, head_cols, tail_cols, in_tail, n_cols, E4M3_MAX, TINY)


@triton.jit
def _quantize_rows_kernel(x_ptr, out_ptr, scale_ptr, n_cols, E4M3_MAX: tl.constexpr, TINY: tl.constexpr,
                          HEAD: tl.constexpr, TAIL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    head_cols, tail_cols = tl.arange(0, HEAD), HEAD + tl.arange(0, TAIL)
    in_tail = tail_cols < n_cols
    head = tl.load(x_ptr + row * n_cols + head_cols).to(tl.float32)
    tail = tl.load(x_ptr + row * n_cols + tail_cols, mask=in_tail, other=0.0).to(tl.float32)
    _store_quantized(out_ptr, scale_ptr, row, head, tail, head_cols, tail_cols, in_tail, n_cols, E4M3_MAX, TINY)


# 32-64 fp32 values per thread: the GELU's 10,240 in 8 warps (the fastest of 4-32 at 64 per thread).
ELEMENTS_PER_THREAD = 40


def row_blocks(n_cols: int) -> dict[str, int]:
    """A row of `n_cols` as its largest power-of-two block and a power-of-two block for the rest,
    and the warps that give each thread about `ELEMENTS_PER_THREAD` of it."""
    head = 1 << (n_cols.bit_length() - 1)
    tail = triton.next_power_of_2(n_cols - head) if n_cols > head else 1
    return {"HEAD": head, "TAIL": tail, "num_warps": min(16, max(1, triton.next_power_of_2(n_cols // ELEMENTS_PER_THREAD) // 32))}


def _rows_out(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty(x.shape, dtype=E4M3, device=x.device), torch.empty((x.shape[0], 1), dtype=torch.float32, device=x.device)


def gelu_quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows(F.gelu(x))` for a CUDA (M, K) x, in one kernel."""
    x = x.contiguous()
    out, scale = _rows_out(x)
    if x.shape[0]:
        _gelu_quantize_rows_kernel[(x.shape[0],)](x, out, scale, x.shape[1], E4M3_MAX=E4M3_MAX, TINY=TINY,
                                                  **row_blocks(x.shape[1]))
    return out, scale


def add_layer_norm_quantize_rows(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                 eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`x + delta` and `quantize_rows(F.layer_norm(x + delta, ...))` for CUDA (M, K) x and delta, in one kernel."""
    # The width from the weight: under torch.compile x's may be symbolic, which a Triton launch cannot take.
    width = weight.shape[0]
    x, delta = x.contiguous().view(-1, width), delta.contiguous().view(-1, width)
    total = torch.empty_like(x)
    out, scale = _rows_out(x)
    if x.shape[0]:
        _add_layer_norm_quantize_rows_kernel[(x.shape[0],)](x, delta, total, weight, bias, out, scale, width, eps,
                                                            E4M3_MAX=E4M3_MAX, TINY=TINY, **row_blocks(width))
    return total, out, scale


def quantize_activation_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows(x)` for a CUDA (M, K) x, in one kernel."""
    x = x.contiguous()
    out, scale = _rows_out(x)
    if x.shape[0]:
        _quantize_rows_kernel[(x.shape[0],)](x, out, scale, x.shape[1], E4M3_MAX=E4M3_MAX, TINY=TINY,
                                             **row_blocks(x.shape[1]))
    return out, scale
