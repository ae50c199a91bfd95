"""The platform as Dagster sees it: the resources a user's settings make, and the definitions built on them."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dagster import (
    AssetSelection,
    AutomationConditionSensorDefinition,
    ConfigurableResource,
    DefaultSensorStatus,
    Definitions,
    define_asset_job,
    in_process_executor,
)

from vnp_assets.assets import build_assets
from vnp_assets.resources import GpuPool, ModelSet, SampleProcessing, SampleStorage
from vnp_assets.sensors import REJECTED_DROPS, fasta_inbox_sensor
from vnp_assets.versions import asset_code_versions

# Resource key -> class: the capabilities the assets ask for by these names.
RESOURCES: dict[str, type[ConfigurableResource]] = {
    "storage": SampleStorage, "processing": SampleProcessing, "models": ModelSet, "gpus": GpuPool,
}

# Evaluates the assets' automation conditions, so a sample flows on by itself after its index.
automation_sensor = AutomationConditionSensorDefinition(
    "vnp_automation", target=AssetSelection.all(), default_status=DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Carries each sample on from its index: shards, merge, validation report and calls, "
                "each once its inputs are new and their blocking checks passed.")


class SettingsError(ValueError):
    """Settings that name no field, or a value a field refuses (the message says which)."""


def home_defaults(home: Path) -> dict[str, str]:
    """Where a home keeps its storage, inbox, placeholder models and compiled layers unless the settings say otherwise."""
    return {"storage_root": str(home / "storage"), "inbox_dir": str(home / "inbox"),
            "tiny_models_dir": str(home / "storage" / "tiny_models"), "compile_cache_dir": str(home / "compile_cache")}


def home_storage(home: Path) -> SampleStorage:
    """The storage of a home run with no settings of its own, as `vnp run --home` runs it."""
    defaults = home_defaults(home)
    return SampleStorage(storage_root=defaults["storage_root"], inbox_dir=defaults["inbox_dir"])


def resources_from_settings(settings: Mapping[str, Any], home: Path) -> dict[str, ConfigurableResource]:
    """The resources of a home and a user's flat settings (VNP_SETTINGS's fields), each field routed to
    the one resource that has it. The shard count, which shapes the partitions, is fixed here."""
    settings = {**home_defaults(home), **settings}
    owner = {name: key for key, cls in RESOURCES.items() for name in cls.model_fields}
    if unknown := sorted(set(settings) - set(owner)):
        raise SettingsError(f"unknown setting(s) {', '.join(unknown)}: the settings are {', '.join(sorted(owner))}")
    # A URL (an fsspec-style s3://...) would become a local folder named after its scheme.
    if urls := [f"{name} {value}" for name, value in settings.items() if name.endswith(("_dir", "_root")) and "://" in str(value)]:
        raise SettingsError(f"{', '.join(urls)}: a URL where a folder is wanted: give a path (on a Ray cluster, a folder "
                            "every node mounts at the same path: NFS, or the bucket through a FUSE file system)")
    fields: dict[str, dict] = {key: {} for key in RESOURCES}
    for name, value in settings.items():
        fields[owner[name]][name] = value
    try:
        resources = {key: cls(**fields[key]) for key, cls in RESOURCES.items()}
        if "num_shards" not in settings or settings["num_shards"] is None:
            shards = max(1, resources["gpus"].slot_count)  # one per GPU by default
            resources["processing"] = SampleProcessing(**{**fields["processing"], "num_shards": shards})
        resources["processing"].prep_config()  # each refuses a bad value with a sentence
        resources["storage"].check_cache_dir()
        resources["processing"].validation_config()
        resources["models"].embed_config("cuda")
    except Exception as error:  # pydantic's ValidationError, or a device list this host lacks
        raise SettingsError(" ".join(str(error).split())) from error
    return resources


def build_definitions(resources: Mapping[str, ConfigurableResource]) -> Definitions:
    storage, processing, models = resources["storage"], resources["processing"], resources["models"]
    models.write_tiny_models_if_used()  # the one place the placeholders are made
    assets = build_assets(processing.num_shards, asset_code_versions(storage, processing, models))
    return Definitions(
        assets=[*assets, REJECTED_DROPS],
        jobs=sample_jobs(),
        sensors=[fasta_inbox_sensor, automation_sensor],
        resources=dict(resources),
        # A run's steps in its own process, one after another: each GPU step starts its device process
        # anyway, and a process per step would import torch again (10-15 s a run on a small host).
        executor=in_process_executor,
    )


def sample_jobs():
    """Named jobs, so a run says what it is for and the GraphQL API can launch one by name."""
    return [
        define_asset_job("index_sample", AssetSelection.groups("prep"),
                         description="Prep and index one sample (a partition of `samples`)."),
        define_asset_job("embed_shard", AssetSelection.groups("embeddings") - AssetSelection.assets("merged_embeddings"),
                         description="Both models over one sample x shard partition, on one leased GPU."),
        define_asset_job("finish_sample", AssetSelection.assets("merged_embeddings", "fp16_validation_report").downstream(),
                         description="Merge a sample's shards, validate against fp32 and make the calls."),
    ]
