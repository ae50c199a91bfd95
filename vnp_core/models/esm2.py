"""ESM-2 over packed sequences: the same state dict and the same numbers as fair-esm's `ESM2`.

The forward runs on a `PackedBatch` (sequences concatenated, no padding) and follows
../shared/spec/esm2-packed.md: token-dropout rescale per sequence, pre-LN layers, rotary positions
restarting at every sequence, exact-erf GELU, `emb_layer_norm_after`, residue-only mean pooling.
Checkpoints: a fair-esm `.pt` file, a fair-esm model name in the local torch hub cache, or a
Hugging Face `facebook/esm2_*` directory.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import re
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
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
# Compiled layers run ESM-2 3B ~12% faster on an H200 (steady 82-84k tokens/s eager, 93k compiled:
# ~1.3 us saved per token; bench/results/scaling_h200x2_3b_170k_a8eb6ae.json). With torch.compile's
# cache warm (any earlier shard of the same read length on the host), a compiled first pack took
# 5.2-6.1 s, no longer than an eager one (8.2-8.8 s), so compiling pays at once; a cold cache adds
# ~5 s more (12.6-14.6 s), repaid from ~4M tokens. 2M: small enough that splitting a sample over
# GPUs keeps its shards compiled, at worst ~2.5 s lost on a cold host.
COMPILE_MIN_TOKENS = 2_000_000

# Heads by width for the released ESM-2 sizes: the one thing a state dict's shapes do not tell.
RELEASED_HEADS = {320: 20, 480: 20, 640: 20, 1280: 20, 2560: 40, 5120: 40}


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

    max_residues: int | None = 1022

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
        heads = (x.shape[0], self.num_heads, self.head_dim)
        q = apply_rotary(self.q_proj(x).view(heads), cos, sin)
        k = apply_rotary(self.k_proj(x).view(heads), cos, sin)
        v = self.v_proj(x).view(heads)
        # fair-esm scales q before the rotation; rotation is linear, so scaling once in the kernel is the same.
        out = attend(q, k, v, plan, scale=self.head_dim**-0.5)
        return self.out_proj(out.flatten(1))


class TransformerLayer(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.self_attn = SelfAttention(embed_dim, num_heads)
        self.final_layer_norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.fc1 = nn.Linear(embed_dim, 4 * embed_dim)
        self.fc2 = nn.Linear(4 * embed_dim, embed_dim)

    def forward(self, x, plan: AttentionPlan, cos, sin):
        x = x + self.self_attn(self.self_attn_layer_norm(x), plan, cos, sin)
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))  # exact erf GELU


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
        for layer in self.layers:
            x = layer(x, plan, cos, sin)
        return self.emb_layer_norm_after(x)

    def compile_layers(self) -> None:
        """Fuse each layer's elementwise work with torch.compile; shapes vary per pack, hence dynamic."""
        for layer in self.layers:
            layer.compile(dynamic=True)

    @torch.inference_mode()
    def embed(self, batch: PackedBatch) -> torch.Tensor:
        """(B, embed_dim) fp32 mean of each sequence's residues (BOS and EOS left out)."""
        return segment_mean(self(batch), batch.cu_seqlens, 1, 1)


# ----------------------------------------------------------------------------------------------
# Checkpoints


def load_esm2(path: Path, config: EmbedConfig) -> LoadedModel:
    """A packed ESM-2 on `config.device` in `config.dtype` from a fair-esm .pt, hub name or HF directory."""
    source = _resolve_checkpoint(Path(path))
    # The checksum reads the file a second time: on a thread (hashlib releases the GIL), it overlaps the load.
    with ThreadPoolExecutor(1, thread_name_prefix="vnp-sha256") as pool:
        weights_sha256 = pool.submit(_sha256, _files_read(source))
        cfg, weights = read_esm2_weights(source)
        device, dtype = torch.device(config.device), getattr(torch, config.dtype)
        backend = select_backend(config.attention_backend, device, dtype, needs_bias=False)
        module = PackedESM2.from_weights(cfg, weights, device, dtype, backend)
        compiled = config.compile_layers and device.type == "cuda"
        if compiled:
            module.compile_layers()
    return LoadedModel(
        kind="esm2",
        name=source.stem if source.is_file() else source.name,
        module=module,
        tokenizer=ESM2Tokenizer(config.max_protein_length),
        embed_dim=cfg.embed_dim,
        weights_sha256=weights_sha256.result(),
        source=str(source),
        device=device,
        dtype=dtype,
        attention_backend=backend,
        pooling=POOLING,
        compiled=compiled,
        compile_min_tokens=COMPILE_MIN_TOKENS,
    )


