"""Triton kernels that fuse a layer's elementwise work with the op that makes its input: one row per
program, held in registers, read once and written once. Each is called through a custom op
(`fused_ops`, `fp8`), which runs the eager ops on the CPU.

- `add_layer_norm_rows`: a residual add and the LayerNorm after it.
- `gelu_mul_rows`: DNABERT-S's gated GELU, `gelu(gate) * up` of the `[gate; up]` halves of a row.
- FP8 mode's, each writing an FP8 linear layer's input in e4m3 with its row scale:
  `gelu_quantize_rows`, the GELU of fc1's output (fc2's input; torch.compile's fusion of it is a
  looped reduction over the 10,240-wide rows, which reads each row twice and computes its GELU
  twice); `add_layer_norm_quantize_rows` (q, k, v and fc1's input); `quantize_rows`, the
  attention's output (out_proj's input).

A row is held as two power-of-two blocks, the largest that fits and one for the rest (10,240 =
8,192 + 2,048; 2,560 = 2,048 + 512): one padded block left 37% of the GELU's lanes computing an erf
for nothing. As the eager ops do, each result is rounded to x's dtype before the row maximum, so the
scales are the same; the values are multiplied by the scale's reciprocal rather than divided by the
scale (an IEEE divide made the GELU kernel 1.8x slower), which moves about 1 in 25,000 of them by one
e4m3 step. The LayerNorm's sums run in another order than PyTorch's, so its rounding to x's dtype
may differ by one step. Each launcher writes into the outputs it is given (contiguous rows).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vnp_core.models.fp8 import E4M3_MAX

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
def _this_row(n_cols, HEAD: tl.constexpr, TAIL: tl.constexpr):
    """This program's row, the columns of its two blocks, and which of the tail's are in the row."""
    head_cols, tail_cols = tl.arange(0, HEAD), HEAD + tl.arange(0, TAIL)
    return tl.program_id(0).to(tl.int64), head_cols, tail_cols, tail_cols < n_cols


@triton.jit
def _load_row(ptr, row, n_cols, head_cols, tail_cols, in_tail):
    """Row `row` of the (M, n_cols) tensor at `ptr`, as its two blocks in fp32 (the tail padded with 0)."""
    return (tl.load(ptr + row * n_cols + head_cols).to(tl.float32),
            tl.load(ptr + row * n_cols + tail_cols, mask=in_tail, other=0.0).to(tl.float32))


@triton.jit
def _gelu_quantize_rows_kernel(x_ptr, out_ptr, scale_ptr, n_cols, E4M3_MAX: tl.constexpr, TINY: tl.constexpr,
                               HEAD: tl.constexpr, TAIL: tl.constexpr):
    row, head_cols, tail_cols, in_tail = _this_row(n_cols, HEAD, TAIL)
    head, tail = _load_row(x_ptr, row, n_cols, head_cols, tail_cols, in_tail)
    dtype = x_ptr.dtype.element_ty
    head, tail = _gelu(head).to(dtype).to(tl.float32), _gelu(tail).to(dtype).to(tl.float32)
    _store_quantized(out_ptr, scale_ptr, row, head, tail, head_cols, tail_cols, in_tail, n_cols, E4M3_MAX, TINY)


@triton.jit
def _add_layer_norm_row(x_ptr, delta_ptr, sum_ptr, weight_ptr, bias_ptr, row, n_cols, eps, head_cols, tail_cols, in_tail):
    """Stores row `row` of `x + delta` (in x's dtype) and returns its LayerNorm as two fp32 blocks
    rounded as x's dtype."""
    x_head, x_tail = _load_row(x_ptr, row, n_cols, head_cols, tail_cols, in_tail)
    delta_head, delta_tail = _load_row(delta_ptr, row, n_cols, head_cols, tail_cols, in_tail)
    dtype = x_ptr.dtype.element_ty
    head, tail = (x_head + delta_head).to(dtype), (x_tail + delta_tail).to(dtype)
    tl.store(sum_ptr + row * n_cols + head_cols, head)
    tl.store(sum_ptr + row * n_cols + tail_cols, tail, mask=in_tail)
    head, tail = head.to(tl.float32), tail.to(tl.float32)
    mean = (tl.sum(head, axis=0) + tl.sum(tail, axis=0)) / n_cols
    head, tail = head - mean, tl.where(in_tail, tail - mean, 0.0)
    rstd = tl.math.rsqrt((tl.sum(head * head, axis=0) + tl.sum(tail * tail, axis=0)) / n_cols + eps)
    weight_head, weight_tail = _load_row(weight_ptr, 0, n_cols, head_cols, tail_cols, in_tail)
    bias_head, bias_tail = _load_row(bias_ptr, 0, n_cols, head_cols, tail_cols, in_tail)
    head, tail = head * rstd * weight_head + bias_head, tail * rstd * weight_tail + bias_tail
    return head.to(dtype).to(tl.float32), tail.to(dtype).to(tl.float32)


@triton.jit
def _add_layer_norm_quantize_rows_kernel(x_ptr, delta_ptr, sum_ptr, weight_ptr, bias_ptr, out_ptr, scale_ptr, n_cols,
                                         eps, E4M3_MAX: tl.constexpr, TINY: tl.constexpr,
                                         HEAD: tl.constexpr, TAIL: tl.constexpr):
    row, head_cols, tail_cols, in_tail = _this_row(n_cols, HEAD, TAIL)
    head, tail = _add_layer_norm_row(x_ptr, delta_ptr, sum_ptr, weight_ptr, bias_ptr, row, n_cols, eps,
                                     head_cols, tail_cols, in_tail)
    _store_quantized(out_ptr, scale_ptr, row, head, tail, head_cols, tail_cols, in_tail, n_cols, E4M3_MAX, TINY)


@triton.jit
def _add_layer_norm_rows_kernel(x_ptr, delta_ptr, sum_ptr, weight_ptr, bias_ptr, out_ptr, n_cols, eps,
                                HEAD: tl.constexpr, TAIL: tl.constexpr):
    row, head_cols, tail_cols, in_tail = _this_row(n_cols, HEAD, TAIL)
    head, tail = _add_layer_norm_row(x_ptr, delta_ptr, sum_ptr, weight_ptr, bias_ptr, row, n_cols, eps,
                                     head_cols, tail_cols, in_tail)
    tl.store(out_ptr + row * n_cols + head_cols, head.to(out_ptr.dtype.element_ty))
    tl.store(out_ptr + row * n_cols + tail_cols, tail.to(out_ptr.dtype.element_ty), mask=in_tail)


@triton.jit
def _gelu_mul_rows_kernel(x_ptr, out_ptr, n_cols, HEAD: tl.constexpr, TAIL: tl.constexpr):
    row, head_cols, tail_cols, in_tail = _this_row(n_cols, HEAD, TAIL)
    gate_head, gate_tail = _load_row(x_ptr, 2 * row, n_cols, head_cols, tail_cols, in_tail)
    up_head, up_tail = _load_row(x_ptr, 2 * row + 1, n_cols, head_cols, tail_cols, in_tail)
    dtype = out_ptr.dtype.element_ty
    # Rounded as the eager ops round: the GELU to x's dtype, then the product.
    head = (_gelu(gate_head).to(dtype).to(tl.float32) * up_head).to(dtype)
    tail = (_gelu(gate_tail).to(dtype).to(tl.float32) * up_tail).to(dtype)
    tl.store(out_ptr + row * n_cols + head_cols, head)
    tl.store(out_ptr + row * n_cols + tail_cols, tail, mask=in_tail)


@triton.jit
def _quantize_rows_kernel(x_ptr, out_ptr, scale_ptr, n_cols, E4M3_MAX: tl.constexpr, TINY: tl.constexpr,
                          HEAD: tl.constexpr, TAIL: tl.constexpr):
    row, head_cols, tail_cols, in_tail = _this_row(n_cols, HEAD, TAIL)
    head, tail = _load_row(x_ptr, row, n_cols, head_cols, tail_cols, in_tail)
    _store_quantized(out_ptr, scale_ptr, row, head, tail, head_cols, tail_cols, in_tail, n_cols, E4M3_MAX, TINY)


# The GELU's 10,240 in 8 warps: the fastest of 4, 8 and 16 (bench/BENCHMARKS.md).
ELEMENTS_PER_THREAD = 40


def row_blocks(n_cols: int) -> dict[str, int]:
    """A row of `n_cols` as its largest power-of-two block and a power-of-two block for the rest,
    and the warps that give each thread about `ELEMENTS_PER_THREAD` of it."""
    head = 1 << (n_cols.bit_length() - 1)
    tail = triton.next_power_of_2(n_cols - head) if n_cols > head else 1
    return {"HEAD": head, "TAIL": tail, "num_warps": min(16, max(1, triton.next_power_of_2(n_cols // ELEMENTS_PER_THREAD) // 32))}


def gelu_quantize_rows(x: torch.Tensor, out: torch.Tensor, scale: torch.Tensor) -> None:
    _gelu_quantize_rows_kernel[(x.shape[0],)](x, out, scale, x.shape[1], E4M3_MAX=E4M3_MAX, TINY=TINY,
                                              **row_blocks(x.shape[1]))


def add_layer_norm_quantize_rows(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                 eps: float, total: torch.Tensor, out: torch.Tensor, scale: torch.Tensor) -> None:
    _add_layer_norm_quantize_rows_kernel[(x.shape[0],)](x, delta, total, weight, bias, out, scale, x.shape[1], eps,
                                                        E4M3_MAX=E4M3_MAX, TINY=TINY, **row_blocks(x.shape[1]))


def add_layer_norm_rows(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                        total: torch.Tensor, out: torch.Tensor) -> None:
    _add_layer_norm_rows_kernel[(x.shape[0],)](x, delta, total, weight, bias, out, x.shape[1], eps, **row_blocks(x.shape[1]))


def gelu_mul_rows(x: torch.Tensor, out: torch.Tensor) -> None:
    """out (M, n) = gelu(x[:, :n]) * x[:, n:] for x (M, 2n)."""
    _gelu_mul_rows_kernel[(x.shape[0],)](x, out, out.shape[1], **row_blocks(out.shape[1]))


def quantize_rows(x: torch.Tensor, out: torch.Tensor, scale: torch.Tensor) -> None:
    _quantize_rows_kernel[(x.shape[0],)](x, out, scale, x.shape[1], E4M3_MAX=E4M3_MAX, TINY=TINY, **row_blocks(x.shape[1]))
