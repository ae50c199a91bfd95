"""The inbox never wedges: a drop that cannot be a sample is reported, recorded and skipped.

Every case drops one bad entry beside a good file: the good file is registered in the same tick,
the bad one is rejected with its reason (the tick's log, `inbox_rejected.jsonl`, an observation of
`inbox_rejected_drops`), and the cursor moves past both, so a later tick is not stuck on it.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from pathlib import Path

import pytest
from dagster import DagsterInstance, SensorResult, build_sensor_context

import vnp_assets.samples as samples_module
import vnp_assets.sensors as sensors_module
from vnp_assets.resources import SampleStorage
from vnp_assets.samples import RejectedDrop, clean_staging, open_regular_file
from vnp_assets.sensors import REJECTED_DROPS_KEY, REJECTED_LOG, fasta_inbox_sensor

GOOD = ">r1\nACGTACGT\n"


@pytest.fixture
def storage(tmp_path: Path) -> SampleStorage:
    (tmp_path / "inbox").mkdir()
    return SampleStorage(storage_root=str(tmp_path / "storage"), inbox_dir=str(tmp_path / "inbox"),
                         inbox_settle_seconds=0)


def tick(storage: SampleStorage, instance: DagsterInstance, cursor: str | None = None) -> SensorResult:
    """One evaluation, its partition requests and asset events applied as the daemon does."""
    result = fasta_inbox_sensor(build_sensor_context(instance=instance, cursor=cursor, resources={"storage": storage}))
    for request in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    for event in result.asset_events:
        instance.report_runless_asset_event(event)
    return result


def requested(result: SensorResult) -> list[str]:
    return sorted(request.partition_key for request in result.run_requests)


def rejected(storage: SampleStorage) -> dict[str, str]:
    """File name -> reason, from `<storage_root>/inbox_rejected.jsonl`."""
    log = Path(storage.storage_root) / REJECTED_LOG
    lines = log.read_text().splitlines() if log.exists() else []
    return {record["file"]: record["reason"] for record in map(json.loads, lines)}


def observed(instance: DagsterInstance) -> dict[str, str]:
    """File name -> reason, from the observations of `inbox_rejected_drops` that the UI lists."""
    events = instance.fetch_observations(REJECTED_DROPS_KEY, limit=100).records
    return {event.asset_observation.metadata["file"].value: event.asset_observation.metadata["reason"].value
            for event in events}


def inbox(storage: SampleStorage) -> Path:
    return Path(storage.inbox_dir)


def assert_rejected_beside_a_good_file(storage: SampleStorage, instance: DagsterInstance, bad: str,
                                       reason: str, cursor: str | None = None) -> SensorResult:
    (inbox(storage) / "good.fa").write_text(GOOD)
    result = tick(storage, instance, cursor)
    assert requested(result) == ["good"]
    assert reason in rejected(storage)[bad]
    assert reason in observed(instance)[bad]
    # The cursor is past both: the next tick finds nothing to do, and fails on nothing.
    again = tick(storage, instance, result.cursor)
    assert requested(again) == [] and again.asset_events == []
    assert again.cursor == result.cursor
    return result


def test_a_directory_named_like_a_fasta_is_rejected(storage: SampleStorage, instance: DagsterInstance) -> None:
    (inbox(storage) / "folder.fa").mkdir()
    assert_rejected_beside_a_good_file(storage, instance, "folder.fa", "a directory, not a regular file")
    assert instance.get_dynamic_partitions("samples") == ["good"]


def test_a_fifo_is_rejected_without_blocking(storage: SampleStorage, instance: DagsterInstance) -> None:
    os.mkfifo(inbox(storage) / "pipe.fasta")
    outcome: list = []
    ticking = threading.Thread(target=lambda: outcome.append(
        assert_rejected_beside_a_good_file(storage, instance, "pipe.fasta", "a FIFO, not a regular file")), daemon=True)
    ticking.start()
    ticking.join(timeout=60)
    assert not ticking.is_alive(), "the sensor blocked on a FIFO"
    assert outcome, "the tick failed (see the thread's exception above)"


def test_a_fifo_swapped_in_after_the_scan_is_refused_at_open_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "late.fa"
    os.mkfifo(fifo)
    start = time.monotonic()
    with pytest.raises(RejectedDrop, match="a FIFO, not a regular file"):
        open_regular_file(fifo, follow_symlinks=False)
    assert time.monotonic() - start < 5


def test_symbolic_links_are_rejected_and_never_read(storage: SampleStorage, instance: DagsterInstance,
                                                    tmp_path: Path) -> None:
    secret = tmp_path / "elsewhere" / "secret.fa"
    secret.parent.mkdir()
    secret.write_text(">secret\nACGTTTTT\n")
    (inbox(storage) / "outside.fa").symlink_to(secret)
    (inbox(storage) / "broken.fa").symlink_to(tmp_path / "missing.fa")
    (inbox(storage) / "inside.fa").symlink_to(inbox(storage) / "good.fa")  # even one inside the inbox

    assert_rejected_beside_a_good_file(storage, instance, "outside.fa", "a symbolic link")
    assert "a symbolic link" in rejected(storage)["broken.fa"]
    assert "a symbolic link" in rejected(storage)["inside.fa"]
    assert instance.get_dynamic_partitions("samples") == ["good"]
    copied = [path.read_text() for path in Path(storage.storage_root).rglob("*.fasta")]
    assert copied == [GOOD]  # the secret's content went nowhere


def test_a_file_swapped_for_a_link_after_the_scan_is_refused_at_open(tmp_path: Path) -> None:
    target = tmp_path / "target.fa"
    target.write_text(GOOD)
    (tmp_path / "link.fa").symlink_to(target)
    with pytest.raises(RejectedDrop, match="a symbolic link"):
        open_regular_file(tmp_path / "link.fa", follow_symlinks=False)
    with open_regular_file(tmp_path / "link.fa") as handle:  # `vnp run FILE`: the user's own path, followed
        assert handle.read() == GOOD.encode()


class _DeniedOs:
    """`os` as samples.py sees it, with opening `denied` refused as for an unreadable file (the tests may run as
    root, which reads any file whatever its mode)."""

    def __init__(self, denied: Path):
        self._denied = str(denied)

    def __getattr__(self, name: str):
        return getattr(os, name)

    def open(self, path, flags, *args):
        if str(path) == self._denied:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return os.open(path, flags, *args)


def test_an_unreadable_file_is_rejected_then_taken_once_fixed(storage: SampleStorage, instance: DagsterInstance,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    locked = inbox(storage) / "locked.fa"
    locked.write_text(">locked\nGGGGCCCC\n")
    locked.chmod(0)
    if os.geteuid() == 0:
        monkeypatch.setattr(samples_module, "os", _DeniedOs(locked))
    first = assert_rejected_beside_a_good_file(storage, instance, "locked.fa", "cannot be read (permission denied)")
    assert "locked" not in instance.get_dynamic_partitions("samples")

    monkeypatch.undo()
    time.sleep(0.02)  # a later ctime than the cursor's on coarse file-system clocks
    locked.chmod(0o644)  # fixing it sets its ctime: a new arrival
    fixed = tick(storage, instance, first.cursor)
    assert requested(fixed) == ["locked"]


def test_a_rejected_directory_replaced_by_a_file_is_taken(storage: SampleStorage, instance: DagsterInstance) -> None:
    folder = inbox(storage) / "s2.fa"
    folder.mkdir()
    first = assert_rejected_beside_a_good_file(storage, instance, "s2.fa", "a directory")
    folder.rmdir()
    time.sleep(0.02)
    folder.write_text(">s2\nACGT\n")
    assert requested(tick(storage, instance, first.cursor)) == ["s2"]


def test_a_very_long_name_becomes_a_sample_and_one_the_storage_refuses_is_rejected(
        storage: SampleStorage, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch) -> None:
    long_name = "x" * 240 + ".fasta"  # 246 bytes: a valid file name in the inbox
    (inbox(storage) / long_name).write_text(GOOD)
    (inbox(storage) / "next.fa").write_text(">n\nAC\n")
    taken = tick(storage, instance)
    assert len(requested(taken)) == 2 and "next" in requested(taken)

    # A sample name the file system refuses (sample names are capped, so this one is forced).
    refused = "y" * 240 + ".fa"
    real_sample_name = sensors_module.sample_name
    monkeypatch.setattr(sensors_module, "sample_name", lambda file_name: file_name.removesuffix(".fa") * 2
                        if file_name == refused else real_sample_name(file_name))
    time.sleep(0.02)
    (inbox(storage) / refused).write_text(GOOD)
    result = assert_rejected_beside_a_good_file(storage, instance, refused, "too long for the storage", taken.cursor)
    assert result.cursor != taken.cursor
    assert not list(storage.staging_dir.iterdir())  # its staged copy was removed


def test_a_full_storage_fails_the_tick_and_loses_nothing(storage: SampleStorage, instance: DagsterInstance,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The storage's trouble is not the drop's: the tick fails and the cursor stays, so the file is taken later."""
    (inbox(storage) / "s1.fa").write_text(GOOD)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(samples_module.tempfile, "NamedTemporaryFile", disk_full)
    with pytest.raises(OSError, match="No space left"):
        tick(storage, instance)
    monkeypatch.undo()
    assert requested(tick(storage, instance)) == ["s1"]
    assert rejected(storage) == {}


