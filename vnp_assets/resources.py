"""The resources, one per capability: where samples live, how they are processed, which models and GPUs.

Assets ask for the capabilities they use; tests swap one resource. `definitions.resources_from_settings`
is the one place where a user's settings become these resources.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from logging import Logger
from pathlib import Path
from typing import Any, Literal

from dagster import ConfigurableResource
from pydantic import Field, PrivateAttr

from vnp_assets.layout import SampleLayout
from vnp_core.config import EmbedConfig, ModelPaths, PrepConfig, ValidationConfig
from vnp_core.models import MODELS


class SampleStorage(ConfigurableResource):
    """Where samples, their outputs and the inbox live."""

    storage_root: str = Field(description="Samples, their outputs and the tiny models live under this folder.")
    inbox_dir: str = Field(description="Folder the inbox sensor watches for *.fa, *.fasta, *.fna (optionally .gz).")
    inbox_settle_seconds: float = Field(
        default=10.0, description="A dropped file is taken only once it has not changed for this long (copies in progress).")
    embedding_cache: bool = Field(
        default=True, description="Keep every vector in a store under the storage root and embed each sequence once per model.")
    embedding_cache_dir: str | None = Field(
        default=None, description="Where the embedding store lives (default: <storage_root>/embedding_cache). On a Ray "
                                  "cluster whose storage root is a network file system, a node-local path: each node "
                                  "then keeps its own store (LMDB's lock does not work over NFS).")

    def layout(self, sample: str) -> SampleLayout:
        return SampleLayout(self.samples_dir / sample)

    def check_cache_dir(self) -> None:
        """Refuse an `embedding_cache_dir` that names a file (a missing folder is made by the first GPU step;
        on a Ray cluster it may exist only on the GPU nodes)."""
        if self.embedding_cache_dir is not None and Path(self.embedding_cache_dir).is_file():
            raise ValueError(f"embedding_cache_dir {self.embedding_cache_dir}: is a file, not a folder: give a "
                             "folder for the embedding store (made if missing)")

    @property
    def cache_dir(self) -> Path | None:
        """The embedding store (`vnp_core.embedding_cache`), None when it is turned off."""
        if not self.embedding_cache:
            return None
        return Path(self.embedding_cache_dir or Path(self.storage_root) / "embedding_cache")

    @property
    def samples_dir(self) -> Path:
        return Path(self.storage_root) / "samples"

    @property
    def staging_dir(self) -> Path:
        """Where dropped files are copied before they become a sample's (same file system: a rename publishes)."""
        return self.samples_dir / ".incoming"


class SampleProcessing(ConfigurableResource):
    """How a sample is cut, sharded and validated."""

    chunk_length: int = Field(default=500, description="300 or 500: must match the classifier.")
    skip_bad_records: bool = Field(default=False, description="Skip (and count) malformed FASTA records instead of failing.")
    num_shards: int = Field(default=1, ge=1, description="Shards per model (the partitions' shard dimension).")
    validation_sample_size: int = Field(default=512, ge=1, description="Sequences per model recomputed in fp32 for the report.")

    def prep_config(self) -> PrepConfig:
        return PrepConfig(chunk_length=self.chunk_length, skip_bad_records=self.skip_bad_records,
                          num_shards=self.num_shards)

    def validation_config(self) -> ValidationConfig:
        return ValidationConfig(sample_size=self.validation_sample_size)


class ModelSet(ConfigurableResource):
    """The models' files and how they run. A model left unset is a tiny random placeholder under
    `tiny_models_dir`, written once by `write_tiny_models_if_used` (never by a getter)."""

    esm2_model: str | None = Field(default=None, description="fair-esm .pt or HF ESM-2 directory (default: tiny model).")
    dnabert_s_model: str | None = Field(default=None, description="DNABERT-S HF directory (default: tiny model).")
    classifier: str | None = Field(default=None, description="VirNucPro classifier weights (default: tiny model).")
    trust_classifier_pickle: bool = Field(
        default=False, description="Allow a pickled whole-module classifier (loading it runs code from the file).")
    tiny_models_dir: str = Field(description="Where the tiny placeholder models are written.")
    dtype: str | None = Field(default=None, description="float16, bfloat16 or float32 (default: float16 on GPU or with fp8, "
                                                       "float32 on CPU).")
    fp8: bool = Field(default=False, description="ESM-2's linear layers in FP8 (Ada/Hopper GPUs): faster, checked against "
                                                 "fp32 by the validation report with FP8's own thresholds. Off by default: "
                                                 "measured on random weights only.")
    max_tokens: int | None = Field(default=None, description="Token budget of one pack (default: sized from free memory).")
    compile_min_tokens: int | None = Field(
        default=None, description="Compile a shard's layers from this many tokens on (default: each model's break-even; 0: always).")
    compile_cache_dir: str | None = Field(
        default=None, description="Where torch.compile keeps what it compiled, for later steps and runs on this host "
                                  "(default: compile_cache in the home).")

    def given(self) -> dict[str, str | None]:
        """Each model's path as the user gave it (None: the tiny placeholder): every embedder, then the classifier."""
        return {**{name: getattr(self, f"{name}_model") for name in MODELS}, "classifier": self.classifier}

    def tiny_models_used(self) -> list[str]:
        """The models left at their default: tiny random placeholders with no biological meaning."""
        return [name for name, path in self.given().items() if path is None]

    def write_tiny_models_if_used(self) -> None:
        if self.tiny_models_used():
            from vnp_core.tiny_models import write_tiny_models

            write_tiny_models(Path(self.tiny_models_dir))

    def paths(self, chunk_length: int) -> ModelPaths:
        """Every model's path, the tiny placeholders' for those left unset (the classifier's for `chunk_length`)."""
        from vnp_core.tiny_models import tiny_model_paths

        tiny = tiny_model_paths(Path(self.tiny_models_dir), chunk_length) if self.tiny_models_used() else {}
        paths = {name: Path(given) if given else tiny[name] for name, given in self.given().items()}
        classifier = paths.pop("classifier")
        return ModelPaths(embedders=paths, classifier=classifier, trust_classifier_pickle=self.trust_classifier_pickle)

    def embed_config(self, device: str) -> EmbedConfig:
        """How the models run on `device` ("cpu" or "cuda")."""
        if self.compile_cache_dir is not None and Path(self.compile_cache_dir).is_file():
            raise ValueError(f"compile_cache_dir {self.compile_cache_dir}: is a file, not a folder: give a folder "
                             "for torch.compile's cache (made if missing)")
        dtype = self.dtype or ("float32" if device == "cpu" and not self.fp8 else "float16")
        return EmbedConfig(device=device, dtype=dtype, fp8=self.fp8, max_tokens=self.max_tokens, compile_min_tokens=self.compile_min_tokens,
                           compile_cache_dir=None if self.compile_cache_dir is None else Path(self.compile_cache_dir))


