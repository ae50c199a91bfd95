"""The Ray side of one GPU step: an actor that holds one GPU, says where it is, and runs one call.

Only Ray and the standard library are imported here, at module level: Ray imports this module in
the actor's process on a cluster node, which must not pay for importing Dagster (`vnp_assets/__init__`
imports nothing). The Dagster side is `vnp_assets.ray_execution`.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    """Where a GPU step runs: the Ray node and the GPU Ray granted it."""

    node_id: str
    node_ip: str
    hostname: str
    pid: int
    gpu_ids: tuple[str, ...]  # as Ray granted them: physical ids of the node
    cuda_visible_devices: str | None  # what the process sees, set by Ray from gpu_ids

    @property
    def where(self) -> str:
        """E.g. "node 10.0.0.7 (gpu-03, 3f2a9c1e) GPU 1"."""
        gpus = ",".join(self.gpu_ids) or "none"
        return f"node {self.node_ip} ({self.hostname}, {self.node_id[:8]}) GPU {gpus}"


class GpuStepActor:
    """One GPU step on one Ray node: created with `num_gpus=1`, asked `placement()`, then `run()` once.

    Ray sets the process's `CUDA_VISIBLE_DEVICES` to the physical id it grants before this class
    is even imported, so nothing here can start CUDA on another GPU. Threaded (`max_concurrency=2`):
    `progress()` answers while `run()` works. The caller kills the actor after its one call: each
    step gets a process of its own, as the local path's device process is.
    """

    def __init__(self, lock_dir: str | None = None, lock_timeout_s: float | None = None, preload: Sequence[str] = ()):
        for module in preload:  # an actor started ahead of its step imports what the step will need
            importlib.import_module(module)
        self._lock_dir = lock_dir
        self._lock_timeout_s = lock_timeout_s
        self._progress: dict[str, dict] = {}
        self._progress_lock = threading.Lock()

    def placement(self) -> Placement:
        import ray

        context = ray.get_runtime_context()
        return Placement(
            node_id=context.get_node_id(),
            node_ip=ray.util.get_node_ip_address(),
            hostname=socket.gethostname(),
            pid=os.getpid(),
            gpu_ids=tuple(str(gpu) for gpu in context.get_accelerator_ids().get("GPU", [])),
            cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
        )

    def progress(self) -> dict[str, dict]:
        """The latest progress report of each model (`kind`), as dicts."""
        with self._progress_lock:
            return dict(self._progress)

    def _report(self, kind: str, report: Any) -> None:
        as_dict = asdict(report) if is_dataclass(report) else dict(report)
        with self._progress_lock:
            self._progress[kind] = as_dict

    def run(self, fn: Callable[..., Any], args: tuple, kwargs: dict, with_progress: bool) -> tuple[bool, Any, str | None]:
        """`fn(*args, **kwargs)`: (True, result, None), or (False, exception, traceback) if it raised.

        The exception comes back as a value so the caller re-raises its own type, as
        `vnp_core.gpu.run_in_device_process` does. With `with_progress`, `fn` gets `progress=`.
        """
        logging.basicConfig(level=logging.INFO, format="%(asctime)s - vnp Ray GPU step - %(message)s")
        if with_progress:
            kwargs = {**kwargs, "progress": self._report}
        started = time.monotonic()
        try:
            with self._node_lease():
                log.info("%s starting on GPU %s (lease wait and start: %.1f s)",
                         getattr(fn, "__qualname__", repr(fn)), os.environ.get("CUDA_VISIBLE_DEVICES"),
                         time.monotonic() - started)
                return True, fn(*args, **kwargs), None
        except Exception as error:  # noqa: BLE001 - it travels back to the step, which raises it
            from ray import cloudpickle

            text = traceback.format_exc()
            try:
                cloudpickle.dumps(error)  # what Ray sends it back with
            except Exception:  # noqa: BLE001 - an unpicklable exception still reaches the step, as text
                error = RuntimeError(repr(error))
            return False, error, text

    def _node_lease(self):
        """The node-local guard: the same per-GPU flock the local path takes (`vnp_core.gpu.GpuLease`), on
        this node's lock folder, so a local run on this node and a Ray step never share a GPU."""
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        if self._lock_dir is None or not visible.strip().isdigit():  # no lock folder, or not one plain id (MIG, UUID)
            return nullcontext()
        from vnp_core.gpu import GpuLease

        return GpuLease([int(visible)], Path(self._lock_dir), timeout=self._lock_timeout_s)
