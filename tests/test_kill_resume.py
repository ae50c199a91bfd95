"""Kills and concurrency, for real: `vnp run` processes killed with SIGKILL mid-embedding, a step's
device process killed, two runs of one sample at once, dead runs' `gpu` slots reclaimed.

Every process a test starts carries a token in its environment (inherited by the shard workers and
device processes), so the test finds them all, orphans included, by scanning /proc; each test
kills whatever is left of its own processes, by pid, in a `finally`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
from dagster import AssetKey, AssetRecordsFilter, DagsterInstance, DagsterRun, DagsterRunStatus, instance_for_test

from vnp_assets.partitions import sample_shard_key
from vnp_assets.resources import SampleStorage
from vnp_assets.run_liveness import HOST_TAG, PID_TAG, PROCESS_START_TAG, process_tags, reclaim_dead_runs
from vnp_assets.run_sample import SampleBusyError, sample_lock
from vnp_core.models import MODELS
from real_genomes import REAL_DATA

ROOT = Path(__file__).resolve().parents[1]
VNP = ROOT / ".venv" / "bin" / "vnp"
if not VNP.exists():
    VNP = Path(sys.executable).with_name("vnp")
TOKEN_VARIABLE = "VNP_TEST_PROCESS_TOKEN"
READS = 100
# An ESM-2 large enough (35M parameters) that its shard takes seconds on a CPU, after DNABERT-S's has
# been written, so a kill lands inside it; the tiny default embeds these reads in a tenth of a second.
SLOW_ESM2 = {"num_layers": 12, "embed_dim": 480, "attention_heads": 20}
FLU = REAL_DATA / "influenza_a_california_07_2009.fasta"


class Processes:
    """The processes started with one token: a `vnp run` and every process below it, orphans included."""

    def __init__(self, esm2_model: Path | None = None) -> None:
        self.esm2_model = esm2_model
        self.token = uuid.uuid4().hex
        self.env = {**os.environ, TOKEN_VARIABLE: self.token}
        self._needle = f"{TOKEN_VARIABLE}={self.token}".encode()

    def vnp_run(self, fasta: Path, home: Path, log: Path, until: str = "merged_embeddings") -> subprocess.Popen:
        with log.open("ab") as out:
            model = ["--esm2-model", str(self.esm2_model)] if self.esm2_model else []
            return subprocess.Popen([str(VNP), "run", str(fasta), "--home", str(home), "--until", until, *model],
                                    env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)

    def alive(self) -> list[int]:
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if self._needle not in (entry / "environ").read_bytes().split(b"\0"):
                    continue
                if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    continue  # exited, waiting to be reaped
            except (OSError, IndexError):
                continue  # gone meanwhile
            pids.append(int(entry.name))
        return pids

    def writing_checkpoint(self, folder: Path) -> list[int]:
        """Those of them that have a checkpoint (`*.partial`) in `folder` open: the device process embedding it."""
        holders = []
        for pid in self.alive():
            try:
                links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
            except OSError:
                continue
            if any(Path(link).parent == folder and link.endswith(".partial") for link in links):
                holders.append(pid)
        return holders

    def gone_within(self, seconds: float) -> list[int]:
        """Wait for all of them to end; those still alive after `seconds`."""
        deadline = time.monotonic() + seconds
        while (left := self.alive()) and time.monotonic() < deadline:
            time.sleep(0.1)
        return left

    def kill_all(self) -> None:
        for pid in self.alive():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def wait_until(condition: Callable[[], object], *, timeout: float, running: subprocess.Popen, what: str,
               log: Path) -> object:
    """Poll `condition` until it holds, failing if `running` ends first or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        if running.poll() is not None:
            pytest.fail(f"vnp run ended (exit {running.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    pytest.fail(f"no {what} within {timeout} s:\n{log.read_text()[-3000:]}")


def write_reads(path: Path) -> Path:
    from vnp_core.fasta import read_fasta
    from vnp_core.simulate import simulate_reads

    genomes = {name: read_fasta(REAL_DATA / f"{name}.fasta").records[0].sequence for name in ("t4", "lambda")}
    path.write_text("".join(f">{read_id}\n{sequence}\n" for read_id, sequence in simulate_reads(genomes, READS, 300, seed=11)))
    return path


def merged(home: Path, sample: str) -> dict[str, np.ndarray]:
    with h5py.File(home / "storage" / "samples" / sample / "embeddings" / "merged.h5", "r") as file:
        return {name: file[name][()] for name in ("ids", *MODELS)}


def finished(process: subprocess.Popen, log: Path, timeout: float = 420) -> int:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"vnp run still running after {timeout} s (waiting for a gpu slot?):\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_killed_runs_and_device_processes_resume_to_identical_vectors(tmp_path: Path) -> None:
    """1. Three `vnp run` at once: a reference in its own home, and two of one sample in another home, of
    which one refuses at once. The other is killed with SIGKILL once its first model's shard is written
    and its second model is being embedded: none of its processes survives it, and its run stays
    STARTED in the instance, holding the `gpu` slot.
    2. A rerun reclaims that slot (it would wait for it forever), keeps the finished shard, and has its
    device process killed mid-shard: it fails with one line naming the shard, and leaves nothing running.
    3. A third run completes, with merged vectors identical to the reference's."""
    fasta = write_reads(tmp_path / "reads.fasta")
    home, reference_home = tmp_path / "home", tmp_path / "reference"
    first_model, second_model = list(MODELS)
    embeddings = home / "storage" / "samples" / "reads" / "embeddings"
    first_shard = embeddings / first_model / "shard-0.h5"
    second_folder = embeddings / second_model
    lock_file = home / "storage" / "samples" / ".locks" / "reads.lock"
    from vnp_core.tiny_models import write_tiny_esm2

    esm2_model = write_tiny_esm2(tmp_path / "models" / "esm2_t12_slow.pt", **SLOW_ESM2)
    reference, killed, device_killed, last = (Processes(esm2_model) for _ in range(4))
    everyone = (reference, killed, device_killed, last)
    began = time.monotonic()
    try:
        # 1. The reference, and two runs of one sample at once.
        reference_log, log_a, log_b = tmp_path / "reference.log", tmp_path / "a.log", tmp_path / "b.log"
        uninterrupted = reference.vnp_run(fasta, reference_home, reference_log)
        run_a, run_b = killed.vnp_run(fasta, home, log_a), killed.vnp_run(fasta, home, log_b)
        holder_pid = int(wait_until(lambda: lock_file.exists() and lock_file.read_text().strip(), timeout=300,
                                    running=run_a if run_a.poll() is None else run_b, what="sample lock", log=log_a))
        holder, holder_log, refused, refused_log = ((run_a, log_a, run_b, log_b) if holder_pid == run_a.pid
                                                    else (run_b, log_b, run_a, log_a))
        assert holder.pid == holder_pid
        assert finished(refused, refused_log, timeout=300) == 1
        refusal = refused_log.read_text()
        assert f"sample reads is being processed by another vnp run (pid {holder_pid}): wait for it or stop it" in refusal
        assert len(refusal.strip().splitlines()) == 1, refusal

        wait_until(lambda: first_shard.exists() and killed.writing_checkpoint(second_folder), timeout=300,
                   running=holder, what=f"{second_model} embedding after {first_model}'s shard", log=holder_log)
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        assert (left := killed.gone_within(10)) == [], f"processes left behind by the killed vnp run: {left}"
        assert first_shard.exists() and not (second_folder / "shard-0.h5").exists()
        with DagsterInstance.from_config(str(home)) as instance:
            stuck = [run for run in instance.get_runs() if run.status == DagsterRunStatus.STARTED]
            assert len(stuck) == 1, "the killed shard step's run stays STARTED"
            claimed = instance.event_log_storage.get_concurrency_info("gpu").claimed_slots
            assert [slot.run_id for slot in claimed] == [stuck[0].run_id], "... and holds its gpu slot"

        print(f"phase 1 (the kill, orphans checked): {time.monotonic() - began:.0f} s")
        # 2. A rerun: its device process is killed in the middle of the second model's shard.
        log_2 = tmp_path / "rerun.log"
        rerun = device_killed.vnp_run(fasta, home, log_2)
        device = wait_until(lambda: device_killed.writing_checkpoint(second_folder), timeout=300, running=rerun,
                            what=f"the rerun's {second_model} embedding (a gpu slot it never got?)", log=log_2)
        assert len(device) == 1
        os.kill(device[0], signal.SIGKILL)
        assert finished(rerun, log_2, timeout=120) == 1
        failure = [line for line in log_2.read_text().splitlines() if line.startswith("error")]
        assert len(failure) == 1 and "shard 0 of reads" in failure[0] and "killed by signal 9" in failure[0], failure
        assert (left := device_killed.gone_within(10)) == [], f"processes left behind by the failed rerun: {left}"
        with DagsterInstance.from_config(str(home)) as instance:
            reclaimed = instance.get_run_by_id(stuck[0].run_id)
            assert reclaimed.status == DagsterRunStatus.FAILURE
            assert instance.event_log_storage.get_concurrency_info("gpu").claimed_slots == []

        print(f"phase 2 (the device process killed): {time.monotonic() - began:.0f} s")
        # 3. The last run completes, from what the killed ones kept, to the reference's vectors, beside a run of
        # another sample in the same home: neither takes the other's live runs for dead ones, their GPU steps
        # take turns on the pool's one slot (one device here), and both complete.
        log_3, other_log = tmp_path / "last.log", tmp_path / "other.log"
        other_sample = tmp_path / "flu.fasta"
        other_sample.write_bytes(FLU.read_bytes())
        final, other = last.vnp_run(fasta, home, log_3), last.vnp_run(other_sample, home, other_log, until="embeddings")
        assert finished(final, log_3) == 0, log_3.read_text()[-3000:]
        assert finished(other, other_log) == 0, other_log.read_text()[-3000:]
        assert finished(uninterrupted, reference_log) == 0, reference_log.read_text()[-3000:]
        print(f"phase 3 (the last run): {time.monotonic() - began:.0f} s")
        resumed, expected = merged(home, "reads"), merged(reference_home, "reads")
        for name in expected:
            assert np.array_equal(resumed[name], expected[name]), f"merged {name} differs from the uninterrupted run's"
        with DagsterInstance.from_config(str(home)) as instance:
            kept = instance.fetch_materializations(AssetRecordsFilter(
                asset_key=AssetKey(f"{first_model}_embeddings"), asset_partitions=[sample_shard_key("reads", 0)]),
                limit=1).records[0].asset_materialization
            assert kept.metadata["resumed_rows"].value == kept.metadata["rows"].value  # the killed run's shard, kept
            assert not [run for run in instance.get_runs() if not run.is_finished]
            failed = {run.run_id for run in instance.get_runs() if run.status == DagsterRunStatus.FAILURE}
            assert len(failed) == 2  # the killed run's step, and the rerun's whose device process was killed
            spans = sorted(step_spans(instance, "shard_embeddings"))
            assert len(spans) == 4  # two runs' steps that failed, two that succeeded
            assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:])), f"GPU steps overlapped: {spans}"
        assert [processes.gone_within(10) for processes in everyone] == [[]] * len(everyone)
    finally:
        for processes in everyone:
            processes.kill_all()