class GpuPool(ConfigurableResource):
    """The host's GPUs: discovered once, leased one per step across every run, each step in a process bound to it."""

    devices: list[int] | None = Field(
        default=None, description="Physical GPU ids this platform may use (e.g. [2, 3]). Default: every GPU of the host.")
    lock_dir: str = Field(
        default="/tmp/vnp-gpu-locks", description="Lock files of the per-GPU leases: shared by every run on the host.")
    lease_timeout_s: float = Field(default=24 * 3600.0, description="How long a step waits for a free GPU.")
    executor: Literal["local", "ray"] = Field(
        default="local", description="local: this host's GPUs, leased; ray: one GPU of the Ray cluster at ray_address per step.")
    ray_address: str | None = Field(
        default=None, description="ray://HOST:10001 (Ray Client) or HOST:6379 (the head's GCS, when Dagster runs on a cluster node).")
    ray_device: Literal["cuda", "cpu"] = Field(
        default="cuda", description="What a Ray step's models run on: its GPU; cpu only for clusters of fake GPU slots (tests).")

    _discovered: list[int] | None = PrivateAttr(default=None)
    _ray: Any = PrivateAttr(default=None)

    @property
    def usable_devices(self) -> list[int]:
        """Physical ids of the GPUs steps may lease, discovered once per process."""
        if self._discovered is None:
            from vnp_core.gpu import discover_devices

            self._discovered = discover_devices(self.devices)
        return self._discovered

    @property
    def cpu_threads_per_gpu(self) -> int:
        """The host's cores shared out among its usable GPUs: each GPU step's CPU thread pool."""
        return max(1, (os.cpu_count() or 1) // max(1, len(self.usable_devices)))

    @contextmanager
    def lease(self) -> Iterator[int | None]:
        """`with gpus.lease() as device:` one usable GPU, exclusive across every run on the host (None without
        GPUs: then the host's one slot, the CPU). Dagster's `gpu` pool alone can let two runs in at once: on
        SQLite its claim reads the free slots, then writes."""
        from vnp_core.gpu import CPU_SLOT, GpuLease

        devices = self.usable_devices
        with GpuLease(devices or [CPU_SLOT], Path(self.lock_dir), timeout=self.lease_timeout_s) as device:
            yield device if devices else None

    @property
    def slot_count(self) -> int:
        """GPU steps that can run at once: the size of Dagster's `gpu` pool, and the default shard count."""
        if self.executor == "ray":
            from vnp_assets.ray_execution import ray_gpu_count

            return ray_gpu_count(self.ray_address)
        return len(self.usable_devices)

    @property
    def torch_device(self) -> str:
        """What a step's models run on: "cuda" (inside its process, the one GPU it got) or "cpu" without GPUs."""
        if self.executor == "ray":
            return self.ray_device
        return "cuda" if self.usable_devices else "cpu"

    @property
    def ray_cluster(self):
        """The Ray cluster at `ray_address` (`vnp_assets.ray_execution.RayGpuCluster`), connected on first use."""
        if self._ray is None:
            from vnp_assets.ray_execution import RayGpuCluster

            if not self.ray_address:
                raise ValueError("executor: ray needs ray_address (ray://HOST:10001, or HOST:6379 on a node of the cluster)")
            self._ray = RayGpuCluster(address=self.ray_address, lock_dir=self.lock_dir, lock_timeout_s=self.lease_timeout_s,
                                      gpu_wait_timeout_s=self.lease_timeout_s)
        return self._ray

    def run_on_gpu(self, fn: Callable[..., Any], /, *args, log: Logger, with_progress: bool = False,
                   label: str | None = None, **kwargs) -> tuple[Any, str]:
        """`fn(*args, **kwargs)` in a process bound to one GPU: leased on this host, or granted by the Ray
        cluster (no GPU on a host without one); its result and where it ran. `with_progress`: `fn` also
        takes a `progress` callback, logged to `log`. `label` names the step in a Ray worker's failure."""
        if self.executor == "ray":
            return self.ray_cluster.run_on_gpu(fn, *args, log=log, label=label, with_progress=with_progress, **kwargs)
        from vnp_assets.progress import run_logging_progress
        from vnp_core.gpu import run_in_device_process

        with self.lease() as device:
            where = "cpu" if device is None else f"GPU {device}"
            cpu_threads = None if device is None else self.cpu_threads_per_gpu
            run = partial(run_logging_progress, log) if with_progress else run_in_device_process
            return run(fn, *args, device=device, cpu_threads=cpu_threads, **kwargs), where
