"""`fasta_inbox_sensor`: each FASTA dropped into the inbox becomes a sample partition and a run.

- Files named `*.fa`, `*.fasta`, `*.fna`, optionally `.gz`; hidden files (partial uploads) and
  other names are ignored.
- The sample name is the file name without its suffixes, every character outside `[A-Za-z0-9._-]`
  replaced by `_` (`my reads.fa.gz` -> `my_reads`).
- The file is copied to `<storage_root>/samples/<sample>/<sample>.fasta[.gz]`: later edits in the
  inbox never change a registered sample.
- The same file dropped again (same name, same content) is not a new sample. A changed file under
  the same name becomes a new sample `<name>-<first 8 hex of its sha256>`, so the first sample's
  outputs are never overwritten.
- A file is taken once it has not changed for `inbox_settle_seconds` (a copy in progress is not
  read half-written). Its arrival is the later of its mtime and ctime: a file moved in with an old
  mtime still counts as new (the move sets its ctime).

The cursor is the latest arrival taken, as `(time_ns, file name)`: older files are skipped from a
`stat` alone, so a tick over thousands of files stays cheap; only new files are read.

A drop that cannot become a sample never stops the inbox. It is rejected: the tick's log says
why (a warning), a line is appended to `<storage_root>/inbox_rejected.jsonl`, and an observation
of the asset `inbox_rejected_drops` (`REJECTED_DROPS`) records the file and the reason, so the
UI lists every rejected drop under that asset. The cursor moves past it. Rejected are: anything
that is not a regular file (a directory named `x.fa`, a FIFO, a socket, a device: their type is
read with `lstat`, and a file is opened non-blocking, so nothing here ever waits on a FIFO), a
file that cannot be read (permissions, I/O errors), a name the storage refuses, a name whose
samples are taken by other content. A fixed file is taken again once it changes: a new copy, a
`touch` or a `chmod` all set its ctime, a new arrival.

Symbolic links are rejected, whether they point inside the inbox or not, broken or not. The
inbox is the door between whoever may drop files and the platform, which copies what it takes
into its storage, where its outputs and the UI expose it: a link can point anywhere on the host
the sensor's user may read (another lab's data, a key, `/proc/self/environ`), so following one
would let a dropper publish files they could not read themselves. Only files dropped into the
inbox itself are taken (links are opened with `O_NOFOLLOW`, so a file swapped for a link
after the scan is refused too): copy the file in, do not link it. (A hard link is a file of the
inbox like any other: the kernel's `protected_hardlinks` lets users link only files they may
read and write.)

Trouble that is not a drop's own (the storage's disk full or read-only) fails the tick instead,
so nothing is lost: the same files are tried again at the next tick.

Staged copies (`<storage_root>/samples/.incoming/`) older than an hour are leftovers of a tick
that was killed while copying: each tick removes them first.

Each tick also marks failed the runs on this host whose process was killed (still STARTED, their
process gone: a `vnp run`, or a run the daemon launched) and frees their `gpu` pool slots (`run_liveness.reclaim_dead_runs`): the steps that the
UI queues on the pool would otherwise wait for those slots forever.
"""

from __future__ import annotations

import json
import os
import stat
import time
from dataclasses import astuple, dataclass
from pathlib import Path

from dagster import (
    AssetKey,
    AssetObservation,
    AssetSpec,
    DefaultSensorStatus,
    MetadataValue,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)

from vnp_assets.partitions import samples_partitions
from vnp_assets.resources import SampleStorage
from vnp_assets.run_liveness import reclaim_dead_runs
from vnp_assets.samples import RejectedDrop, clean_staging, describe_file_type, register_sample, sample_name

# Bounds one tick's copying (a tick must finish well inside Dagster's 60 s); the rest waits a tick.
BYTES_PER_TICK = 4 << 30
REJECTED_DROPS_KEY = AssetKey("inbox_rejected_drops")
# Observed, never materialized: each rejected drop is one observation, with the file and the reason.
REJECTED_DROPS = AssetSpec(
    REJECTED_DROPS_KEY, group_name="inbox", kinds={"file"},
    description="Files dropped into the inbox that could not become samples: each observation names the file "
                "and the reason (not a regular file, a symbolic link, unreadable, a name the storage refuses...). "
                "Fix the file and drop it again; the same list is in <storage_root>/inbox_rejected.jsonl.")
REJECTED_LOG = "inbox_rejected.jsonl"
SYMLINK_REASON = ("a symbolic link: only files dropped into the inbox itself are taken, a link could point anywhere "
                  "on the host (copy the file in, not a link)")


@dataclass(frozen=True, order=True)
class Arrival:
    time_ns: int
    name: str


@dataclass(frozen=True)
class Drop:
    """A FASTA-named entry of the inbox, as `lstat` saw it (a symbolic link is not followed)."""

    arrival: Arrival
    mode: int
    size: int


