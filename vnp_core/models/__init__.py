"""The embedding models, as one registry that the engine, the assets, the validation and the store iterate.

A model is one `ModelSpec` entry plus its files: `<name>.py` (tokenizer and packed forward),
`<name>_checkpoint.py` (reading its weights) and its fp32 reference in `reference.py`. The
registry's order is the order the device runs them in and the order of the classifier's features.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vnp_core.config import EmbedConfig
from vnp_core.fasta import NUCLEOTIDE_LETTERS
from vnp_core.models.base import LoadedModel, ModelDescription, SequenceTokenizer, Tokenized, checkpoint_embedding

__all__ = ["MODELS", "LoadedModel", "ModelDescription", "ModelSpec", "SequenceTokenizer", "Tokenized", "checkpoint_embedding",
           "model_spec"]


@dataclass(frozen=True)
class ModelSpec:
    name: str  # asset `<name>_embeddings`, HDF5 dataset `<name>`, index column `<name>_tokens`
    index_column: str  # the sequence column of the index it embeds
    alphabet: str  # letters its FASTA input may hold
    pooling: str
    compile_min_tokens: int | None  # tokens from which a shard repays compiling the layers; None: none does
    load: Callable[[Path, EmbedConfig], LoadedModel]
    describe: Callable[[Path, EmbedConfig], ModelDescription]  # what `load` loads, from the weights' checksum only
    tokenizer: Callable[[Path, EmbedConfig], SequenceTokenizer]  # without reading the weights
    reference: Callable[[Path, list[str], EmbedConfig, str], np.ndarray]  # fp32, unpacked, on a torch device


def _dnabert_s() -> ModelSpec:
    from vnp_core.models import dnabert_s, dnabert_s_checkpoint, reference

    return ModelSpec(
        name="dnabert_s", index_column="nucleotide", alphabet=NUCLEOTIDE_LETTERS, pooling=dnabert_s.POOLING,
        compile_min_tokens=dnabert_s.COMPILE_MIN_TOKENS, load=dnabert_s_checkpoint.load_dnabert_s,
        describe=dnabert_s_checkpoint.describe_dnabert_s,
        tokenizer=lambda path, config: dnabert_s.DnabertSTokenizer(Path(path) / "tokenizer.json"),
        reference=lambda path, sequences, config, device: reference.dnabert_s_reference(Path(path), sequences, device),
    )


def _esm2() -> ModelSpec:
    from vnp_core.models import esm2, esm2_checkpoint, reference

    return ModelSpec(
        name="esm2", index_column="protein", alphabet=esm2.RESIDUES, pooling=esm2.POOLING,
        compile_min_tokens=esm2.COMPILE_MIN_TOKENS, load=esm2_checkpoint.load_esm2, describe=esm2_checkpoint.describe_esm2,
        tokenizer=lambda path, config: esm2.ESM2Tokenizer(config.max_protein_length),
        reference=lambda path, sequences, config, device: reference.esm2_reference(
            Path(path), sequences, max_residues=config.max_protein_length, device=device),
    )


# DNABERT-S first: it is small and quick to load, so the device starts early while the 3B ESM-2
# loads and compiles; and VirNucPro's features are DNABERT-S's vector, then ESM-2's.
MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in (_dnabert_s(), _esm2())}


def model_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: expected one of {', '.join(MODELS)}")
    return MODELS[name]
