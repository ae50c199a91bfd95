import math

import numpy as np
import polars as pl
import pytest

from vnp_core.config import PrepConfig
from vnp_core.fasta import FastaRecord, read_fasta
from vnp_core.index import (
    TOKEN_IDS,
    IndexProvenance,
    ShardRows,
    build_index,
    first_copies,
    index_summary,
    read_index,
    read_index_provenance,
    write_index,
)
from vnp_core.models.dnabert_s import DnabertSTokenizer
from vnp_core.tiny_models import write_tiny_dnabert_s
from vnp_core.prep import prepare_records
from real_genomes import REAL_DATA


@pytest.fixture(scope="module")
def t4_frames() -> pl.DataFrame:
    return prepare_records(read_fasta(REAL_DATA / "t4.fasta").records, PrepConfig(chunk_length=300)).frames


@pytest.fixture(scope="module")
def two_genomes_frames(t4_frames) -> pl.DataFrame:
    bacterium = read_fasta(REAL_DATA / "cdiphtheriae_NCTC11397_100kb.fasta").records
    return pl.concat([t4_frames, prepare_records(bacterium, PrepConfig(chunk_length=300)).frames])


def test_every_kept_frame_appears_exactly_once_with_its_sequences_and_place_in_prep(t4_frames):
    index = build_index(t4_frames, num_shards=3)
    assert index.height == t4_frames.height == index["frame_id"].n_unique()
    assert index["prep_order"].sort().to_list() == list(range(index.height))
    columns = ["frame_id", "record_id", "chunk_index", "chunk_start", "chunk_end", "frame", "nucleotide", "protein"]
    assert index.sort("prep_order").select(columns).equals(t4_frames.select(columns))


@pytest.mark.parametrize("num_shards", [2, 4, 8])
def test_shards_get_almost_equal_tokens_on_real_genomes(two_genomes_frames, num_shards):
    index = build_index(two_genomes_frames, num_shards=num_shards)
    shards = index_summary(index)["shards"]
    assert shards["shard"].to_list() == list(range(num_shards))
    # Dealing distinct proteins in turn leaves shards at most one protein's copies apart.
    most_copies = index["protein"].value_counts()["count"].max()
    assert shards["frames"].max() - shards["frames"].min() <= most_copies
    for tokens in ("esm2_tokens", "dnabert_s_tokens"):
        assert shards[tokens].max() - shards[tokens].min() <= most_copies * index[tokens].max()
        assert shards[tokens].max() / shards[tokens].min() < 1.03


def test_rows_are_sorted_longest_first_and_distinct_proteins_dealt_to_shards_in_turn(t4_frames):
    index = build_index(t4_frames, num_shards=3)
    assert index["esm2_tokens"].is_sorted(descending=True)
    distinct = index["protein"].rle_id()
    assert index["shard"].to_list() == [i % 3 for i in distinct]


def test_every_copy_of_a_frame_lands_in_one_shard(t4_frames):
    # Shards embedded at once on several GPUs can only skip a sequence another shard embeds if
    # both hold it: so no two shards may.
    copies = t4_frames.head(300).with_columns(frame_id=pl.col("frame_id") + "_copy")
    index = build_index(pl.concat([t4_frames, copies]), num_shards=4)
    for column in ("protein", "nucleotide"):
        assert index.group_by(column).agg(pl.col("shard").n_unique())["shard"].max() == 1
    shards = index_summary(index)["shards"]
    assert shards["frames"].max() / shards["frames"].min() < 1.05


def test_first_copies_point_each_frame_at_the_first_with_its_nucleotide_and_protein(t4_frames):
    copies = t4_frames.head(300).with_columns(frame_id=pl.col("frame_id") + "_copy")
    index = build_index(pl.concat([t4_frames, copies]), num_shards=2)
    ids = index["frame_id"].to_list()
    first = first_copies(index, ids)
    by_id = dict(zip(ids, first.tolist(), strict=True))
    for frame_id in copies["frame_id"].head(20):  # a copy and its original share a first, which comes first
        original = frame_id.removesuffix("_copy")
        assert by_id[frame_id] == by_id[original] <= min(ids.index(frame_id), ids.index(original))
    sequences = index.select("nucleotide", "protein").rows()
    assert all(sequences[row] == sequences[first[row]] and first[first[row]] == first[row] for row in range(len(ids)))
    assert (first == np.arange(len(ids))).sum() == index.select("nucleotide", "protein").n_unique()
    with pytest.raises(ValueError, match=r"1 frame\(s\) are not in the sequence index, e.g. \['nowhere_F1'\]"):
        first_copies(index, [ids[0], "nowhere_F1"])


def test_only_prep_order_follows_the_order_of_the_input(t4_frames):
    shuffled = t4_frames.sample(fraction=1.0, shuffle=True, seed=1)
    index, shuffled_index = build_index(t4_frames, num_shards=4), build_index(shuffled, num_shards=4)
    assert shuffled_index.drop("prep_order").equals(index.drop("prep_order"))
    assert shuffled_index.sort("prep_order")["frame_id"].equals(shuffled["frame_id"])


