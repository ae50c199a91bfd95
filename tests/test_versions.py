"""Code versions from the model files: replacing one model marks exactly its assets and those below stale,
and automation refreshes them top down, leaving the other model's alone."""

from __future__ import annotations

import shutil
from pathlib import Path

from dagster import AssetCheckEvaluation, AssetKey, AssetMaterialization, AssetRecordsFilter, DagsterInstance, evaluate_automation_conditions

from dagster._core.definitions.asset_checks.asset_check_evaluation import AssetCheckEvaluationTargetMaterializationData

from vnp_assets.platform import build_definitions
from vnp_assets.partitions import sample_shard_key
from vnp_assets.versions import asset_code_versions
from vnp_core.tiny_models import write_tiny_esm2

CHECKS = {"dnabert_s_embeddings": ("embeddings_finite", "rows_match_index", "ids_unique"),
          "esm2_embeddings": ("embeddings_finite", "rows_match_index", "ids_unique"),
          "fp16_validation_report": ("cosine_thresholds",)}
BELOW_ESM2 = {"esm2_embeddings", "merged_embeddings", "fp16_validation_report", "virnucpro_predictions"}


def land(instance: DagsterInstance, key: str, partition, checks: bool = True) -> None:
    """A materialization and, with `checks`, its passed checks, as a successful step records them."""
    instance.report_runless_asset_event(AssetMaterialization(key, partition=partition))
    [record] = instance.fetch_materializations(
        AssetRecordsFilter(AssetKey(key), asset_partitions=[str(partition)]), limit=1).records
    target = AssetCheckEvaluationTargetMaterializationData(storage_id=record.storage_id, run_id=record.run_id,
                                                           timestamp=record.timestamp)
    for check in CHECKS.get(key, ()) if checks else ():
        instance.report_runless_asset_event(AssetCheckEvaluation(
            asset_key=AssetKey(key), check_name=check, passed=True, partition=str(partition),
            target_materialization_data=target))


def versions(resources) -> dict[str, str]:
    return asset_code_versions(resources["storage"], resources["processing"], resources["models"])


def test_replacing_one_model_changes_the_versions_of_its_assets_and_those_below(
        make_resources, tiny_models_dir: Path, tmp_path: Path) -> None:
    esm2 = tmp_path / "models" / "esm2_t6.pt"
    esm2.parent.mkdir()
    shutil.copyfile(tiny_models_dir / "esm2_tiny.pt", esm2)
    before = versions(make_resources(esm2_model=str(esm2)))

    write_tiny_esm2(esm2, seed=1)  # new weights under the same name
    after = versions(make_resources(esm2_model=str(esm2)))

    assert {key for key in before if before[key] != after[key]} == BELOW_ESM2
    assert versions(make_resources(esm2_model=str(esm2))) == after  # stable, and served from the checksum cache
    assert {key for key, version in versions(make_resources(dtype="float32")).items()
            if version != versions(make_resources())[key]} == {"esm2_embeddings", "dnabert_s_embeddings",
                                                               *BELOW_ESM2}


def test_fp8_changes_esm2_and_below_and_ties_the_report_to_the_classifier(make_resources, tmp_path: Path) -> None:
    half, fp8 = versions(make_resources(dtype="float16")), versions(make_resources(dtype="float16", fp8=True))
    assert {key for key in half if half[key] != fp8[key]} == BELOW_ESM2
    # FP8's report counts the calls that agree with fp32's: another classifier makes it stale. In fp16 it does not.
    from vnp_core.tiny_models import write_tiny_classifier

    other = write_tiny_classifier(tmp_path / "other", in_features=128, chunk_length=500, seed=7)["state_dict"]
    changed = {key for key, version in versions(make_resources(dtype="float16", fp8=True, classifier=str(other))).items()
               if version != fp8[key]}
    assert changed == {"fp16_validation_report", "virnucpro_predictions"}
    changed = {key for key, version in versions(make_resources(dtype="float16", classifier=str(other))).items()
               if version != half[key]}
    assert changed == {"virnucpro_predictions"}


def test_automation_refreshes_only_the_replaced_models_assets_in_graph_order(
        make_resources, instance: DagsterInstance, tiny_models_dir: Path, tmp_path: Path) -> None:
    esm2 = tmp_path / "esm2_t6.pt"
    shutil.copyfile(tiny_models_dir / "esm2_tiny.pt", esm2)
    resources = make_resources(esm2_model=str(esm2), num_shards=2)
    old = build_definitions(resources)
    instance.add_dynamic_partitions("samples", ["s1"])
    for key, partitions in [("sequence_index", ["s1"]),
                            *((f"{m}_embeddings", [sample_shard_key("s1", shard) for shard in (0, 1)])
                              for m in ("dnabert_s", "esm2")),
                            *((key, ["s1"]) for key in ("merged_embeddings", "fp16_validation_report",
                                                        "virnucpro_predictions"))]:
        for partition in partitions:  # runless check results are one per partition: only where none comes later
            land(instance, key, partition, checks=key == "dnabert_s_embeddings")
    ticked = evaluate_automation_conditions(old, instance=instance)
    assert ticked.total_requested == 0  # a done sample stays done

    write_tiny_esm2(esm2, seed=1)
    new = build_definitions(make_resources(esm2_model=str(esm2), num_shards=2))
    ticked = evaluate_automation_conditions(new, instance=instance, cursor=ticked.cursor)

    assert ticked.get_requested_partitions(AssetKey("esm2_embeddings")) == {
        sample_shard_key("s1", 0), sample_shard_key("s1", 1)}
    assert ticked.total_requested == 2  # DNABERT-S's shards and what is below the new ESM-2 wait or stay

    for shard in (0, 1):  # the refreshed shards land
        land(instance, "esm2_embeddings", sample_shard_key("s1", shard))
    # What is below follows, each asset once, never before what it reads (merged and the report may share a run).
    below = ["merged_embeddings", "fp16_validation_report", "virnucpro_predictions"]
    requested_at: dict[str, int] = {}
    for tick in range(len(below) + 1):
        ticked = evaluate_automation_conditions(new, instance=instance, cursor=ticked.cursor)
        requested = [key for key in below if ticked.get_requested_partitions(AssetKey(key))]
        assert ticked.total_requested == len(requested) and not set(requested) & set(requested_at)
        for key in requested:
            assert ticked.get_requested_partitions(AssetKey(key)) == {"s1"}
            requested_at[key] = tick
            land(instance, key, "s1")
    assert set(requested_at) == set(below)
    assert [requested_at[key] for key in below] == sorted(requested_at[key] for key in below)
