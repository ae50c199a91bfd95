"""ESM-2 over packed sequences: the same state dict and the same numbers as fair-esm's `ESM2`.

The forward runs on a `PackedBatch` (sequences concatenated, no padding) and follows
../shared/spec/esm2-packed.md: token-dropout rescale per sequence, pre-LN layers, rotary positions
restarting at every sequence, exact-erf GELU, `emb_layer_norm_after`, residue-only mean pooling.
Checkpoints are read by `esm2_checkpoint`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from vnp_core.attention import AttentionPlan, attend, plan_attention
from vnp_core.config import ESM2_MAX_RESIDUES
from vnp_core.models.base import SequenceTokenizer, Tokenized, checkpoint_embedding
from vnp_core.models.fused_ops import add_layer_norm
from vnp_core.packing import PackedBatch, segment_mean

# The ESM-1b alphabet of every ESM-2 model, in token-id order.
TOKENS = ("<cls>", "<pad>", "<eos>", "<unk>", *"LAGVSERTIDPKQNFYMHWCXBUZO.-", "<null_1>", "<mask>")
CLS, PAD, EOS, UNK, MASK = 0, 1, 2, 3, 32
RESIDUES = "".join(t for t in TOKENS if len(t) == 1)
# Token id of each ASCII code point, -1 where it is no residue.
_RESIDUE_IDS = np.full(128, -1, dtype=np.int64)
_RESIDUE_IDS[[ord(r) for r in RESIDUES]] = [TOKENS.index(r) for r in RESIDUES]

# Token dropout masked 15% x 80% of the tokens in training; inference rescales to match.
TOKEN_DROPOUT_KEEP = 1 - 0.15 * 0.8
LAYER_NORM_EPS = 1e-5
POOLING = "mean over residues, BOS/EOS excluded, fp32"
# Compiling the layers (~12% faster on ESM-2 3B) costs seconds at the first pack; from about this
# many tokens a shard repays it, even on a host whose compile cache is cold (bench/BENCHMARKS.md).
COMPILE_MIN_TOKENS = 2_000_000


@dataclass(frozen=True)
class ESM2Config:
    num_layers: int
    embed_dim: int
    attention_heads: int

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.attention_heads


@dataclass(frozen=True)
class ESM2Tokenizer(SequenceTokenizer):
    """`[cls] residues [eos]`; proteins longer than `max_residues` keep their N-terminal part."""

    max_residues: int | None = ESM2_MAX_RESIDUES

    @property
    def digest(self) -> str:
        return f"esm2 alphabet, max_residues={self.max_residues}"

    def encode(self, sequence: str, record_id: str) -> tuple[np.ndarray, bool]:
        if not sequence:
            raise ValueError(f"record {record_id!r}: empty protein sequence")
        codes = np.frombuffer(sequence.encode("utf-32-le"), dtype=np.uint32)
        # Every code point >= 127 lands on DEL, which is not a residue.
        ids = _RESIDUE_IDS[np.minimum(codes, 127)]
        unknown = np.flatnonzero(ids < 0)
        if unknown.size:
            pos = int(unknown[0])
            raise ValueError(
                f"record {record_id!r}: unknown residue {sequence[pos]!r} at position {pos + 1} "
                f"(ESM-2 accepts {RESIDUES})"
            )
        truncated = self.max_residues is not None and len(ids) > self.max_residues
        if truncated:
            ids = ids[: self.max_residues]
        return np.concatenate(([CLS], ids, [EOS])), truncated

    def encode_many(self, sequences: Sequence[str], record_ids: Sequence[str]) -> Tokenized:
        """`encode` of every sequence as whole-array operations: a million proteins in about a second."""
        lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))
        starts = np.cumsum(lengths) - lengths
        # ASCII with "?" for any other code point: one byte per letter, and "?" is no residue.
        residues = _RESIDUE_IDS[np.frombuffer("".join(sequences).encode("ascii", "replace"), dtype=np.uint8)]
        empty, unknown = np.flatnonzero(lengths == 0)[:1], np.flatnonzero(residues < 0)[:1]
        if bad := [*empty.tolist(), *(np.searchsorted(starts, unknown, side="right") - 1).tolist()]:
            row = min(bad)
            self.encode(sequences[row], record_ids[row])  # raises the error that names the record and letter
        truncated = int((lengths > self.max_residues).sum()) if self.max_residues is not None else 0
        if truncated:
            position = np.arange(len(residues)) - np.repeat(starts, lengths)
            residues, lengths = residues[position < self.max_residues], np.minimum(lengths, self.max_residues)
        out_lengths = lengths + 2
        ends = np.cumsum(out_lengths)
        tokens = np.empty(int(ends[-1]) if len(ends) else 0, dtype=np.int32)
        special = np.zeros(len(tokens), dtype=bool)
        special[ends - out_lengths] = special[ends - 1] = True
        tokens[ends - out_lengths], tokens[ends - 1] = CLS, EOS
        tokens[~special] = residues
        return Tokenized(tokens, out_lengths, truncated)


# ----------------------------------------------------------------------------------------------
# The packed model


def rotary_tables(position_ids: torch.Tensor, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, 1, head_dim) cos and sin, computed in fp32: half-precision angles drift at long positions."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim)
    angles = position_ids.float()[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)[:, None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half (NeoX) rotary over all head dims of (T, H, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class SelfAttention(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x, plan: AttentionPlan, cos, sin):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # x: a tensor, or `Fp8Rows` in FP8 mode
        heads = (q.shape[0], self.num_heads, self.head_dim)
        q, k, v = apply_rotary(q.view(heads), cos, sin), apply_rotary(k.view(heads), cos, sin), v.view(heads)
        # fair-esm scales q before the rotation; rotation is linear, so scaling once in the kernel is the same.
        out = attend(q, k, v, plan, scale=self.head_dim**-0.5)
        return self.out_proj(out.flatten(1))


class ResidualLayerNorm(nn.LayerNorm):
    """LayerNorm of `x + delta`, returned with the sum: on a GPU one kernel that reads each row once."""

    def forward(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return add_layer_norm(x, delta, self.weight, self.bias, self.eps)


class TransformerLayer(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        self.self_attn_layer_norm = ResidualLayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.self_attn = SelfAttention(embed_dim, num_heads)
        self.final_layer_norm = ResidualLayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.fc1 = nn.Linear(embed_dim, 4 * embed_dim)
        self.activation = nn.GELU()  # exact erf
        self.fc2 = nn.Linear(4 * embed_dim, embed_dim)

    def forward(self, x, delta, plan: AttentionPlan, cos, sin):
        """The layer of `x + delta`, whose output it returns as the same pair: each residual add is left
        to the LayerNorm that reads its sum, including the next layer's, which a compiled layer cannot
        otherwise fuse (a whole pass over the activations per layer)."""
        x, h = self.self_attn_layer_norm(x, delta)
        x, h = self.final_layer_norm(x, self.self_attn(h, plan, cos, sin))
        return x, self.fc2(self.fc1_gelu(h))

    def fc1_gelu(self, h: torch.Tensor) -> torch.Tensor:
        """GELU(fc1(h)). In half precision on a GPU, in the epilogue of cuBLASLt's GEMM, which saves a pass
        over the 4x-wide activations (+5% tokens/s on ESM-2 3B; +8% with the add + LayerNorm kernel). Its
        GELU is the tanh approximation: in fp16 the cosine against fp32 with the exact GELU moved from
        0.9999996 to 0.9999995 (bench/BENCHMARKS.md). FP8 mode has its own fc1 and GELU."""
        if type(self.fc1) is nn.Linear and h.is_cuda and h.dtype in (torch.float16, torch.bfloat16):  # h: `Fp8Rows` in FP8 mode
            return torch._addmm_activation(self.fc1.bias, h, self.fc1.weight.t(), use_gelu=True)
        return self.activation(self.fc1(h))


class PackedESM2(nn.Module):
    """ESM-2 encoder without its LM and contact heads; parameter names are fair-esm's."""

    def __init__(self, cfg: ESM2Config, attention_backend: str = "sdpa_reference"):
        super().__init__()
        self.cfg = cfg
        self.attention_backend = attention_backend
        self.embed_tokens = checkpoint_embedding(len(TOKENS), cfg.embed_dim)
        self.layers = nn.ModuleList(TransformerLayer(cfg.embed_dim, cfg.attention_heads) for _ in range(cfg.num_layers))
        self.emb_layer_norm_after = nn.LayerNorm(cfg.embed_dim, eps=LAYER_NORM_EPS)

    @classmethod
    def from_config(cls, cfg: ESM2Config, device, dtype: torch.dtype, attention_backend: str) -> PackedESM2:
        """Random weights (for benchmarks), allocated directly on `device`."""
        with torch.device(device):
            model = cls(cfg, attention_backend)
            nn.init.normal_(model.embed_tokens.weight)  # the one tensor `checkpoint_embedding` leaves unset
        return model.to(dtype).eval().requires_grad_(False)

    @classmethod
    def from_weights(cls, cfg: ESM2Config, weights: dict[str, torch.Tensor], device, dtype: torch.dtype,
                     attention_backend: str) -> PackedESM2:
        """The model holding `weights`, each tensor cast on its own so no fp32 copy lands on the GPU."""
        with torch.device("meta"):
            model = cls(cfg, attention_backend)
        model.load_state_dict({k: w.to(device=device, dtype=dtype) for k, w in weights.items()}, assign=True)
        return model.eval().requires_grad_(False)

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        """(T, embed_dim) last-layer hidden states of every token of the pack."""
        ids, cu_seqlens = batch.input_ids, batch.cu_seqlens
        x = self.embed_tokens(ids)

        # Token dropout: <mask> embeddings are zeroed and each sequence is rescaled by its own mask ratio.
        # Position 0 opens each sequence: a sequence index per token without a host sync.
        is_mask = ids == MASK
        seq_of_token = torch.cumsum(batch.position_ids == 0, dim=0) - 1
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).float()
        masked = torch.zeros_like(lengths).index_add_(0, seq_of_token, is_mask.float())
        scale = TOKEN_DROPOUT_KEEP / (1 - masked / lengths)
        x = x.masked_fill(is_mask[:, None], 0.0) * scale[seq_of_token, None].to(x.dtype)

        cos, sin = rotary_tables(batch.position_ids, self.cfg.head_dim, x.dtype)
        plan = plan_attention(self.attention_backend, cu_seqlens, x.shape[0], batch.max_seqlen, x.dtype)
        delta = torch.zeros_like(x)  # a tensor, not None: the first layer runs the others' compiled graph
        for layer in self.layers:
            x, delta = layer(x, delta, plan, cos, sin)
        return self.emb_layer_norm_after(x + delta)

    def compile_layers(self, backend: str = "inductor") -> None:
        """Fuse each layer's elementwise work with torch.compile; shapes vary per pack, hence dynamic."""
        for layer in self.layers:
            layer.compile(dynamic=True, backend=backend)

    @torch.inference_mode()
    def embed(self, batch: PackedBatch) -> torch.Tensor:
        """(B, embed_dim) fp32 mean of each sequence's residues (BOS and EOS left out)."""
        return segment_mean(self(batch), batch.cu_seqlens, 1, 1)
