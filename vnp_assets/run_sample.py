"""`vnp run`: one sample through the asset graph on a local, persistent Dagster instance.

No daemon and no web server: the steps are materialized here, in graph order, and recorded in the
instance at `home` (SQLite), so `DAGSTER_HOME=<home> dagster dev` shows their runs, metadata and
checks afterwards. The embedding steps (one per shard, both models) run side by side, one worker
process each, as many at once as there are usable GPUs; each step still takes its own GPU lease.
Processes rather than threads: Dagster's in-process execution is not thread-safe. Those processes
start while the index is built, so their imports, and those of each one's spare device process
(`start_spare_device_process`), are paid before the GPUs wait. Where one step runs at a time (one
GPU, a CPU-only host, one shard), they run here instead: a worker's start (3.5 s on a small host)
was most of a small sample's embedding stage. Its device process is then started before the home
is prepared, and a large sample gets one worker for its merge (`MERGE_BESIDE_MIN_ROWS`).

Kills: the worker processes and every device process die with `vnp run` (`exit_with_parent`),
however it is stopped. Each run is tagged with the host, pid and start time of the process that
executes it (`process_tags`); a later `vnp run` on the home finds the runs whose process is gone,
still STARTED in the instance, marks them failed and frees their `gpu` pool slots
(`reclaim_dead_runs`), so it never waits for a slot a dead run holds. GPU leases are flocks, which
the kernel drops with their holder. Checkpoints make the rerun resume where the killed one stopped.
Two `vnp run` of one sample at once: the second refuses at once (`sample_lock`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import multiprocessing
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import cache, partial
from pathlib import Path

import polars as pl
from dagster import AssetKey, AssetRecordsFilter, DagsterInstance, DagsterRunStatus, Definitions
from dagster._core.errors import DagsterAssetCheckFailedError  # not exported at the top level in 1.13

from vnp_assets.instance import prepare_home
from vnp_assets.platform import RESOURCES, build_definitions, resources_from_settings
from vnp_assets.run_liveness import process_tags, reclaim_dead_runs
from vnp_assets.partitions import sample_shard_key
from vnp_assets.resources import GpuPool, SampleStorage
from vnp_assets.samples import clean_staging, register_sample, sample_name
from vnp_core.gpu import exit_with_parent, start_spare_device_process
from vnp_core.models import MODELS

log = logging.getLogger(__name__)

# Step progress and warnings on the terminal; Dagster's DEBUG events stay in the instance's event log.
# What `vnp run` materializes, in order; `until` stops after one of them ("embeddings": every shard).
STAGES = ("sequence_index", "embeddings", "merged_embeddings", "fp16_validation_report", "virnucpro_predictions")
def console_at(level: str) -> dict:
    """Run config for the console logger: INFO shows each step's progress (and a failure's stack trace)."""
    return {"loggers": {"console": {"config": {"log_level": level}}}}


@dataclass
class SampleRun:
    """What `vnp run` did: the sample, its stage wall times and where its outputs are."""

    sample: str
    input: Path
    shards: int
    tiny_models: list[str]
    stage_seconds: dict[str, float] = field(default_factory=dict)
    up_to_date: list[str] = field(default_factory=list)
    outputs: dict[str, Path] = field(default_factory=dict)

    def summary(self) -> str:
        from vnp_core.tiny_models import TINY_MODELS_NOTICE

        lines = [f"sample {self.sample} ({self.input}), {self.shards} shard(s) per model"]
        if self.tiny_models:
            lines.append(f"WARNING: {', '.join(self.tiny_models)}: {TINY_MODELS_NOTICE}")
        lines += [f"{stage}: up to date (same models and settings), skipped" for stage in self.up_to_date]
        lines += [f"{stage}: {seconds:.1f} s" for stage, seconds in self.stage_seconds.items()]
        lines += [f"{label}: {path}" for label, path in self.outputs.items()]
        return "\n".join(lines)


def run_sample(input: Path, *, home: Path = Path("vnp_home"), until: str = "virnucpro_predictions",
               console_log_level: str = "INFO", **settings) -> SampleRun:
    """Materializes `input` as one sample up to the stage `until` (one of `STAGES`), through the named jobs
    (`index_sample`, `embed_shard`, `finish_sample`). `settings`: the flat settings of
    `platform.resources_from_settings` (chunk_length, num_shards, esm2_model, devices, executor...)."""
    if until not in STAGES:
        raise ValueError(f"until={until!r}: expected one of {', '.join(STAGES)}")
    input, home = Path(input), Path(home).resolve()
    name = sample_name(input.name)
    if name is None:
        raise ValueError(f"{input}: a FASTA file's name must end in .fa, .fasta or .fna (optionally .gz)")
    if not input.is_file():
        raise FileNotFoundError(f"{input}: no such file")
    resources = resources_from_settings({key: value for key, value in settings.items() if value is not None}, home)
    with sample_lock(resources["storage"], name), ExitStack() as ray_connection:
        if resources["gpus"].executor == "ray":  # a step run here connects this process: not past the run
            from vnp_assets.ray_execution import ray_left_as_found

            ray_connection.enter_context(ray_left_as_found(resources["gpus"].ray_cluster))
        return _run_sample_locked(input, name, home, until, resources, console_at(console_log_level))


def _run_sample_locked(input: Path, name: str, home: Path, until: str, resources: dict, console: dict) -> SampleRun:
    storage, processing, models, gpus = (resources[key] for key in ("storage", "processing", "models", "gpus"))
    defs = build_definitions(resources)
    slots = max(1, gpus.slot_count)
    if until != "sequence_index" and min(slots, processing.num_shards) == 1 and not storage.layout(name).index.exists():
        # A new sample, embedded one step at a time here: the step's process imports while the home is prepared.
        start_next_gpu_process(gpus, embedding_imports(gpus))
    # The same home serves `dagster dev`, whose runs queue their GPU steps on the `gpu` pool sized here.
    instance = prepare_home(home, gpu_slots=slots)
    reclaim_dead_runs(instance)
    if gpus.executor == "ray":  # the cluster's GPUs come and go: its size on every run
        instance.event_log_storage.set_concurrency_slots("gpu", slots)
    clean_staging(storage)
    sample, _ = register_sample(input, name, storage, set(instance.get_dynamic_partitions("samples")))
    instance.add_dynamic_partitions("samples", [sample])

    run = SampleRun(sample, input, processing.num_shards, models.tiny_models_used())
    fields = resource_fields(resources)
    layout = storage.layout(sample)
    fresh = partial(up_to_date, instance, defs.resolve_asset_graph())

    def stage(label: str, work: Callable[..., object], *args) -> None:
        start = time.perf_counter()
        work(*args)
        run.stage_seconds[label] = time.perf_counter() - start

    def materialize_sample(asset: str) -> None:
        job = "index_sample" if asset == "sequence_index" else "finish_sample"
        try:
            defs.resolve_job_def(job).execute_in_process(partition_key=sample, asset_selection=[AssetKey(asset)],
                                                         instance=instance, run_config=console, tags=vnp_run_tags())
        except DagsterAssetCheckFailedError as error:
            if asset != "fp16_validation_report":
                raise
            from vnp_core.validate import REPORT_FILE, what_failed

            report = layout.report_dir / REPORT_FILE
            raise ValueError(f"{asset}: the embeddings failed their comparison with the fp32 reference "
                             f"[{what_failed(json.loads(report.read_text()))}], so no calls were made: see {report}") from error

    # A stage whose outputs are up to date is skipped (a rerun with another classifier embeds nothing and
    # loads no embedder); once one stage runs, every later one runs too.
    rerun = not fresh("sequence_index", sample, layout.index)
    shards = [] if until == "sequence_index" else [shard for shard in range(processing.num_shards) if rerun or not all(
        fresh(f"{model}_embeddings", sample_shard_key(sample, shard), layout.embeddings(model, shard)) for model in MODELS)]
    worker_count = min(slots, len(shards))
    local = gpus.executor == "local"
    from vnp_core.validate import REFERENCE_MODULES  # what the validation's device process imports ahead

    later = list(STAGES[STAGES.index("embeddings") + 1 : STAGES.index(until) + 1])
    made = {"merged_embeddings": layout.merged, "fp16_validation_report": layout.report_dir,
            "virnucpro_predictions": layout.predictions_dir}
    later_up_to_date = []
    while not shards and later and fresh(later[0], sample, made[later[0]]):  # after embedding steps, all run
        later_up_to_date.append(later.pop(0))
    # Steps side by side run in worker processes; one at a time, here (a worker's start would be waited for).
    side_by_side = worker_count > 1
    if shards and not side_by_side:
        start_next_gpu_process(gpus, embedding_imports(gpus))  # its imports meanwhile the index is built
    with ExitStack() as workers_open:
        workers = workers_open.enter_context(shard_workers(gpus, worker_count, home)) if side_by_side else None
        if rerun:
            stage("sequence_index", materialize_sample, "sequence_index")
        else:
            run.up_to_date.append("sequence_index")
        merge_beside = later[:2] == ["merged_embeddings", "fp16_validation_report"]
        if shards:
            embedding_stage = f"embeddings ({len(shards)} steps of {len(MODELS)} models)"
            if side_by_side:
                if local and "fp16_validation_report" in later:
                    start_spare_device_process(REFERENCE_MODULES)  # the validation's, ready when the embeddings are
                stage(embedding_stage, embed_all_shards, workers, worker_count, home, fields, sample, shards, console)
            else:
                if merge_beside and pl.scan_parquet(layout.index).select(pl.len()).collect().item() >= MERGE_BESIDE_MIN_ROWS:
                    workers = workers_open.enter_context(merge_worker(home))  # ready by the embeddings' end
                # On a GPU host the validation's device process imports while the last shard computes on
                # its GPU; on a CPU-only host those imports would slow the embedding beside them.
                overlap = local and bool(gpus.usable_devices) and "fp16_validation_report" in later
                stage(embedding_stage, embed_shards_here, defs, instance, gpus, sample, shards, console,
                      REFERENCE_MODULES if overlap else None)
        elif until != "sequence_index":
            run.up_to_date.append("embeddings")
        run.up_to_date += later_up_to_date
        if workers is not None and merge_beside:
            # Both read the shards: the merge (CPU) runs in a worker while the validation (a GPU step) runs here.
            merging = workers.submit(materialize_sample_step, str(home), fields, sample, "merged_embeddings", console)
            if not local:  # not earlier: an actor started ahead holds its GPU from the start
                start_ray_actor_ahead(gpus, REFERENCE_MODULES)
            elif not side_by_side:
                start_spare_device_process(REFERENCE_MODULES)  # already running on a GPU host
            stage("fp16_validation_report", materialize_sample, "fp16_validation_report")
            waiting = time.perf_counter()
            if failure := merging.result():
                raise RuntimeError(f"the merge failed (the embedding shards are kept):\n{failure}")
            run.stage_seconds["merged_embeddings (beside the validation; time after it)"] = time.perf_counter() - waiting
            later = later[2:]
    for asset in later:
        if asset == "merged_embeddings" and "fp16_validation_report" in later:
            # The validation's device process (or Ray actor), its imports done during the merge.
            (start_spare_device_process if local else partial(start_ray_actor_ahead, gpus))(REFERENCE_MODULES)
        stage(asset, materialize_sample, asset)

    outputs = {"prep files": layout.prep_dir, "index": layout.index, "embedding shards": layout.embeddings_dir,
               "merged embeddings": layout.merged, "validation report": layout.report_dir,
               "predictions": layout.predictions_dir}
    run.outputs = {label: path for label, path in outputs.items() if path.exists()}  # those the stages run made
    return run


def vnp_run_tags() -> dict[str, str]:
    """The tags of `vnp run`'s runs: the process that executes them (`process_tags`), and no retry by a
    daemon that serves the same home (it would rerun them with its own settings; `vnp run` resumes)."""
    return {**process_tags(), "dagster/max_retries": "0"}


def up_to_date(instance: DagsterInstance, asset_graph, asset: str, partition: str, *outputs: Path) -> bool:
    """Whether `asset`'s `partition` needs no rerun: its last materialization has today's code version
    (`vnp_assets.versions`: the models, precision and prep settings it was made with), the run that made
    it succeeded (so its blocking checks passed), and its `outputs` are still there."""
    key = AssetKey(asset)
    records = instance.fetch_materializations(AssetRecordsFilter(asset_key=key, asset_partitions=[partition]),
                                              limit=1).records
    if not records or not all(path.exists() for path in outputs):
        return False
    made_with = records[0].asset_materialization.tags.get("dagster/code_version")
    made_by = instance.get_run_by_id(records[0].run_id)
    return (made_with == asset_graph.get(key).code_version and made_by is not None
            and made_by.status == DagsterRunStatus.SUCCESS)


def resource_fields(resources: dict) -> dict[str, dict]:
    """The resources as plain fields, to rebuild them in a worker process (`materialize_shard`)."""
    return {key: resource.model_dump() for key, resource in resources.items()}


def embedding_imports(gpus: GpuPool) -> list[str]:
    """What an embedding step's device process (or Ray actor) imports ahead of its step."""
    from vnp_core.engine import COMPILER_MODULES, EMBED_SHARDS_MODULES

    compiles = gpus.ray_device == "cuda" if gpus.executor == "ray" else bool(gpus.usable_devices)
    return [*EMBED_SHARDS_MODULES, *(COMPILER_MODULES if compiles else ())]