def step_spans(instance: DagsterInstance, step: str) -> list[tuple[float, float]]:
    """(start, end) of every run's `step`, from its events; a step that never ended (killed) ends with its run."""
    from dagster import DagsterEventType

    spans = []
    for run in instance.get_runs():
        times: dict[str, float] = {}
        for record in instance.all_logs(run.run_id):
            event = record.dagster_event
            if event is None or event.step_key != step:
                continue
            if event.event_type == DagsterEventType.STEP_START:
                times["start"] = record.timestamp
            elif event.event_type in (DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE):
                times["end"] = record.timestamp
        if "start" in times:
            end = times.get("end") or instance.get_run_record_by_id(run.run_id).end_time
            spans.append((times["start"], end))
    return spans


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def _started_run(instance: DagsterInstance, tags: dict[str, str], slot: bool = True, parent: DagsterRun | None = None) -> DagsterRun:
    run = instance.add_run(DagsterRun(job_name="shard_step", run_id=uuid.uuid4().hex, status=DagsterRunStatus.STARTED,
                                      tags=tags, parent_run_id=parent and parent.run_id, root_run_id=parent and parent.run_id))
    if slot:
        assert instance.event_log_storage.claim_concurrency_slot("gpu", run.run_id, "shard_embeddings").is_claimed
    return run


