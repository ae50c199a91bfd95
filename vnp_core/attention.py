"""Varlen (packed) attention back ends, chosen once when a model is loaded.

Every back end takes q, k, v of shape (T, H, D) for a pack described by `cu_seqlens`, and returns
(T, H, D). Attention never crosses a sequence boundary. `scale` multiplies q k^T exactly once.
An optional `alibi_slopes` (H,) fp32 adds the symmetric bias `-slope[h] * |i - j|` (DNABERT-S).

- `flash_attn`: flash-attn's `flash_attn_varlen_func` (CUDA, fp16/bf16), when installed.
- `torch_varlen`: `torch.nn.attention.varlen.varlen_attn` (torch >= 2.10, CUDA, fp16/bf16, no bias).
- `sdpa_padded`: pad to (B, S), one `scaled_dot_product_attention` call with a mask/bias (any device).
- `sdpa_reference`: one SDPA call per sequence (the exact CPU/fp32 reference).
- `flex`: FlexAttention with a document mask and ALiBi as a `score_mod` (compiled on CUDA; on
  the CPU it runs uncompiled, materialising the scores, for tests only).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from vnp_core.packing import pad_packed, token_layout, unpad

log = logging.getLogger(__name__)

AttentionFn = Callable[..., torch.Tensor]


def _flash_attn(q, k, v, cu_seqlens, max_seqlen, *, scale, alibi_slopes=None):
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
        softmax_scale=scale, causal=False, alibi_slopes=alibi_slopes,
    )


@functools.cache
def _varlen_attn_takes_scale() -> bool:
    from torch.nn.attention.varlen import varlen_attn

    return "scale" in inspect.signature(varlen_attn).parameters


def _torch_varlen(q, k, v, cu_seqlens, max_seqlen, *, scale, alibi_slopes=None):
    from torch.nn.attention.varlen import varlen_attn

    if alibi_slopes is not None:
        raise ValueError("torch_varlen takes no attention bias: use flash_attn or sdpa_padded for ALiBi")
    if _varlen_attn_takes_scale():
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scale)
    # torch 2.10 applies head_dim ** -0.5 itself: fold the difference into q.
    q = q * (scale * q.shape[-1] ** 0.5)
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)


def alibi_bias(slopes: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """(H, L, L) symmetric ALiBi bias `-slope[h] * |i - j|`, computed in fp32."""
    pos = torch.arange(length, device=slopes.device, dtype=torch.float32)
    distance = (pos[None, :] - pos[:, None]).abs()
    return (-slopes.float()[:, None, None] * distance).to(dtype)


def _sdpa_padded(q, k, v, cu_seqlens, max_seqlen, *, scale, alibi_slopes=None):
    # One layout for q, k, v and the output: computed once, and free of host synchronisation.
    layout = token_layout(cu_seqlens, q.shape[0])
    batch_size = len(cu_seqlens) - 1
    qp, kp, vp = (pad_packed(t, layout, batch_size, max_seqlen).transpose(1, 2) for t in (q, k, v))  # (B, H, S, D)
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    # (B, 1, 1, S): padded keys get no weight
    key_mask = (torch.arange(max_seqlen, device=q.device)[None, :] < lengths[:, None])[:, None, None, :]
    if alibi_slopes is None:
        attn_mask = key_mask
    else:
        bias = alibi_bias(alibi_slopes, max_seqlen, q.dtype)[None]
        attn_mask = bias.masked_fill(~key_mask, float("-inf"))
    out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=attn_mask, scale=scale)
    return unpad(out.transpose(1, 2), layout)


def _sdpa_reference(q, k, v, cu_seqlens, max_seqlen, *, scale, alibi_slopes=None):
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))  # (H, L, D)
        bias = None if alibi_slopes is None else alibi_bias(alibi_slopes, b - a, q.dtype)
        out[a:b] = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=bias, scale=scale).transpose(0, 1)
    return out


@functools.cache
def _compiled_flex_attention() -> AttentionFn:
    from torch.nn.attention.flex_attention import flex_attention

    # dynamic: every pack has its own length, and a recompile per length would cost more than it saves.
    return torch.compile(flex_attention, dynamic=True)


def _flex(q, k, v, cu_seqlens, max_seqlen, *, scale, alibi_slopes=None):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    tokens = q.shape[0]
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    document = torch.repeat_interleave(torch.arange(len(lengths), device=q.device), lengths, output_size=tokens)

    def same_document(b, h, q_idx, kv_idx):
        return document[q_idx] == document[kv_idx]

    def alibi(score, b, h, q_idx, kv_idx):
        # Sequences lie contiguously in the pack, so within one |q_idx - kv_idx| is their distance.
        return score - alibi_slopes[h] * (q_idx - kv_idx).abs()

    cuda = q.is_cuda
    block_mask = create_block_mask(same_document, None, None, tokens, tokens, device=q.device, _compile=cuda)
    attend = _compiled_flex_attention() if cuda else flex_attention
    out = attend(*(t.transpose(0, 1)[None] for t in (q, k, v)), block_mask=block_mask, scale=scale,
                 score_mod=None if alibi_slopes is None else alibi)
    return out[0].transpose(0, 1)


BACKENDS: dict[str, AttentionFn] = {
    "flash_attn": _flash_attn,
    "torch_varlen": _torch_varlen,
    "sdpa_padded": _sdpa_padded,
    "sdpa_reference": _sdpa_reference,
    "flex": _flex,
}


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def torch_varlen_available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def select_backend(requested: str, device: torch.device, dtype: torch.dtype, needs_bias: bool) -> str:
    """Resolve "auto" (or check an explicit choice) for this device, dtype and model. Logged by name."""
    half = dtype in (torch.float16, torch.bfloat16)
    cuda = device.type == "cuda"
    if requested == "auto":
        if cuda and half and flash_attn_available():
            name = "flash_attn"
        elif cuda and half and not needs_bias and torch_varlen_available():
            name = "torch_varlen"
        elif cuda:
            name = "sdpa_padded"
        else:
            name = "sdpa_reference"
    else:
        name = requested
        if name not in BACKENDS:
            raise ValueError(f"unknown attention back end {name!r}; choose one of {sorted(BACKENDS)} or 'auto'")
        if name in ("flash_attn", "torch_varlen") and not (cuda and half):
            raise ValueError(f"attention back end {name} needs a CUDA device and float16/bfloat16")
        if name == "flash_attn" and not flash_attn_available():
            raise ValueError("attention back end flash_attn requested but the flash-attn package is not installed")
        if name == "torch_varlen" and (needs_bias or not torch_varlen_available()):
            raise ValueError("attention back end torch_varlen is unavailable here (torch < 2.10, or the model needs ALiBi)")
    log.info("attention back end: %s (device %s, dtype %s)", name, device, dtype)
    return name


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, *, scale, backend, alibi_slopes=None):
    return BACKENDS[backend](q, k, v, cu_seqlens, max_seqlen, scale=scale, alibi_slopes=alibi_slopes)
