"""The typed configuration passed down through vnp: one object per stage, no environment reads.

The CLI and the Dagster resources build these objects; library functions take them as arguments.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

ChunkLength = Literal[300, 500]
Dtype = Literal["float32", "float16", "bfloat16"]
# ESM-2 was trained on crops of 1022 residues between <cls> and <eos>: longer proteins keep their N-terminal part.
ESM2_MAX_RESIDUES = 1022
AttentionBackend = Literal["auto", "flash_attn", "torch_varlen", "triton_varlen", "sdpa_padded", "sdpa_bucketed", "sdpa_reference"]


@dataclass(frozen=True)
class PrepConfig:
    """VirNucPro preprocessing (../shared/spec/virnucpro-prep.md)."""

    chunk_length: ChunkLength = 500
    # Skip malformed records (counted and reported) instead of failing the whole file.
    skip_bad_records: bool = False
    # Number of shards the index balances tokens across (default: one per GPU, at least 1).
    num_shards: int = 1

    def __post_init__(self) -> None:
        if self.chunk_length not in (300, 500):
            raise ValueError(f"chunk_length must be 300 or 500 (the two VirNucPro classifiers), got {self.chunk_length}")
        if self.num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {self.num_shards}")


@dataclass(frozen=True)
class EmbedConfig:
    """How one model is run over a set of sequences."""

    device: str = "cpu"
    dtype: Dtype = "float32"
    # Token budget of one pack; None sizes it from the device's free memory.
    max_tokens: int | None = None
    attention_backend: AttentionBackend = "auto"
    # ESM-2's linear layers in FP8 e4m3 with row-wise scales (`vnp_core.models.fp8`); activations,
    # attention and pooling stay in `dtype`. Opt-in: validated on random weights only (bench/), which
    # lack the outlier features of trained ones. DNABERT-S, ~5% of the GPU time, stays in `dtype`.
    fp8: bool = False
    # torch.compile each transformer layer on CUDA, fusing its elementwise work (LayerNorm, rotary,
    # GELU, residuals); attention stays an opaque kernel. +13% on ESM-2 3B on an H200 (bench/).
    compile_layers: bool = True
    # A shard's layers are compiled from this many tokens on (None: the model's own measured break-even,
    # `LoadedModel.compile_min_tokens`); 0 compiles every shard, e.g. to fill the compile cache.
    compile_min_tokens: int | None = None
    # torch.compile's on-disk caches (Inductor's compiled graphs, their Triton kernels), kept across
    # processes and runs: a later step with the same shapes loads them instead of compiling.
    # None: torch's default folder under the system's temporary folder.
    compile_cache_dir: Path | None = None
    max_protein_length: int = ESM2_MAX_RESIDUES
    # CPU worker processes that tokenise before the device loop (0: in the main process). Both
    # tokenizers are vectorised/Rust and fast; a worker costs a process start with a torch import,
    # which only pays off for inputs of millions of sequences.
    num_workers: int = 0
    # Rows between durable checkpoints of a shard (resume restarts from the last one).
    checkpoint_rows: int = 4096

    def __post_init__(self) -> None:
        if self.dtype not in get_args(Dtype):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        if self.fp8 and self.dtype == "float32":
            raise ValueError("fp8 computes its products in FP8 and keeps activations in float16 or bfloat16: "
                             "set dtype to float16 or bfloat16, or turn fp8 off")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be positive, got {self.max_tokens}")
        if self.max_protein_length < 1:
            raise ValueError(f"max_protein_length must be at least 1 residue, got {self.max_protein_length}")
        if self.attention_backend not in get_args(AttentionBackend):
            raise ValueError(f"attention back end must be one of {', '.join(get_args(AttentionBackend))}, "
                             f"got {self.attention_backend!r}")
        if self.num_workers < 0 or self.checkpoint_rows < 1:
            raise ValueError(f"num_workers must be 0 or more and checkpoint_rows 1 or more, "
                             f"got {self.num_workers} and {self.checkpoint_rows}")
        if self.compile_min_tokens is not None and self.compile_min_tokens < 0:
            raise ValueError(f"compile_min_tokens must be 0 or more, got {self.compile_min_tokens}")


@dataclass(frozen=True)
class ModelPaths:
    """Where the weights are: each embedding model's by its registry name (`vnp_core.models.MODELS`)."""

    embedders: Mapping[str, Path]
    classifier: Path
    # Pickled whole-module classifiers execute code on load: only with the user's explicit consent.
    trust_classifier_pickle: bool = False


@dataclass(frozen=True)
class ValidationConfig:
    """fp16_validation_report: a length-stratified subset recomputed in fp32 by an unpacked path."""

    sample_size: int = 512
    min_cosine_all: float = 0.995
    min_cosine_p99: float = 0.999  # at least 99% of sequences at or above this
    seed: int = 0
    # A model run in FP8 (`EmbedConfig.fp8`) is held to its own cosine thresholds, and then the
    # sample's VirNucPro chunk calls must also agree with the calls made from the fp32 vectors.
    fp8_min_cosine_all: float = 0.99
    fp8_min_cosine_p99: float = 0.995
    min_call_agreement: float = 0.995
