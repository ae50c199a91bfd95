"""DNABERT-S run packed: the published architecture written out, its weight loader and BPE tokenizer.

DNABERT-S is DNABERT-2-117M (a MosaicBERT: ALiBi instead of position embeddings, post-LayerNorm
layers, a GLU feed-forward) fine-tuned contrastively. Its own `trust_remote_code` model no longer
runs on current Triton, so we run none of its code: the weights load from a local Hugging Face
directory into the module below (../shared/spec/dnabert-s.md).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, processors, trainers
from torch import nn

from vnp_core.atomic import atomic_path
from vnp_core.attention import AttentionPlan, attend, plan_attention, select_backend
from vnp_core.config import EmbedConfig
from vnp_core.models import (
    LoadedModel,
    SequenceTokenizer,
    Tokenized,
    checkpoint_embedding,
)
from vnp_core.packing import PackedBatch, segment_mean

POOLING = "mean over all tokens incl. [CLS]/[SEP], fp32"
# Compiled layers run DNABERT-S 42% faster on an H200 (934k -> 1.33M tokens/s in 256k packs,
# bench/results/), and compiling cost 10.9 s there (importing the compiler 3.4 s, compiling 7.5 s,
# results/startup_profile_h200.txt), more with the recompilation when the padded length changes
# alignment: at an estimated ~14 s it pays from ~45M tokens on, a shard of ~1M reads.
COMPILE_MIN_TOKENS = 50_000_000
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# The pooler and the MLM head are not part of the embedding.
UNUSED_WEIGHTS = ("pooler.", "cls.")
# DNABERT-2's order of special tokens, kept for the tiny model.
SPECIAL_TOKENS = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
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
        raw = json.loads(path.read_text())
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in raw]
        if missing:
            raise ValueError(f"{path}: missing {', '.join(missing)}")
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
        self._tokenizer = Tokenizer.from_file(str(tokenizer_json))
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
        x = self.attention.output.LayerNorm(self.attention.output.dense(a.reshape(tokens, d)) + x)
        gate, up = self.mlp.gated_layers(x).chunk(2, dim=-1)
        # Exact (erf) GELU, the model's own: the tanh approximation shifts the embeddings.
        return self.mlp.layernorm(self.mlp.wo(F.gelu(gate) * up) + x)


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
        # Kept fp32 whatever the weights' dtype (load_dnabert_s never casts the module): flash-attn
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

    def compile_layers(self) -> None:
        """Fuse each layer's elementwise work with torch.compile; shapes vary per pack, hence dynamic."""
        for layer in self.encoder.layer:
            layer.compile(dynamic=True)

    @torch.inference_mode()
    def embed(self, batch: PackedBatch) -> torch.Tensor:
        """(B, hidden) fp32: each sequence's mean over all its tokens, [CLS] and [SEP] included."""
        return segment_mean(self(batch), batch.cu_seqlens, 0, 0)


def _read_checkpoint(model_dir: Path, device: torch.device) -> tuple[Path, dict[str, torch.Tensor]]:
    """The weights file and its tensors, keyed as in DNABERT-S (DNABERT-2's `bert.` prefix removed,
    pooler and MLM head left out)."""
    files = [model_dir / name for name in WEIGHT_FILES if (model_dir / name).is_file()]
    if not files:
        raise FileNotFoundError(f"{model_dir}: no DNABERT-S weights ({' or '.join(WEIGHT_FILES)})")
    file = files[0]
    if file.suffix == ".safetensors":
        raw = load_file(file, device=str(device))
    else:
        raw = torch.load(file, map_location=device, weights_only=True)
    state = {key.removeprefix("bert."): tensor for key, tensor in raw.items()}
    return file, {key: tensor for key, tensor in state.items() if not key.startswith(UNUSED_WEIGHTS)}


def _check_weights(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], file: Path) -> None:
    for key, param in expected.items():
        if key not in state:
            raise ValueError(f"{file}: missing weight {key}")
        if state[key].shape != param.shape:
            raise ValueError(f"{file}: weight {key} has shape {tuple(state[key].shape)}, expected {tuple(param.shape)}")
    unexpected = sorted(state.keys() - expected.keys())
    if unexpected:
        raise ValueError(f"{file}: unexpected weights {', '.join(unexpected)}")


def load_dnabert_s(path: Path, config: EmbedConfig) -> LoadedModel:
    """DNABERT-S from a local Hugging Face directory: config.json, the weights, tokenizer.json."""
    model_config = DnabertSConfig.from_json(path / "config.json")
    tokenizer = DnabertSTokenizer(path / "tokenizer.json")
    # An id past the embedding table would fail later as an opaque device-side assert.
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ValueError(f"{path}: tokenizer.json has {tokenizer.vocab_size} tokens, "
                         f"config.json's vocab_size is {model_config.vocab_size}")
    device, dtype = torch.device(config.device), getattr(torch, config.dtype)
    backend = select_backend(config.attention_backend, device, dtype, needs_bias=True)
    file, state = _read_checkpoint(path, device)
    # Built on the meta device, then given the checkpoint's tensors: no random init, no second copy.
    with torch.device("meta"):
        module = PackedDnabertS(model_config, backend)
    _check_weights(state, module.state_dict(), file)
    module.load_state_dict({key: tensor.to(dtype) for key, tensor in state.items()}, assign=True)
    # A non-persistent buffer: not in the checkpoint, so still on the meta device until set here.
    module.alibi_slopes = alibi_slopes(model_config.num_attention_heads).to(device)
    compiled = config.compile_layers and device.type == "cuda"
    if compiled:
        module.compile_layers()
    with file.open("rb") as f:
        sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    return LoadedModel(
        kind="dnabert_s", name=path.name, module=module.eval(), tokenizer=tokenizer, embed_dim=model_config.hidden_size,
        weights_sha256=sha256, source=str(file), device=device, dtype=dtype,
        attention_backend=backend, pooling=POOLING, compiled=compiled, compile_min_tokens=COMPILE_MIN_TOKENS,
    )