def test_staging_leftovers_of_killed_ticks_are_removed(storage: SampleStorage, instance: DagsterInstance) -> None:
    storage.staging_dir.mkdir(parents=True)
    old, fresh = storage.staging_dir / "tmpold", storage.staging_dir / "tmpfresh"
    old.write_bytes(b"half a copy")
    fresh.write_bytes(b"a copy in progress")
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))

    tick(storage, instance)
    assert not old.exists() and fresh.exists()
    assert clean_staging(storage, older_than_s=0) == ["tmpfresh"]


def test_a_missing_inbox_skips_the_tick(tmp_path: Path, instance: DagsterInstance) -> None:
    storage = SampleStorage(storage_root=str(tmp_path / "storage"), inbox_dir=str(tmp_path / "nowhere"))
    result = tick(storage, instance, "[5, \"a.fa\"]")
    assert "does not exist" in result.skip_reason.skip_message
    assert result.cursor == "[5, \"a.fa\"]"


def test_undecodable_names_are_reported_readably(storage: SampleStorage, instance: DagsterInstance) -> None:
    name = os.fsdecode(b"bad\xff.fa")
    (inbox(storage) / name).mkdir()
    (inbox(storage) / "good.fa").write_text(GOOD)
    result = tick(storage, instance)
    assert requested(result) == ["good"]
    assert "a directory" in rejected(storage)["bad\\xff.fa"]
    json.loads(result.cursor)  # the cursor still round-trips
