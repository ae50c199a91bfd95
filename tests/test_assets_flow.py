"""End to end on the CPU with the tiny models: a FASTA dropped in the inbox flows to predictions by
the inbox sensor and declarative automation alone; `vnp run` carries a file through the same graph."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from dagster import (
    AssetKey,
    DagsterInstance,
    build_sensor_context,
    evaluate_automation_conditions,
    materialize,
)
from typer.testing import CliRunner

from vnp_assets.assets import build_assets
from vnp_assets.platform import build_definitions
from conftest import Resources
from vnp_assets.run_liveness import PID_TAG
from vnp_assets.run_sample import run_sample
from vnp_assets.sensors import fasta_inbox_sensor
from vnp_assets.cli import app
from real_genomes import FLU, REAL_DATA


@pytest.mark.slow
def test_a_dropped_fasta_flows_through_sensor_and_automation_to_predictions(
        make_resources, instance: DagsterInstance) -> None:
    settings = make_resources(num_shards=1)
    defs = build_definitions(settings)
    assets = build_assets(num_shards=1)
    automation = evaluate_automation_conditions(defs, instance=instance)  # the daemon ticks before the drop
    shutil.copyfile(FLU, Path(settings["storage"].inbox_dir) / "flu sample.fasta")

    sensor = fasta_inbox_sensor(build_sensor_context(instance=instance, resources=settings))
    for request in sensor.dynamic_partitions_requests:  # what the daemon does with the sensor's result
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    automation = evaluate_automation_conditions(defs, instance=instance, cursor=automation.cursor)
    requested = [(AssetKey("sequence_index"), request.partition_key) for request in sensor.run_requests]
    assert requested == [(AssetKey("sequence_index"), "flu_sample")]

    materialized = []
    while requested:
        for partition in dict.fromkeys(partition for _, partition in requested):  # one run per partition, as the daemon
            keys = [key for key, requested_partition in requested if requested_partition == partition]
            materialize(assets, selection=keys, partition_key=partition, resources=settings, instance=instance)
            materialized.append({key.to_user_string() for key in keys})
        automation = evaluate_automation_conditions(defs, instance=instance, cursor=automation.cursor)
        requested = [(key, partition) for asset in assets for key in asset.keys
                     for partition in sorted(automation.get_requested_partitions(key))]

    # The report and the calls in one run: a failed blocking check of the report stops the calls inside it.
    assert materialized == [{"sequence_index"}, {"esm2_embeddings", "dnabert_s_embeddings"},
                            {"merged_embeddings", "fp16_validation_report", "virnucpro_predictions"}]
    predictions = settings["storage"].layout("flu_sample").predictions_dir
    assert (predictions / "prediction_results.txt").read_text().startswith("Sequence_ID\tPrediction\tscore1\tscore2\n")

    # A manual rerun of the index sets off nothing below it: nobody asked for new embeddings.
    materialize(assets, selection=["sequence_index"], partition_key="flu_sample", resources=settings, instance=instance)
    automation = evaluate_automation_conditions(defs, instance=instance, cursor=automation.cursor)
    assert automation.total_requested == 0


def test_vnp_run_until_embeddings_stops_after_the_shards(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    fasta = tmp_path / "flu.fasta"
    shutil.copyfile(FLU, fasta)
    run = run_sample(fasta, home=tmp_path / "home", num_shards=2, until="embeddings")
    # No GPU here, so one step at a time: this process ran both shards (no worker to start), and each
    # step's device process was a spare started ahead.
    device_log = capfd.readouterr().err
    assert device_log.count("embed_shards ready to run") == 2
    assert device_log.count("(a spare: interpreter and imports done ahead)") == 2
    with DagsterInstance.from_config(str(tmp_path / "home")) as instance:
        assert {run.tags[PID_TAG] for run in instance.get_runs()} == {str(os.getpid())}
    assert list(run.stage_seconds) == ["sequence_index", "embeddings (2 steps of 2 models)"]
    sample = tmp_path / "home" / "storage" / "samples" / "flu"
    assert run.outputs["embedding shards"] == sample / "embeddings" and "merged embeddings" not in run.outputs
    assert sorted(str(path.relative_to(sample / "embeddings")) for path in (sample / "embeddings").rglob("*.h5")) == [
        f"{model}/shard-{shard}.h5" for model in ("dnabert_s", "esm2") for shard in (0, 1)]
    with pytest.raises(ValueError, match="until='merge'"):
        run_sample(fasta, home=tmp_path / "home", until="merge")


@pytest.mark.slow
def test_vnp_run_carries_a_file_to_predictions(tmp_path: Path, capfd: pytest.CaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    fasta = tmp_path / "flu.fasta"
    shutil.copyfile(FLU, fasta)
    home = tmp_path / "home"
    import vnp_assets.run_sample

    monkeypatch.setattr(vnp_assets.run_sample, "MERGE_BESIDE_MIN_ROWS", 0)  # a sample whose merge is worth a worker

    run = CliRunner().invoke(app, ["run", str(fasta), "--home", str(home), "--shards", "1"])

    assert run.exit_code == 0, run.output
    assert f"sample flu ({fasta}), 1 shard(s) per model" in run.output
    device_log = capfd.readouterr().err  # both GPU steps' device processes were spares started ahead
    assert "embed_shards ready to run" in device_log and "reference_embeddings ready to run" in device_log
    assert device_log.count("(a spare: interpreter and imports done ahead)") == 2
    assert "WARNING: dnabert_s, esm2, classifier: tiny random placeholder models" in run.output
    sample = home / "storage" / "samples" / "flu"
    assert f"predictions: {sample / 'predictions'}" in run.output
    assert (sample / "predictions" / "prediction_results_highestscore.csv").read_text().startswith("Modified_ID\tIs_Virus\n")
    assert (home / "dagster.yaml").read_text() == (Path(__file__).resolve().parents[1] / "dagster.yaml").read_text()
    with DagsterInstance.from_config(str(home)) as instance:  # the runs are recorded for `dagster dev` to show
        assert instance.get_dynamic_partitions("samples") == ["flu"]
        assert instance.get_latest_materialization_event(AssetKey("virnucpro_predictions")) is not None
        assert instance.event_log_storage.get_concurrency_info("gpu").slot_count == 1  # no GPU here: one slot
        # The merge and the validation both read the shards: they ran side by side, in two processes.
        ran_in = {key.to_user_string(): run.tags[PID_TAG] for run in instance.get_runs()
                  for key in run.asset_selection or ()}
        assert ran_in["fp16_validation_report"] == str(os.getpid()) != ran_in["merged_embeddings"], (ran_in, run.output)
    assert "merged_embeddings (beside the validation; time after it): " in run.output

    # A rerun with another classifier runs the calls alone: no embedder is loaded, no device process started.
    from vnp_core.tiny_models import write_tiny_classifier

    calls = sample / "predictions" / "prediction_results.txt"
    first_calls = calls.read_bytes()
    other = write_tiny_classifier(tmp_path / "other", in_features=128, chunk_length=500, seed=5)["state_dict"]
    import vnp_assets.cli

    def read_again(path: Path) -> None:
        raise AssertionError(f"{path} was indexed from this content: its records need no second reading")

    monkeypatch.setattr(vnp_assets.cli, "_check_fasta", read_again)
    rerun = CliRunner().invoke(app, ["run", str(fasta), "--home", str(home), "--shards", "1", "--classifier", str(other)])
    assert rerun.exit_code == 0, rerun.output
    for stage in ("sequence_index", "embeddings", "merged_embeddings", "fp16_validation_report"):
        assert f"{stage}: up to date (same models and settings), skipped" in rerun.output
    assert "virnucpro_predictions: " in rerun.output and calls.read_bytes() != first_calls
    assert "ready to run" not in capfd.readouterr().err

    # An output removed by hand is remade, with everything below it; what is above it is not.
    (sample / "embeddings" / "merged.h5").unlink()
    rerun = CliRunner().invoke(app, ["run", str(fasta), "--home", str(home), "--shards", "1", "--classifier", str(other)])
    assert rerun.exit_code == 0, rerun.output
    assert "embeddings: up to date" in rerun.output and "merged_embeddings: up to date" not in rerun.output
    assert "fp16_validation_report: up to date" not in rerun.output and (sample / "embeddings" / "merged.h5").exists()
    assert "embed_shards ready to run" not in capfd.readouterr().err

    # Another shard count is another index: every stage runs again.
    rerun = CliRunner().invoke(app, ["run", str(fasta), "--home", str(home), "--shards", "2", "--classifier", str(other)])
    assert rerun.exit_code == 0, rerun.output
    assert "up to date" not in rerun.output and "embeddings (2 steps of 2 models)" in rerun.output

    # The store the runs filled: per model identity, what it holds and how often it served.
    import json

    stats = CliRunner().invoke(app, ["cache", "stats", "--home", str(home), "--json"])
    assert stats.exit_code == 0, stats.output
    report = json.loads(stats.output)
    assert report["store"] == str(home / "storage" / "embedding_cache")
    assert len(report["identities"]) == 2 and all(row["entries"] > 0 for row in report["identities"])
    assert all(row["hits"] > 0 for row in report["identities"])  # the 2-shard run found every row stored
    elsewhere = CliRunner().invoke(app, ["cache", "stats", "--store", str(home / "storage" / "embedding_cache"), "--json"])
    assert json.loads(elsewhere.output)["identities"] == report["identities"]
    dropped = report["identities"][0]["identity"]
    pruned = CliRunner().invoke(app, ["cache", "prune", "--home", str(home), "--identity", dropped])
    assert pruned.exit_code == 0 and f"dropped 1 model identity: {dropped}" in pruned.output
    left = json.loads(CliRunner().invoke(app, ["cache", "stats", "--home", str(home), "--json"]).output)["identities"]
    assert [row["identity"] for row in left] == [row["identity"] for row in report["identities"] if row["identity"] != dropped]
    missing = CliRunner().invoke(app, ["cache", "stats", "--store", str(tmp_path / "nowhere")])
    assert missing.exit_code == 1 and "--store" in missing.output and "no embedding store there" in missing.output