def read_esm2_weights(source: Path) -> tuple[ESM2Config, dict[str, torch.Tensor]]:
    """The config and the encoder's tensors under fair-esm's names, checked key by key and shape by shape."""
    cfg, weights = _read_hf_dir(source) if source.is_dir() else _read_fair_esm(source)
    with torch.device("meta"):
        expected = PackedESM2(cfg).state_dict()
    for key, tensor in expected.items():
        if key not in weights:
            raise ValueError(f"{source}: missing weight {key!r} for an ESM-2 of {cfg}")
        if weights[key].shape != tensor.shape:
            raise ValueError(f"{source}: weight {key!r} has shape {tuple(weights[key].shape)}, expected {tuple(tensor.shape)}")
    if unexpected := sorted(set(weights) - set(expected)):
        raise ValueError(f"{source}: unexpected weight(s) for an ESM-2 of {cfg}: {unexpected[:5]}")
    return cfg, weights


def _resolve_checkpoint(path: Path) -> Path:
    """A file or directory as given, or a fair-esm model name looked up in the torch hub cache (never downloaded)."""
    if path.exists():
        return path
    if path.name.startswith("esm2_") and not path.suffix and path.parent == Path("."):
        cached = Path(torch.hub.get_dir()) / "checkpoints" / f"{path.name}.pt"
        if cached.is_file():
            return cached
        raise FileNotFoundError(f"ESM-2 model {path.name!r} is not in the local torch hub cache: put {path.name}.pt at {cached}")
    raise FileNotFoundError(f"no ESM-2 checkpoint at {path}")


def _read_fair_esm(path: Path) -> tuple[ESM2Config, dict[str, torch.Tensor]]:
    # fair-esm checkpoints pickle an argparse.Namespace config: trusted files, so weights_only=False.
    try:
        # Memory-mapped where the format allows (zip checkpoints): each tensor is read once, as it is
        # cast onto the device, rather than copied into host memory first.
        mmap = zipfile.is_zipfile(path)
        data = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise ValueError(f"{path}: not a readable torch checkpoint ({error})") from error
    if not isinstance(data, dict) or "model" not in data:
        raise ValueError(f"{path}: not a fair-esm checkpoint (expected a dict with a 'model' state dict)")
    # The same upgrade as fair-esm's loader, then drop the heads and the rotary buffers we recompute.
    weights = {re.sub(r"^(encoder\.sentence_encoder\.|encoder\.)", "", k): v for k, v in data["model"].items()}
    weights = {
        k: v for k, v in weights.items()
        if not (k.startswith(("lm_head.", "contact_head.")) or k.endswith("rot_emb.inv_freq"))
    }
    model_cfg = data.get("cfg", {}).get("model")
    if model_cfg is not None:
        args = vars(model_cfg) if isinstance(model_cfg, argparse.Namespace) else dict(model_cfg)
        return ESM2Config(args["encoder_layers"], args["encoder_embed_dim"], args["encoder_attention_heads"]), weights
    return _infer_config(path, weights), weights


def _infer_config(path: Path, weights: dict[str, torch.Tensor]) -> ESM2Config:
    if "embed_tokens.weight" not in weights:
        raise ValueError(f"{path}: missing weight 'embed_tokens.weight'")
    embed_dim = weights["embed_tokens.weight"].shape[1]
    if embed_dim not in RELEASED_HEADS:
        raise ValueError(f"{path}: no 'cfg' in the checkpoint and width {embed_dim} is no released ESM-2 size: "
                         "cannot tell the number of attention heads")
    num_layers = sum(1 for k in weights if re.fullmatch(r"layers\.\d+\.fc1\.weight", k))
    return ESM2Config(num_layers, embed_dim, RELEASED_HEADS[embed_dim])


# Hugging Face EsmModel module names -> fair-esm module names, inside one layer and at the top.
_HF_LAYER_MODULES = {
    "attention.self.query": "self_attn.q_proj",
    "attention.self.key": "self_attn.k_proj",
    "attention.self.value": "self_attn.v_proj",
    "attention.output.dense": "self_attn.out_proj",
    "attention.LayerNorm": "self_attn_layer_norm",
    "intermediate.dense": "fc1",
    "output.dense": "fc2",
    "LayerNorm": "final_layer_norm",
}
_HF_TOP_MODULES = {"embeddings.word_embeddings": "embed_tokens", "encoder.emb_layer_norm_after": "emb_layer_norm_after"}
# transformers writes LayerNorm parameters under their legacy BERT names.
_HF_PARAMS = {"gamma": "weight", "beta": "bias"}


def _fair_esm_name(hf_name: str) -> str | None:
    """The fair-esm name of an HF encoder weight; None for heads, pooler and rotary buffers."""
    module, _, param = hf_name.removeprefix("esm.").rpartition(".")
    param = _HF_PARAMS.get(param, param)
    if layer := re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", module):
        index, module = layer.groups()
        mapped = _HF_LAYER_MODULES.get(module)
        return None if mapped is None else f"layers.{index}.{mapped}.{param}"
    mapped = _HF_TOP_MODULES.get(module)
    return None if mapped is None else f"{mapped}.{param}"


