"""Varlen (packed) attention back ends, chosen once when a model is loaded.

A pack is described once, by `plan_attention`: whatever a back end derives from the pack's
`cu_seqlens` (a padding layout and mask, host-side bounds) is computed there and shared by every
layer, so no layer repeats it and compiled layers see plain tensors.
`attend(q, k, v, plan, scale=...)` then takes q, k, v of shape (T, H, D) and returns (T, H, D).
Attention never crosses a sequence boundary. `scale` multiplies q k^T exactly once. An optional
`alibi_slopes` (H,) fp32 adds the symmetric bias `-slope[h] * |i - j|` (DNABERT-S).

- `flash_attn`: flash-attn's `flash_attn_varlen_func` (CUDA, fp16/bf16), when installed.
- `torch_varlen`: `torch.nn.attention.varlen.varlen_attn` (torch >= 2.10, CUDA, fp16/bf16, no bias).
- `triton_varlen`: our Triton kernel over the pack, ALiBi computed in it (`vnp_core.varlen_attention`;
  CUDA, where Triton is). What DNABERT-S runs on a GPU without flash-attn.
- `sdpa_padded`: pad to (B, S), one `scaled_dot_product_attention` call with a mask/bias (any device).
- `sdpa_bucketed`: the CPU's choice. Sequences grouped by length (`length_groups`), each group
  gathered into (n, H, S, D) padded to its own longest and attended in one SDPA call, which on the
  CPU is PyTorch's fused flash kernel; no sequence is padded to the pack's longest. Reads the pack's
  bounds on the host (once per pack, in `plan_attention`).
- `sdpa_reference`: one SDPA call per sequence (the exact CPU/fp32 reference). Its (H, L, D) inputs
  take SDPA's unfused math path, ~10 small ops per sequence and layer: the CPU's old default, slow
  in Python overhead and, on a busy machine, in OpenMP waits per op.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from vnp_core.packing import length_groups, pad_packed, padded_gather_index, padded_slots, unpad

log = logging.getLogger(__name__)

# sdpa_bucketed: a group's shortest sequence grows by at most this share when padded to its longest.
# Exact-length groups (0) made more calls and ran 3-20% slower on VirNucPro-like packs; 1/16 to 1/2
# were within noise of each other (2 threads of a Xeon, ESM-2 2x64 and 6x320, 30-1022 residues).
BUCKET_MAX_PADDING = 0.125


@dataclass(frozen=True)
class Bucket:
    """Sequences of similar length attended as one padded (n, H, S, D) batch."""

    shape: tuple[int, int]  # (n, S): sequences, padded length
    gather: torch.Tensor  # (n * S,) the pack's token at each padded slot (padding repeats a real token)
    # None (equal lengths, no bias); (n, 1, 1, S) bool: padded keys off; with ALiBi (1, H, S, S), or
    # (n, H, S, S) with -inf on padded keys.
    mask: torch.Tensor | None


@dataclass(frozen=True)
class AttentionPlan:
    """One pack as its attention back end needs it; built by `plan_attention`, read by `attend`."""

    backend: str
    cu_seqlens: torch.Tensor  # (B + 1,) int32 on the device
    max_seqlen: int
    alibi_slopes: torch.Tensor | None = None  # (H,) fp32
    slots: torch.Tensor | None = None  # sdpa_padded: (T,) each token's row of the (B * S) padded rows
    mask: torch.Tensor | None = None  # sdpa_padded: (B, 1, 1, S) bool, or (B, H, S, S) ALiBi bias with -inf pads
    bounds: tuple[int, ...] = ()  # sdpa_reference: cu_seqlens on the host
    buckets: tuple[Bucket, ...] = ()  # sdpa_bucketed
    unbucket: torch.Tensor | None = None  # sdpa_bucketed: (T,) each token's row in the buckets' outputs, concatenated


def alibi_bias(slopes: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """(H, L, L) symmetric ALiBi bias `-slope[h] * |i - j|`, computed in fp32."""
    pos = torch.arange(length, device=slopes.device, dtype=torch.float32)
    distance = (pos[None, :] - pos[:, None]).abs()
    return (-slopes.float()[:, None, None] * distance).to(dtype)


def padded_attention_mask(cu_seqlens: torch.Tensor, max_seqlen: int, dtype: torch.dtype,
                          alibi_slopes: torch.Tensor | None) -> torch.Tensor:
    """The mask of a padded (B, H, S, S) SDPA call: padded keys get no weight, plus ALiBi if given."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    key_mask = (torch.arange(max_seqlen, device=cu_seqlens.device)[None, :] < lengths[:, None])[:, None, None, :]
    if alibi_slopes is None:
        return key_mask  # (B, 1, 1, S)
    return alibi_bias(alibi_slopes, max_seqlen, dtype)[None].masked_fill(~key_mask, float("-inf"))


