"""Packed (varlen) flash attention with an optional ALiBi bias: one Triton kernel, called as the
custom op `vnp::varlen_attention`.

It reads q, k and v where the projection wrote them (strided views of one (T, 3, H, D) output) and
writes (T, H, D): no padding, no (B, H, S, S) bias in memory. Padded SDPA spent more of DNABERT-S's
time moving rows into and out of its padded layout than attending (bench/BENCHMARKS.md).

One program per (sequence, head, block of BLOCK_M queries) loops over its sequence's keys BLOCK_N at
a time with the online softmax, in fp32, in the log2 domain (`exp2`). The bias is
`-slope[h] * |i - j|` within a sequence, as flash-attn's `alibi_slopes` and MosaicBERT define it.
Triton's interpreter (`TRITON_INTERPRET=1`) runs the same kernel on the CPU, which is how the tests
check it without a GPU. `vnp_core.attention` imports this module only when a pack uses it.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = math.log2(math.e)


@triton.jit
def _head_block(ptr, token_stride, tokens, head, head_dim, dims):
    """Pointers to head `head` of `tokens` (rows of a (T, H, head_dim) view): a (tokens, dims) block."""
    return ptr + tokens[:, None] * token_stride + head * head_dim + dims[None, :]


@triton.jit
def _varlen_attention_kernel(q_ptr, k_ptr, v_ptr, out_ptr, cu_seqlens_ptr, slopes_ptr,
                             q_stride, k_stride, v_stride, out_stride, head_dim, scale_log2,
                             LOG2E: tl.constexpr, HAS_ALIBI: tl.constexpr, PRECISION: tl.constexpr,
                             DIM_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    sequence, head, block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(cu_seqlens_ptr + sequence).to(tl.int64)
    length = tl.load(cu_seqlens_ptr + sequence + 1).to(tl.int64) - start
    if block * BLOCK_M >= length:
        return
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)  # positions in the sequence
    dims = tl.arange(0, DIM_BLOCK)
    dim_in = dims < head_dim
    q_mask = (rows < length)[:, None] & dim_in[None, :]
    q = tl.load(_head_block(q_ptr, q_stride, start + rows, head, head_dim, dims), mask=q_mask, other=0.0)
    slope_log2 = 0.0
    if HAS_ALIBI:
        slope_log2 = tl.load(slopes_ptr + head) * LOG2E
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DIM_BLOCK], tl.float32)
    for key_start in range(0, length, BLOCK_N):
        cols = key_start + tl.arange(0, BLOCK_N)
        col_in = cols < length
        kv_mask = col_in[:, None] & dim_in[None, :]
        k = tl.load(_head_block(k_ptr, k_stride, start + cols, head, head_dim, dims), mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        if HAS_ALIBI:
            scores -= slope_log2 * tl.abs(rows[:, None] - cols[None, :]).to(tl.float32)
        scores = tl.where(col_in[None, :], scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        weights = tl.exp2(scores - new_max[:, None])
        rescale = tl.exp2(row_max - new_max)
        row_sum = row_sum * rescale + tl.sum(weights, axis=1)
        v = tl.load(_head_block(v_ptr, v_stride, start + cols, head, head_dim, dims), mask=kv_mask, other=0.0)
        acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v, input_precision=PRECISION)
        row_max = new_max
    out = acc / row_sum[:, None]
    tl.store(_head_block(out_ptr, out_stride, start + rows, head, head_dim, dims), out.to(out_ptr.dtype.element_ty), mask=q_mask)


def block_sizes(max_seqlen: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): queries per program, keys per step. 64 x 32 was the fastest of six on an H200
    for both 150-bp reads (~35 DNABERT-S tokens) and 500-bp chunks (~110); fewer queries when every
    sequence of the pack is shorter. tl.dot needs at least 16 of each."""
    queries = max(16, min(64, triton.next_power_of_2(max_seqlen)))
    return queries, min(32, queries)


@torch.library.custom_op("vnp::varlen_attention", mutates_args=())
def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                     scale: float, alibi_slopes: torch.Tensor | None) -> torch.Tensor:
    """(T, H, D) attention of q, k, v (T, H, D) within each sequence of `cu_seqlens` (B + 1,) int32.

    Each of q, k, v may be a view with any token stride (heads and dims contiguous within a token);
    `max_seqlen` bounds the longest sequence; `alibi_slopes` (H,) fp32 or None.
    """
    tokens, heads, head_dim = q.shape
    for t in (q, k, v):
        if t.stride(2) != 1 or t.stride(1) != head_dim:
            raise ValueError("varlen_attention: each token's heads and dims must be contiguous")
    out = q.new_empty(tokens, heads, head_dim)
    batch_size = cu_seqlens.shape[0] - 1
    if tokens == 0 or batch_size == 0:
        return out
    block_m, block_n = block_sizes(max_seqlen)
    grid = (batch_size, heads, -(-max_seqlen // block_m))
    slopes = alibi_slopes if alibi_slopes is not None else cu_seqlens  # never read without ALiBi
    _varlen_attention_kernel[grid](q, k, v, out, cu_seqlens, slopes, q.stride(0), k.stride(0), v.stride(0),
                                   out.stride(0), head_dim, scale * LOG2E, LOG2E=LOG2E, HAS_ALIBI=alibi_slopes is not None,
                                   # fp32 in full: Triton's default for fp32 dots is TF32.
                                   PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                                   DIM_BLOCK=max(16, triton.next_power_of_2(head_dim)),
                                   BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
    return out


@varlen_attention.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale, alibi_slopes):
    return q.new_empty(q.shape)
