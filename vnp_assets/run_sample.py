"""`vnp run`: one sample through the asset graph on a local, persistent Dagster instance.

No daemon and no web server: the steps are materialized here, in graph order, and recorded in the
instance at `home` (SQLite), so `DAGSTER_HOME=<home> dagster dev` shows their runs, metadata and
checks afterwards. The embedding steps (one per shard, both models) run side by side, one process
each, as many at once as there are usable GPUs (one on a CPU-only host); each step still takes its
own GPU lease. Processes rather than threads: Dagster's in-process execution is not thread-safe.
Those processes start while the index is built, so their imports, and those of each one's spare
device process (`start_spare_device_process`), are paid before the GPUs wait.
"""

from __future__ import annotations

import multiprocessing
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from dagster import DagsterInstance, materialize

from vnp_assets.assets import build_assets
from vnp_assets.assets.embeddings import MODELS
from vnp_assets.partitions import sample_shard_key
from vnp_assets.resources import VnpSettings
from vnp_assets.samples import register_sample, sample_name
from vnp_core.gpu import start_spare_device_process

INSTANCE_TEMPLATE = Path(__file__).resolve().parents[1] / "dagster.yaml"
# Step progress and warnings on the terminal; Dagster's DEBUG events stay in the instance's event log.
# What `vnp run` materializes, in order; `until` stops after one of them ("embeddings": every shard).
STAGES = ("sequence_index", "embeddings", "merged_embeddings", "fp16_validation_report", "virnucpro_predictions")
CONSOLE_AT_INFO = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}


@dataclass
class SampleRun:
    """What `vnp run` did: the sample, its stage wall times and where its outputs are."""

    sample: str
    input: Path
    shards: int
    tiny_models: list[str]
    stage_seconds: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, Path] = field(default_factory=dict)

    def summary(self) -> str:
        from vnp_core.tiny_models import TINY_MODELS_NOTICE

        lines = [f"sample {self.sample} ({self.input}), {self.shards} shard(s) per model"]
        if self.tiny_models:
            lines.append(f"WARNING: {', '.join(self.tiny_models)}: {TINY_MODELS_NOTICE}")
        lines += [f"{stage}: {seconds:.1f} s" for stage, seconds in self.stage_seconds.items()]
        lines += [f"{label}: {path}" for label, path in self.outputs.items()]
        return "\n".join(lines)


def run_sample(input: Path, *, chunk_length: int = 500, shards: int | None = None, home: Path = Path("vnp_home"),
               esm2_model: Path | None = None, dnabert_s_model: Path | None = None, classifier: Path | None = None,
               trust_classifier_pickle: bool = False, dtype: str | None = None,
               devices: Sequence[int] | None = None, until: str = "virnucpro_predictions",
               compile_min_tokens: int | None = None) -> SampleRun:
    """Materializes `input` as one sample up to the stage `until` (one of `STAGES`), on `devices` (default:
    every GPU, or the CPU)."""
    if until not in STAGES:
        raise ValueError(f"until={until!r}: expected one of {', '.join(STAGES)}")
    input, home = Path(input), Path(home).resolve()
    name = sample_name(input.name)
    if name is None:
        raise ValueError(f"{input}: a FASTA file's name must end in .fa, .fasta or .fna (optionally .gz)")
    if not input.is_file():
        raise FileNotFoundError(f"{input}: no such file")
    instance = local_instance(home)
    settings = VnpSettings(
        storage_root=str(home / "storage"), inbox_dir=str(home / "inbox"), chunk_length=chunk_length, num_shards=shards,
        esm2_model=_optional_str(esm2_model), dnabert_s_model=_optional_str(dnabert_s_model),
        classifier=_optional_str(classifier), trust_classifier_pickle=trust_classifier_pickle, dtype=dtype,
        devices=None if devices is None else list(devices), compile_min_tokens=compile_min_tokens,
    ).with_fixed_shard_count()
    if "gpu" not in instance.event_log_storage.get_concurrency_keys():
        # Sized once: the same home serves `dagster dev`, whose runs queue their GPU steps on this pool.
        instance.event_log_storage.set_concurrency_slots("gpu", max(1, len(settings.usable_devices())))
    sample, _ = register_sample(input, name, settings, set(instance.get_dynamic_partitions("samples")))
    instance.add_dynamic_partitions("samples", [sample])

    run = SampleRun(sample, input, settings.num_shards, settings.tiny_models_used())
    assets = build_assets(settings.num_shards)

    def stage(label: str, work: Callable[..., object], *args) -> None:
        start = time.perf_counter()
        work(*args)
        run.stage_seconds[label] = time.perf_counter() - start

    def materialize_sample(asset: str) -> None:
        materialize(assets, selection=[asset], partition_key=sample, resources={"vnp": settings}, instance=instance,
                    run_config=CONSOLE_AT_INFO)

    with shard_workers(settings, home) as workers:
        stage("sequence_index", materialize_sample, "sequence_index")
        if until != "sequence_index":
            stage(f"embeddings ({settings.num_shards} steps of {len(MODELS)} models)", embed_all_shards, workers, home,
                  settings, sample)
    if STAGES.index(until) >= STAGES.index("fp16_validation_report"):
        from vnp_core.validate import REFERENCE_MODULES

        # The validation's device process, its imports done during the merge.
        start_spare_device_process(REFERENCE_MODULES)
    for asset in STAGES[STAGES.index("embeddings") + 1 : STAGES.index(until) + 1]:
        stage(asset, materialize_sample, asset)

    layout = settings.sample_layout(sample)
    outputs = {"prep files": layout.prep_dir, "index": layout.index, "embedding shards": layout.embeddings_dir,
               "merged embeddings": layout.merged, "validation report": layout.report_dir,
               "predictions": layout.predictions_dir}
    run.outputs = {label: path for label, path in outputs.items() if path.exists()}  # those the stages run made
    return run