def length_buckets(cu_seqlens: torch.Tensor, dtype: torch.dtype, alibi_slopes: torch.Tensor | None,
                   max_padding: float = BUCKET_MAX_PADDING) -> tuple[tuple[Bucket, ...], torch.Tensor]:
    """The pack's sequences as buckets of similar length, and `unbucket`: for each token of the pack,
    its row in the buckets' (n * S, H, D) outputs laid end to end."""
    cu = cu_seqlens.cpu().numpy().astype(np.int64)
    starts, lengths = cu[:-1], np.diff(cu)
    device = cu_seqlens.device
    buckets, unbucket, offset = [], np.empty(cu[-1], dtype=np.int64), 0
    for group in length_groups(lengths, max_padding):
        n, s = len(group), int(lengths[group].max())
        gather = padded_gather_index(starts[group], lengths[group], s)  # (n, S)
        real = np.arange(s) < lengths[group, None]
        unbucket[gather[real]] = offset + np.flatnonzero(real)
        offset += n * s
        key_mask = None if real.all() else torch.from_numpy(real).to(device)[:, None, None, :]
        buckets.append(Bucket((n, s), torch.from_numpy(gather.reshape(-1)).to(device),
                              key_mask if alibi_slopes is None else _alibi_mask(alibi_slopes, s, dtype, key_mask)))
    return tuple(buckets), torch.from_numpy(unbucket).to(device)


def _alibi_mask(slopes: torch.Tensor, length: int, dtype: torch.dtype, key_mask: torch.Tensor | None) -> torch.Tensor:
    """ALiBi for one bucket: (1, H, S, S) shared by its sequences, or (n, H, S, S) with their padded keys at -inf."""
    bias = alibi_bias(slopes, length, dtype)[None]
    return bias if key_mask is None else bias.masked_fill(~key_mask, float("-inf"))


def plan_attention(backend: str, cu_seqlens: torch.Tensor, tokens: int, max_seqlen: int, dtype: torch.dtype,
                   alibi_slopes: torch.Tensor | None = None) -> AttentionPlan:
    """Everything `backend` derives from one pack's boundaries, computed once for all layers."""
    if backend in ("flash_attn", "torch_varlen", "triton_varlen"):
        # Varlen kernels take max_seqlen as an upper bound only. Rounded up to a multiple of 8, it
        # never changes alignment between packs: DNABERT-S's padded layers recompiled on exactly
        # that guard (`max_seqlen % 8`) on an H200; ESM-2 3B's compiled once in the runs since.
        max_seqlen = -(-max_seqlen // 8) * 8
    plan = AttentionPlan(backend, cu_seqlens, max_seqlen, alibi_slopes)
    if backend == "sdpa_padded":
        return replace(plan, slots=padded_slots(cu_seqlens, tokens, max_seqlen),
                       mask=padded_attention_mask(cu_seqlens, max_seqlen, dtype, alibi_slopes))
    if backend == "sdpa_reference":
        return replace(plan, bounds=tuple(cu_seqlens.tolist()))
    if backend == "sdpa_bucketed":
        buckets, unbucket = length_buckets(cu_seqlens, dtype, alibi_slopes)
        return replace(plan, buckets=buckets, unbucket=unbucket)
    return plan


def _flash_attn(q, k, v, plan: AttentionPlan, scale: float) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(
        q, k, v, plan.cu_seqlens, plan.cu_seqlens, plan.max_seqlen, plan.max_seqlen,
        softmax_scale=scale, causal=False, alibi_slopes=plan.alibi_slopes,
    )


@functools.cache
def _varlen_attn_takes_scale() -> bool:
    from torch.nn.attention.varlen import varlen_attn

    return "scale" in inspect.signature(varlen_attn).parameters


def _torch_varlen(q, k, v, plan: AttentionPlan, scale: float) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    if plan.alibi_slopes is not None:
        raise ValueError("torch_varlen takes no attention bias: use flash_attn or sdpa_padded for ALiBi")
    cu, s = plan.cu_seqlens, plan.max_seqlen
    if _varlen_attn_takes_scale():
        return varlen_attn(q, k, v, cu, cu, s, s, scale=scale)
    # torch 2.10 applies head_dim ** -0.5 itself: fold the difference into q.
    return varlen_attn(q * (scale * q.shape[-1] ** 0.5), k, v, cu, cu, s, s)


def _triton_varlen(q, k, v, plan: AttentionPlan, scale: float) -> torch.Tensor:
    from vnp_core.varlen_attention import varlen_attention

    return varlen_attention(q, k, v, plan.cu_seqlens, plan.max_seqlen, scale, plan.alibi_slopes)


def _sdpa_padded(q, k, v, plan: AttentionPlan, scale: float) -> torch.Tensor:
    batch_size = len(plan.cu_seqlens) - 1
    qp, kp, vp = (pad_packed(t, plan.slots, batch_size, plan.max_seqlen).transpose(1, 2) for t in (q, k, v))  # (B, H, S, D)
    out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=plan.mask, scale=scale)
    return unpad(out.transpose(1, 2), plan.slots)


