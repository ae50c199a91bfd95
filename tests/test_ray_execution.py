"""GPU steps on a Ray cluster (`vnp_assets.ray_execution`), on the CPU: a loopback cluster of our own with
fake GPU slots, a head with two (`0`, `1`) and a second node with one, physical GPU 3 (started with
`CUDA_VISIBLE_DEVICES=3`: a GPU subset, the Ray way). Ray hands each actor one slot and sets its
`CUDA_VISIBLE_DEVICES`, whether or not there is a GPU behind it.

The cluster is started for this module and stopped at its end: each node is a `ray start --block`
in a process group of its own, which the teardown stops (SIGTERM, then SIGKILL), then checks that
no process of either group is left. Never `ray stop`: it stops every Ray process on the machine,
other people's clusters included.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from services import free_port, stop_process_groups
from shard_rows import Rows

ray = pytest.importorskip("ray")

from vnp_assets import ray_execution  # noqa: E402
from vnp_assets.ray_execution import (  # noqa: E402
    RayClusterUnreachable,
    RayGpuCluster,
    RayGpuStepError,
    ray_gpu_count,
)
from real_genomes import FLU

pytestmark = pytest.mark.slow

# The functions below run in Ray workers, which cannot import the tests' modules: send them by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
ray.cloudpickle.register_pickle_by_value(sys.modules[Rows.__module__])

RAY = Path(sys.executable).with_name("ray")


@dataclass
class LoopbackCluster:
    gcs_address: str  # HOST:PORT: this process connects as a driver on a node
    client_address: str  # ray://HOST:PORT: Ray Client
    groups: list[int]  # process groups of the nodes


def _start_node(args: list[str], temp_dir: Path, env: dict[str, str]) -> subprocess.Popen:
    log = open(temp_dir / f"node{len(list(temp_dir.glob('node*.log')))}.log", "w")  # noqa: SIM115 - closed with the file object
    return subprocess.Popen([str(RAY), "start", "--block", "--disable-usage-stats", *args], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _alive_members(group: int) -> list[str]:
    """The processes of a process group, zombies left out, as "pid command"."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) ": state, ppid, pgrp, ...
        if int(fields[2]) == group and fields[0] != "Z":
            members.append(f"{stat.parent.name} {text[text.index('(') : text.rindex(')') + 1]}")
    return members


@pytest.fixture(scope="module")
def loopback_cluster():
    # Ray's socket paths must stay under 108 bytes: a short folder of our own, not pytest's tmp_path.
    temp_dir = Path(tempfile.mkdtemp(prefix="vnp-ray-", dir="/tmp"))
    gcs, client = free_port(), free_port()
    # GRPC_ENABLE_FORK_SUPPORT as the KubeRay head has it: Ray Client's per-connection server then dies
    # less often while it starts (ray-project/ray#63202; `client_server_failures` tests the retry).
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "GRPC_ENABLE_FORK_SUPPORT": "false"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    nodes = []
    try:
        nodes.append(_start_node(
            ["--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", f"--ray-client-server-port={client}",
             f"--dashboard-agent-listen-port={free_port()}", "--include-dashboard=false",
             "--num-cpus=2", "--num-gpus=2", f"--temp-dir={temp_dir / 'ray'}"], temp_dir, env))
        # The second node waits for the head's GCS by itself: both start at once.
        nodes.append(_start_node(
            [f"--address=127.0.0.1:{gcs}", "--node-ip-address=127.0.0.1", f"--dashboard-agent-listen-port={free_port()}",
             "--num-cpus=1", "--num-gpus=1"], temp_dir, {**env, "CUDA_VISIBLE_DEVICES": "3"}))
        _wait_for_port(client, nodes[0], temp_dir)
        _wait_for_gpus(f"127.0.0.1:{gcs}", 3, nodes, temp_dir)
        yield LoopbackCluster(f"127.0.0.1:{gcs}", f"ray://127.0.0.1:{client}", [node.pid for node in nodes])
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for node in reversed(nodes):  # `ray start --block` stops its node's processes on SIGTERM
            stop_process_groups([node], grace_s=20)
        left = [member for node in nodes for member in _alive_members(node.pid)]
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"Ray processes left running: {left}"


def _node_logs(temp_dir: Path) -> str:
    return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in sorted(temp_dir.glob("node*.log")))


