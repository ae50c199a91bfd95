"""GPUs: which physical devices this process may use, an exclusive lease on one, a process bound to it.

A lease is an `fcntl.flock` on `<lock_dir>/gpu<N>.lock`. The kernel drops a flock when its holder
exits, however it exits (SIGKILL included), so a crashed step never leaves a GPU taken; a pid
file would. The work then runs in a process of its own whose `CUDA_VISIBLE_DEVICES` is the leased
physical id, never a rank or a local index: a fresh one, or a spare that did its imports ahead
and is given its GPU with its call.

A device process never outlives the process that started it (`exit_with_parent`): killed with
its parent (even by SIGKILL, which no handler sees), it is killed too, and a rerun finds no orphan
holding a GPU or writing a shard.
"""

from __future__ import annotations

import ctypes
import fcntl
import importlib
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


# A spare exits with this status, without running its call, when CUDA started in it before its
# GPU was set (an import that initialised it): the call then runs in a fresh process.
SPARE_REFUSED = 75
CUDA_ERROR_NOT_INITIALIZED = 3


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


# The one slot of a host without GPUs, leased like a GPU: its embedding steps take turns on the CPU.
CPU_SLOT = -1


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
        name = "cpu.lock" if device == CPU_SLOT else f"gpu{device}.lock"
        fd = os.open(self.lock_dir / name, os.O_RDWR | os.O_CREAT, 0o666)
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
    """`fn(*args, **kwargs)` in a Python process of its own that sees only physical GPU `device` (None: no GPU).

    The child gets `CUDA_VISIBLE_DEVICES` before anything in it can initialise CUDA; inside it the
    GPU is `cuda:0`. It is the spare `start_spare_device_process` started, if there is one, or a new
    interpreter. `cpu_threads` caps its torch (OpenMP) thread pool, as torchrun does for its
    workers: a GPU's process does little CPU tensor work, and one pool of every core per GPU would
    oversubscribe the host. `fn`, its arguments and its result must be picklable. The child's
    exception is raised here with its traceback as a note.
    """
    where = "no GPU" if device is None else f"GPU {device}"
    name = getattr(fn, "__qualname__", repr(fn))
    environ = {"CUDA_VISIBLE_DEVICES": "" if device is None else str(device)}
    if cpu_threads is not None:
        environ["OMP_NUM_THREADS"] = str(cpu_threads)
    with tempfile.TemporaryDirectory(prefix="vnp-device-") as tmp:
        call, result = Path(tmp, "call.pkl"), Path(tmp, "result.pkl")
        # Two layers: the child restores sys.path before it unpickles `fn`, so fn's module imports.
        call.write_bytes(pickle.dumps((sys.path, pickle.dumps((fn, args, kwargs)))))
        order = {"call": str(call), "result": str(result), "where": where, "environ": environ}
        child = None
        if (spare := _take_spare()) is not None:
            child = _send(spare, order, started_ahead=True)
            if child.returncode == SPARE_REFUSED:
                log.warning("the spare device process had started CUDA before its GPU was set: %s on %s "
                            "runs in a fresh process", name, where)
                child = None
        if child is None:
            child = _send(_launch(environ), order, started_ahead=False)
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


# This process's spare device process, if it has one, and what the one after it imports (`once_taken`).
_spare: subprocess.Popen | None = None
_next_preload: tuple[str, ...] | None = None
_spare_lock = threading.Lock()


def start_spare_device_process(preload: Sequence[str] = (), *, once_taken: bool = False) -> None:
    """Start now the interpreter that this process's next `run_in_device_process` will use.

    A device process spends seconds on its interpreter and imports before any work (4.2-5.1 s on an
    H200 host, 3.7 s of it importing torch), and a GPU is leased to it meanwhile. A spare does them
    ahead, while the GPU is not yet waiting: it imports `preload`, then waits for its call. It sees
    no GPU until the call sets its GPU; if one of its imports had started CUDA by then, it refuses
    the call, which runs in a fresh process instead.
    A spare serves one call; start the next one when its imports will not compete for the CPU with
    work in progress (on a small CPU-only host they slowed the embedding beside them by a fifth to a quarter).
    A spare leaves when its parent does (its stdin closes; busy, `exit_with_parent` ends it); it keeps the
    environment of its start. `once_taken`: where a spare is waiting, start this one when that one's
    call takes it, so its imports overlap that call's work rather than compete with the first imports.
    """
    global _spare, _next_preload
    with _spare_lock:
        if _spare is None or _spare.poll() is not None:
            _spare = _launch({"CUDA_VISIBLE_DEVICES": ""}, preload, spare=True)
        elif once_taken:
            _next_preload = tuple(preload)


def stop_spare_device_process() -> None:
    """Let this process's spare, if any, leave (its imports done, it sees its stdin close)."""
    global _spare
    with _spare_lock:
        spare, _spare = _spare, None
    if spare is not None:
        spare.communicate("")


def _take_spare() -> subprocess.Popen | None:
    global _spare, _next_preload
    with _spare_lock:
        spare, _spare = _spare, None
        following, _next_preload = _next_preload, None
    if following is not None:
        start_spare_device_process(following)
    if spare is None or spare.poll() is not None:  # none started, or it died waiting
        return None
    return spare


