"""`fasta_inbox_sensor`: each FASTA dropped into the inbox becomes a sample partition and a run.

- Files named `*.fa`, `*.fasta`, `*.fna`, optionally `.gz`; hidden files (partial uploads) are ignored.
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
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import astuple, dataclass
from pathlib import Path

from dagster import DefaultSensorStatus, RunRequest, SensorEvaluationContext, SensorResult, sensor

from vnp_assets.assets.sequence_index import sequence_index
from vnp_assets.partitions import samples_partitions
from vnp_assets.resources import VnpSettings
from vnp_assets.samples import register_sample, sample_name

# Bounds one tick's copying (a tick must finish well inside Dagster's 60 s); the rest waits a tick.
BYTES_PER_TICK = 4 << 30


@dataclass(frozen=True, order=True)
class Arrival:
    time_ns: int
    name: str


def scan_inbox(inbox: Path, after: Arrival, settled_before_ns: int) -> list[Arrival]:
    """FASTA files that arrived after the cursor and have settled, oldest first."""
    arrivals = []
    with os.scandir(inbox) as entries:
        for entry in entries:
            if not entry.is_file() or sample_name(entry.name) is None:
                continue
            stat = entry.stat()
            arrival = Arrival(max(stat.st_mtime_ns, stat.st_ctime_ns), entry.name)
            if after < arrival and arrival.time_ns <= settled_before_ns:
                arrivals.append(arrival)
    return sorted(arrivals)


@sensor(target=[sequence_index], default_status=DefaultSensorStatus.RUNNING, minimum_interval_seconds=30)
def fasta_inbox_sensor(context: SensorEvaluationContext, vnp: VnpSettings) -> SensorResult:
    """Registers each new FASTA of the inbox as a sample and requests its `sequence_index`."""
    cursor = Arrival(*json.loads(context.cursor)) if context.cursor else Arrival(-1, "")
    inbox = Path(vnp.inbox_dir)
    settled_before_ns = time.time_ns() - int(vnp.inbox_settle_seconds * 1e9)
    registered = set(context.instance.get_dynamic_partitions(samples_partitions.name))
    new_samples: list[str] = []
    copied_bytes = 0
    for arrival in scan_inbox(inbox, cursor, settled_before_ns):
        if copied_bytes > BYTES_PER_TICK:
            break
        source = inbox / arrival.name
        copied_bytes += source.stat().st_size
        try:
            sample, is_new = register_sample(source, sample_name(arrival.name), vnp, registered)
        except ValueError as error:
            # Raising would keep the cursor here and fail every later tick on this one file.
            context.log.error(f"{arrival.name}: not registered: {error}")
            cursor = arrival
            continue
        if is_new:
            context.log.info(f"{arrival.name}: new sample {sample}")
            registered.add(sample)
            new_samples.append(sample)
        cursor = arrival
    return SensorResult(
        run_requests=[RunRequest(partition_key=sample, run_key=sample) for sample in new_samples],
        dynamic_partitions_requests=[samples_partitions.build_add_request(new_samples)] if new_samples else [],
        cursor=json.dumps(astuple(cursor)),
    )