def _sdpa_bucketed(q, k, v, plan: AttentionPlan, scale: float) -> torch.Tensor:
    outs = []
    for bucket in plan.buckets:
        qb, kb, vb = (t.index_select(0, bucket.gather).unflatten(0, bucket.shape).transpose(1, 2) for t in (q, k, v))  # (n, H, S, D)
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=bucket.mask, scale=scale)
        # The CPU kernel writes (n, S, H, D) memory: back to rows of tokens without a copy.
        outs.append(out.transpose(1, 2).flatten(0, 1))  # (n * S, H, D)
    return (outs[0] if len(outs) == 1 else torch.cat(outs)).index_select(0, plan.unbucket)


def _sdpa_reference(q, k, v, plan: AttentionPlan, scale: float) -> torch.Tensor:
    out = torch.empty_like(q)
    for a, b in zip(plan.bounds[:-1], plan.bounds[1:]):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))  # (H, L, D)
        bias = None if plan.alibi_slopes is None else alibi_bias(plan.alibi_slopes, b - a, q.dtype)
        out[a:b] = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=bias, scale=scale).transpose(0, 1)
    return out


BACKENDS = {
    "flash_attn": _flash_attn,
    "torch_varlen": _torch_varlen,
    "triton_varlen": _triton_varlen,
    "sdpa_padded": _sdpa_padded,
    "sdpa_bucketed": _sdpa_bucketed,
    "sdpa_reference": _sdpa_reference,
}


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, *, scale: float) -> torch.Tensor:
    return BACKENDS[plan.backend](q, k, v, plan, scale)


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


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def select_backend(requested: str, device: torch.device, dtype: torch.dtype, needs_bias: bool) -> str:
    """Resolve "auto" (or check an explicit choice) for this device, dtype and model. Logged by name."""
    half = dtype in (torch.float16, torch.bfloat16)
    cuda = device.type == "cuda"
    if requested == "auto":
        if cuda and half and flash_attn_available():
            name = "flash_attn"
        elif cuda and half and not needs_bias and torch_varlen_available():
            name = "torch_varlen"
        elif cuda and half and triton_available():
            name = "triton_varlen"
        elif cuda:
            name = "sdpa_padded"  # one call, no host synchronisation
        else:
            name = "sdpa_bucketed"  # bench/cpu_embed_bench.py: exact, and faster than sdpa_reference
    else:
        name = requested
        if name not in BACKENDS:
            raise ValueError(f"unknown attention back end {name!r}; choose one of {sorted(BACKENDS)} or 'auto'")
        if name in ("flash_attn", "torch_varlen", "triton_varlen") and not (cuda and half):
            raise ValueError(f"attention back end {name} needs a CUDA device and float16/bfloat16: choose 'auto' here")
        if name == "flash_attn" and not flash_attn_available():
            raise ValueError("attention back end flash_attn requested but the flash-attn package is not installed")
        if name == "torch_varlen" and (needs_bias or not torch_varlen_available()):
            raise ValueError("attention back end torch_varlen is unavailable here (torch < 2.10, or the model needs ALiBi)")
        if name == "triton_varlen" and not triton_available():
            raise ValueError("attention back end triton_varlen requested but the triton package is not installed")
    log.info("attention back end: %s (device %s, dtype %s)", name, device, dtype)
    return name