def start_next_gpu_process(gpus: GpuPool, imports: Sequence[str]) -> None:
    """Start what this process's next GPU step runs in, ahead of it: a spare device process on this
    host, or the step's actor on the Ray cluster."""
    if gpus.executor == "ray":
        start_ray_actor_ahead(gpus, imports)
    else:
        start_spare_device_process(imports)


# From about this many index rows the merge (34 us a row: 22 s for the 639,204 of a 450k-read sample)
# takes longer than a worker process's start (3-5 s): a sample embedded here gets one for its merge.
MERGE_BESIDE_MIN_ROWS = 100_000


@contextmanager
def merge_worker(home: Path) -> Iterator[ProcessPoolExecutor]:
    """One process for the merge, started now and made ready for it (no device process: it needs none)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_prepare_merge_worker,
                             initargs=(str(home), os.getpid())) as pool:
        pool.submit(int)
        yield pool


def _prepare_merge_worker(home: str, parent_pid: int) -> None:
    exit_with_parent(parent_pid)
    import vnp_assets.assets  # noqa: F401

    worker_instance(home)


@contextmanager
def shard_workers(gpus: GpuPool, worker_count: int, home: Path) -> Iterator[ProcessPoolExecutor]:
    """`worker_count` processes for the embedding steps (one per usable GPU), started now and made ready for them."""
    spawn = multiprocessing.get_context("spawn")
    # Every worker ready before any takes a shard: a worker that is ready early would otherwise take a
    # second shard while a slower one still imports, and that GPU would wait (seen on a loaded 2-core host).
    ready = spawn.Barrier(worker_count)
    with ProcessPoolExecutor(worker_count, mp_context=spawn, initializer=_prepare_step_worker,
                             initargs=(gpus.model_dump(), str(home), os.getpid(), embedding_imports(gpus), ready)) as pool:
        for _ in range(worker_count):
            pool.submit(int)  # a pool starts its processes on demand: ask for all of them now
        yield pool


# Starts what this worker's next GPU step will run in, ahead of it: a spare device process on this
# host, or the step's actor on the Ray cluster. Set by `_prepare_step_worker`.
_start_spare: Callable[[], None] | None = None


def _prepare_step_worker(gpu_fields: dict, home: str, parent_pid: int, imports: list[str], ready) -> None:
    """What every step of the worker would otherwise do first, done while the index is built: start
    the CUDA driver (counting the GPUs does; it creates no context on any GPU),
    start what its first step runs in with `imports` done (for an embedding step on a GPU,
    torch.compile's machinery: 3.4-4.5 s), import Dagster and the asset code, open the instance.
    First of all, the worker dies with `vnp run` (`parent_pid`): a killed run leaves no worker behind
    (a pool's idle worker would otherwise wait for work forever), nor the Ray actor it started.
    Last, it waits for the other workers to be as ready (`ready`, a barrier), never longer than
    `WORKERS_READY_TIMEOUT_S`: a worker that died starting breaks it rather than hang the rest."""
    exit_with_parent(parent_pid)
    global _start_spare
    gpus = GpuPool(**gpu_fields)
    if gpus.executor == "local":
        from vnp_core.gpu import discover_devices

        discover_devices(gpus.devices)  # the step's lease counts the GPUs again: the driver is up by then
    _start_spare = partial(start_next_gpu_process, gpus, imports)
    _start_spare()
    import vnp_assets.assets  # noqa: F401

    worker_instance(home)
    try:
        ready.wait(timeout=WORKERS_READY_TIMEOUT_S)
    except threading.BrokenBarrierError:  # a slow or failed worker: the others go on
        pass


WORKERS_READY_TIMEOUT_S = 120


def start_ray_actor_ahead(gpus: GpuPool, imports: Sequence[str]) -> None:
    """The next Ray GPU step's actor, started now (`RayGpuCluster.start_ahead`). A cluster that does not
    answer is the step's to report, in its own words: here it is only logged."""
    try:
        gpus.ray_cluster.start_ahead(imports, log)
    except Exception as error:  # noqa: BLE001 - the step connects again and fails with one line
        log.warning("could not start the next GPU step's Ray actor ahead: %s", error)


@cache
def worker_instance(home: str) -> DagsterInstance:
    """The instance at `home`, opened once per process: opening one imports and connects its storage (1.2 s in a profile on a 2-core machine)."""
    return DagsterInstance.from_config(home)


def embed_all_shards(workers: ProcessPoolExecutor, worker_count: int, home: Path, resource_fields: dict[str, dict],
                     sample: str, shards: Sequence[int], console: dict) -> None:
    # The workers take the shards in order: a shard more than a worker count from the end has another after it.
    outcomes = [workers.submit(materialize_shard, str(home), resource_fields, sample, shard, console=console,
                               spare_after=position < len(shards) - worker_count)
                for position, shard in enumerate(shards)]
    _raise_failures([outcome.result() for outcome in outcomes])


def embed_shards_here(defs: Definitions, instance: DagsterInstance, gpus: GpuPool, sample: str, shards: Sequence[int],
                      console: dict, then: Sequence[str] | None = None) -> None:
    """The embedding steps one after another in this process, where one GPU (or the CPU) takes one at a
    time: no worker process to start. Each step's device process (or actor) was started ahead; the
    next local GPU step's, importing `then`, starts when the last one's takes its spare."""
    failures = []
    for position, shard in enumerate(shards):
        if then is not None and position == len(shards) - 1:
            start_spare_device_process(then, once_taken=True)
        failures.append(embed_shard(defs, instance, sample, shard, MODELS, console))
        if position < len(shards) - 1:
            start_next_gpu_process(gpus, embedding_imports(gpus))
    _raise_failures(failures)


def _raise_failures(failures: Sequence[str | None]) -> None:
    if failures := [failure for failure in failures if failure is not None]:
        raise RuntimeError("embedding steps failed (rerun `vnp run`: finished shards are kept):\n" + "\n".join(failures))


def materialize_shard(home: str, resource_fields: dict[str, dict], sample: str, shard: int,
                      models: Sequence[str] = tuple(MODELS), *, console: dict | None = None,
                      spare_after: bool = False) -> str | None:
    """In a worker process: one shard's `embed_shard` run, recorded in the instance at `home`. Its error text if it failed.

    `spare_after`: start a spare device process once the step is done, for the worker's next step.
    """
    failure = embed_shard(worker_definitions(json.dumps(resource_fields, sort_keys=True)), worker_instance(home),
                          sample, shard, models, console or console_at("INFO"))
    if spare_after and _start_spare is not None:
        _start_spare()
    return failure


def embed_shard(defs: Definitions, instance: DagsterInstance, sample: str, shard: int, models: Sequence[str],
                console: dict) -> str | None:
    """One shard's `embed_shard` run in this process; its error text, naming the shard, if it failed."""
    failure = execute_assets(defs, instance, "embed_shard", sample_shard_key(sample, shard),
                             [f"{model}_embeddings" for model in models], console)
    return None if failure is None else f"shard {shard} of {sample}: {failure}"


def materialize_sample_step(home: str, resource_fields: dict[str, dict], sample: str, asset: str,
                            console: dict) -> str | None:
    """In a worker process: `asset` of `sample` (a `finish_sample` step). Its error text if it failed."""
    return execute_assets(worker_definitions(json.dumps(resource_fields, sort_keys=True)), worker_instance(home),
                          "finish_sample", sample, [asset], console)


def execute_assets(defs: Definitions, instance: DagsterInstance, job: str, partition_key: str, assets: Sequence[str],
                   console: dict) -> str | None:
    """`assets` of one partition through `job`, in this process, recorded in `instance`; the failed
    steps' error text, or None."""
    result = defs.resolve_job_def(job).execute_in_process(
        partition_key=partition_key, asset_selection=[AssetKey(asset) for asset in assets], instance=instance,
        run_config=console, raise_on_error=False, tags=vnp_run_tags())
    if result.success:
        return None
    if any(event.step_failure_data.error.cls_name == "DagsterExecutionInterruptedError"
           for event in result.get_step_failure_events()):
        raise KeyboardInterrupt  # a stop asked of this process (Ctrl-C, `kill`), not a step's failure
    return "\n".join([event.step_failure_data.error.to_string() for event in result.get_step_failure_events()]
                     or [f"the {job} run of {partition_key} failed"])


@cache
def worker_definitions(fields_json: str) -> Definitions:
    """The definitions of `materialize_shard`'s resource fields (as JSON), built once per worker process."""
    return build_definitions({key: RESOURCES[key](**fields) for key, fields in json.loads(fields_json).items()})


class SampleBusyError(ValueError):
    """Another `vnp run` is processing the same sample."""


@contextmanager
def sample_lock(storage: SampleStorage, name: str) -> Iterator[None]:
    """Held while one `vnp run` processes sample `name` (an flock, dropped by the kernel if the run is killed);
    `SampleBusyError` at once if another run holds it."""
    locks = storage.samples_dir / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    path = locks / f"{name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 20, 0).decode(errors="replace").strip() or "unknown"
            raise SampleBusyError(f"sample {name} is being processed by another vnp run (pid {holder}): "
                                  "wait for it or stop it") from None
        os.pwrite(fd, f"{os.getpid():<20}".encode(), 0)  # one fixed-width write: never read half done
        yield
    finally:
        os.close(fd)  # drops the flock