def _read_hf_dir(directory: Path) -> tuple[ESM2Config, dict[str, torch.Tensor]]:
    hf = json.loads((directory / "config.json").read_text())
    architecture = {
        "position_embedding_type": ("rotary", hf.get("position_embedding_type")),
        "emb_layer_norm_before": (False, bool(hf.get("emb_layer_norm_before"))),
        "token_dropout": (True, hf.get("token_dropout")),
        "vocab_size": (len(TOKENS), hf.get("vocab_size")),
        "layer_norm_eps": (LAYER_NORM_EPS, hf.get("layer_norm_eps")),
        "intermediate_size": (4 * hf["hidden_size"], hf.get("intermediate_size")),
    }
    for field, (wanted, found) in architecture.items():
        if found != wanted:
            raise ValueError(f"{directory / 'config.json'}: {field} is {found!r}; ESM-2 has {wanted!r}")
    cfg = ESM2Config(hf["num_hidden_layers"], hf["hidden_size"], hf["num_attention_heads"])
    weights = {}
    for weights_file in _hf_weight_files(directory):
        for hf_name, tensor in _read_tensors(weights_file).items():
            if (name := _fair_esm_name(hf_name)) is not None:
                weights[name] = tensor
    return cfg, weights


def _hf_weight_files(directory: Path) -> list[Path]:
    """The weights file, or the shards its index lists (large models are saved sharded)."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return [directory / name]
        index = directory / f"{name}.index.json"
        if index.is_file():
            return [directory / shard for shard in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    raise FileNotFoundError(f"{directory}: no model.safetensors or pytorch_model.bin (nor their sharded index)")


def _read_tensors(weights_file: Path) -> dict[str, torch.Tensor]:
    if weights_file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(weights_file)
    return torch.load(weights_file, map_location="cpu", weights_only=True)


def _files_read(source: Path) -> list[Path]:
    return [source / "config.json", *_hf_weight_files(source)] if source.is_dir() else [source]


def _sha256(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# fair-esm itself: the tiny checkpoint and the unpacked fp32 reference


def write_tiny_checkpoint(path: Path, *, num_layers: int = 2, embed_dim: int = 64, attention_heads: int = 4,
                          seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """A random ESM-2 in fair-esm's release layout: `<name>.pt` and its `<name>-contact-regression.pt`.

    Random placeholder weights with no biological meaning. The name must start with "esm2", which
    is how fair-esm's `load_model_and_alphabet_local` recognises the ESM-2 format. `dtype` float16
    halves the file of a 3B-sized model.
    """
    from esm.model.esm2 import ESM2

    path = Path(path)
    if not path.name.startswith("esm2") or path.suffix != ".pt":
        raise ValueError(f"{path}: fair-esm only reads ESM-2 checkpoints named esm2*.pt")
    with torch.random.fork_rng(devices=[]):  # CPU tensors only: no CUDA context on every GPU
        torch.manual_seed(seed)
        model = ESM2(num_layers, embed_dim, attention_heads)
        # Non-trivial LayerNorms, so that a comparison against fair-esm exercises them.
        for name, param in model.named_parameters():
            if "layer_norm" in name:
                nn.init.normal_(param, mean=1.0 if name.endswith("weight") else 0.0, std=0.2)
    state = {key: tensor.to(dtype) if tensor.is_floating_point() else tensor for key, tensor in model.state_dict().items()}
    regression = {k: state.pop(k) for k in [k for k in state if k.startswith("contact_head.regression.")]}
    cfg = argparse.Namespace(encoder_layers=num_layers, encoder_embed_dim=embed_dim,
                             encoder_attention_heads=attention_heads, token_dropout=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_atomic({"model": regression}, path.with_name(f"{path.stem}-contact-regression.pt"))
    _save_atomic({"model": state, "cfg": {"model": cfg}}, path)
    return path


def _save_atomic(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def reference_embed(checkpoint: Path, sequences: list[str], *, max_residues: int | None = 1022,
                    device: str = "cpu") -> np.ndarray:
    """(N, embed_dim) float32: fair-esm's own `ESM2` in fp32, one sequence at a time, same pooling."""
    import esm
    from esm.model.esm2 import ESM2

    cfg, weights = read_esm2_weights(_resolve_checkpoint(Path(checkpoint)))
    model = ESM2(cfg.num_layers, cfg.embed_dim, cfg.attention_heads)
    model.load_state_dict(weights, strict=False)  # LM/contact heads and rotary buffers are not read
    model = model.to(device).eval()
    to_tokens = esm.Alphabet.from_architecture("ESM-1b").get_batch_converter()
    out = np.empty((len(sequences), cfg.embed_dim), dtype=np.float32)
    with torch.inference_mode():
        for i, sequence in enumerate(sequences):
            residues = sequence[:max_residues]
            _, _, tokens = to_tokens([(str(i), residues)])
            hidden = model(tokens.to(device), repr_layers=[cfg.num_layers])["representations"][cfg.num_layers]
            out[i] = hidden[0, 1 : len(residues) + 1].mean(0).cpu().numpy()
    return out
