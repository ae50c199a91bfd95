"""What every embedding model gives the engine: its tokens (`Tokenized`), a picklable tokenizer
(`SequenceTokenizer`), before loading a `ModelDescription` (what names its vectors) and, once loaded,
a `LoadedModel` whose `module.embed(batch)` returns pooled fp32 vectors, one per sequence of a pack."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from vnp_core.attention import select_backend
from vnp_core.config import EmbedConfig
from vnp_core.packing import PackedBatch, make_batch


@dataclass
class Tokenized:
    """Every sequence's token ids (specials included), concatenated in input order."""

    tokens: np.ndarray  # (total,) int32: int32 halves the host memory of a large shard
    lengths: np.ndarray  # (N,) int64
    truncated: int  # inputs the tokenizer cut
    offsets: np.ndarray = field(init=False)  # (N+1,) where each sequence starts in `tokens`

    def __post_init__(self) -> None:
        self.offsets = np.concatenate(([0], np.cumsum(self.lengths)))

    @classmethod
    def concat(cls, parts: Sequence[np.ndarray], truncated: int = 0) -> Tokenized:
        """From one array of ids per sequence."""
        lengths = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
        tokens = np.concatenate(parts).astype(np.int32) if parts else np.empty(0, dtype=np.int32)
        return cls(tokens, lengths, truncated)

    def __len__(self) -> int:
        return len(self.lengths)

    def sequence(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def select(self, rows: np.ndarray) -> Tokenized:
        """The sequences at `rows`, in that order (truncations are not tracked per row)."""
        lengths = self.lengths[rows]
        shift = self.offsets[:-1][rows] - (np.cumsum(lengths) - lengths)  # where each sequence starts, minus where it lands
        return Tokenized(self.tokens[np.arange(int(lengths.sum())) + np.repeat(shift, lengths)], lengths, truncated=0)

    def batch(self, indices: Sequence[int]) -> PackedBatch:
        return make_batch([self.sequence(i) for i in indices], indices)


class SequenceTokenizer:
    """Turns sequences into token ids (specials included). Picklable: runs in worker processes."""

    @property
    def digest(self) -> str:
        """Names the mapping from sequences to ids: token ids stored earlier are reused only under the same digest."""
        raise NotImplementedError

    def encode(self, sequence: str, record_id: str) -> tuple[np.ndarray, bool]:
        """Token ids, and whether the input was truncated. Unknown letters raise `ValueError` naming the record."""
        raise NotImplementedError

    def encode_many(self, sequences: Sequence[str], record_ids: Sequence[str]) -> Tokenized:
        """`encode` of every sequence; a tokenizer with a faster batch path overrides it."""
        encoded = [self.encode(sequence, record_id) for sequence, record_id in zip(sequences, record_ids)]
        return Tokenized.concat([ids for ids, _ in encoded], truncated=sum(truncated for _, truncated in encoded))


def checkpoint_embedding(num_embeddings: int, dim: int, padding_idx: int | None = None) -> torch.nn.Embedding:
    """An `nn.Embedding` left uninitialised, for a model built on the meta device and given a checkpoint.

    Its usual random init is `normal_`, which on the meta device imports torch._dynamo (3.4-4.5 s on
    an H200 host, bench/results/startup_profile_h200*.txt) inside the first model's load.
    """
    return torch.nn.Embedding(num_embeddings, dim, padding_idx, _weight=torch.empty(num_embeddings, dim))


@dataclass(frozen=True, kw_only=True)
class ModelDescription:
    """A model as its outputs and the embedding store name it, known without loading its weights
    (`ModelSpec.describe`); a `LoadedModel` is its description plus the module and tokenizer."""

    kind: str  # its `ModelSpec.name`
    name: str  # e.g. "esm2_t36_3B_UR50D", or the directory name of a DNABERT-S checkpoint
    embed_dim: int
    weights_sha256: str
    source: str  # the path the weights are read from
    device: torch.device
    dtype: torch.dtype
    attention_backend: str
    pooling: str  # the pooling rule, recorded in every output
    fp8: bool = False  # linear layers in FP8 (`vnp_core.models.fp8`), activations in `dtype`

    @property
    def precision(self) -> str:
        """What its vectors are computed in: recorded in every output and part of the store's model identity."""
        from vnp_core.models.fp8 import PRECISION_PREFIX

        dtype = str(self.dtype).removeprefix("torch.")
        return PRECISION_PREFIX + dtype if self.fp8 else dtype


@dataclass(frozen=True, kw_only=True)
class LoadedModel(ModelDescription):
    module: torch.nn.Module  # .embed(PackedBatch) -> (B, embed_dim) float32
    tokenizer: SequenceTokenizer
    compiled: bool = False  # layers wrapped by torch.compile (`engine.compile_if_worth_it`)

    @property
    def description(self) -> ModelDescription:
        """The model without its module: what `ModelSpec.describe` gives for the same files and config."""
        return ModelDescription(**{f.name: getattr(self, f.name) for f in fields(ModelDescription)})


def placement(config: EmbedConfig, *, needs_bias: bool) -> tuple[torch.device, torch.dtype, str]:
    """The device, dtype and attention back end a model runs with under `config`."""
    device, dtype = torch.device(config.device), getattr(torch, config.dtype)
    return device, dtype, select_backend(config.attention_backend, device, dtype, needs_bias=needs_bias)
