"""`sequence_index` materialized on a real genome: prep files, the Parquet index, the metadata a person reads."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from dagster import DagsterInstance, materialize

from vnp_assets.assets.sequence_index import sequence_index
from conftest import Resources
from real_genomes import REAL_DATA


def test_sequence_index_writes_prep_files_index_and_metadata(vnp_resources: Resources, instance: DagsterInstance,
                                                             add_sample) -> None:
    add_sample("flu", REAL_DATA / "influenza_a_california_07_2009.fasta")

    result = materialize([sequence_index], partition_key="flu", resources=vnp_resources, instance=instance)

    layout = vnp_resources["storage"].layout("flu")
    index = pl.read_parquet(layout.index)
    metadata = {key: value.value for key, value in result.asset_materializations_for_node("sequence_index")[0].metadata.items()}
    assert metadata["records"] == 8
    assert metadata["skipped_records"] == 0
    assert metadata["kept_frames"] == index.height > 0
    # Every chunk either has a kept frame in the index or is counted as having none.
    chunks_with_frames = index.select("record_id", "chunk_index").n_unique()
    assert metadata["chunks"] == chunks_with_frames + metadata["chunks_without_kept_frame"]
    assert metadata["esm2_tokens"] == index["esm2_tokens"].sum()
    assert sorted(index["shard"].unique()) == [0, 1]
    assert "| shard |" in metadata["shards"] and "| protein_length |" in metadata["protein_lengths"]
    assert metadata["index"] == str(layout.index)
    assert "no biological meaning" in metadata["placeholder_models"]
    prep_files = sorted(path.name for path in layout.prep_dir.iterdir())
    assert prep_files == ["flu_chunked500.fa", "flu_identified_nucleotide.fa", "flu_identified_protein.faa"]
    assert all(f"`{layout.prep_dir / name}`" in metadata["prep_files"] for name in prep_files)


def test_bad_record_fails_naming_file_and_record_or_is_skipped_and_counted(
        vnp_resources: Resources, make_resources, instance: DagsterInstance, add_sample, tmp_path: Path) -> None:
    fasta = tmp_path / "reads.fa"
    fasta.write_text(">good\n" + "ACGTTGCA" * 40 + "\n>empty\n>good2\n" + "TTGACCAG" * 40 + "\n")
    add_sample("reads", fasta)

    with pytest.raises(ValueError, match=r"reads\.fasta: line 3: record 'empty'"):
        materialize([sequence_index], partition_key="reads", resources=vnp_resources, instance=instance)

    lenient = make_resources(skip_bad_records=True)
    result = materialize([sequence_index], partition_key="reads", resources=lenient, instance=instance)
    metadata = result.asset_materializations_for_node("sequence_index")[0].metadata
    assert metadata["records"].value == 2
    assert metadata["skipped_records"].value == 1


def test_a_partition_added_by_hand_fails_with_a_sentence_not_a_stack_trace(
        vnp_resources: Resources, instance: DagsterInstance) -> None:
    instance.add_dynamic_partitions("samples", ["typed_in_the_ui"])  # the UI's "Add a partition"

    result = materialize([sequence_index], partition_key="typed_in_the_ui", resources=vnp_resources, instance=instance,
                         raise_on_error=False)

    failure = result.get_step_failure_events()[0].step_failure_data
    assert "sample 'typed_in_the_ui' has no FASTA: drop the file into" in failure.user_failure_data.description
    assert not vnp_resources["storage"].layout("typed_in_the_ui").root.exists()