def local_instance(home: Path) -> DagsterInstance:
    """The persistent instance in `home`, configured from the project's dagster.yaml on first use."""
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        shutil.copyfile(INSTANCE_TEMPLATE, home / "dagster.yaml")
    return DagsterInstance.from_config(str(home))


@contextmanager
def shard_workers(settings: VnpSettings, home: Path) -> Iterator[ProcessPoolExecutor]:
    """One worker process per usable GPU (one without GPUs), started now and made ready for its steps."""
    with ProcessPoolExecutor(workers := shard_worker_count(settings), mp_context=multiprocessing.get_context("spawn"),
                             initializer=_prepare_step_worker, initargs=(settings.devices, str(home))) as pool:
        for _ in range(workers):
            pool.submit(int)  # a pool starts its processes on demand: ask for all of them now
        yield pool


def shard_worker_count(settings: VnpSettings) -> int:
    return max(1, len(settings.usable_devices()))


# What this worker's spare device processes import: the engine and, on a GPU host, torch.compile's
# machinery (3.4-4.5 s more). Set by `_prepare_step_worker`.
_spare_imports: list[str] = []


def _prepare_step_worker(devices: list[int] | None, home: str) -> None:
    """What every step of the worker would otherwise do first, done while the index is built: start
    the CUDA driver (counting the GPUs does; it creates no context on any GPU), start the spare
    device process of its first step, import Dagster and the asset code, open the instance."""
    from vnp_core.gpu import discover_devices

    gpus = discover_devices(devices)
    from vnp_core.engine import COMPILER_MODULES, EMBED_SHARDS_MODULES

    global _spare_imports
    _spare_imports = [*EMBED_SHARDS_MODULES, *(COMPILER_MODULES if gpus else ())]
    start_spare_device_process(_spare_imports)
    import vnp_assets.assets  # noqa: F401

    worker_instance(home)


@cache
def worker_instance(home: str) -> DagsterInstance:
    """The instance at `home`, opened once per process: opening one imports and connects its storage (1.2 s in a profile on a 2-core machine)."""
    return DagsterInstance.from_config(home)


def embed_all_shards(workers: ProcessPoolExecutor, home: Path, settings: VnpSettings, sample: str) -> None:
    # The workers take the shards in order: a shard more than a worker count from the end has another after it.
    step_to_come = settings.num_shards - shard_worker_count(settings)
    outcomes = [workers.submit(materialize_shard, str(home), settings.model_dump(), sample, shard,
                               spare_after=shard < step_to_come)
                for shard in range(settings.num_shards)]
    if failures := [failure for outcome in outcomes if (failure := outcome.result()) is not None]:
        raise RuntimeError("embedding steps failed (rerun `vnp run`: finished shards are kept):\n" + "\n".join(failures))


def materialize_shard(home: str, settings: dict, sample: str, shard: int, models: Sequence[str] = MODELS, *,
                      spare_after: bool = False) -> str | None:
    """In a worker process: one shard's embedding step, recorded in the instance at `home`. Its error text if it failed.

    `spare_after`: start a spare device process once the step is done, for the worker's next step.
    """
    vnp = VnpSettings(**settings)
    result = materialize(build_assets(vnp.num_shards), selection=[f"{kind}_embeddings" for kind in models],
                         partition_key=sample_shard_key(sample, shard), resources={"vnp": vnp},
                         instance=worker_instance(home), run_config=CONSOLE_AT_INFO, raise_on_error=False)
    if spare_after:
        start_spare_device_process(_spare_imports)
    if result.success:
        return None
    errors = [event.step_failure_data.error.to_string() for event in result.get_step_failure_events()]
    return f"shard {shard} of {sample}: " + "\n".join(errors)


def _optional_str(path: Path | None) -> str | None:
    return None if path is None else str(Path(path).resolve())
