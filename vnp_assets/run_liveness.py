"""Which process executes a run, so that a run whose process was killed is found, failed and its
`gpu` pool slots freed.

A run whose process is killed stays STARTED forever unless something notices: the code server that
launched a daemon's run marks it failed, if that server still lives, but leaves its slot claimed.
Either way every later GPU step, the run's own retry included, would wait for that slot forever.
Each run is tagged with the host, pid and start time of the process that executes it
(`process_tags`): `vnp run` tags its runs when it launches them, and every GPU step tags its own run
as it starts (`tag_run_with_this_process`), which covers the runs the daemon launches for the UI, the
sensor, backfills and retries. `reclaim_dead_runs`, called by every `vnp run` and every inbox sensor
tick, marks failed the runs of this host whose process is gone and frees the slots of every run that
has ended; the daemon then retries the failed runs (`run_retries` in dagster.yaml). A retry starts
with its parent's tags, which Dagster copies: they are not judged until the retry's GPU step tags it.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

HOST_TAG, PID_TAG, PROCESS_START_TAG = "vnp/host", "vnp/pid", "vnp/process_start"
# The states of a run whose process may have died under it (a finished run holds no slot).
UNFINISHED = [DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING, DagsterRunStatus.STARTED,
              DagsterRunStatus.CANCELING]


def process_tags() -> dict[str, str]:
    """This process, as run tags: host name, pid and start time (a reused pid is not the same process)."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()),
            PROCESS_START_TAG: str(_process_start(os.getpid()) or "")}


def tag_run_with_this_process(instance: DagsterInstance, run_id: str) -> None:
    """Tag run `run_id` with this process (`process_tags`): the step's process is the run's, in-process."""
    instance.add_run_tags(run_id, process_tags())


def _process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, /proc/<pid>/stat's 22nd field); None if unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[19])  # the fields after the command name start at the 3rd


def process_alive(pid: int, start: str = "") -> bool:
    """Whether process `pid` still runs, and is the one that started at `start` (when known)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    state = Path(f"/proc/{pid}/stat")
    try:
        if state.read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False  # exited, not yet reaped
    except (OSError, IndexError):
        pass
    return not start or str(_process_start(pid) or start) == start


def reclaim_dead_runs(instance: DagsterInstance) -> list[str]:
    """Mark failed the runs of this host whose process is gone (killed: they stay STARTED forever) and
    free their `gpu` pool slots; their ids. Only runs tagged by `process_tags`: a run that never reached
    a GPU step may be a daemon's, whose process is not known."""
    host = socket.gethostname()
    reclaimed = []
    for run in instance.get_runs(RunsFilter(statuses=UNFINISHED, tags={HOST_TAG: host})):
        pid = run.tags.get(PID_TAG, "")
        if not pid.isdigit() or process_alive(int(pid), run.tags.get(PROCESS_START_TAG, "")) \
                or _tags_copied_from_parent(instance, run):
            continue
        instance.report_run_failed(run, message=f"the process that ran this run (pid {pid} on {host}) is gone, "
                                               "killed: marked failed, its gpu slots freed")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        reclaimed.append(run.run_id)
    free_slots_of_finished_runs(instance)
    return reclaimed


def _tags_copied_from_parent(instance: DagsterInstance, run) -> bool:  # noqa: ANN001
    """Whether `run`'s process tags are still those of the run it retries or re-executes: Dagster copies
    them, and the dead process they name is the parent's, not this run's (which has not reached its
    GPU step yet, where it tags itself)."""
    parent = instance.get_run_by_id(run.parent_run_id) if run.parent_run_id else None
    return parent is not None and all(parent.tags.get(tag) == run.tags.get(tag) for tag in (HOST_TAG, PID_TAG, PROCESS_START_TAG))


def free_slots_of_finished_runs(instance: DagsterInstance, pool: str = "gpu") -> list[str]:
    """Free the `pool` slots still claimed by runs that have ended; their ids. A run whose process was
    killed and which Dagster's code server then marked failed keeps its slot, and its own retry would
    wait for that slot forever."""
    info = instance.event_log_storage.get_concurrency_info(pool)
    holders = {slot.run_id for slot in info.claimed_slots} | {step.run_id for step in info.pending_steps}
    ended = sorted(run_id for run_id in holders if (run := instance.get_run_by_id(run_id)) is None or run.is_finished)
    for run_id in ended:
        instance.event_log_storage.free_concurrency_slots_for_run(run_id)
    return ended
