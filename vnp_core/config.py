"""The typed configuration passed down through vnp: one object per stage, no environment reads.

The CLI and the Dagster resources build these objects; library functions take them as arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from vnp_core.models import SequenceTokenizer, Tokenized

ChunkLength = Literal[300, 500]
Dtype = Literal["float32", "float16", "bfloat16"]
AttentionBackend = Literal["auto", "flash_attn", "torch_varlen", "sdpa_padded", "sdpa_reference", "flex"]


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
    # torch.compile each transformer layer on CUDA, fusing its elementwise work (LayerNorm, rotary,
    # GELU, residuals); attention stays an opaque kernel. +13% on ESM-2 3B on an H200 (bench/).
    compile_layers: bool = True
    # A shard's layers are compiled from this many tokens on (None: the model's own measured break-even,
    # `LoadedModel.compile_min_tokens`); 0 compiles every shard, e.g. to fill the compile cache.
    compile_min_tokens: int | None = None
    # ESM-2 was trained on crops of 1022 residues: longer proteins keep their N-terminal part.
    max_protein_length: int = 1022
    # CPU worker processes that tokenise before the device loop (0: in the main process). Both
    # tokenizers are vectorised/Rust and fast; a worker costs a process start with a torch import,
    # which only pays off for inputs of millions of sequences.
    num_workers: int = 0
    # Rows between durable checkpoints of a shard (resume restarts from the last one).
    checkpoint_rows: int = 4096

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be positive, got {self.max_tokens}")


@dataclass(frozen=True)
class ShardJob:
    """One model over one shard, as a device process is asked to run it (`vnp_core.engine.embed_shards`)."""

    kind: Literal["esm2", "dnabert_s"]
    model_path: Path
    rows: Callable[[], tuple[list[str], list[str]]]  # picklable; (ids, sequences), read where the job runs
    out: Path
    config: EmbedConfig
    attrs: dict = field(default_factory=dict)  # written into the shard beside the model's own
    # Picklable; the rows' token ids made earlier (the index's), or None when this tokenizer did not make them.
    tokens: Callable[[SequenceTokenizer], Tokenized | None] | None = None


@dataclass(frozen=True)
class ModelPaths:
    """Where the model weights are. None means the tiny placeholder models (no biological meaning)."""

    esm2: Path | None = None
    dnabert_s: Path | None = None
    classifier: Path | None = None
    # Pickled whole-module classifiers execute code on load: only with the user's explicit consent.
    trust_classifier_pickle: bool = False


@dataclass(frozen=True)
class ValidationConfig:
    """fp16_validation_report: a length-stratified subset recomputed in fp32 by an unpacked path."""

    sample_size: int = 512
    min_cosine_all: float = 0.995
    min_cosine_p99: float = 0.999  # at least 99% of sequences at or above this
    seed: int = 0


@dataclass(frozen=True)
class VnpConfig:
    """Everything a sample's run needs, passed down as one object."""

    storage_root: Path = Path("vnp_home/storage")
    prep: PrepConfig = field(default_factory=PrepConfig)
    esm2: EmbedConfig = field(default_factory=EmbedConfig)
    dnabert_s: EmbedConfig = field(default_factory=EmbedConfig)
    models: ModelPaths = field(default_factory=ModelPaths)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
