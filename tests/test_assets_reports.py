"""`fp16_validation_report` and `virnucpro_predictions` on a sample whose production embeddings are
written by the test: exactly the fp32 reference (the report passes), or with one vector flipped (it fails)."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from dagster import AssetKey, DagsterInstance, evaluate_automation_conditions, materialize

from vnp_assets.assets import build_assets
from vnp_assets.platform import build_definitions
from conftest import Resources
from real_genomes import REAL_DATA

ASSETS = build_assets(num_shards=2)


def write_production_embeddings(settings: Resources, flip_first_dnabert_s_row: bool) -> None:
    """Shards as the embedding steps would write them, holding each model's fp32 reference vectors."""
    from vnp_core.index import read_index
    from vnp_core.models.reference import dnabert_s_reference, esm2_reference
    from vnp_core.store import write_embeddings

    layout = settings["storage"].layout("flu")
    index = read_index(layout.index)
    models = settings["models"].paths(500)
    reference = {"esm2": esm2_reference(models.embedders["esm2"], index["protein"].to_list()),
                 "dnabert_s": dnabert_s_reference(models.embedders["dnabert_s"], index["nucleotide"].to_list())}
    if flip_first_dnabert_s_row:
        reference["dnabert_s"][0] *= -1
    for model, vectors in reference.items():
        for shard in (0, 1):
            rows = (index["shard"] == shard).to_numpy()
            layout.embeddings(model, shard).parent.mkdir(parents=True, exist_ok=True)
            write_embeddings(layout.embeddings(model, shard), index["frame_id"].filter(rows).to_list(), vectors[rows],
                             {"dtype": "float16", "attention_backend": "flash_attn"})


def materialize_for_sample(settings: Resources, instance: DagsterInstance, asset: str, **kwargs):
    return materialize(ASSETS, selection=[asset], partition_key="flu", resources=settings, instance=instance,
                       **kwargs)


def materialization_metadata(result, asset: str) -> dict:
    return {key: value.value for key, value in result.asset_materializations_for_node(asset)[0].metadata.items()}


@pytest.fixture
def indexed_sample(vnp_resources: Resources, instance: DagsterInstance, add_sample) -> str:
    add_sample("flu", REAL_DATA / "influenza_a_california_07_2009.fasta")
    materialize_for_sample(vnp_resources, instance, "sequence_index")
    return "flu"


def test_passing_report_then_predictions_in_the_original_files(
        vnp_resources: Resources, instance: DagsterInstance, indexed_sample: str) -> None:
    write_production_embeddings(vnp_resources, flip_first_dnabert_s_row=False)
    materialize_for_sample(vnp_resources, instance, "merged_embeddings")
    defs = build_definitions(vnp_resources)
    automation = evaluate_automation_conditions(defs, instance=instance)  # a tick before, as the sensor ticks on

    report = materialize_for_sample(vnp_resources, instance, "fp16_validation_report")
    metadata = materialization_metadata(report, "fp16_validation_report")
    assert [(check.check_name, check.passed) for check in report.get_asset_check_evaluations()] == [("cosine_thresholds", True)]
    assert metadata["summary"].startswith("**PASSED**")
    assert "- esm2.dtype: float16" in metadata["summary"]  # what production ran with, from the merged file
    assert metadata["histogram"].startswith("![cosine histogram](data:image/png;base64,iVBOR")  # a PNG, inline
    assert metadata["esm2_cosine_min"] > 0.9999 and metadata["dnabert_s_cosine_p1"] > 0.9999
    assert metadata["call_agreement"] == 1.0  # the same vectors make the same calls
    index_rows = pl.read_parquet(vnp_resources["storage"].layout("flu").index).height
    assert metadata["compared"] == index_rows  # fewer frames than the subset size: all of them
    assert all(Path(metadata[name]).is_file() for name in ("report_file", "per_sequence_file", "histogram_file"))

    automation = evaluate_automation_conditions(defs, instance=instance, cursor=automation.cursor)
    assert automation.get_requested_partitions(AssetKey("virnucpro_predictions")) == {"flu"}
    predictions = materialize_for_sample(vnp_resources, instance, "virnucpro_predictions")
    metadata = materialization_metadata(predictions, "virnucpro_predictions")
    assert metadata["frames"] == index_rows
    assert metadata["chunk_length"] == 500
    assert "no biological meaning" in metadata["placeholder_models"]
    frame_lines = Path(metadata["frame_predictions"]).read_text().splitlines()
    assert frame_lines[0] == "Sequence_ID\tPrediction\tscore1\tscore2" and len(frame_lines) == index_rows + 1
    protein_fasta = vnp_resources["storage"].layout("flu").prep_dir / "flu_identified_protein.faa"
    protein_ids = [line[1:] for line in protein_fasta.read_text().splitlines() if line.startswith(">")]
    assert [line.split("\t")[0] for line in frame_lines[1:]] == protein_ids  # prep's order, as the original wrote it
    assert Path(metadata["chunk_calls"]).read_text().startswith("Modified_ID\tIs_Virus\n")


