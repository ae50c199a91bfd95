"""Fixtures shared by the Dagster-layer tests: settings over a temporary storage root, a temporary
instance, and a way to register a sample as the inbox sensor would."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from dagster import DagsterInstance, instance_for_test

from vnp_assets.resources import VnpSettings


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny placeholder models, written once per test session."""
    from vnp_core.tiny_models import write_tiny_models

    out = tmp_path_factory.mktemp("tiny_models")
    write_tiny_models(out)
    return out


@pytest.fixture
def vnp_settings(tmp_path: Path, tiny_models_dir: Path) -> VnpSettings:
    """Default settings (tiny models, CPU, two shards) over a fresh storage root."""
    storage = tmp_path / "storage"
    storage.mkdir()
    (storage / "tiny_models").symlink_to(tiny_models_dir)  # where the settings make them by default
    (tmp_path / "inbox").mkdir()
    return VnpSettings(storage_root=str(storage), inbox_dir=str(tmp_path / "inbox"), inbox_settle_seconds=0,
                       num_shards=2, gpu_lock_dir=str(tmp_path / "gpu-locks"))


@pytest.fixture
def instance() -> DagsterInstance:
    with instance_for_test() as instance:
        yield instance


@pytest.fixture
def add_sample(vnp_settings: VnpSettings, instance: DagsterInstance) -> Callable[[str, Path], str]:
    """Registers `fasta` as sample `name` the way the inbox sensor does: its own copy and a partition."""

    def add(name: str, fasta: Path) -> str:
        copy = vnp_settings.sample_layout(name).input_copy(gzipped=fasta.name.endswith(".gz"))
        copy.parent.mkdir(parents=True)
        shutil.copyfile(fasta, copy)
        instance.add_dynamic_partitions("samples", [name])
        return name

    return add
