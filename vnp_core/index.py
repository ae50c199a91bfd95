"""The sequence index: one row per kept frame, the unit of work of every embedding shard.

A row holds the frame's ids and chunk coordinates, its place in prep's output, its sequences (so a
shard reads its rows and needs nothing else), its length in tokens for each model, and its shard.
Rows are sorted longest first and dealt to the shards in turn, so every shard gets an almost equal
share of the tokens; `prep_order` restores the original tool's order where a user sees it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from vnp_core.atomic import atomic_path

# ESM-2 embeds at most 1022 residues (its training crop) between <cls> and <eos>.
ESM2_MAX_RESIDUES = 1022
# DNABERT-S's BPE averages 4-5 bp per token (../shared/spec/dnabert-s.md): the estimate used
# when no tokenizer is given. Only shard balance relies on it; the embedding step tokenises exactly.
DNABERT_S_BP_PER_TOKEN_ESTIMATE = 4.5
_LENGTH_BIN = 25  # residues, in the summary's length table (a 500-bp chunk gives at most 166)

COLUMNS = [
    "frame_id", "prep_order", "record_id", "chunk_index", "chunk_start", "chunk_end", "frame",
    "nucleotide_length", "protein_length", "esm2_tokens", "dnabert_s_tokens", "shard", "nucleotide", "protein",
]


def build_index(frames: pl.DataFrame, *, num_shards: int,
                dnabert_token_counter: Callable[[list[str]], np.ndarray] | None = None) -> pl.DataFrame:
    """Index the kept frames of `vnp_core.prep` (its `frames` table) over `num_shards` shards.

    `frames` are in prep's output order (chunk order, then F1..F3, R1..R3), which `prep_order`
    keeps as each row's 0-based number. `dnabert_token_counter` maps nucleotide sequences to their
    DNABERT-S token counts ([CLS] and [SEP] included); without it `dnabert_s_tokens` is an
    estimate, ceil(length / 4.5) + 2.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    index = frames.with_columns(
        prep_order=pl.int_range(pl.len(), dtype=pl.Int64),
        nucleotide_length=pl.col("nucleotide").str.len_bytes().cast(pl.Int32),
        protein_length=pl.col("protein").str.len_bytes().cast(pl.Int32),
    )
    if dnabert_token_counter is None:
        dnabert_s_tokens = (pl.col("nucleotide_length") / DNABERT_S_BP_PER_TOKEN_ESTIMATE).ceil() + 2
    else:
        dnabert_s_tokens = pl.lit(pl.Series(dnabert_token_counter(index["nucleotide"].to_list())))
    index = index.with_columns(
        esm2_tokens=(pl.min_horizontal("protein_length", ESM2_MAX_RESIDUES) + 2).cast(pl.Int64),
        dnabert_s_tokens=dnabert_s_tokens.cast(pl.Int64),
    ).sort(["esm2_tokens", "frame_id"], descending=[True, False])
    # Dealing length-sorted rows in turn gives each shard nearly the same tokens (and sequence lengths).
    return index.with_columns(shard=(pl.int_range(pl.len(), dtype=pl.Int32) % num_shards)).select(COLUMNS)


def index_summary(index: pl.DataFrame) -> dict:
    """What a person wants to see of an index: frame and token counts, per shard, and by protein length."""
    counts = [pl.len().alias("frames"), pl.col("esm2_tokens").sum(), pl.col("dnabert_s_tokens").sum()]
    length_bin = pl.col("protein_length") // _LENGTH_BIN * _LENGTH_BIN
    return {
        "kept_frames": index.height,
        "records_with_kept_frames": index["record_id"].n_unique(),
        "esm2_tokens": int(index["esm2_tokens"].sum()),
        "dnabert_s_tokens": int(index["dnabert_s_tokens"].sum()),
        "shards": index.group_by("shard").agg(counts).sort("shard"),
        "lengths": index.group_by(length_bin.alias("from")).agg(counts).sort("from").select(
            pl.format("{}-{}", "from", pl.col("from") + _LENGTH_BIN - 1).alias("protein_length"), pl.exclude("from")),
    }


def write_index(index: pl.DataFrame, path: Path) -> None:
    """Parquet, written under a temporary name and renamed: a reader never sees half an index."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        index.write_parquet(temporary)


def read_index(path: Path) -> pl.DataFrame:
    index = pl.read_parquet(path)
    if index.columns != COLUMNS:
        raise ValueError(f"{path}: not a vnp sequence index (columns {index.columns}, expected {COLUMNS})")
    return index


@dataclass(frozen=True)
class ShardRows:
    """The frame ids and `column` sequences of one shard of the index at `path`, in index order.

    A picklable reader: the device process reads its rows itself rather than receiving millions
    of strings through a pickle from the step.
    """

    path: Path
    shard: int
    column: str  # "protein" (ESM-2) or "nucleotide" (DNABERT-S)

    def __call__(self) -> tuple[list[str], list[str]]:
        rows = self.frame().select("frame_id", self.column).collect()
        return rows["frame_id"].to_list(), rows[self.column].to_list()

    def count(self) -> int:
        return self.frame().select(pl.len()).collect().item()

    def frame(self) -> pl.LazyFrame:
        return pl.scan_parquet(self.path).filter(pl.col("shard") == self.shard)
