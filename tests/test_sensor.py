"""The FASTA inbox sensor: registration, cursor, duplicates, changed files, names, settling, scale."""

from __future__ import annotations

import gzip
import hashlib
import os
import time
from pathlib import Path

import pytest
from dagster import DagsterInstance, SensorResult, build_sensor_context

from conftest import Resources
from vnp_assets.resources import SampleStorage
from vnp_assets.samples import sample_name
from vnp_assets.sensors import fasta_inbox_sensor


def storage(tmp_path: Path, **changes) -> Resources:
    """Only what the sensor reads: the inbox and the storage root (no models)."""
    return {"storage": SampleStorage(storage_root=str(tmp_path / "storage"), inbox_dir=str(tmp_path / "inbox"),
                                     **{"inbox_settle_seconds": 0, **changes})}


@pytest.fixture
def vnp_resources(tmp_path: Path) -> Resources:
    (tmp_path / "inbox").mkdir()
    return storage(tmp_path)


def tick(settings: Resources, instance: DagsterInstance, cursor: str | None) -> SensorResult:
    """One sensor evaluation, with its partition requests applied as the daemon would."""
    context = build_sensor_context(instance=instance, cursor=cursor, resources=settings)
    result = fasta_inbox_sensor(context)
    for request in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result


def requested(result: SensorResult) -> list[str]:
    return sorted(request.partition_key for request in result.run_requests)


def drop(settings: Resources, name: str, text: str) -> Path:
    path = Path(settings["storage"].inbox_dir) / name
    path.write_text(text)
    return path


def test_sample_names_are_sanitised_and_non_fasta_ignored() -> None:
    assert sample_name("my reads (1).fa.gz") == "my_reads__1_"
    assert sample_name("S1.R1.FASTA") == "S1.R1"
    assert sample_name("contigs.fna") == "contigs"
    assert sample_name("notes.txt") is None
    assert sample_name("reads.fastq.gz") is None
    assert sample_name(".partial.fa") is None
    assert sample_name(".fa") is None


def test_new_files_become_samples_with_their_own_copy(vnp_resources: Resources, instance: DagsterInstance) -> None:
    drop(vnp_resources, "a b.fa", ">r1\nACGT\n")
    with gzip.open(Path(vnp_resources["storage"].inbox_dir) / "c.fasta.gz", "wt") as handle:
        handle.write(">r2\nGGCC\n")
    drop(vnp_resources, "readme.txt", "not a FASTA")

    result = tick(vnp_resources, instance, None)

    assert requested(result) == ["a_b", "c"]
    assert all(request.run_key == request.partition_key for request in result.run_requests)
    assert sorted(instance.get_dynamic_partitions("samples")) == ["a_b", "c"]
    a_b = vnp_resources["storage"].layout("a_b")
    assert a_b.input_fasta.read_text() == ">r1\nACGT\n"
    assert a_b.input_sha256.read_text() == hashlib.sha256(b">r1\nACGT\n").hexdigest()
    assert vnp_resources["storage"].layout("c").input_fasta.name == "c.fasta.gz"
    # Editing the inbox afterwards leaves the registered copy alone.
    drop(vnp_resources, "a b.fa", ">edited\nTTTT\n")
    assert a_b.input_fasta.read_text() == ">r1\nACGT\n"


def test_a_file_counts_as_indexed_only_with_its_exact_content_and_an_index(
        vnp_resources: Resources, instance: DagsterInstance) -> None:
    from vnp_assets.samples import indexed_before

    store = vnp_resources["storage"]
    path = drop(vnp_resources, "s1.fa", ">r\nACGT\n")
    assert not indexed_before(path, "s1", store)  # not registered
    tick(vnp_resources, instance, None)
    assert not indexed_before(path, "s1", store)  # registered, never indexed
    store.layout("s1").index.write_bytes(b"an index")
    assert indexed_before(path, "s1", store)
    path.write_text(">r\nACGA\n")
    assert not indexed_before(path, "s1", store)  # edited since


def test_cursor_skips_files_already_seen(vnp_resources: Resources, instance: DagsterInstance) -> None:
    drop(vnp_resources, "s1.fa", ">r\nACGT\n")
    first = tick(vnp_resources, instance, None)
    second = tick(vnp_resources, instance, first.cursor)
    assert requested(first) == ["s1"]
    assert requested(second) == [] and second.dynamic_partitions_requests == []
    assert second.cursor == first.cursor


def test_same_file_dropped_again_is_not_a_new_sample(vnp_resources: Resources, instance: DagsterInstance) -> None:
    drop(vnp_resources, "s1.fa", ">r\nACGT\n")
    first = tick(vnp_resources, instance, None)
    time.sleep(0.02)  # a later arrival than the cursor's on coarse file-system clocks
    drop(vnp_resources, "s1.fa", ">r\nACGT\n")
    again = tick(vnp_resources, instance, first.cursor)
    assert requested(again) == []
    assert again.cursor != first.cursor  # the file was looked at once, and is now behind the cursor
    assert instance.get_dynamic_partitions("samples") == ["s1"]


def test_changed_file_becomes_a_new_sample_named_by_its_checksum(vnp_resources: Resources, instance: DagsterInstance) -> None:
    drop(vnp_resources, "s1.fa", ">r\nACGT\n")
    first = tick(vnp_resources, instance, None)
    time.sleep(0.02)
    drop(vnp_resources, "s1.fa", ">r\nTTTT\n")
    changed = tick(vnp_resources, instance, first.cursor)

    new_name = "s1-" + hashlib.sha256(b">r\nTTTT\n").hexdigest()[:8]
    assert requested(changed) == [new_name]
    assert vnp_resources["storage"].layout("s1").input_fasta.read_text() == ">r\nACGT\n"
    assert vnp_resources["storage"].layout(new_name).input_fasta.read_text() == ">r\nTTTT\n"


def test_file_still_being_written_waits_until_it_settles(vnp_resources: Resources, instance: DagsterInstance,
                                                        tmp_path: Path) -> None:
    patient = storage(tmp_path, inbox_settle_seconds=3600)
    old = drop(vnp_resources, "old.fa", ">r\nACGT\n")
    os.utime(old, ns=(0, 0))  # its mtime is old, but the write set its ctime to now
    drop(vnp_resources, "fresh.fa", ">r\nAC")
    waiting = tick(patient, instance, None)
    assert requested(waiting) == []

    taken = tick(vnp_resources, instance, waiting.cursor)
    assert requested(taken) == ["fresh", "old"]


def test_three_thousand_files_in_one_tick(vnp_resources: Resources, instance: DagsterInstance) -> None:
    for i in range(3000):
        drop(vnp_resources, f"read_{i:04d}.fa", f">r{i}\nACGT\n")
    start = time.perf_counter()
    result = tick(vnp_resources, instance, None)
    elapsed = time.perf_counter() - start
    assert len(result.run_requests) == 3000
    assert elapsed < 10, f"one tick over 3,000 new files took {elapsed:.1f} s"

    start = time.perf_counter()
    assert tick(vnp_resources, instance, result.cursor).run_requests == []
    assert time.perf_counter() - start < 2
