"""The sequence index: one row per kept frame, the unit of work of every embedding shard.

A row holds the frame's ids and chunk coordinates, its place in prep's output, its sequences (so a
shard reads its rows and needs nothing else), its length in tokens for each model, and its shard.
Rows are sorted longest first and their distinct proteins dealt to the shards in turn, so every
shard gets an almost equal share of the tokens and all copies of a frame share a shard;
`prep_order` restores the original tool's order where a user sees it.

Given DNABERT-S's tokenizer, the index also keeps each row's DNABERT-S token ids. Counting the
tokens exactly means tokenising anyway, and an embedding step that reads the ids starts its GPU
seconds sooner: tokenising a 350k-row shard took 5-6 s on an H200 host, while the device waited.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from vnp_core.atomic import atomic_path
from vnp_core.config import ESM2_MAX_RESIDUES
from vnp_core.models import SequenceTokenizer, Tokenized
# DNABERT-S's BPE averages 4-5 bp per token (../shared/spec/dnabert-s.md): the estimate used
# when no tokenizer is given. Only shard balance relies on it; the embedding step tokenises exactly.
DNABERT_S_BP_PER_TOKEN_ESTIMATE = 4.5
_LENGTH_BIN = 25  # residues, in the summary's length table (a 500-bp chunk gives at most 166)

COLUMNS = [
    "frame_id", "prep_order", "record_id", "chunk_index", "chunk_start", "chunk_end", "frame",
    "nucleotide_length", "protein_length", "esm2_tokens", "dnabert_s_tokens", "shard", "nucleotide", "protein",
]
# The optional column of DNABERT-S token ids: each row's as little-endian uint16 bytes (the vocabulary
# has 4096 tokens), which join and convert in one call for a whole shard.
TOKEN_IDS = "dnabert_s_token_ids"
TOKEN_ID_DTYPE = np.dtype("<u2")
# Parquet metadata keys: the digest of the tokenizer that made the ids (`SequenceTokenizer.digest`),
# and the chunk length the frames were cut with (every later stage reads it from here).
TOKENIZER_KEY = "vnp.dnabert_s_tokenizer"
CHUNK_LENGTH_KEY = "vnp.chunk_length"


@dataclass(frozen=True)
class IndexProvenance:
    """What a sample's index was built with: later stages follow it rather than today's settings."""

    chunk_length: int
    dnabert_s_tokenizer: str | None  # the digest of the tokenizer whose ids it keeps


def build_index(frames: pl.DataFrame, *, num_shards: int,
                dnabert_tokenizer: SequenceTokenizer | None = None) -> pl.DataFrame:
    """Index the kept frames of `vnp_core.prep` (its `frames` table) over `num_shards` shards.

    `frames` are in prep's output order (chunk order, then F1..F3, R1..R3), which `prep_order`
    keeps as each row's 0-based number. With `dnabert_tokenizer`, `dnabert_s_tokens` is exact
    ([CLS] and [SEP] included) and the ids are kept in `TOKEN_IDS`; without it `dnabert_s_tokens`
    is an estimate, ceil(length / 4.5) + 2.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    index = frames.with_columns(
        prep_order=pl.int_range(pl.len(), dtype=pl.Int64),
        nucleotide_length=pl.col("nucleotide").str.len_bytes().cast(pl.Int32),
        protein_length=pl.col("protein").str.len_bytes().cast(pl.Int32),
    )
    columns = list(COLUMNS)
    if dnabert_tokenizer is None:
        dnabert_s_tokens = (pl.col("nucleotide_length") / DNABERT_S_BP_PER_TOKEN_ESTIMATE).ceil() + 2
    else:
        # Each distinct nucleotide once: copies of a read, and both strands of a place, repeat them.
        distinct = index.select("nucleotide", "frame_id").unique("nucleotide", keep="first", maintain_order=True)
        tokenized = dnabert_tokenizer.encode_many(distinct["nucleotide"].to_list(), distinct["frame_id"].to_list())
        tokens = distinct.select("nucleotide", pl.Series("dnabert_s_tokens", tokenized.lengths))
        if int(tokenized.tokens.max(initial=0)) <= np.iinfo(TOKEN_ID_DTYPE).max:
            tokens = tokens.with_columns(pl.Series(TOKEN_IDS, _token_bytes(tokenized), dtype=pl.Binary))
            columns.append(TOKEN_IDS)
        index = index.join(tokens, on="nucleotide", how="left", maintain_order="left")
        dnabert_s_tokens = pl.col("dnabert_s_tokens")
    index = index.with_columns(
        esm2_tokens=(pl.min_horizontal("protein_length", ESM2_MAX_RESIDUES) + 2).cast(pl.Int64),
        dnabert_s_tokens=dnabert_s_tokens.cast(pl.Int64),
    ).sort(["esm2_tokens", "protein", "frame_id"], descending=[True, False, False])
    # Dealing length-sorted proteins in turn gives each shard nearly the same tokens (and sequence
    # lengths). Dealing distinct proteins, not rows, keeps every copy of a frame (same protein, so
    # same nucleotide too) in one shard: a step dedups only its own rows through the embedding
    # store, so shards embedded at once on several GPUs would otherwise each embed the copies.
    return index.with_columns(shard=(pl.col("protein").rle_id() % num_shards).cast(pl.Int32)).select(columns)


