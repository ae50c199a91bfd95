"""The two embedding models behind one small interface that the engine drives.

A model is loaded into a `LoadedModel`: the packed `nn.Module` (its `embed(batch)` returns pooled
fp32 vectors, one per sequence of the pack) and a picklable tokenizer that worker processes use.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


class SequenceTokenizer:
    """Turns sequences into token ids (specials included). Picklable: runs in worker processes."""

    def encode(self, sequence: str, record_id: str) -> tuple[np.ndarray, bool]:
        """Token ids, and whether the input was truncated. Unknown letters raise `ValueError` naming the record."""
        raise NotImplementedError

    def encode_many(self, sequences: Sequence[str], record_ids: Sequence[str]) -> tuple[list[np.ndarray], int]:
        """`encode` of every sequence, and how many were truncated; a tokenizer with a faster batch path overrides it."""
        encoded = [self.encode(sequence, record_id) for sequence, record_id in zip(sequences, record_ids)]
        return [ids for ids, _ in encoded], sum(truncated for _, truncated in encoded)


@dataclass
class LoadedModel:
    kind: str  # "esm2" or "dnabert_s"
    name: str  # e.g. "esm2_t36_3B_UR50D", or the directory name of a DNABERT-S checkpoint
    module: torch.nn.Module  # .embed(PackedBatch) -> (B, embed_dim) float32
    tokenizer: SequenceTokenizer
    embed_dim: int
    weights_sha256: str
    source: str  # the path the weights were read from
    device: torch.device
    dtype: torch.dtype
    attention_backend: str
    pooling: str  # the pooling rule, recorded in every output
