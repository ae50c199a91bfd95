"""DNABERT-S run packed: the published architecture written out, and its BPE tokenizer.

DNABERT-S is DNABERT-2-117M (a MosaicBERT: ALiBi instead of position embeddings, post-LayerNorm
layers, a GLU feed-forward) fine-tuned contrastively. Its own `trust_remote_code` model no longer
runs on current Triton, so we run none of its code: `dnabert_s_checkpoint` loads the weights of a
local Hugging Face directory into the module below (../shared/spec/dnabert-s.md).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn

from vnp_core.attention import AttentionPlan, attend, plan_attention
from vnp_core.models.base import SequenceTokenizer, Tokenized, checkpoint_embedding
from vnp_core.models.checkpoint import read_json
from vnp_core.models.fused_ops import add_layer_norm, gelu_mul
from vnp_core.packing import PackedBatch, segment_mean

POOLING = "mean over all tokens incl. [CLS]/[SEP], fp32"
# Never compiled unless asked (`compile_min_tokens`): with its fused ops and the Triton attention
# kernel, compiled layers ran within 1.5% of eager ones on an H200 (1.68-1.77M tokens/s both), so a
# compile, ~1.8 s of first pack with a warm cache and 10-14 s with a cold one, never repays (bench/BENCHMARKS.md).
COMPILE_MIN_TOKENS = None
_ENCODE_BLOCK = 65536  # sequences per encode_batch call: bounds the tokenizer's transient memory


@dataclass(frozen=True)
class DnabertSConfig:
    """The fields of the checkpoint's `config.json` that shape the network."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    # Hugging Face BertConfig defaults, for a config.json that leaves them out.
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    @classmethod
    def from_json(cls, path: Path) -> DnabertSConfig:
        raw = read_json(path, [f.name for f in fields(cls) if f.default is MISSING])
        return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi slopes as MosaicBERT computes them, fp32.

    For n heads, a power of two, the geometric series 2^(-8/n), 2^(-16/n), ...; otherwise those of
    the largest power of two below n, then every other slope of the next power of two.
    """

    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    lower = 2 ** math.floor(math.log2(num_heads))
    slopes = geometric(lower) + geometric(2 * lower)[0::2][: num_heads - lower]
    return torch.tensor(slopes, dtype=torch.float32)


class DnabertSTokenizer(SequenceTokenizer):
    """The checkpoint's BPE `tokenizer.json`; picklable, as `tokenizers.Tokenizer` is.

    Sequences are upper-cased first: the vocabulary is upper-case and prep keeps the input's case,
    so soft-masked (lower-case) bases would otherwise all become [UNK]. Letters the vocabulary
    lacks become [UNK], as in the original model. The file's post-processor adds [CLS] ... [SEP],
    and nothing is truncated: VirNucPro embeds each sequence whole.
    """

    def __init__(self, tokenizer_json: Path):
        try:
            self._tokenizer = Tokenizer.from_file(str(tokenizer_json))
        except Exception as error:  # the Rust library raises its own exception type for any bad file
            raise ValueError(f"{tokenizer_json}: not a readable tokenizer.json ({error})") from error
        self._digest = "dnabert_s upper-cased, tokenizer.json sha256=" + hashlib.sha256(Path(tokenizer_json).read_bytes()).hexdigest()
        # A tokenizer.json may carry a padding or truncation setting; packing needs neither.
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self.vocab_size = self._tokenizer.get_vocab_size()
        wrapped = [self._tokenizer.token_to_id("[CLS]"), self._tokenizer.token_to_id("[SEP]")]
        if None in wrapped or self._tokenizer.encode("").ids != wrapped:
            raise ValueError(f"{tokenizer_json}: its post-processor must wrap each sequence as [CLS] ... [SEP]")

    @property
    def digest(self) -> str:
        return self._digest

    def encode(self, sequence: str, record_id: str) -> tuple[np.ndarray, bool]:
        ids = self._tokenizer.encode(sequence.upper()).ids
        if len(ids) <= 2:
            raise ValueError(f"record {record_id!r}: empty nucleotide sequence")
        return np.asarray(ids, dtype=np.int64), False

    def encode_many(self, sequences: Sequence[str], record_ids: Sequence[str]) -> Tokenized:
        # One call into the Rust tokenizer per block (it tokenises the block on all cores): per-sequence
        # calls cost ~50 us each, a minute for a 1M-read sample.
        encoded = []
        for start in range(0, len(sequences), _ENCODE_BLOCK):
            block = sequences[start : start + _ENCODE_BLOCK]
            encoded += [np.asarray(e.ids, dtype=np.int32) for e in self._tokenizer.encode_batch([s.upper() for s in block])]
        if (empty := next((i for i, ids in enumerate(encoded) if len(ids) <= 2), None)) is not None:
            raise ValueError(f"record {record_ids[empty]!r}: empty nucleotide sequence")
        return Tokenized.concat(encoded)


def add_norm(norm: nn.LayerNorm, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """`norm(x + residual)`, in one kernel on a GPU."""
    return add_layer_norm(x, residual, norm.weight, norm.bias, norm.eps)[1]


class DnabertSLayer(nn.Module):
    """One post-LayerNorm encoder layer over a pack of T tokens; submodule names are the checkpoint's."""

    def __init__(self, config: DnabertSConfig):
        super().__init__()
        d, eps = config.hidden_size, config.layer_norm_eps
        self.num_heads = config.num_attention_heads
        self.attention = nn.ModuleDict(dict(
            self=nn.ModuleDict(dict(Wqkv=nn.Linear(d, 3 * d))),
            output=nn.ModuleDict(dict(dense=nn.Linear(d, d), LayerNorm=nn.LayerNorm(d, eps=eps))),
        ))
        self.mlp = nn.ModuleDict(dict(
            gated_layers=nn.Linear(d, 2 * config.intermediate_size, bias=False),
            wo=nn.Linear(config.intermediate_size, d),
            layernorm=nn.LayerNorm(d, eps=eps),
        ))

    def forward(self, x: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        tokens, d = x.shape
        # Wqkv's output is [q; k; v], each head-major.
        q, k, v = self.attention.self.Wqkv(x).view(tokens, 3, self.num_heads, -1).unbind(1)
        a = attend(q, k, v, plan, scale=q.shape[-1] ** -0.5)
        x = add_norm(self.attention.output.LayerNorm, self.attention.output.dense(a.reshape(tokens, d)), x)
        # Exact (erf) GELU, the model's own: the tanh approximation shifts the embeddings.
        return add_norm(self.mlp.layernorm, self.mlp.wo(gelu_mul(self.mlp.gated_layers(x))), x)


class PackedDnabertS(nn.Module):
    """DNABERT-S over a `PackedBatch`; parameter names match the checkpoint's keys (no `bert.` prefix)."""

    def __init__(self, config: DnabertSConfig, attention_backend: str):
        super().__init__()
        d = config.hidden_size
        self.attention_backend = attention_backend
        self.embeddings = nn.ModuleDict(dict(
            word_embeddings=checkpoint_embedding(config.vocab_size, d, padding_idx=config.pad_token_id),
            token_type_embeddings=checkpoint_embedding(config.type_vocab_size, d),
            LayerNorm=nn.LayerNorm(d, eps=config.layer_norm_eps),
        ))
        self.encoder = nn.ModuleDict(dict(
            layer=nn.ModuleList(DnabertSLayer(config) for _ in range(config.num_hidden_layers)),
        ))
        # Kept fp32 whatever the weights' dtype (its loader never casts the module): flash-attn
        # requires fp32 slopes, and fp16 would round them.
        self.register_buffer("alibi_slopes", alibi_slopes(config.num_attention_heads), persistent=False)

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        """(T, hidden) last-layer states of every token of the pack."""
        emb = self.embeddings
        # The token type is always 0. No position embeddings: position enters only through ALiBi.
        x = emb.LayerNorm(emb.word_embeddings(batch.input_ids) + emb.token_type_embeddings.weight[0])
        plan = plan_attention(self.attention_backend, batch.cu_seqlens, x.shape[0], batch.max_seqlen, x.dtype,
                              alibi_slopes=self.alibi_slopes)
        for layer in self.encoder.layer:
            x = layer(x, plan)
        return x

    def compile_layers(self, backend: str = "inductor") -> None:
        """Fuse each layer's elementwise work with torch.compile; shapes vary per pack, hence dynamic."""
        for layer in self.encoder.layer:
            layer.compile(dynamic=True, backend=backend)

    @torch.inference_mode()
    def embed(self, batch: PackedBatch) -> torch.Tensor:
        """(B, hidden) fp32: each sequence's mean over all its tokens, [CLS] and [SEP] included."""
        return segment_mean(self(batch), batch.cu_seqlens, 0, 0)