def _send(child: subprocess.Popen, order: dict, *, started_ahead: bool) -> subprocess.Popen:
    """Give `child` its call and wait for it to end."""
    child.communicate(json.dumps({**order, "sent": time.time(), "started_ahead": started_ahead}) + "\n")
    return child


def _launch(environ: dict[str, str], preload: Sequence[str] = (), *, spare: bool = False) -> subprocess.Popen:
    # The child dies with this process (`exit_with_parent`). The kernel's parent-death signal follows
    # the thread that forks: armed for a process this thread waits for (a fresh one), or one started
    # by the main thread; a spare started by another thread, which may end before the spare's call,
    # has the watchdog alone.
    death_signal = not spare or threading.current_thread() is threading.main_thread()
    parent = {PARENT_PID_ENV: str(os.getpid()), PARENT_DEATH_SIGNAL_ENV: "1" if death_signal else "0"}
    return subprocess.Popen([sys.executable, "-m", "vnp_core.gpu", *preload], stdin=subprocess.PIPE, text=True,
                            env={**os.environ, **environ, **parent})


# How a device process knows its parent: set by `_launch`, read (and removed) by the child.
PARENT_PID_ENV = "VNP_DEVICE_PARENT_PID"
PARENT_DEATH_SIGNAL_ENV = "VNP_DEVICE_PARENT_DEATH_SIGNAL"
PR_SET_PDEATHSIG = 1
# How often the watchdog of `exit_with_parent` looks at the parent.
PARENT_POLL_SECONDS = 0.5


def exit_with_parent(parent_pid: int, *, death_signal: bool = True) -> None:
    """Make this process die as soon as its parent `parent_pid` has, however it died (SIGKILL included).

    Two ways, both cheap: the kernel's parent-death signal (`prctl(PR_SET_PDEATHSIG, SIGKILL)`, Linux;
    `death_signal=False` where the forking thread of the parent may end before the parent), and a
    daemon thread that notices the parent is gone (this process re-parented) within
    `PARENT_POLL_SECONDS`. A parent already gone by the time this runs ends this process at once.
    Called first thing in device processes and in `vnp run`'s shard workers: a killed run leaves no
    orphan computing on a GPU or holding a lease.
    """
    if death_signal and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no prctl: the watchdog alone
            pass
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_SECONDS)
        os.kill(os.getpid(), signal.SIGKILL)  # no teardown: the parent that would take the result is gone

    threading.Thread(target=watch, name="vnp-parent-watchdog", daemon=True).start()


def _device_process_main(preload: Sequence[str]) -> None:
    """The child: its imports, then the one call it reads from stdin (none: its parent has gone)."""
    for module in preload:
        importlib.import_module(module)
    line = sys.stdin.readline()
    if not line:
        return
    order = json.loads(line)
    if not _bind(order["environ"]):
        os._exit(SPARE_REFUSED)
    where = order["where"]
    # The child's log lines (the engine's phases, resumes, retries) go to its stderr, which the
    # step shows; timestamped like Dagster's own lines, so a step's fixed cost can be read off them.
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s - vnp device process on {where} - %(message)s")
    call, result = Path(order["call"]), Path(order["result"])
    sys_path, payload = pickle.loads(call.read_bytes())
    sys.path[:] = sys_path
    try:
        fn, args, kwargs = pickle.loads(payload)
        log.info("%s ready to run %.1f s after the call (%s)", getattr(fn, "__qualname__", repr(fn)),
                 time.time() - order["sent"],
                 "a spare: interpreter and imports done ahead" if order["started_ahead"] else "interpreter and imports")
        outcome = (True, fn(*args, **kwargs), None)
    except Exception as error:  # SystemExit and the like end the child: the parent reports its exit status
        outcome = (False, error, traceback.format_exc())
    try:
        data = pickle.dumps(outcome)
    except Exception:  # an unpicklable result or exception still reaches the parent, as text
        data = pickle.dumps((False, RuntimeError(repr(outcome[1])), outcome[2] or traceback.format_exc()))
    result.write_bytes(data)


def _bind(environ: dict[str, str]) -> bool:
    """Set this process's GPU and thread pool; False if CUDA has started here, too late to set the GPU."""
    if _cuda_driver_started():
        return False
    os.environ.update(environ)
    torch = sys.modules.get("torch")  # imported ahead by a spare, or not yet
    if torch is not None and "OMP_NUM_THREADS" in environ:
        torch.set_num_threads(int(environ["OMP_NUM_THREADS"]))  # its OpenMP read the variable at import
    return True


def _cuda_driver_started() -> bool:
    """Whether this process's CUDA driver is initialised (it reads CUDA_VISIBLE_DEVICES then, and never
    again), asked without initialising it: before `cuInit`, every driver call answers NOT_INITIALIZED."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False  # no driver, so nothing started it
    count = ctypes.c_int()
    return driver.cuDeviceGetCount(ctypes.byref(count)) != CUDA_ERROR_NOT_INITIALIZED


if __name__ == "__main__":
    if PARENT_PID_ENV in os.environ:  # not set when run by hand
        exit_with_parent(int(os.environ.pop(PARENT_PID_ENV)),
                         death_signal=os.environ.pop(PARENT_DEATH_SIGNAL_ENV, "1") == "1")
    _device_process_main(sys.argv[1:])
    # The result is on disk: leave without the interpreter's teardown (freeing a 3B model's weights,
    # stopping torch.compile's worker pool), which the step would otherwise wait for.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