def reference_embed(model_dir: Path, sequences: list[str], device: torch.device | str = "cpu") -> np.ndarray:
    """(N, hidden) float32: the same equations in fp32, one unpadded sequence at a time.

    Written independently of `PackedDnabertS` (explicit (L, L) ALiBi bias, plain softmax) so that it
    checks the packed forward; it shares only the checkpoint reader and the tokenizer.
    """
    config = DnabertSConfig.from_json(model_dir / "config.json")
    _, weights = _read_checkpoint(model_dir, torch.device(device))
    w = {key: tensor.float() for key, tensor in weights.items()}
    tokenizer = DnabertSTokenizer(model_dir / "tokenizer.json")
    d, heads, inner = config.hidden_size, config.num_attention_heads, config.intermediate_size
    slopes = alibi_slopes(heads).to(device)

    def linear(x: torch.Tensor, name: str) -> torch.Tensor:
        return x @ w[f"{name}.weight"].T + w.get(f"{name}.bias", 0.0)

    def layer_norm(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, (d,), w[f"{name}.weight"], w[f"{name}.bias"], config.layer_norm_eps)

    out = np.empty((len(sequences), d), dtype=np.float32)
    for row, sequence in enumerate(sequences):
        ids = torch.from_numpy(tokenizer.encode(sequence, str(row))[0]).to(device)
        n = len(ids)
        pos = torch.arange(n, dtype=torch.float32, device=device)
        bias = -slopes[:, None, None] * (pos[None, :] - pos[:, None]).abs()  # (H, L, L)
        x = layer_norm(w["embeddings.word_embeddings.weight"][ids] + w["embeddings.token_type_embeddings.weight"][0],
                       "embeddings.LayerNorm")
        for i in range(config.num_hidden_layers):
            p = f"encoder.layer.{i}"
            q, k, v = linear(x, f"{p}.attention.self.Wqkv").view(n, 3, heads, -1).permute(1, 2, 0, 3)  # (H, L, Dh)
            probs = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d // heads) + bias, dim=-1)
            a = (probs @ v).transpose(0, 1).reshape(n, d)
            x = layer_norm(linear(a, f"{p}.attention.output.dense") + x, f"{p}.attention.output.LayerNorm")
            g = linear(x, f"{p}.mlp.gated_layers")
            h = F.gelu(g[:, :inner]) * g[:, inner:]
            x = layer_norm(linear(h, f"{p}.mlp.wo") + x, f"{p}.mlp.layernorm")
        out[row] = x.mean(0).cpu().numpy()
    return out


def _train_tiny_tokenizer(seed: int, vocab_size: int) -> Tokenizer:
    """A DNA BPE tokenizer trained on deterministic pseudo-random sequence (no data files needed)."""
    rng = np.random.default_rng(seed)
    corpus = ["".join(rng.choice(list("ACGT"), size=1000)) for _ in range(200)]
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=list("ACGTN"), show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer)
    cls, sep = (("[CLS]", tokenizer.token_to_id("[CLS]")), ("[SEP]", tokenizer.token_to_id("[SEP]")))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[cls, sep])
    return tokenizer


def _random_weight(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(shape, generator=generator)
    if "layernorm" in name.lower():
        # Far from the identity, so that a LayerNorm applied wrongly shows in the tests.
        return 1.0 + 0.2 * noise if name.endswith("weight") else 0.2 * noise
    if name.startswith("embeddings."):
        return noise
    if name.endswith("bias"):
        return 0.1 * noise
    return noise * shape[-1] ** -0.5  # fan-in scaling keeps activations and attention logits O(1)


def _write_atomic(path: Path, write: Callable[[str], object]) -> None:
    with atomic_path(path) as tmp:
        write(str(tmp))


def write_tiny_model(out_dir: Path, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                     intermediate: int = 128, seed: int = 0) -> Path:
    """A small random DNABERT-S directory in the real layout (same seed, same bytes).

    A placeholder for tests and laptops: its embeddings have no biological meaning.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tiny_tokenizer(seed, vocab_size=384)
    config = DnabertSConfig(hidden, layers, heads, intermediate, vocab_size=tokenizer.get_vocab_size())
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in PackedDnabertS(config, "sdpa_reference").state_dict().items()}
    shapes |= {"pooler.dense.weight": (hidden, hidden), "pooler.dense.bias": (hidden,)}
    generator = torch.Generator().manual_seed(seed)
    state = {name: _random_weight(name, shape, generator) for name, shape in shapes.items()}
    hf_config = asdict(config) | {
        "architectures": ["BertModel"], "model_type": "bert", "alibi_starting_size": 512,
        "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.0,
        "max_position_embeddings": 512, "position_embedding_type": "absolute", "torch_dtype": "float32",
    }
    _write_atomic(out_dir / "config.json", lambda p: Path(p).write_text(json.dumps(hf_config, indent=2, sort_keys=True)))
    _write_atomic(out_dir / "tokenizer.json", tokenizer.save)
    _write_atomic(out_dir / "model.safetensors", lambda p: save_file(state, p))
    return out_dir
