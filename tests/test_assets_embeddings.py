"""The GPU steps without a GPU: device leases, the device process, checks, reruns and merge.

`embed_shard` (what runs in the device process) is replaced by `fake_embed_shard`, a fast stand-in
that records the CUDA_VISIBLE_DEVICES it was started with; everything around it is the real path:
the lease, the spawned process, the written file, the checks that read it back, the automation, the merge.
"""

from __future__ import annotations

import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import polars as pl
import pytest
from dagster import AssetKey, AssetRecordsFilter, DagsterInstance, evaluate_automation_conditions, materialize
from fake_embedder import WIDTH, fake_embed_shard

import vnp_assets.assets.embeddings as embeddings_module
import vnp_assets.progress as progress_module
from vnp_assets.assets import build_assets
from vnp_assets.definitions import build_definitions
from vnp_assets.partitions import sample_shard_key
from vnp_assets.resources import VnpSettings
from vnp_assets.run_sample import materialize_shard

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"
ASSETS = build_assets(num_shards=2)
MODELS = ("esm2", "dnabert_s")


@pytest.fixture
def indexed_sample(vnp_settings: VnpSettings, instance: DagsterInstance, add_sample, monkeypatch) -> str:
    monkeypatch.setattr(embeddings_module, "embed_shard", fake_embed_shard)  # for steps run in this process
    add_sample("flu", REAL_DATA / "influenza_a_california_07_2009.fasta")
    materialize(ASSETS, selection=["sequence_index"], partition_key="flu", resources={"vnp": vnp_settings},
                instance=instance)
    return "flu"


def embed(settings: VnpSettings, instance: DagsterInstance, kind: str, shard: int, **kwargs):
    return materialize(ASSETS, selection=[f"{kind}_embeddings"], partition_key=sample_shard_key("flu", shard),
                       resources={"vnp": settings}, instance=instance, **kwargs)


def use_fake_model_and_gpus(devices: list[int]) -> None:
    """Initializer of the worker processes: the fake model, and `devices` as if they were this host's GPUs."""
    embeddings_module.embed_shard = fake_embed_shard
    VnpSettings.usable_devices = lambda self: devices


def test_concurrent_steps_lease_distinct_gpus_and_the_child_sees_its_physical_id(
        vnp_settings: VnpSettings, instance: DagsterInstance, indexed_sample: str) -> None:
    steps = [(kind, shard) for kind in MODELS for shard in (0, 1)]
    # One process per step, as `vnp run` runs them, all at once: four steps compete for GPUs 2 and 3.
    with ProcessPoolExecutor(len(steps), mp_context=multiprocessing.get_context("spawn"),
                             initializer=use_fake_model_and_gpus, initargs=([2, 3],)) as pool:
        outcomes = [pool.submit(materialize_shard, instance.root_directory, vnp_settings.model_dump(), "flu", kind, shard)
                    for kind, shard in steps]
        assert [outcome.result() for outcome in outcomes] == [None] * len(steps)

    spans: dict[str, list[tuple[float, float]]] = {"2": [], "3": []}
    for kind, shard in steps:
        seen = json.loads(vnp_settings.sample_layout("flu").embeddings(kind, shard).with_suffix(".device.json").read_text())
        metadata = latest_metadata(instance, f"{kind}_embeddings", sample_shard_key("flu", shard))
        assert metadata["device"] == f"GPU {seen['visible']}"  # the leased physical id is what the child saw
        assert metadata["dtype"] == "float16"  # the GPU default
        spans[seen["visible"]].append((seen["start"], seen["end"]))
    for device, device_spans in spans.items():
        device_spans.sort()
        assert all(end <= next_start for (_, end), (next_start, _) in zip(device_spans, device_spans[1:], strict=False)), \
            f"two steps used GPU {device} at once"


def latest_metadata(instance: DagsterInstance, asset: str, partition: str) -> dict:
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey(asset), asset_partitions=[partition]), limit=1).records
    return {key: value.value for key, value in records[0].asset_materialization.metadata.items()}


def test_a_failed_shard_is_rerun_alone(vnp_settings: VnpSettings, instance: DagsterInstance, indexed_sample: str) -> None:
    layout = vnp_settings.sample_layout("flu")
    embed(vnp_settings, instance, "esm2", 0)
    done = layout.embeddings("esm2", 0).stat().st_mtime_ns
    layout.embeddings("esm2", 1).with_suffix(".kill").touch()

    failed = embed(vnp_settings, instance, "esm2", 1, raise_on_error=False)
    assert not failed.success
    assert not layout.embeddings("esm2", 1).exists()

    rerun = embed(vnp_settings, instance, "esm2", 1)
    assert rerun.success
    rows = pl.read_parquet(layout.index).filter(pl.col("shard") == 1).height
    assert rerun.asset_materializations_for_node("esm2_embeddings")[0].metadata["rows"].value == rows
    assert layout.embeddings("esm2", 0).stat().st_mtime_ns == done


def test_the_device_process_progress_reaches_the_run_log(vnp_settings: VnpSettings, instance: DagsterInstance,
                                                         indexed_sample: str, monkeypatch) -> None:
    monkeypatch.setattr(progress_module, "LOG_EVERY_S", 0.05)
    result = embed(vnp_settings, instance, "esm2", 0)
    rows = pl.read_parquet(vnp_settings.sample_layout("flu").index).filter(pl.col("shard") == 0).height
    messages = [entry.user_message for entry in instance.all_logs(result.run_id)]
    # FakeProgress: half the rows and 100 tokens in 0.1 s.
    assert f"{rows // 2:,}/{rows:,} sequences, {rows // 2 / 0.1:,.1f} sequences/s, 1,000 tokens/s" in messages


def test_failed_blocking_check_keeps_merged_embeddings_from_running(
        vnp_settings: VnpSettings, instance: DagsterInstance, indexed_sample: str) -> None:
    layout = vnp_settings.sample_layout("flu")
    layout.embeddings("dnabert_s", 1).parent.mkdir(parents=True)
    layout.embeddings("dnabert_s", 1).with_suffix(".nan").touch()
    defs = build_definitions(vnp_settings)
    automation = evaluate_automation_conditions(defs, instance=instance)  # a tick before, as the sensor ticks on
    for kind in MODELS:
        for shard in (0, 1):
            result = embed(vnp_settings, instance, kind, shard, raise_on_error=False)
    checks = {evaluation.check_name: evaluation.passed for evaluation in result.get_asset_check_evaluations()}
    assert checks == {"embeddings_finite": False, "rows_match_index": True, "ids_unique": True}
    assert not result.success

    automation = evaluate_automation_conditions(defs, instance=instance, cursor=automation.cursor)
    assert automation.get_num_requested(AssetKey("merged_embeddings")) == 0

    layout.embeddings("dnabert_s", 1).with_suffix(".nan").unlink()
    assert embed(vnp_settings, instance, "dnabert_s", 1).success
    automation = evaluate_automation_conditions(defs, instance=instance, cursor=automation.cursor)
    assert automation.get_requested_partitions(AssetKey("merged_embeddings")) == {"flu"}

    merged = materialize(ASSETS, selection=["merged_embeddings"], partition_key="flu", resources={"vnp": vnp_settings},
                         instance=instance)
    metadata = merged.asset_materializations_for_node("merged_embeddings")[0].metadata
    assert metadata["sequences"].value == pl.read_parquet(layout.index).height
    assert metadata["esm2_dim"].value == metadata["dnabert_s_dim"].value == WIDTH
