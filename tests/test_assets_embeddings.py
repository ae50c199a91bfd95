"""The GPU steps without a GPU: device leases, the device process, checks, reruns and merge.

`embed_shards` (what runs in the device process) is replaced by `fake_embed_shards`, a fast stand-in
that records the CUDA_VISIBLE_DEVICES it was started with; everything around it is the real path:
the lease, the spawned process, the written file, the checks that read it back, the automation, the merge.
"""

from __future__ import annotations

import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import polars as pl
import pytest
from dagster import AssetKey, AssetRecordsFilter, DagsterInstance, evaluate_automation_conditions, materialize
from fake_embedder import WIDTH, fake_embed_shards

import vnp_assets.assets.embeddings as embeddings_module
import vnp_assets.progress as progress_module
from vnp_assets.assets import build_assets
from vnp_assets.platform import build_definitions
from vnp_assets.partitions import sample_shard_key
from conftest import Resources
from vnp_assets.resources import GpuPool
from vnp_assets.run_sample import materialize_shard, resource_fields
from real_genomes import REAL_DATA

ASSETS = build_assets(num_shards=2)
MODELS = ("dnabert_s", "esm2")  # the order the step runs them in


@pytest.fixture
def indexed_sample(vnp_resources: Resources, instance: DagsterInstance, add_sample, monkeypatch) -> str:
    monkeypatch.setattr(embeddings_module, "embed_shards", fake_embed_shards)  # for steps run in this process
    add_sample("flu", REAL_DATA / "influenza_a_california_07_2009.fasta")
    materialize(ASSETS, selection=["sequence_index"], partition_key="flu", resources=vnp_resources,
                instance=instance)
    return "flu"


def embed(settings: Resources, instance: DagsterInstance, shard: int, models=MODELS, **kwargs):
    """The shard's embedding step, for `models` (both by default, as automation and `vnp run` ask)."""
    return materialize(ASSETS, selection=[f"{kind}_embeddings" for kind in models],
                       partition_key=sample_shard_key("flu", shard), resources=settings, instance=instance,
                       **kwargs)


def materialized(result, kind: str) -> list:
    return [event.step_materialization_data.materialization for event in result.get_asset_materialization_events()
            if event.asset_key == AssetKey(f"{kind}_embeddings")]


def use_fake_model_and_gpus(devices: list[int]) -> None:
    """Initializer of the worker processes: the fake model, and `devices` as if they were this host's GPUs."""
    embeddings_module.embed_shards = fake_embed_shards
    GpuPool.usable_devices = property(lambda self: devices)


def test_concurrent_steps_lease_distinct_gpus_and_the_child_sees_its_physical_id(
        vnp_resources: Resources, instance: DagsterInstance, indexed_sample: str) -> None:
    # Four steps at once for GPUs 2 and 3, one per model and shard, as two backfills could start them.
    steps = [(shard, (kind,)) for kind in MODELS for shard in (0, 1)]
    with ProcessPoolExecutor(len(steps), mp_context=multiprocessing.get_context("spawn"),
                             initializer=use_fake_model_and_gpus, initargs=([2, 3],)) as pool:
        outcomes = [pool.submit(materialize_shard, instance.root_directory, resource_fields(vnp_resources), "flu", shard, models)
                    for shard, models in steps]
        assert [outcome.result() for outcome in outcomes] == [None] * len(steps)

    spans: dict[str, list[tuple[float, float]]] = {"2": [], "3": []}
    for shard, (kind,) in steps:
        seen = json.loads(vnp_resources["storage"].layout("flu").embeddings(kind, shard).with_suffix(".device.json").read_text())
        metadata = latest_metadata(instance, f"{kind}_embeddings", sample_shard_key("flu", shard))
        assert metadata["device"] == f"GPU {seen['visible']}"  # the leased physical id is what the child saw
        assert metadata["dtype"] == "float16"  # the GPU default
        spans[seen["visible"]].append((seen["start"], seen["end"]))
    for device, device_spans in spans.items():
        device_spans.sort()
        assert all(end <= next_start for (_, end), (next_start, _) in zip(device_spans, device_spans[1:], strict=False)), \
            f"two steps used GPU {device} at once"


def test_one_step_embeds_both_models_of_a_shard_in_one_device_process(
        vnp_resources: Resources, instance: DagsterInstance, indexed_sample: str) -> None:
    result = embed(vnp_resources, instance, 1)
    layout = vnp_resources["storage"].layout("flu")
    rows = pl.read_parquet(layout.index).filter(pl.col("shard") == 1).height
    assert [materialized(result, kind)[0].metadata["rows"].value for kind in MODELS] == [rows, rows]
    starts = {json.loads(layout.embeddings(kind, 1).with_suffix(".device.json").read_text())["start"] for kind in MODELS}
    assert len(starts) == 1  # the same process ran both
    checks = {(evaluation.asset_key.to_user_string(), evaluation.check_name) for evaluation
              in result.get_asset_check_evaluations() if evaluation.passed}
    assert checks == {(f"{kind}_embeddings", check) for kind in MODELS
                      for check in ("embeddings_finite", "rows_match_index", "ids_unique")}


def latest_metadata(instance: DagsterInstance, asset: str, partition: str) -> dict:
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey(asset), asset_partitions=[partition]), limit=1).records
    return {key: value.value for key, value in records[0].asset_materialization.metadata.items()}


