"""GPUs: which physical devices this process may use, an exclusive lease on one, a process bound to it.

A lease is an `fcntl.flock` on `<lock_dir>/gpu<N>.lock`. The kernel drops a flock when its holder
exits, however it exits (SIGKILL included), so a crashed step never leaves a GPU taken; a pid
file would. The work then runs in a fresh process whose `CUDA_VISIBLE_DEVICES` is the leased
physical id, never a rank or a local index.
"""

from __future__ import annotations

import fcntl
import logging
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class DeviceProcessError(RuntimeError):
    """A device process ended without returning (killed by a signal, or exited early)."""


def discover_devices(allowed: Sequence[int] | None = None) -> list[int]:
    """Physical ids of the GPUs this process can use, in CUDA order; `allowed` picks some (e.g. [2, 3])."""
    import torch  # here only: leasing and launching device processes need no torch

    count = torch.cuda.device_count()
    # CUDA numbers the devices listed in CUDA_VISIBLE_DEVICES from 0; the list gives their physical ids.
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    physical = list(range(count)) if visible is None else _parse_visible(visible)[:count]
    if allowed is None:
        return physical
    if unknown := [device for device in allowed if device not in physical]:
        raise ValueError(f"GPU(s) {unknown} requested, but the GPUs available here are {physical or 'none'}")
    return list(dict.fromkeys(allowed))


def _parse_visible(visible: str) -> list[int]:
    entries = [entry.strip() for entry in visible.split(",") if entry.strip()]
    if not all(entry.isdigit() for entry in entries):
        raise ValueError(f"CUDA_VISIBLE_DEVICES={visible!r}: only integer GPU ids are supported, not UUIDs or MIG")
    return [int(entry) for entry in entries]


class GpuLease:
    """Exclusive use of one of `devices` among all processes sharing `lock_dir`.

    `with GpuLease([2, 3], lock_dir) as device:` waits until one of the GPUs is free (up to
    `timeout` seconds, None: forever) and yields its physical id; leaving the block frees it.
    """

    def __init__(self, devices: Sequence[int], lock_dir: Path, *, timeout: float | None = None,
                 poll_seconds: float = 0.5):
        if not devices:
            raise ValueError("no GPU to lease: the device list is empty")
        self.devices = list(devices)
        self.lock_dir = Path(lock_dir)
        self.timeout = timeout
        self.poll_seconds = poll_seconds
        self.device: int | None = None
        self._fd: int | None = None

    def acquire(self) -> int:
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            for device in self.devices:
                if self._try_lock(device):
                    return device
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"none of GPUs {self.devices} became free within {self.timeout} s "
                                   f"(leases in {self.lock_dir})")
            time.sleep(self.poll_seconds)

    def _try_lock(self, device: int) -> bool:
        fd = os.open(self.lock_dir / f"gpu{device}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd, self.device = fd, device
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = self.device = None

    def __enter__(self) -> int:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


def run_in_device_process(fn: Callable[..., Any], /, *args, device: int | None, cpu_threads: int | None = None,
                          **kwargs) -> Any:
    """`fn(*args, **kwargs)` in a fresh Python process that sees only physical GPU `device` (None: no GPU).

    The child gets `CUDA_VISIBLE_DEVICES` in its environment from its first instruction, before
    anything could initialise CUDA; inside it the GPU is `cuda:0`. `cpu_threads` caps its torch
    (OpenMP) thread pool, as torchrun does for its workers: a GPU's process does little CPU tensor
    work, and one pool of every core per GPU would oversubscribe the host. `fn`, its arguments and
    its result must be picklable. The child's exception is raised here with its traceback as a note.
    """
    where = "no GPU" if device is None else f"GPU {device}"
    name = getattr(fn, "__qualname__", repr(fn))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "" if device is None else str(device)}
    if cpu_threads is not None:
        env["OMP_NUM_THREADS"] = str(cpu_threads)
    with tempfile.TemporaryDirectory(prefix="vnp-device-") as tmp:
        call, result = Path(tmp, "call.pkl"), Path(tmp, "result.pkl")
        # Two layers: the child restores sys.path before it unpickles `fn`, so fn's module imports.
        call.write_bytes(pickle.dumps((sys.path, pickle.dumps((fn, args, kwargs)))))
        child = subprocess.run([sys.executable, "-m", "vnp_core.gpu", str(call), str(result), where, str(time.time())],
                               env=env)
        if child.returncode < 0:
            signal_name = signal.Signals(-child.returncode).name
            raise DeviceProcessError(f"{name} on {where} was killed by signal {-child.returncode} ({signal_name})")
        if not result.exists():
            raise DeviceProcessError(f"{name} on {where} exited with status {child.returncode} without a result")
        returned, value, child_traceback = pickle.loads(result.read_bytes())
    if returned:
        return value
    value.add_note(f"raised in the device process of {name} on {where}:\n{child_traceback}")
    raise value


def _device_process_main(call: Path, result: Path, where: str, launched: float) -> None:
    # The child's log lines (the engine's phases, resumes, retries) go to its stderr, which the
    # step shows; timestamped like Dagster's own lines, so a step's fixed cost can be read off them.
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s - vnp device process on {where} - %(message)s")
    sys_path, payload = pickle.loads(call.read_bytes())
    sys.path[:] = sys_path
    try:
        fn, args, kwargs = pickle.loads(payload)
        log.info("%s ready to run %.1f s after launch (interpreter and imports)",
                 getattr(fn, "__qualname__", repr(fn)), time.time() - launched)
        outcome = (True, fn(*args, **kwargs), None)
    except Exception as error:  # SystemExit and the like end the child: the parent reports its exit status
        outcome = (False, error, traceback.format_exc())
    try:
        data = pickle.dumps(outcome)
    except Exception:  # an unpicklable result or exception still reaches the parent, as text
        data = pickle.dumps((False, RuntimeError(repr(outcome[1])), outcome[2] or traceback.format_exc()))
    result.write_bytes(data)


if __name__ == "__main__":
    _device_process_main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], float(sys.argv[4]))
    # The result is on disk: leave without the interpreter's teardown (freeing a 3B model's weights,
    # stopping torch.compile's worker pool), which the step would otherwise wait for.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