@pytest.mark.slow  # the same guard as the embedding checks' (tested there), exercised for the report
def test_failing_report_blocks_the_predictions(vnp_resources: Resources, instance: DagsterInstance,
                                               indexed_sample: str) -> None:
    write_production_embeddings(vnp_resources, flip_first_dnabert_s_row=True)
    materialize_for_sample(vnp_resources, instance, "merged_embeddings")
    defs = build_definitions(vnp_resources)
    automation = evaluate_automation_conditions(defs, instance=instance)

    report = materialize_for_sample(vnp_resources, instance, "fp16_validation_report", raise_on_error=False)
    assert not report.success
    [check] = report.get_asset_check_evaluations()
    assert (check.check_name, check.passed) == ("cosine_thresholds", False)
    assert check.metadata["missed"].text.startswith("dnabert_s: lowest cosine ")  # the flipped row's
    automation = evaluate_automation_conditions(defs, instance=instance, cursor=automation.cursor)
    assert automation.get_num_requested(AssetKey("virnucpro_predictions")) == 0

    # A new sample's report and calls run in one run (automation requests them on one tick): the failed
    # check stops the calls inside it.
    both = materialize(ASSETS, selection=["fp16_validation_report", "virnucpro_predictions"], partition_key="flu",
                       resources=vnp_resources, instance=instance, raise_on_error=False)
    assert not both.success and not both.asset_materializations_for_node("virnucpro_predictions")
    assert [(check.check_name, check.passed, check.partition) for check in both.get_asset_check_evaluations()] == [
        ("cosine_thresholds", False, "flu")]


def test_classifier_of_the_other_chunk_length_is_refused(vnp_resources: Resources, make_resources,
                                                         instance: DagsterInstance, indexed_sample: str) -> None:
    write_production_embeddings(vnp_resources, flip_first_dnabert_s_row=False)
    materialize_for_sample(vnp_resources, instance, "merged_embeddings")
    classifier_300 = vnp_resources["models"].paths(300).classifier
    mismatched = make_resources(classifier=str(classifier_300))

    with pytest.raises(ValueError, match="500-bp chunks but the classifier .*300_model.* was trained on 300-bp chunks"):
        materialize_for_sample(mismatched, instance, "virnucpro_predictions")


def test_a_classifier_that_does_not_fit_leaves_the_calls_uncompared_in_fp16(
        make_resources, instance: DagsterInstance, indexed_sample: str, vnp_resources: Resources, tmp_path: Path) -> None:
    from vnp_core.tiny_models import write_tiny_classifier

    write_production_embeddings(vnp_resources, flip_first_dnabert_s_row=False)
    narrow = write_tiny_classifier(tmp_path / "narrow", in_features=64, chunk_length=500)["state_dict"]
    report = materialize_for_sample(make_resources(classifier=str(narrow)), instance, "fp16_validation_report")
    metadata = materialization_metadata(report, "fp16_validation_report")
    assert [(check.check_name, check.passed) for check in report.get_asset_check_evaluations()] == [("cosine_thresholds", True)]
    assert "call_agreement" not in metadata and "VirNucPro calls" not in metadata["summary"]