def test_dead_runs_are_marked_failed_and_their_gpu_slots_freed() -> None:
    with instance_for_test() as instance:
        instance.event_log_storage.set_concurrency_slots("gpu", 4)
        host = socket.gethostname()
        dead = _started_run(instance, {HOST_TAG: host, PID_TAG: str(_dead_pid()), PROCESS_START_TAG: "1"})
        reused = _started_run(instance, {**process_tags(), PROCESS_START_TAG: "1"})  # our pid, another process's start
        alive = _started_run(instance, process_tags())
        elsewhere = _started_run(instance, {HOST_TAG: host + "-other", PID_TAG: str(_dead_pid())})
        untagged = _started_run(instance, {}, slot=False)  # e.g. launched by the daemon: not ours to judge
        # A retry starting up carries its parent's tags, which Dagster copied: the dead process is the parent's.
        retry = _started_run(instance, dead.tags, slot=False, parent=dead)
        retry_tagged = _started_run(instance, {**dead.tags, PID_TAG: str(_dead_pid())}, slot=False, parent=reused)

        assert sorted(reclaim_dead_runs(instance)) == sorted([dead.run_id, reused.run_id, retry_tagged.run_id])

        runs = (dead, reused, alive, elsewhere, untagged, retry, retry_tagged)
        status = {run.run_id: instance.get_run_by_id(run.run_id).status for run in runs}
        assert status == {dead.run_id: DagsterRunStatus.FAILURE, reused.run_id: DagsterRunStatus.FAILURE,
                          alive.run_id: DagsterRunStatus.STARTED, elsewhere.run_id: DagsterRunStatus.STARTED,
                          untagged.run_id: DagsterRunStatus.STARTED, retry.run_id: DagsterRunStatus.STARTED,
                          retry_tagged.run_id: DagsterRunStatus.FAILURE}
        claimed = {slot.run_id for slot in instance.event_log_storage.get_concurrency_info("gpu").claimed_slots}
        assert claimed == {alive.run_id, elsewhere.run_id}
        assert reclaim_dead_runs(instance) == []  # once