def test_a_killed_shard_step_is_rerun_alone(vnp_resources: Resources, instance: DagsterInstance,
                                            indexed_sample: str) -> None:
    layout = vnp_resources["storage"].layout("flu")
    embed(vnp_resources, instance, 0)
    done = layout.embeddings("esm2", 0).stat().st_mtime_ns
    layout.embeddings("esm2", 1).with_suffix(".kill").touch()

    failed = embed(vnp_resources, instance, 1, models=("esm2",), raise_on_error=False)
    assert not failed.success
    assert not layout.embeddings("esm2", 1).exists()

    rerun = embed(vnp_resources, instance, 1, models=("esm2",))
    assert rerun.success
    rows = pl.read_parquet(layout.index).filter(pl.col("shard") == 1).height
    assert materialized(rerun, "esm2")[0].metadata["rows"].value == rows
    assert materialized(rerun, "dnabert_s") == []
    assert layout.embeddings("esm2", 0).stat().st_mtime_ns == done


def test_one_failed_model_keeps_the_other_models_shard_and_reruns_alone(
        vnp_resources: Resources, instance: DagsterInstance, indexed_sample: str) -> None:
    layout = vnp_resources["storage"].layout("flu")
    layout.embeddings("dnabert_s", 0).parent.mkdir(parents=True)
    layout.embeddings("dnabert_s", 0).with_suffix(".fail").touch()

    failed = embed(vnp_resources, instance, 0, raise_on_error=False)
    assert not failed.success
    assert "dnabert_s failed on purpose" in failed.get_step_failure_events()[0].step_failure_data.error.to_string()
    assert materialized(failed, "dnabert_s") == [] and len(materialized(failed, "esm2")) == 1  # recorded, not lost

    layout.embeddings("dnabert_s", 0).with_suffix(".fail").unlink()
    rerun = embed(vnp_resources, instance, 0, models=("dnabert_s",))
    assert len(materialized(rerun, "dnabert_s")) == 1 and materialized(rerun, "esm2") == []


def test_the_device_process_progress_reaches_the_run_log(vnp_resources: Resources, instance: DagsterInstance,
                                                         indexed_sample: str, monkeypatch) -> None:
    monkeypatch.setattr(progress_module, "LOG_EVERY_S", 0.05)
    result = embed(vnp_resources, instance, 0)
    rows = pl.read_parquet(vnp_resources["storage"].layout("flu").index).filter(pl.col("shard") == 0).height
    messages = [entry.user_message for entry in instance.all_logs(result.run_id)]
    # FakeProgress: half the rows and 100 tokens in 0.1 s, for each model.
    for kind in MODELS:
        assert f"{kind}: {rows // 2:,}/{rows:,} sequences, {rows // 2 / 0.1:,.1f} sequences/s, 1,000 tokens/s" in messages


def test_failed_blocking_check_keeps_merged_embeddings_from_running(
        vnp_resources: Resources, instance: DagsterInstance, indexed_sample: str) -> None:
    layout = vnp_resources["storage"].layout("flu")
    layout.embeddings("dnabert_s", 1).parent.mkdir(parents=True)
    layout.embeddings("dnabert_s", 1).with_suffix(".nan").touch()
    defs = build_definitions(vnp_resources)
    automation = evaluate_automation_conditions(defs, instance=instance)  # a tick before, as the sensor ticks on
    assert embed(vnp_resources, instance, 0).success
    result = embed(vnp_resources, instance, 1, raise_on_error=False)
    checks = {(evaluation.asset_key.to_user_string(), evaluation.check_name): evaluation.passed
              for evaluation in result.get_asset_check_evaluations() if evaluation.check_name == "embeddings_finite"}
    assert checks == {("esm2_embeddings", "embeddings_finite"): True, ("dnabert_s_embeddings", "embeddings_finite"): False}
    assert {evaluation.partition for evaluation in result.get_asset_check_evaluations()} == {"flu|1"}  # shown per shard
    assert not result.success

    automation = evaluate_automation_conditions(defs, instance=instance, cursor=automation.cursor)
    assert automation.get_num_requested(AssetKey("merged_embeddings")) == 0

    layout.embeddings("dnabert_s", 1).with_suffix(".nan").unlink()
    assert embed(vnp_resources, instance, 1, models=("dnabert_s",)).success
    automation = evaluate_automation_conditions(defs, instance=instance, cursor=automation.cursor)
    assert automation.get_requested_partitions(AssetKey("merged_embeddings")) == {"flu"}

    merged = materialize(ASSETS, selection=["merged_embeddings"], partition_key="flu", resources=vnp_resources,
                         instance=instance)
    metadata = merged.asset_materializations_for_node("merged_embeddings")[0].metadata
    assert metadata["sequences"].value == pl.read_parquet(layout.index).height
    assert metadata["esm2_dim"].value == metadata["dnabert_s_dim"].value == WIDTH


def test_a_compiled_shards_metadata_says_what_its_first_pack_compiled():
    from fake_embedder import FakeEmbedStats

    compiled = embeddings_module._stats_metadata(FakeEmbedStats(10, "float16", compiled=True,
                                                                compile_at_first_pack=(1, 0, 2.5)), "GPU 0")
    assert (compiled["compiled_graphs_from_cache"], compiled["compiled_graphs_anew"],
            compiled["compile_seconds_at_first_pack"]) == (1, 0, 2.5)
    uncompiled = embeddings_module._stats_metadata(FakeEmbedStats(10, "float16"), "cpu")
    assert "compiled_graphs_anew" not in uncompiled and uncompiled["device"] == "cpu"