def scan_inbox(inbox: Path, after: Arrival, settled_before_ns: int) -> list[Drop]:
    """FASTA-named entries (of any type) that arrived after the cursor and have settled, oldest first."""
    drops = []
    with os.scandir(inbox) as entries:
        for entry in entries:
            if sample_name(entry.name) is None:
                continue
            try:
                status = entry.stat(follow_symlinks=False)
            except FileNotFoundError:  # removed since the listing
                continue
            arrival = Arrival(max(status.st_mtime_ns, status.st_ctime_ns), entry.name)
            if after < arrival and arrival.time_ns <= settled_before_ns:
                drops.append(Drop(arrival, status.st_mode, status.st_size))
    return sorted(drops, key=lambda drop: drop.arrival)


@sensor(job_name="index_sample", default_status=DefaultSensorStatus.RUNNING, minimum_interval_seconds=30,
        description="Registers each FASTA dropped into the inbox as a sample and requests its sequence_index. "
                    "A drop that cannot be a sample (a link, a directory, unreadable...) is skipped and "
                    "recorded under the asset inbox_rejected_drops. Also fails the runs whose process was killed, "
                    "freeing their gpu slots (the daemon then retries them).")
def fasta_inbox_sensor(context: SensorEvaluationContext, storage: SampleStorage) -> SensorResult:
    """Registers each new FASTA of the inbox as a sample and requests its `sequence_index`."""
    cursor = Arrival(*json.loads(context.cursor)) if context.cursor else Arrival(-1, "")
    inbox = Path(storage.inbox_dir)
    if not inbox.is_dir():
        return SensorResult(skip_reason=f"the inbox {inbox} does not exist (create it, or set inbox_dir)",
                            cursor=context.cursor)
    if removed := clean_staging(storage):
        context.log.info(f"removed {len(removed)} staged cop(ies) left by an interrupted tick in {storage.staging_dir}")
    for run_id in reclaim_dead_runs(context.instance):
        context.log.warning(f"run {run_id}: its process is gone (killed): marked failed, its gpu slots freed")
    settled_before_ns = time.time_ns() - int(storage.inbox_settle_seconds * 1e9)
    registered = set(context.instance.get_dynamic_partitions(samples_partitions.name))
    new_samples: list[str] = []
    rejected: list[AssetObservation] = []
    copied_bytes = 0
    for drop in scan_inbox(inbox, cursor, settled_before_ns):
        if copied_bytes > BYTES_PER_TICK:
            break
        source = inbox / drop.arrival.name
        try:
            if stat.S_ISLNK(drop.mode):
                raise RejectedDrop(f"{source}: {SYMLINK_REASON}")
            if not stat.S_ISREG(drop.mode):
                raise RejectedDrop(f"{source}: {describe_file_type(drop.mode)}, not a regular file: "
                                   "only regular files are taken")
            copied_bytes += drop.size
            sample, is_new = register_sample(source, sample_name(drop.arrival.name), storage, registered,
                                             follow_symlinks=False)
        except RejectedDrop as error:
            # Raising would keep the cursor here and fail every later tick on this one file.
            rejected.append(reject(context, storage, drop, str(error).removeprefix(f"{source}: ")))
            cursor = drop.arrival
            continue
        if is_new:
            context.log.info(f"{shown(drop.arrival.name)}: new sample {sample}")
            registered.add(sample)
            new_samples.append(sample)
        cursor = drop.arrival
    return SensorResult(
        run_requests=[RunRequest(partition_key=sample, run_key=sample) for sample in new_samples],
        dynamic_partitions_requests=[samples_partitions.build_add_request(new_samples)] if new_samples else [],
        asset_events=rejected,
        cursor=json.dumps(astuple(cursor)),
    )


def reject(context: SensorEvaluationContext, storage: SampleStorage, drop: Drop, reason: str) -> AssetObservation:
    """Report a drop that cannot be a sample: the tick's log, `inbox_rejected.jsonl`, and the observation returned."""
    name = shown(drop.arrival.name)
    reason = shown(reason)
    context.log.warning(f"{name}: rejected, not registered: {reason} (fix it and drop it again)")
    record = {"time": time.time(), "file": name, "inbox": storage.inbox_dir, "reason": reason,
              "arrival_ns": drop.arrival.time_ns, "size": drop.size}
    log_path = Path(storage.storage_root) / REJECTED_LOG
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("a") as log:
            log.write(json.dumps(record) + "\n")
    except OSError as error:  # the observation and the tick's log still say it
        context.log.error(f"could not append to {log_path}: {error}")
    return AssetObservation(
        REJECTED_DROPS_KEY,
        description=f"{name}: {reason}",
        metadata={"file": MetadataValue.text(name), "reason": MetadataValue.text(reason),
                  "size_bytes": MetadataValue.int(drop.size),
                  "arrived": MetadataValue.timestamp(drop.arrival.time_ns / 1e9),
                  "rejected_log": MetadataValue.path(str(log_path))},
    )


def shown(text: str) -> str:
    """`text` printable as UTF-8 (a file name's undecodable bytes as `\\xNN`)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