def test_token_counts():
    frames = prepare_records([FastaRecord("r", "", "ATGAAACCC", 1)], PrepConfig(chunk_length=300)).frames
    long_protein = frames.head(1).with_columns(frame_id=pl.lit("long"), protein=pl.lit("M" * 1500))
    index = build_index(pl.concat([frames, long_protein]), num_shards=1)
    rows = {row["frame_id"]: row for row in index.iter_rows(named=True)}
    assert rows["long"]["esm2_tokens"] == 1022 + 2  # ESM-2's crop
    assert (rows["r_chunk_1F3"]["nucleotide_length"], rows["r_chunk_1F3"]["protein_length"]) == (7, 2)
    assert rows["r_chunk_1F3"]["esm2_tokens"] == 4
    assert rows["r_chunk_1F3"]["dnabert_s_tokens"] == math.ceil(7 / 4.5) + 2  # the documented estimate


def test_dnabert_s_token_ids_are_kept_with_their_tokenizer_and_read_back_per_shard(tmp_path, t4_frames):
    tokenizer = DnabertSTokenizer(write_tiny_dnabert_s(tmp_path / "dnabert_s") / "tokenizer.json")
    index = build_index(t4_frames, num_shards=3, dnabert_tokenizer=tokenizer)
    path = tmp_path / "index.parquet"
    write_index(index, path, chunk_length=300, dnabert_tokenizer=tokenizer)
    for shard in range(3):
        rows = ShardRows(path, shard, "nucleotide")
        ids, sequences = rows()
        stored, fresh = rows.tokens(tokenizer), tokenizer.encode_many(sequences, ids)
        np.testing.assert_array_equal(stored.lengths, fresh.lengths)
        np.testing.assert_array_equal(stored.tokens, fresh.tokens)
        assert stored.lengths.tolist() == index.filter(pl.col("shard") == shard)["dnabert_s_tokens"].to_list()
    # Ids made by another tokenizer, or asked for the protein column, are not handed out.
    other = DnabertSTokenizer(write_tiny_dnabert_s(tmp_path / "other", seed=1) / "tokenizer.json")
    assert ShardRows(path, 0, "nucleotide").tokens(other) is None
    assert ShardRows(path, 0, "protein").tokens(tokenizer) is None
    # The other stages read the index without them.
    assert TOKEN_IDS not in read_index(path).columns
    assert read_index_provenance(path) == IndexProvenance(chunk_length=300, dnabert_s_tokenizer=tokenizer.digest)


def test_the_index_carries_its_chunk_length(tmp_path, t4_frames):
    index = build_index(t4_frames, num_shards=2)
    for chunk_length in (300, 500):
        write_index(index, tmp_path / f"{chunk_length}.parquet", chunk_length=chunk_length)
        # No token ids kept: no tokenizer digest, even when one is given.
        assert read_index_provenance(tmp_path / f"{chunk_length}.parquet") == IndexProvenance(chunk_length, None)
    tokenizer = DnabertSTokenizer(write_tiny_dnabert_s(tmp_path / "dnabert_s") / "tokenizer.json")
    write_index(index, tmp_path / "no_ids.parquet", chunk_length=300, dnabert_tokenizer=tokenizer)
    assert read_index_provenance(tmp_path / "no_ids.parquet").dnabert_s_tokenizer is None
    with pytest.raises(TypeError):
        write_index(index, tmp_path / "unknown.parquet")  # the chunk length is required


def test_an_index_without_its_chunk_length_is_refused(tmp_path, t4_frames):
    path = tmp_path / "old.parquet"
    build_index(t4_frames, num_shards=2).write_parquet(path)  # as an older vnp wrote it
    with pytest.raises(ValueError, match="old.parquet: an index without its chunk length"):
        read_index_provenance(path)


def test_summary_adds_up(t4_frames):
    index = build_index(t4_frames, num_shards=4)
    summary = index_summary(index)
    assert summary["kept_frames"] == index.height and summary["records_with_kept_frames"] == 1
    assert summary["esm2_tokens"] == index["esm2_tokens"].sum() == summary["shards"]["esm2_tokens"].sum()
    assert summary["lengths"]["frames"].sum() == index.height
    # A 300-bp chunk holds 100 codons; T4's stop-free frames nearly fill it.
    assert summary["lengths"]["protein_length"].to_list() == ["75-99", "100-124"]
    assert summary["lengths"]["dnabert_s_tokens"].sum() == summary["dnabert_s_tokens"]


def test_parquet_round_trip_is_exact_and_leaves_no_temporary_file(tmp_path, t4_frames):
    index = build_index(t4_frames, num_shards=2)
    path = tmp_path / "sample" / "index.parquet"
    write_index(index, path, chunk_length=300)
    assert read_index(path).equals(index)
    assert [p.name for p in path.parent.iterdir()] == ["index.parquet"]


def test_reading_something_else_fails_clearly(tmp_path):
    path = tmp_path / "other.parquet"
    pl.DataFrame({"a": [1]}).write_parquet(path)
    with pytest.raises(ValueError, match="other.parquet: not a vnp sequence index"):
        read_index(path)


def test_at_least_one_shard(t4_frames):
    with pytest.raises(ValueError, match="num_shards must be >= 1"):
        build_index(t4_frames, num_shards=0)
