"""The code location loads, holds every asset, check and sensor, and the instance template is valid."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterInstance
from dagster._core.instance.config import PoolGranularity

from vnp_assets.definitions import settings_from_environment
from vnp_assets.platform import SettingsError, build_definitions, resources_from_settings

REPO = Path(__file__).resolve().parents[1]
ASSETS = {"sequence_index", "esm2_embeddings", "dnabert_s_embeddings", "merged_embeddings", "fp16_validation_report",
          "virnucpro_predictions"}
SHARD_CHECKS = {"embeddings_finite", "rows_match_index", "ids_unique"}


def test_definitions_hold_every_asset_check_and_sensor() -> None:
    from vnp_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    assert {key.to_user_string() for key in graph.get_all_asset_keys()} == {*ASSETS, "inbox_rejected_drops"}
    assert {(check.asset_key.to_user_string(), check.name) for check in graph.asset_check_keys} == {
        *((f"{model}_embeddings", check) for model in ("esm2", "dnabert_s") for check in SHARD_CHECKS),
        ("fp16_validation_report", "cosine_thresholds"),
    }
    assert {sensor.name for sensor in defs.sensors} == {"fasta_inbox_sensor", "vnp_automation"}
    gpu_steps = {key.to_user_string() for key in graph.get_all_asset_keys() if graph.get(key).pools == {"gpu"}}
    assert gpu_steps == {"esm2_embeddings", "dnabert_s_embeddings", "fp16_validation_report"}
    # Both models' shards come from one step, which can still run for one of them alone.
    shard_step = defs.get_assets_def(AssetKey("esm2_embeddings"))
    assert shard_step is defs.get_assets_def(AssetKey("dnabert_s_embeddings")) and shard_step.can_subset
    # Without GPUs and without a shard count, there is one shard per model.
    assert defs.resources["processing"].num_shards == 1
    # Named jobs, so runs say what they are for; groups, so the UI shows the stages.
    assert {job.name for job in defs.jobs} >= {"index_sample", "embed_shard", "finish_sample"}
    assert {graph.get(key).group_name for key in graph.get_all_asset_keys()} == {"prep", "embeddings", "validation", "calls",
                                                                                 "inbox"}
    assert all(sensor.description for sensor in defs.sensors)


def test_the_shard_count_fixes_the_shard_partitions(tmp_path: Path) -> None:
    defs = build_definitions(resources_from_settings({"num_shards": 3}, home=tmp_path))
    shards = defs.resolve_asset_graph().get(AssetKey("esm2_embeddings")).partitions_def.get_partitions_def_for_dimension("shard")
    assert shards.get_partition_keys() == ["0", "1", "2"]


def test_settings_come_from_dagster_home_and_an_optional_yaml(tmp_path: Path) -> None:
    settings_file = tmp_path / "vnp.yaml"
    settings_file.write_text("chunk_length: 300\ndevices: [2, 3]\nesm2_model: /models/esm2_t36_3B_UR50D.pt\n")

    settings, home = settings_from_environment({"DAGSTER_HOME": str(tmp_path), "VNP_SETTINGS": str(settings_file)})
    resources = resources_from_settings({**settings, "devices": None}, home)  # this host has no GPU 2 or 3

    assert settings["devices"] == [2, 3]
    assert resources["storage"].storage_root == str(tmp_path / "storage")
    assert resources["storage"].inbox_dir == str(tmp_path / "inbox")
    assert (resources["processing"].chunk_length, resources["models"].esm2_model) == (300, "/models/esm2_t36_3B_UR50D.pt")


@pytest.mark.parametrize(("settings", "message"), [
    ({"chunk_lenght": 300}, "unknown setting(s) chunk_lenght"),
    ({"chunk_length": 400}, "chunk_length must be 300 or 500"),
    ({"num_shards": 0}, "num_shards"),
    ({"dtype": "float8"}, "dtype must be float32, float16 or bfloat16"),
    ({"devices": [7]}, "GPU(s) [7] requested"),
    ({"storage_root": "s3://bucket/vnp"}, "storage_root s3://bucket/vnp: a URL where a folder is wanted: give a path"),
])
def test_bad_settings_are_refused_with_a_sentence(tmp_path: Path, settings: dict, message: str) -> None:
    with pytest.raises(SettingsError) as refused:
        resources_from_settings(settings, home=tmp_path)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_an_embedding_store_folder_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "store").write_text("not a folder")
    with pytest.raises(SettingsError, match=r"embedding_cache_dir .*store: is a file, not a folder"):
        resources_from_settings({"embedding_cache_dir": str(tmp_path / "store")}, home=tmp_path)
    resources_from_settings({"embedding_cache_dir": str(tmp_path / "not yet")}, home=tmp_path)  # made when used


def test_a_home_keeps_its_compiled_layers_and_a_file_in_their_place_is_refused(tmp_path: Path) -> None:
    resources = resources_from_settings({}, home=tmp_path)
    assert resources["models"].embed_config("cuda").compile_cache_dir == tmp_path / "compile_cache"
    (tmp_path / "compiled").write_text("not a folder")
    with pytest.raises(SettingsError, match=r"compile_cache_dir .*compiled: is a file, not a folder"):
        resources_from_settings({"compile_cache_dir": str(tmp_path / "compiled")}, home=tmp_path)


def test_instance_template_queues_runs_and_pools_gpu_steps(tmp_path: Path) -> None:
    shutil.copyfile(REPO / "dagster.yaml", tmp_path / "dagster.yaml")
    with DagsterInstance.from_config(str(tmp_path)) as instance:
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert instance.get_concurrency_config().pool_config.pool_granularity == PoolGranularity.OP
        assert not instance.telemetry_enabled


@pytest.mark.slow
def test_dg_check_defs_passes(tmp_path: Path) -> None:
    shutil.copyfile(REPO / "dagster.yaml", tmp_path / "dagster.yaml")
    check = subprocess.run([Path(sys.executable).parent / "dg", "check", "defs"], cwd=REPO, capture_output=True,
                           text=True, env={**os.environ, "DAGSTER_HOME": str(tmp_path)}, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "All definitions loaded successfully" in check.stdout + check.stderr
