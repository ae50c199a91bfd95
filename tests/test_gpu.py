"""GPU discovery, the cross-process lease and device processes, with simulated devices (no GPU needed)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vnp_core.gpu import (
    DeviceProcessError,
    GpuLease,
    discover_devices,
    run_in_device_process,
    start_spare_device_process,
    stop_spare_device_process,
)


@pytest.fixture
def four_gpus(monkeypatch):
    monkeypatch.setattr("torch.cuda.device_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_discovery_lists_physical_ids_and_honours_allowed(four_gpus):
    assert discover_devices() == [0, 1, 2, 3]
    assert discover_devices([2, 3]) == [2, 3]
    with pytest.raises(ValueError, match=r"GPU\(s\) \[4\] requested.*\[0, 1, 2, 3\]"):
        discover_devices([3, 4])


def test_discovery_maps_cuda_visible_devices_back_to_physical_ids(monkeypatch):
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    assert discover_devices() == [5, 7]
    assert discover_devices([7]) == [7]
    with pytest.raises(ValueError, match=r"\[0\] requested"):
        discover_devices([0])  # cuda:0 here is physical GPU 5, not 0


def test_discovery_without_gpus(monkeypatch):
    monkeypatch.setattr("torch.cuda.device_count", lambda: 0)
    assert discover_devices() == []
    with pytest.raises(ValueError, match="none"):
        discover_devices([0])


def _hold_a_lease(start, lock_dir: Path, holders: Path, log: Path) -> None:
    """Take a lease on one of two GPUs together with the others; prove nobody holds the same one meanwhile."""
    start.wait()
    asked = time.monotonic()
    with GpuLease([0, 1], lock_dir, timeout=60, poll_seconds=0.02) as device:
        waited = time.monotonic() - asked
        # O_EXCL fails if another process holds this device right now.
        fd = os.open(holders / f"gpu{device}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        time.sleep(0.5)
        os.close(fd)
        os.unlink(holders / f"gpu{device}")
    with log.open("a") as f:
        f.write(f"{device} {waited}\n")


def test_lease_is_exclusive_across_processes(tmp_path):
    holders = tmp_path / "holders"
    holders.mkdir()
    log = tmp_path / "log"
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(6)
    workers = [context.Process(target=_hold_a_lease, args=(start, tmp_path / "locks", holders, log)) for _ in range(6)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert [w.exitcode for w in workers] == [0] * 6  # a clash would have failed the O_EXCL create
    leases = [line.split() for line in log.read_text().splitlines()]
    assert sorted(device for device, _ in leases) == ["0", "0", "0", "1", "1", "1"]
    assert sum(float(waited) > 0.3 for _, waited in leases) >= 2  # they did contend for the two GPUs


def _lease_then_sleep(lock_dir: Path, marker: Path) -> None:
    with GpuLease([0], lock_dir):
        marker.touch()
        time.sleep(600)


def test_lease_of_a_killed_process_is_freed(tmp_path):
    marker = tmp_path / "leased"
    holder = multiprocessing.get_context("spawn").Process(target=_lease_then_sleep, args=(tmp_path, marker))
    holder.start()
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    with pytest.raises(TimeoutError, match=r"GPUs \[0\]"):
        GpuLease([0], tmp_path, timeout=0.2, poll_seconds=0.05).acquire()

    os.kill(holder.pid, signal.SIGKILL)
    holder.join()
    with GpuLease([0], tmp_path, timeout=10, poll_seconds=0.05) as device:
        assert device == 0


def _visible_devices() -> str:
    return os.environ["CUDA_VISIBLE_DEVICES"]


def test_device_process_sees_exactly_the_leased_gpu(four_gpus, tmp_path):
    devices = discover_devices([2, 3])
    with GpuLease(devices, tmp_path) as first, GpuLease(devices, tmp_path) as second:
        assert (first, second) == (2, 3)
        assert run_in_device_process(_visible_devices, device=second) == "3"
    assert run_in_device_process(_visible_devices, device=None) == ""


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def test_device_process_cpu_thread_pool_can_be_capped():
    assert run_in_device_process(_torch_threads, device=None, cpu_threads=1) == 1


def _fail(record_id: str) -> None:
    raise ValueError(f"record {record_id!r} is broken")


def test_device_process_error_comes_back_with_its_traceback():
    with pytest.raises(ValueError, match="record 'r7' is broken") as excinfo:
        run_in_device_process(_fail, "r7", device=1)
    note = "\n".join(excinfo.value.__notes__)
    assert "_fail on GPU 1" in note and 'Traceback (most recent call last)' in note and "in _fail" in note


def _killed() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def test_device_process_killed_by_a_signal_is_an_error():
    with pytest.raises(DeviceProcessError, match=r"_killed on GPU 0 was killed by signal 9 \(SIGKILL\)"):
        run_in_device_process(_killed, device=0)


# A module the test functions below never import: present in the child only if it was preloaded.
PRELOADED = "vnp_core.simulate"


def _process_facts() -> tuple[int, str, bool, int]:
    import sys

    import torch

    return os.getpid(), os.environ["CUDA_VISIBLE_DEVICES"], PRELOADED in sys.modules, torch.get_num_threads()


@pytest.fixture
def spare():
    start_spare_device_process([PRELOADED, "torch"])
    yield
    stop_spare_device_process()


def test_spare_device_process_is_bound_to_the_leased_gpu_when_called(spare, four_gpus, tmp_path):
    with GpuLease(discover_devices([2, 3]), tmp_path) as device:
        first = run_in_device_process(_process_facts, device=device, cpu_threads=1)
    assert first[1:] == ("2", True, 1)  # torch was imported before the call: its thread pool is capped all the same
    second = run_in_device_process(_process_facts, device=3)
    assert second[1:3] == ("3", False)  # a spare serves one call: this one ran in a fresh process
    assert second[0] != first[0]


def test_a_spare_asked_for_once_taken_starts_when_the_waiting_one_is_taken(four_gpus):
    import vnp_core.gpu

    start_spare_device_process([PRELOADED])
    first = vnp_core.gpu._spare
    start_spare_device_process(["torch"], once_taken=True)
    assert vnp_core.gpu._spare is first  # not yet: its imports would compete with the waiting spare's
    assert run_in_device_process(_process_facts, device=1)[:3] == (first.pid, "1", True)
    second = vnp_core.gpu._spare
    assert second is not None and second is not first  # started when the first one's call took it
    assert run_in_device_process(_process_facts, device=2)[:3] == (second.pid, "2", False)
    assert vnp_core.gpu._spare is None  # asked for once


def test_spare_that_died_waiting_is_replaced_by_a_fresh_process(four_gpus):
    start_spare_device_process([PRELOADED])
    import vnp_core.gpu

    vnp_core.gpu._spare.kill()
    vnp_core.gpu._spare.wait()
    assert run_in_device_process(_process_facts, device=1)[1:3] == ("1", False)


def test_device_process_refuses_its_gpu_once_cuda_has_started(monkeypatch):
    # The driver reads CUDA_VISIBLE_DEVICES once, when it starts: setting it afterwards would do nothing.
    from vnp_core.gpu import _bind

    monkeypatch.setattr("vnp_core.gpu._cuda_driver_started", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert not _bind({"CUDA_VISIBLE_DEVICES": "1"})
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""


def test_spare_whose_import_started_cuda_hands_its_call_to_a_fresh_process(tmp_path, monkeypatch, caplog):
    # A preloaded module standing for an import that starts the CUDA driver in the spare.
    (tmp_path / "starts_cuda.py").write_text("import sys\nsys.modules['__main__']._cuda_driver_started = lambda: True\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    start_spare_device_process(["starts_cuda", PRELOADED])
    try:
        _, visible, preloaded, _ = run_in_device_process(_process_facts, device=2)
    finally:
        stop_spare_device_process()
    assert (visible, preloaded) == ("2", False)
    assert "had started CUDA before its GPU was set: _process_facts on GPU 2 runs in a fresh process" in caplog.text


def test_spare_leaves_when_its_parent_does(tmp_path):
    pid_file = tmp_path / "spare.pid"
    parent = (f"import vnp_core.gpu as g; g.start_spare_device_process(); "
              f"open({str(pid_file)!r}, 'w').write(str(g._spare.pid))")
    subprocess.run([sys.executable, "-c", parent], check=True, cwd=Path(__file__).resolve().parents[1])
    spare_pid = int(pid_file.read_text())
    deadline = time.monotonic() + 30
    while _alive(spare_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(spare_pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by init) counts as gone.
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_without_gpus_the_hosts_one_slot_is_leased_too(tmp_path):
    """Dagster's `gpu` pool alone can let two runs' steps in at once (on SQLite its claim reads, then writes):
    on a host without GPUs, the CPU is leased like a GPU, so their steps still take turns."""
    from vnp_assets.resources import GpuPool

    pool = GpuPool(lock_dir=str(tmp_path / "locks"), lease_timeout_s=0.3)
    pool._discovered = []  # a host without GPUs, whatever this one has
    with pool.lease() as device:
        assert device is None and (tmp_path / "locks" / "cpu.lock").exists()
        with pytest.raises(TimeoutError):
            with pool.lease():
                pass
    with pool.lease() as device:  # free again
        assert device is None