def first_copies(index: pl.DataFrame, frame_ids: Sequence[str]) -> np.ndarray:
    """For each of `frame_ids` (e.g. a merged file's rows), the position of the first of them with
    the same nucleotide and protein: itself for the first of its copies."""
    rows = (pl.DataFrame({"frame_id": list(frame_ids)}, schema={"frame_id": pl.String}).with_row_index("row")
            .join(index.select("frame_id", "nucleotide", "protein"), on="frame_id", how="left", maintain_order="left"))
    if rows["protein"].null_count():
        raise ValueError(f"{rows['protein'].null_count()} frame(s) are not in the sequence index, "
                         f"e.g. {rows.filter(pl.col('protein').is_null())['frame_id'].head(5).to_list()}")
    return rows.select(pl.col("row").first().over("nucleotide", "protein")).to_series().to_numpy().astype(np.int64)


def _token_bytes(tokenized: Tokenized) -> list[bytes]:
    flat = tokenized.tokens.astype(TOKEN_ID_DTYPE)
    return [part.tobytes() for part in np.split(flat, tokenized.offsets[1:-1])]


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


def write_index(index: pl.DataFrame, path: Path, *, chunk_length: int,
                dnabert_tokenizer: SequenceTokenizer | None = None) -> None:
    """Parquet, written under a temporary name and renamed: a reader never sees half an index.

    `dnabert_tokenizer` is the one `build_index` was given: its digest is kept beside the token ids.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {CHUNK_LENGTH_KEY: str(chunk_length)}
    if dnabert_tokenizer is not None and TOKEN_IDS in index.columns:
        metadata[TOKENIZER_KEY] = dnabert_tokenizer.digest
    with atomic_path(path) as temporary:
        index.write_parquet(temporary, metadata=metadata)


def read_index_provenance(path: Path) -> IndexProvenance:
    metadata = pl.read_parquet_metadata(path)
    if CHUNK_LENGTH_KEY not in metadata:
        raise ValueError(f"{path}: an index without its chunk length (made by an older vnp): rematerialize sequence_index")
    return IndexProvenance(int(metadata[CHUNK_LENGTH_KEY]), metadata.get(TOKENIZER_KEY))


def read_index(path: Path) -> pl.DataFrame:
    """The index's `COLUMNS` (the token ids are left on disk: only the embedding step reads them)."""
    schema = pl.read_parquet_schema(path)
    if missing := [column for column in COLUMNS if column not in schema]:
        raise ValueError(f"{path}: not a vnp sequence index (columns {list(schema)}, missing {missing})")
    return pl.read_parquet(path, columns=COLUMNS)


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

    def tokens(self, tokenizer: SequenceTokenizer) -> Tokenized | None:
        """The rows' token ids as the index keeps them, when it does and `tokenizer` made them (else None)."""
        if self.column != "nucleotide" or pl.read_parquet_metadata(self.path).get(TOKENIZER_KEY) != tokenizer.digest:
            return None
        rows = self.frame().select("dnabert_s_tokens", TOKEN_IDS).collect()
        tokens = np.frombuffer(b"".join(rows[TOKEN_IDS].to_list()), dtype=TOKEN_ID_DTYPE).astype(np.int32)
        lengths = rows["dnabert_s_tokens"].to_numpy().astype(np.int64)
        if len(tokens) != lengths.sum():
            raise ValueError(f"{self.path}: shard {self.shard} holds {len(tokens)} token ids, its counts add up to {lengths.sum()}")
        return Tokenized(tokens, lengths, truncated=0)

    def count(self) -> int:
        return self.frame().select(pl.len()).collect().item()

    def frame(self) -> pl.LazyFrame:
        return pl.scan_parquet(self.path).filter(pl.col("shard") == self.shard)