# A run as the daemon launches it for the UI, a sensor or a backfill: its process executes the run with
# none of vnp's tags (argv: home, ESM-2 checkpoint).
_UNTAGGED_RUN = """
import sys
from pathlib import Path
from dagster import DagsterInstance
from vnp_assets.platform import build_definitions, resources_from_settings

home = Path(sys.argv[1])
defs = build_definitions(resources_from_settings({"esm2_model": sys.argv[2]}, home))
defs.resolve_job_def("embed_shard").execute_in_process(partition_key="reads|0", instance=DagsterInstance.from_config(str(home)))
"""


@pytest.mark.slow
def test_a_vnp_run_started_in_the_background_stops_on_a_plain_kill(tmp_path: Path) -> None:
    """A non-interactive shell's background job starts with SIGINT ignored, and Dagster gives SIGTERM
    SIGINT's handler: `kill` must still stop `vnp run`, in one line, and every process below it."""
    from vnp_core.tiny_models import write_tiny_esm2

    esm2_model = write_tiny_esm2(tmp_path / "models" / "esm2_t12_slow.pt", **SLOW_ESM2)
    fasta, home, log = write_reads(tmp_path / "reads.fasta"), tmp_path / "home", tmp_path / "run.log"
    processes = Processes(esm2_model)
    try:
        with log.open("ab") as out:
            run = subprocess.Popen(["bash", "-c", 'trap "" INT; exec "$@"', "bash", str(VNP), "run", str(fasta), "--home",
                                    str(home), "--esm2-model", str(esm2_model)],
                                   env=processes.env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        wait_until(lambda: processes.writing_checkpoint(home / "storage" / "samples" / "reads" / "embeddings" / "esm2"),
                   timeout=300, running=run, what="the esm2 embedding", log=log)
        run.send_signal(signal.SIGTERM)
        assert finished(run, log, timeout=60) == 1
        assert processes.gone_within(20) == []
        assert log.read_text().rstrip().splitlines()[-1].startswith("error: interrupted")
    finally:
        processes.kill_all()


@pytest.mark.slow
def test_a_killed_run_launched_without_vnp_tags_is_found_by_its_gpu_step(tmp_path: Path) -> None:
    """The GPU step tags its own run with its process: a run the daemon launched, killed while it holds
    the `gpu` slot, is marked failed and its slot freed like a `vnp run`'s."""
    from vnp_core.tiny_models import write_tiny_esm2

    esm2_model = write_tiny_esm2(tmp_path / "models" / "esm2_t12_slow.pt", **SLOW_ESM2)
    fasta, home = write_reads(tmp_path / "reads.fasta"), tmp_path / "home"
    processes = Processes(esm2_model)
    log = tmp_path / "run.log"
    try:
        assert finished(processes.vnp_run(fasta, home, log, until="sequence_index"), log) == 0, log.read_text()
        with log.open("ab") as out:
            run = subprocess.Popen([sys.executable, "-c", _UNTAGGED_RUN, str(home), str(esm2_model)], env=processes.env,
                                   stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        wait_until(lambda: processes.writing_checkpoint(home / "storage" / "samples" / "reads" / "embeddings" / "esm2"),
                   timeout=300, running=run, what="the untagged run's esm2 embedding", log=log)
        run.send_signal(signal.SIGKILL)
        run.wait()
        assert processes.gone_within(10) == []
        with DagsterInstance.from_config(str(home)) as instance:
            [killed] = [record for record in instance.get_runs() if record.status == DagsterRunStatus.STARTED]
            assert killed.tags[PID_TAG] == str(run.pid)  # put there by the step, not by whoever launched it
            assert [slot.run_id for slot in instance.event_log_storage.get_concurrency_info("gpu").claimed_slots] == [
                killed.run_id]
            assert reclaim_dead_runs(instance) == [killed.run_id]
            assert instance.get_run_by_id(killed.run_id).status == DagsterRunStatus.FAILURE
            assert instance.event_log_storage.get_concurrency_info("gpu").claimed_slots == []
    finally:
        processes.kill_all()


def test_the_inbox_sensor_reclaims_dead_runs_for_the_ui(tmp_path: Path) -> None:
    """Steps queued from the UI wait on the same `gpu` pool: each sensor tick frees what killed `vnp run`s held."""
    from dagster import build_sensor_context

    from vnp_assets.sensors import fasta_inbox_sensor

    (tmp_path / "inbox").mkdir()
    storage = SampleStorage(storage_root=str(tmp_path / "storage"), inbox_dir=str(tmp_path / "inbox"))
    with instance_for_test() as instance:
        instance.event_log_storage.set_concurrency_slots("gpu", 1)
        dead = _started_run(instance, {HOST_TAG: socket.gethostname(), PID_TAG: str(_dead_pid())})
        fasta_inbox_sensor(build_sensor_context(instance=instance, resources={"storage": storage}))
        assert instance.get_run_by_id(dead.run_id).status == DagsterRunStatus.FAILURE
        assert instance.event_log_storage.get_concurrency_info("gpu").claimed_slots == []


def test_a_sample_is_processed_by_one_vnp_run_at_a_time(tmp_path: Path) -> None:
    storage = SampleStorage(storage_root=str(tmp_path / "storage"), inbox_dir=str(tmp_path / "inbox"))
    with sample_lock(storage, "s1"):
        with pytest.raises(SampleBusyError, match=rf"sample s1 is being processed by another vnp run \(pid {os.getpid()}\)"):
            with sample_lock(storage, "s1"):
                pass
        with sample_lock(storage, "s2"):  # another sample: no wait
            pass
    with sample_lock(storage, "s1"):  # released
        pass


# A parent with three device processes, all busy with a call (so none leaves on its stdin's end): a
# spare started by the main thread and a fresh one started by the thread that waits for it (both armed
# with the kernel's parent-death signal), and a spare started by a thread that ended before its call
# (the watchdog alone: a parent-death signal follows the thread that forked, and would have killed it).
_PARENT = """
import threading, time
import vnp_core.gpu as gpu
def call():
    threading.Thread(target=gpu.run_in_device_process, args=(time.sleep, 600), kwargs={"device": None}).start()
    time.sleep(2)
gpu.start_spare_device_process()
call()
starter = threading.Thread(target=gpu.start_spare_device_process)
starter.start()
starter.join()
time.sleep(1)
call()
call()
print("started", flush=True)
time.sleep(600)
"""


def test_device_processes_die_with_their_parent() -> None:
    processes = Processes()
    parent = subprocess.Popen([sys.executable, "-c", _PARENT], env=processes.env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert parent.stdout.readline().strip() == "started"
        deadline = time.monotonic() + 120
        while len(processes.alive()) < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(processes.alive()) == 4  # the parent and its three device processes
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert processes.gone_within(10) == []
        calls = parent.stderr.read()
        assert calls.count("(a spare: interpreter and imports done ahead)") == 2, calls  # the thread's spare lived
        assert calls.count("sleep ready to run") == 3, calls
    finally:
        processes.kill_all()
        parent.wait()


def test_a_parent_gone_before_the_child_armed_its_watch_ends_the_child() -> None:
    probe = subprocess.run([sys.executable, "-c", "import os, vnp_core.gpu as g; g.exit_with_parent(os.getppid() + 10**6); "
                            "print('still here')"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 1 and "still here" not in probe.stdout
