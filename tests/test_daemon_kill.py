"""Two samples dropped at once, a backfill launched during their runs; the daemon killed with SIGKILL while a run it launched embeds, together
with that run's process: a new daemon carries both samples to the end, the killed run failed, retried
and resumed, with vectors identical to an uninterrupted `vnp run`'s, the GPU steps one at a time on
the pool's one slot, and nothing left running.

No webserver: the daemon alone drives a sample dropped into the inbox (sensor, automation, run
retries). Every process carries the test's token (tests/test_kill_resume.py's `Processes`).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from dagster import AssetKey, DagsterInstance, DagsterRunStatus
from services import VENV_BIN, stop_process_groups, with_default_signals
from test_kill_resume import FLU, SLOW_ESM2, Processes, finished, merged, step_spans, wait_until, write_reads

from vnp_assets.instance import prepare_home
from vnp_assets.run_liveness import PID_TAG

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def start_daemon(home: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("ab") as out:
        return subprocess.Popen(with_default_signals([str(VENV_BIN / "dagster-daemon"), "run", "-w", str(REPO / "workspace.yaml")]),
                                cwd=home, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_a_killed_daemon_and_its_killed_run_recover_to_identical_vectors(tmp_path: Path) -> None:
    from vnp_core.tiny_models import write_tiny_classifier, write_tiny_esm2

    esm2_model = write_tiny_esm2(tmp_path / "models" / "esm2_t12_slow.pt", **SLOW_ESM2)
    processes = Processes(esm2_model)
    fasta = write_reads(tmp_path / "reads.fasta")
    reference_log = tmp_path / "reference.log"
    reference = processes.vnp_run(fasta, tmp_path / "reference", reference_log)

    home = tmp_path / "home"
    prepare_home(home, gpu_slots=1).dispose()
    settings = home / "vnp_settings.yaml"
    # A classifier for the larger ESM-2's features (480) beside the tiny DNABERT-S's (64).
    classifier = write_tiny_classifier(tmp_path / "models" / "classifier", in_features=480 + 64, chunk_length=500)
    settings.write_text(f"inbox_settle_seconds: 0\nesm2_model: {esm2_model}\nclassifier: {classifier['state_dict']}\n")
    env = {**processes.env, "DAGSTER_HOME": str(home), "VNP_SETTINGS": str(settings), "PYTHONUNBUFFERED": "1",
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    for drop in (fasta, FLU):
        shutil.copyfile(drop, home / "inbox" / drop.name)
    esm2_folder = home / "storage" / "samples" / "reads" / "embeddings" / "esm2"
    daemons: list[subprocess.Popen] = []
    try:
        log = tmp_path / "daemon.log"
        daemons.append(start_daemon(home, env, log))
        [device] = wait_until(lambda: processes.writing_checkpoint(esm2_folder), timeout=600, running=daemons[0],
                              what="the esm2 embedding of the run the daemon launched", log=log)
        run_process = parent_of(device)  # the run's process, which the step's device process serves
        for pid in (daemons[0].pid, run_process):
            os.kill(pid, signal.SIGKILL)
        daemons[0].wait()
        with DagsterInstance.from_config(str(home)) as instance:
            [killed] = [run for run in instance.get_runs() if run.status == DagsterRunStatus.STARTED]
            assert killed.tags[PID_TAG] == str(run_process)

        daemons.append(start_daemon(home, env, log))
        # A backfill of both samples' first shards, launched while the killed run waits for its retry.
        backfill = subprocess.run(
            [str(VENV_BIN / "dagster"), "job", "backfill", "-w", str(REPO / "workspace.yaml"), "-j", "embed_shard",
             "--partitions", f"reads|0,{FLU.stem}|0", "--noprompt"],
            cwd=home, env=env, capture_output=True, text=True, timeout=300)
        assert backfill.returncode == 0, backfill.stdout + backfill.stderr
        with DagsterInstance.from_config(str(home)) as instance:
            samples = {"reads", FLU.name.removesuffix(".fasta")}
            wait_until(lambda: instance.get_materialized_partitions(AssetKey("virnucpro_predictions")) == samples,
                       timeout=600, running=daemons[1], what="both samples' calls after the new daemon took over", log=log)
            wait_until(lambda: all(run.is_finished for run in instance.get_runs()), timeout=120, running=daemons[1],
                       what="the last run's end", log=log)
            runs = instance.get_runs()
            assert instance.get_run_by_id(killed.run_id).status == DagsterRunStatus.FAILURE
            retried = [run for run in runs if run.parent_run_id == killed.run_id]
            assert len(retried) == 1 and retried[0].status == DagsterRunStatus.SUCCESS, [
                (run.run_id, run.status, run.parent_run_id) for run in runs]
            assert not [run for run in runs if not run.is_finished]
            # (Automation's own runs carry a backfill tag too: it requests several partitions as one.)
            backfilled = [run for run in runs if run.job_name == "embed_shard" and "dagster/backfill" in run.tags]
            assert len(backfilled) == 2 and all(run.status == DagsterRunStatus.SUCCESS for run in backfilled), [
                (run.run_id, run.status, run.tags.get("dagster/partition")) for run in backfilled]
            spans = sorted(step_spans(instance, "shard_embeddings") + step_spans(instance, "fp16_validation_report"))
            assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:])), f"GPU steps overlapped: {spans}"
        assert finished(reference, reference_log) == 0, reference_log.read_text()[-3000:]
        resumed, expected = merged(home, "reads"), merged(tmp_path / "reference", "reads")
        for name in expected:
            assert np.array_equal(resumed[name], expected[name]), f"merged {name} differs from the uninterrupted run's"
    finally:
        stop_process_groups(daemons)
        processes.kill_all()
    assert processes.gone_within(10) == []
