"""Fixtures shared by the Dagster-layer tests: resources over a temporary storage root, a temporary
instance, and a way to register a sample as the inbox sensor would."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from dagster import ConfigurableResource, DagsterInstance, instance_for_test

from vnp_assets.platform import resources_from_settings
from vnp_assets.samples import register_sample

Resources = dict[str, ConfigurableResource]

# Started as a background job of a non-interactive shell, the test process inherits SIGINT ignored, and
# Dagster gives SIGTERM SIGINT's handler: no child (a process pool, a stub Ray node) could be stopped.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny placeholder models, written once per test session."""
    from vnp_core.tiny_models import write_tiny_models

    out = tmp_path_factory.mktemp("tiny_models")
    write_tiny_models(out)
    return out


@pytest.fixture
def make_resources(tmp_path: Path, tiny_models_dir: Path) -> Callable[..., Resources]:
    """Resources over one fresh storage root: the defaults (tiny models, CPU, two shards), then `changes`."""
    storage = tmp_path / "storage"
    storage.mkdir()
    (tmp_path / "inbox").mkdir()

    def make(**changes) -> Resources:
        settings = {"inbox_settle_seconds": 0, "num_shards": 2, "lock_dir": str(tmp_path / "gpu-locks"),
                    "tiny_models_dir": str(tiny_models_dir), **changes}
        return resources_from_settings(settings, home=tmp_path)

    return make


@pytest.fixture
def vnp_resources(make_resources: Callable[..., Resources]) -> Resources:
    return make_resources()


@pytest.fixture
def instance() -> DagsterInstance:
    with instance_for_test() as instance:
        yield instance


@pytest.fixture
def add_sample(vnp_resources: Resources, instance: DagsterInstance) -> Callable[[str, Path], str]:
    """Registers `fasta` as sample `name` the way the inbox sensor does: its own copy and a partition."""

    def add(name: str, fasta: Path) -> str:
        sample, _ = register_sample(fasta, name, vnp_resources["storage"], set(instance.get_dynamic_partitions("samples")))
        instance.add_dynamic_partitions("samples", [sample])
        return sample

    return add
