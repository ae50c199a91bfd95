"""`VnpSettings`: the one place where Dagster settings become the typed `VnpConfig` passed down."""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from dagster import ConfigurableResource
from pydantic import Field

from vnp_assets.layout import SampleLayout
from vnp_core.config import EmbedConfig, ModelPaths, PrepConfig, ValidationConfig, VnpConfig


class VnpSettings(ConfigurableResource):
    """Where samples live, which models and GPUs they use, and how they are run."""

    storage_root: str = Field(description="Samples, their outputs and the tiny models live under this folder.")
    inbox_dir: str = Field(description="Folder the inbox sensor watches for *.fa, *.fasta, *.fna (optionally .gz).")
    inbox_settle_seconds: float = Field(
        default=10.0, description="A dropped file is taken only once it has not changed for this long (copies in progress).")
    chunk_length: int = Field(default=500, description="300 or 500: must match the classifier.")
    skip_bad_records: bool = Field(default=False, description="Skip (and count) malformed FASTA records instead of failing.")
    num_shards: int | None = Field(
        default=None, description="Shards per model; fixed when definitions load. Default: one per usable GPU, at least 1.")
    devices: list[int] | None = Field(
        default=None, description="Physical GPU ids this platform may use (e.g. [2, 3]). Default: every GPU of the host.")
    gpu_lock_dir: str = Field(
        default="/tmp/vnp-gpu-locks", description="Lock files of the per-GPU leases: shared by every run on the host.")
    gpu_lease_timeout_s: float = Field(default=24 * 3600.0, description="How long a step waits for a free GPU.")
    esm2_model: str | None = Field(default=None, description="fair-esm .pt or HF ESM-2 directory (default: tiny model).")
    dnabert_s_model: str | None = Field(default=None, description="DNABERT-S HF directory (default: tiny model).")
    classifier: str | None = Field(default=None, description="VirNucPro classifier weights (default: tiny model).")
    trust_classifier_pickle: bool = Field(
        default=False, description="Allow a pickled whole-module classifier (loading it runs code from the file).")
    dtype: str | None = Field(default=None, description="float16, bfloat16 or float32 (default: float16 on GPU, float32 on CPU).")
    max_tokens: int | None = Field(default=None, description="Token budget of one pack (default: sized from free memory).")
    compile_min_tokens: int | None = Field(
        default=None, description="Compile a shard's layers from this many tokens on (default: each model's break-even; 0: always).")
    validation_sample_size: int = Field(default=512, description="Sequences per model recomputed in fp32 for the report.")

    def sample_layout(self, sample: str) -> SampleLayout:
        return SampleLayout(Path(self.storage_root) / "samples" / sample)

    def usable_devices(self) -> list[int]:
        from vnp_core.gpu import discover_devices

        return discover_devices(self.devices)

    def cpu_threads_per_gpu(self) -> int:
        """The host's cores shared out among its usable GPUs: each GPU step's CPU thread pool."""
        return max(1, (os.cpu_count() or 1) // max(1, len(self.usable_devices())))

    def shard_count(self) -> int:
        return self.num_shards or max(1, len(self.usable_devices()))

    def with_fixed_shard_count(self) -> VnpSettings:
        """These settings with `num_shards` resolved: the partitions and every step must agree on it."""
        return VnpSettings(**{**self.model_dump(), "num_shards": self.shard_count()})

    def gpu_lease(self) -> AbstractContextManager[int | None]:
        """`with vnp.gpu_lease() as device:` one usable GPU, exclusive across every run on the host (None without GPUs)."""
        from vnp_core.gpu import GpuLease

        devices = self.usable_devices()
        return GpuLease(devices, Path(self.gpu_lock_dir), timeout=self.gpu_lease_timeout_s) if devices else nullcontext()

    def tiny_models_used(self) -> list[str]:
        """The models left at their default: tiny random placeholders with no biological meaning."""
        given = {"esm2": self.esm2_model, "dnabert_s": self.dnabert_s_model, "classifier": self.classifier}
        return [name for name, path in given.items() if path is None]

    def model_paths(self) -> ModelPaths:
        """The user's model paths, with the tiny placeholders (made once under the storage root) for the rest."""
        tiny: dict[str, Path] = {}
        if self.tiny_models_used():
            from vnp_core.tiny_models import write_tiny_models

            tiny = write_tiny_models(Path(self.storage_root) / "tiny_models")
        tiny_classifier = tiny.get(f"classifier_{self.chunk_length}")
        return ModelPaths(
            esm2=Path(self.esm2_model) if self.esm2_model else tiny["esm2"],
            dnabert_s=Path(self.dnabert_s_model) if self.dnabert_s_model else tiny["dnabert_s"],
            classifier=Path(self.classifier) if self.classifier else tiny_classifier,
            trust_classifier_pickle=self.trust_classifier_pickle,
        )

    def vnp_config(self, device: str = "cpu") -> VnpConfig:
        """The typed configuration of one step; `device` is what the step runs its models on."""
        embed = EmbedConfig(device=device, dtype=self.dtype or ("float32" if device == "cpu" else "float16"),
                            max_tokens=self.max_tokens, compile_min_tokens=self.compile_min_tokens)
        return VnpConfig(
            storage_root=Path(self.storage_root),
            prep=PrepConfig(chunk_length=self.chunk_length, skip_bad_records=self.skip_bad_records,
                            num_shards=self.shard_count()),
            esm2=embed,
            dnabert_s=embed,
            models=self.model_paths(),
            validation=ValidationConfig(sample_size=self.validation_sample_size),
        )