def _wait_for_port(port: int, node: subprocess.Popen, temp_dir: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if node.poll() is not None:
            pytest.fail(f"the Ray head exited ({node.returncode}):\n{_node_logs(temp_dir)}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"the Ray head did not open port {port} within {timeout_s} s:\n{_node_logs(temp_dir)}")


def _wait_for_gpus(address: str, gpus: int, nodes: list[subprocess.Popen], temp_dir: Path, timeout_s: float = 60) -> None:
    ray.init(address=address, log_to_driver=False)
    try:
        deadline = time.monotonic() + timeout_s
        while ray.cluster_resources().get("GPU", 0) < gpus:
            if time.monotonic() > deadline or any(node.poll() is not None for node in nodes):
                pytest.fail(f"the cluster did not reach {gpus} GPUs: {ray.cluster_resources()}\n{_node_logs(temp_dir)}")
            time.sleep(0.2)
    finally:
        ray.shutdown()


@pytest.fixture
def cluster(loopback_cluster: LoopbackCluster, tmp_path: Path):
    """The cluster as the GPU pool would use it, this process connected as a driver; disconnected after."""
    gpus = RayGpuCluster(address=loopback_cluster.gcs_address, lock_dir=str(tmp_path / "gpu-locks"), log_every_s=0.5)
    yield gpus
    gpus.disconnect()
    assert not ray.is_initialized()


@pytest.fixture
def log() -> logging.Logger:
    logger = logging.getLogger("test_ray_execution")
    logger.setLevel(logging.INFO)
    return logger


# What the GPU steps run, in the Ray actors.

def placement_after_barrier(barrier_dir: str, parties: int) -> dict:
    """This process's GPU, once `parties` calls are running at the same time."""
    Path(barrier_dir, str(os.getpid())).touch()
    deadline = time.monotonic() + 60
    while len(list(Path(barrier_dir).iterdir())) < parties:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(list(Path(barrier_dir).iterdir()))} of {parties} calls ran at once")
        time.sleep(0.05)
    return {"cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "node_id": ray.get_runtime_context().get_node_id(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def killed_on_first_attempt(marker: str) -> str:
    """Kills its own process (SIGKILL) the first time, as the OOM killer or a crash would; returns the second."""
    if not Path(marker).exists():
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return f"second attempt on GPU {os.environ.get('CUDA_VISIBLE_DEVICES')}"


class ShardOutOfRange(ValueError):
    pass


def raises() -> None:
    raise ShardOutOfRange("shard 9 of 2")


# First of the cluster's tests: Ray Client's per-connection server fails to start now and then,
# more often after a worker was killed (ray-project/ray#63202; `client_connect_attempts` retries it).
def test_ray_client_mode_counts_gpus_and_runs_a_step(loopback_cluster, log, tmp_path):
    assert not ray.is_initialized()
    assert ray_gpu_count(loopback_cluster.client_address) == 3
    assert not ray.is_initialized()  # it connected for the question only
    gpus = RayGpuCluster(address=loopback_cluster.client_address, lock_dir=str(tmp_path / "gpu-locks"))
    marker = str(tmp_path / "attempted")
    try:
        with pytest.raises(RayGpuStepError, match="^shard 0: killed_on_first_attempt on node .* GPU .*killed"):
            gpus.run_on_gpu(killed_on_first_attempt, marker, log=log, label="shard 0")
        result, where = gpus.run_on_gpu(killed_on_first_attempt, marker, log=log, label="shard 0")
        assert result.startswith("second attempt on GPU ") and where.startswith("node ")
    finally:
        gpus.disconnect()
    assert not ray.is_initialized()


# How Ray Client's proxy answers when the connection's server died while starting (a CI run's words).
SERVER_DIED_WHILE_STARTING = (
    "Initialization failure from server:\nTraceback (most recent call last):\n"
    '  File ".../ray/util/client/server/proxier.py", line 396, in start_specific_server\n'
    "psutil.ZombieProcess: PID still exists but it's a zombie (pid=17895)")


@pytest.fixture
def client_server_failures(monkeypatch) -> dict[str, int]:
    """Ray Client, all of it real but the proxy's answer to the first `failures` connections: that their
    server died while starting (ray-project/ray#63202), which takes Ray 30-60 s to say."""
    from ray.util.client.worker import Worker

    server_init = Worker._server_init
    left = {"failures": 0}

    def failing_server_init(self, job_config, ray_init_kwargs=None):
        if left["failures"]:
            left["failures"] -= 1
            raise ConnectionAbortedError(SERVER_DIED_WHILE_STARTING)
        return server_init(self, job_config, ray_init_kwargs)

    monkeypatch.setattr(Worker, "_server_init", failing_server_init)
    return left


def _gpus_counted_connected(gpus: RayGpuCluster, log: logging.Logger) -> float:
    """The cluster's GPUs as `gpus` sees them once connected; disconnected after."""
    try:
        gpus.ensure_connected(log)
        return ray.cluster_resources()["GPU"]
    finally:
        gpus.disconnect()


def test_a_ray_client_server_that_died_while_starting_is_connected_again(loopback_cluster, client_server_failures, log, caplog):
    client_server_failures["failures"] = 1
    assert _gpus_counted_connected(RayGpuCluster(address=loopback_cluster.client_address), log) == 3
    warnings = [record.getMessage() for record in caplog.records if record.name == log.name and record.levelno == logging.WARNING]
    assert warnings == ["Ray Client's server for this step failed to start (attempt 1 of 3, ray-project/ray#63202): "
                        "connecting again"]


def test_a_ray_client_server_that_never_starts_fails_in_one_line_and_leaves_ray_as_it_was(
        loopback_cluster, client_server_failures, log, caplog):
    client_server_failures["failures"] = 2
    gpus = RayGpuCluster(address=loopback_cluster.client_address, client_connect_attempts=2)
    with pytest.raises(RayClusterUnreachable, match=r"^Ray cluster at ray://\S+: Ray Client's server for this "
                                                    r"connection failed to start 2 times .* \(HOST:6379\)$") as failed:
        gpus.ensure_connected(log)
    assert "\n" not in str(failed.value) and not any(record.exc_info for record in caplog.records)
    assert not ray.is_initialized()
    # A failed Ray Client connect left Ray's client mode on, and this process's next `ray.init` as a
    # driver failed on an assert: a CI run's every later Ray test did.
    assert _gpus_counted_connected(RayGpuCluster(address=loopback_cluster.gcs_address), log) == 3


def test_each_call_gets_one_gpu_of_its_own_and_concurrent_calls_get_distinct_gpus(cluster, loopback_cluster, log, tmp_path):
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    results: dict[int, tuple[dict, str]] = {}

    def call(shard: int) -> None:
        results[shard] = cluster.run_on_gpu(placement_after_barrier, str(barrier), 3, log=log, label=f"shard {shard}")

    threads = [threading.Thread(target=call, args=(shard,)) for shard in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(results) == [0, 1, 2], "a call failed: see the log above"

    seen = {(got["node_id"], got["cuda_visible_devices"]) for got, _ in results.values()}
    assert len(seen) == 3  # three GPUs, three distinct (node, GPU) pairs: no GPU given twice
    by_node: dict[str, set[str]] = {}
    for node_id, gpu in seen:
        by_node.setdefault(node_id, set()).add(gpu)
    assert sorted(map(sorted, by_node.values())) == [["0", "1"], ["3"]]  # one id each; the second node's subset kept
    for got, where in results.values():
        assert where.endswith(f"GPU {got['cuda_visible_devices']}") and got["node_id"][:8] in where
        assert got["omp_num_threads"] == "1"  # the share of CPU: 2 CPUs for 2 GPUs, 1 for 1
    assert ray_gpu_count(loopback_cluster.gcs_address) == 3  # connected already: counted, still connected
    assert ray.is_initialized()


def test_a_killed_worker_fails_the_step_naming_shard_and_node_and_the_rerun_completes(cluster, log, tmp_path):
    marker = tmp_path / "attempted"
    started = time.monotonic()
    with pytest.raises(RayGpuStepError) as failed:
        cluster.run_on_gpu(killed_on_first_attempt, str(marker), log=log, label="shard 3 of sample S")
    message = str(failed.value)
    assert "\n" not in message
    assert message.startswith("shard 3 of sample S: killed_on_first_attempt on node ")
    assert " GPU " in message and "killed" in message and "Ray does not rerun it" in message
    assert time.monotonic() - started < 30
    assert isinstance(failed.value.__cause__, ray.exceptions.RayActorError)

    result, where = cluster.run_on_gpu(killed_on_first_attempt, str(marker), log=log, label="shard 3 of sample S")
    assert result.startswith("second attempt on GPU ") and where.startswith("node ")


def test_the_functions_exception_is_raised_with_its_own_type_and_where_it_ran(cluster, log):
    with pytest.raises(ShardOutOfRange, match="shard 9 of 2") as raised:
        cluster.run_on_gpu(raises, log=log, label="shard 9")
    (note,) = raised.value.__notes__
    assert note.startswith("raised in the Ray GPU step shard 9 on node ") and "in raises" in note


def test_the_node_lease_keeps_a_gpu_held_by_a_local_run(loopback_cluster, log, tmp_path):
    from vnp_core.gpu import GpuLease

    locks = tmp_path / "gpu-locks"
    gpus = RayGpuCluster(address=loopback_cluster.gcs_address, lock_dir=str(locks), lock_timeout_s=1.0)
    try:
        with GpuLease([0], locks), GpuLease([1], locks), GpuLease([3], locks):  # a local run holds every GPU
            with pytest.raises(TimeoutError, match=r"none of GPUs \[\d\] became free within 1.0 s"):
                gpus.run_on_gpu(placement_after_barrier, str(tmp_path), 0, log=log, label="shard 0")
    finally:
        gpus.disconnect()


# The engine through Ray: the same function as the local device process, the same vectors.

def embed_shards_killed_once(jobs, marker: str, progress=None):
    """`embed_shards`, killed (SIGKILL) the first time once half of the first shard is done and checkpointed."""
    from vnp_core.engine import embed_shards

    def report(model, done):
        if progress is not None:
            progress(model, done)
        if not Path(marker).exists() and done.sequences_done >= done.sequences_total // 2:
            Path(marker).touch()
            time.sleep(1.0)  # the checkpoint writer thread flushes what is done
            os.kill(os.getpid(), signal.SIGKILL)

    return embed_shards(jobs, report)


def _shard_jobs(models: dict[str, Path], out_dir: Path) -> list:
    from vnp_core.config import EmbedConfig
    from vnp_core.engine import ShardJob

    rng = random.Random(7)
    dna = [("".join(rng.choices("ACGT", k=rng.randint(60, 200)))) for _ in range(48)]
    proteins = [("".join(rng.choices("ACDEFGHIKLMNPQRSTVWY", k=rng.randint(10, 90)))) for _ in range(48)]
    config = EmbedConfig(max_tokens=256, checkpoint_rows=4, compile_layers=False)
    return [ShardJob("dnabert_s", models["dnabert_s"], Rows(tuple(f"c{i}" for i in range(48)), tuple(dna)),
                     out_dir / "dnabert_s.h5", config, {"shard": 0}),
            ShardJob("esm2", models["esm2"], Rows(tuple(f"p{i}" for i in range(48)), tuple(proteins)),
                     out_dir / "esm2.h5", config, {"shard": 0})]


def test_embed_shards_on_ray_killed_then_resumed_gives_the_local_paths_vectors_bit_for_bit(cluster, log, tmp_path):
    from vnp_core.gpu import run_in_device_process
    from vnp_core.store import read_embeddings
    from vnp_core.tiny_models import write_tiny_dnabert_s, write_tiny_esm2

    models = {"esm2": write_tiny_esm2(tmp_path / "esm2_tiny.pt"), "dnabert_s": write_tiny_dnabert_s(tmp_path / "dnabert_s")}
    (tmp_path / "local").mkdir()
    (tmp_path / "ray").mkdir()
    from vnp_core.engine import embed_shards

    # The local path: the device process (one CPU thread, as the Ray actor's share).
    local = run_in_device_process(embed_shards, _shard_jobs(models, tmp_path / "local"), device=None, cpu_threads=1)
    assert all(not isinstance(outcome, Exception) for outcome in local), local

    jobs = _shard_jobs(models, tmp_path / "ray")
    marker = str(tmp_path / "killed")
    with pytest.raises(RayGpuStepError, match="^shard 0 of sample S: embed_shards_killed_once on node .* GPU"):
        cluster.run_on_gpu(embed_shards_killed_once, jobs, marker, log=log, label="shard 0 of sample S", with_progress=True)
    outcomes, where = cluster.run_on_gpu(embed_shards_killed_once, jobs, marker, log=log, label="shard 0 of sample S",
                                         with_progress=True)
    assert all(not isinstance(outcome, Exception) for outcome in outcomes), outcomes
    assert outcomes[0].resumed_from_rows > 0  # the rerun resumed from the killed run's checkpoint
    for model in ("dnabert_s", "esm2"):
        ours, theirs = read_embeddings(tmp_path / "ray" / f"{model}.h5"), read_embeddings(tmp_path / "local" / f"{model}.h5")
        assert ours.ids == theirs.ids
        np.testing.assert_array_equal(ours.embeddings, theirs.embeddings)


def test_progress_is_logged_while_the_step_runs(cluster, log, caplog):
    with caplog.at_level(logging.INFO, logger=log.name):
        result, _ = cluster.run_on_gpu(reports_progress, log=log, label="shard 1", with_progress=True)
    assert result == "done"
    lines = [record.getMessage() for record in caplog.records]
    assert any(line.startswith("shard 1: on node ") for line in lines)
    assert "shard 1: esm2: 4/8 sequences, 2.0 sequences/s, 20 tokens/s" in lines


def imported_here(module: str) -> tuple[bool, int]:
    return module in sys.modules, os.getpid()


def test_an_actor_started_ahead_serves_the_next_step_with_its_imports_done(cluster, log, caplog):
    # `vnp run`'s shard workers start their first step's actor while the index is built.
    with caplog.at_level(logging.INFO, logger=log.name):
        cluster.start_ahead(["wave"], log)  # a module nothing else here imports
        (imported, pid), _ = cluster.run_on_gpu(imported_here, "wave", log=log, label="shard 0")
        (imported_again, pid_again), _ = cluster.run_on_gpu(imported_here, "wave", log=log, label="shard 1")
    assert imported and not imported_again and pid != pid_again  # one actor per step, the first started ahead
    lines = [record.getMessage() for record in caplog.records]
    assert any(line.startswith("shard 0: on node ") and line.endswith("; its actor was started ahead") for line in lines)
    assert not any(line.startswith("shard 1: ") and "started ahead" in line for line in lines)


def test_an_actor_started_ahead_that_died_is_replaced_by_a_new_one(cluster, log, caplog):
    with caplog.at_level(logging.INFO, logger=log.name):
        cluster.start_ahead(["vnp_no_such_module"], log)  # its imports fail: the actor dies before the step
        (_, _), where = cluster.run_on_gpu(imported_here, "json", log=log, label="shard 2")
    assert where.startswith("node ")
    lines = [record.getMessage() for record in caplog.records]
    assert any(line.startswith("shard 2: the actor started ahead for this step is gone (") for line in lines)


@dataclass
class FakeProgress:  # fake_embedder's, which a Ray worker cannot import (this module travels by value)
    sequences_done: int
    sequences_total: int
    tokens_done: int
    seconds: float
    resumed_from_rows: int


def reports_progress(progress) -> str:
    progress("esm2", FakeProgress(4, 8, 40, 2.0, 0))
    time.sleep(2.0)  # the step polls every 0.5 s
    return "done"


@pytest.mark.parametrize("address", ["127.0.0.1:{port}", "ray://127.0.0.1:{port}", "ray://10.255.255.1:10001"])
def test_an_unreachable_cluster_fails_within_the_timeout_in_one_line(address, log, caplog):
    address = address.format(port=free_port())
    gpus = RayGpuCluster(address=address, connect_timeout_s=2.0)
    started = time.monotonic()
    with pytest.raises(RayClusterUnreachable) as failed:
        gpus.run_on_gpu(raises, log=log, label="shard 0")
    assert time.monotonic() - started < 5
    message = str(failed.value)
    assert "\n" not in message and message.startswith(f"Ray cluster at {address} cannot be reached")
    assert "ray start --head" in message and "ray_address" in message
    with pytest.raises(RayClusterUnreachable):
        ray_gpu_count(address, connect_timeout_s=2.0)
    assert not ray.is_initialized()
    assert not [record.getMessage() for record in caplog.records if record.exc_info]  # no traceback logged either


def test_addresses_are_parsed_with_rays_default_ports():
    assert ray_execution.split_address("ray://head") == (True, "head", 10001)
    assert ray_execution.split_address("head") == (False, "head", 6379)
    assert ray_execution.split_address("ray://10.0.0.1:20001") == (True, "10.0.0.1", 20001)
    with pytest.raises(ValueError, match="expected ray://HOST:PORT"):
        ray_execution.split_address("ray://head:port")


# The whole graph with `executor: ray`: needs the GPU pool's Ray settings (`executor`, `ray_address`,
# `ray_device`), which the resources refactor adds; skipped until then.

def _gpu_pool_has_ray_settings() -> bool:
    from vnp_assets.resources import GpuPool

    return {"executor", "ray_address", "ray_device"} <= set(GpuPool.model_fields)


@pytest.mark.skipif(not _gpu_pool_has_ray_settings(), reason="GpuPool has no executor/ray_address/ray_device yet")
def test_a_sample_through_the_graph_on_ray_gives_the_local_merged_vectors_bit_for_bit(
        loopback_cluster, tiny_models_dir, tmp_path, monkeypatch):
    from dagster import AssetKey, instance_for_test, materialize

    from vnp_assets.assets import build_assets
    from vnp_assets.platform import resources_from_settings
    from vnp_assets.partitions import sample_shard_key
    from vnp_assets.samples import register_sample
    from vnp_core.store import read_merged

    flu = FLU
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the local device process: one CPU thread, as a Ray step's share
    assets = build_assets(num_shards=2)
    merged = {}
    for executor in ("local", "ray"):
        home = tmp_path / executor
        (home / "inbox").mkdir(parents=True)
        ray_settings = ({"executor": "ray", "ray_address": loopback_cluster.gcs_address, "ray_device": "cpu"}
                        if executor == "ray" else {})
        resources = resources_from_settings({"num_shards": 2, "lock_dir": str(tmp_path / "gpu-locks"),
                                             "tiny_models_dir": str(tiny_models_dir), **ray_settings}, home=home)
        with instance_for_test() as instance:
            sample, _ = register_sample(flu, "flu", resources["storage"], set())
            instance.add_dynamic_partitions("samples", [sample])
            run = dict(resources=resources, instance=instance)
            assert materialize(assets, selection=["sequence_index"], partition_key=sample, **run).success
            for shard in (0, 1):
                assert materialize(assets, selection=["esm2_embeddings", "dnabert_s_embeddings"],
                                   partition_key=sample_shard_key(sample, shard), **run).success
            assert materialize(assets, selection=["merged_embeddings"], partition_key=sample, **run).success
            shard_ran_on = instance.get_latest_materialization_event(AssetKey("esm2_embeddings")).asset_materialization
            assert shard_ran_on.metadata["device"].value.startswith("node " if executor == "ray" else "cpu")
            merged[executor] = read_merged(resources["storage"].layout(sample).merged)
    if ray.is_initialized():
        ray.shutdown()
    assert merged["ray"].ids == merged["local"].ids
    assert sorted(merged["ray"].vectors) == sorted(merged["local"].vectors) == ["dnabert_s", "esm2"]
    for model, vectors in merged["local"].vectors.items():
        np.testing.assert_array_equal(merged["ray"].vectors[model], vectors)


def test_vnp_run_on_ray_starts_each_steps_actor_ahead(loopback_cluster, tiny_models_dir, tmp_path):
    # The shard workers start their step's actor while the index is built: the step finds it ready.
    from dagster import DagsterInstance

    from vnp_assets.run_sample import run_sample

    flu = FLU
    home = tmp_path / "home"
    run = run_sample(flu, home=home, until="embeddings", num_shards=2, executor="ray", ray_device="cpu",
                     ray_address=loopback_cluster.gcs_address, lock_dir=str(tmp_path / "gpu-locks"),
                     tiny_models_dir=str(tiny_models_dir), console_log_level="WARNING")
    assert "embeddings (2 steps of 2 models)" in run.stage_seconds
    with DagsterInstance.from_config(str(home)) as instance:
        placed = [event.user_message for found in instance.get_runs() if found.job_name == "embed_shard"
                  for event in instance.all_logs(found.run_id) if ": on node " in (event.user_message or "")]
    assert len(placed) == 2 and all(line.endswith("; its actor was started ahead") for line in placed), placed


def test_vnp_run_on_ray_one_step_at_a_time_leaves_the_process_unconnected(loopback_cluster, tiny_models_dir, tmp_path):
    # One shard: the step runs in this process, on its actor started ahead. Ray would end a process left
    # connected 60 s after its cluster went, so the caller gets its process back as it was.
    from vnp_assets.ray_execution import _started_ahead
    from vnp_assets.run_sample import run_sample

    flu = FLU
    assert not ray.is_initialized()
    run = run_sample(flu, home=tmp_path / "home", until="embeddings", num_shards=1, executor="ray", ray_device="cpu",
                     ray_address=loopback_cluster.gcs_address, lock_dir=str(tmp_path / "gpu-locks"),
                     tiny_models_dir=str(tiny_models_dir), console_log_level="WARNING")
    assert "embeddings (1 steps of 2 models)" in run.stage_seconds
    assert not ray.is_initialized() and not _started_ahead


# The deployment configs, checked offline.

DEPLOY = Path(__file__).resolve().parents[1] / "vnp_assets" / "deploy"

STUBS = {
    # srun: its options, then the command, run here; `hostname --ip-address` answers the head's address.
    "srun": """echo "srun $*" >> "$CALLS"
while [[ $# -gt 0 && "$1" == -* ]]; do if [[ "$1" == -w ]]; then shift 2; else shift; fi; done
if [[ "$1" == hostname ]]; then echo 10.0.0.1; exit 0; fi
exec "$@"
""",
    "scontrol": 'printf "gpu-01\\ngpu-02\\n"\n',
    # `ray start --block`: stays until stopped, and says it was.
    "venv/bin/ray": """echo "ray $*" >> "$CALLS"
trap 'echo "ray stopped" >> "$CALLS"; exit 0' TERM
while true; do sleep 0.05; done
""",
    # python: records; the script's waits for the head, then for every node's GPUs, see the nodes start.
    "venv/bin/python": """echo "python $*" >> "$CALLS"
case "$*" in
    *check_reachable*) nodes=1 ;;
    *ray_gpu_count*) nodes=2 ;;
    *) exit 0 ;;
esac
for _ in $(seq 200); do
    (( $(grep -c '^ray start' "$CALLS") >= nodes )) && exit 0
    sleep 0.05
done
exit 1
""",
    "venv/bin/vnp": 'echo "vnp $*" >> "$CALLS"\n',
    # The daemon exits once the web server is up: the script then stops the web server and ends.
    "venv/bin/dagster-daemon": """echo "dagster-daemon $*" >> "$CALLS"
for _ in $(seq 200); do grep -q '^dagster-webserver' "$CALLS" && exit 0; sleep 0.05; done
""",
    "venv/bin/dagster-webserver": """echo "dagster-webserver $*" >> "$CALLS"
trap 'exit 0' TERM
while true; do sleep 0.05; done
""",
}


def test_the_slurm_script_is_valid_bash_and_never_stops_other_peoples_ray():
    script = DEPLOY / "slurm_ray.sbatch"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True).returncode == 0
    text = script.read_text()
    directives = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert all(re.fullmatch(r"#SBATCH --[a-z-]+=\S+", line) for line in directives), directives
    assert {line.split("=")[0] for line in directives} >= {
        "#SBATCH --nodes", "#SBATCH --gpus-per-node", "#SBATCH --cpus-per-task", "#SBATCH --time"}
    commands = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in commands if re.search(r"\bray\b.*\bstop\b", line)]  # it stops its own nodes only


@pytest.mark.parametrize("mode", ["run", "daemon"])
def test_the_slurm_script_starts_the_head_then_the_workers_then_vnp_against_the_gcs_address(mode, tmp_path):
    for name, body in STUBS.items():
        stub = tmp_path / "stubs" / name
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#!/usr/bin/env bash\n" + body)
        stub.chmod(0o755)
    calls = tmp_path / "calls"
    env = {**os.environ, "PATH": f"{tmp_path / 'stubs'}:{os.environ['PATH']}", "CALLS": str(calls),
           "SLURM_JOB_NODELIST": "gpu-[01-02]", "SLURM_JOB_ID": "42", "SLURM_CPUS_PER_TASK": "8",
           "SLURM_GPUS_PER_NODE": "h200:2", "VNP_VENV": str(tmp_path / "stubs" / "venv"),
           "VNP_HOME": str(tmp_path / "home"), "VNP_MODE": mode, "VNP_INPUT": "/shared/sample.fasta"}
    done = subprocess.run(["bash", str(DEPLOY / "slurm_ray.sbatch")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    lines = calls.read_text().splitlines()
    ray_lines = [line for line in lines if line.startswith("ray start")]
    head, worker = ray_lines
    assert head.startswith("ray start --head --block --node-ip-address=10.0.0.1 --port=6379 ")
    assert "--num-cpus=4 --num-gpus=2" in head  # 8 cores, 4 of them kept for Dagster's CPU steps
    assert worker == "ray start --block --address=10.0.0.1:6379 --num-cpus=8 --num-gpus=2"
    assert any("srun" in line and "-w gpu-02" in line and "--address=10.0.0.1:6379" in line for line in lines)
    assert lines.count("ray stopped") == 2  # both nodes' `ray start --block` stopped at the end
    assert any("ray_gpu_count('10.0.0.1:6379') >= 4" in line for line in lines)
    settings = (tmp_path / "home" / "vnp_settings_slurm_42.yaml").read_text()
    assert "executor: ray" in settings and 'ray_address: "10.0.0.1:6379"' in settings
    if mode == "run":
        (run,) = [line for line in lines if line.startswith("vnp ")]
        assert run == (f"vnp run /shared/sample.fasta --home {tmp_path / 'home'} --executor ray "
                       f"--ray-address 10.0.0.1:6379")
        assert lines.index(worker) < lines.index(run)
    else:
        assert f"python -m vnp_assets.instance {tmp_path / 'home'} --gpu-slots 4" in lines
        assert any(line.startswith("dagster-daemon run -w ") for line in lines)
        assert any(line.startswith("dagster-webserver -h 0.0.0.0 -p 3000 -w ") for line in lines)


# What the RayCluster CRD (ray.io/v1, KubeRay ray-operator/config/crd/bases/ray.io_rayclusters.yaml)
# requires and allows at the levels the manifest sets.
CRD_SPEC_REQUIRED = {"headGroupSpec"}
CRD_SPEC_FIELDS = {"authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
                   "headGroupSpec", "headServiceAnnotations", "managedBy", "rayVersion", "suspend", "workerGroupSpecs"}
CRD_HEAD_REQUIRED = {"template"}
CRD_HEAD_FIELDS = {"enableIngress", "headService", "rayStartParams", "serviceType", "template"}
CRD_WORKER_REQUIRED = {"groupName", "maxReplicas", "minReplicas", "template"}
CRD_WORKER_FIELDS = {"groupName", "idleTimeoutSeconds", "maxReplicas", "minReplicas", "numOfHosts", "rayStartParams",
                     "replicas", "scaleStrategy", "suspend", "template"}


def _containers(group: dict) -> list[dict]:
    containers = group["template"]["spec"]["containers"]
    assert containers and all(container.get("name") and container.get("image") for container in containers)
    return containers


def _mounts(group: dict) -> dict[str, str]:
    """Mount path -> claim name of the group's persistent volumes."""
    claims = {volume["name"]: volume["persistentVolumeClaim"]["claimName"]
              for volume in group["template"]["spec"].get("volumes", []) if "persistentVolumeClaim" in volume}
    return {mount["mountPath"]: claims[mount["name"]] for container in _containers(group)
            for mount in container.get("volumeMounts", []) if mount["name"] in claims}


def test_the_kuberay_manifest_is_a_raycluster_with_gpu_worker_groups_and_shared_storage():
    import yaml

    text = (DEPLOY / "kuberay_cluster.yaml").read_text()
    (cluster,) = list(yaml.safe_load_all(text))
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    name = cluster["metadata"]["name"]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63
    spec = cluster["spec"]
    assert CRD_SPEC_REQUIRED <= set(spec) <= CRD_SPEC_FIELDS
    assert spec["rayVersion"] == ray.__version__  # the cluster's Ray is the one vnp pins
    head, workers = spec["headGroupSpec"], spec["workerGroupSpecs"]
    assert CRD_HEAD_REQUIRED <= set(head) <= CRD_HEAD_FIELDS
    groups = [head, *workers]
    for group in groups:  # rayStartParams: a map of strings
        assert all(isinstance(key, str) and isinstance(value, str) for key, value in group.get("rayStartParams", {}).items())

    (head_container,) = _containers(head)
    assert "nvidia.com/gpu" not in head_container["resources"].get("limits", {})
    assert {port["containerPort"] for port in head_container["ports"]} >= {6379, 10001}
    assert f"ray://{name}-head-svc." in text  # the address Dagster is told to use is this cluster's head service

    assert workers
    for group in workers:
        assert CRD_WORKER_REQUIRED <= set(group) <= CRD_WORKER_FIELDS
        assert all(isinstance(group[key], int) for key in ("minReplicas", "maxReplicas", "replicas"))
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        (container,) = _containers(group)
        resources = container["resources"]
        gpus = int(resources["limits"]["nvidia.com/gpu"])
        assert gpus >= 1 and int(resources["requests"].get("nvidia.com/gpu", gpus)) == gpus  # extended: requests == limits
        assert container["image"] == head_container["image"]  # one image: the same vnp and Ray everywhere
        cpus = int(group.get("rayStartParams", {}).get("num-cpus", resources["limits"]["cpu"]))
        assert cpus >= gpus  # at least one CPU per GPU step
    shared = [_mounts(group) for group in groups]
    assert shared[0] and all(mounts == shared[0] for mounts in shared)  # one claim, one path, in every pod
