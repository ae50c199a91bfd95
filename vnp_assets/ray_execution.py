"""GPU steps on a Ray cluster: one call, one GPU, through dagster-ray's Ray resource.

`RayGpuCluster` is a `dagster_ray.RayResource` (the integration's resource for a Ray cluster)
pointed at an existing cluster by address. Its `run_on_gpu(fn, *args, log=..., label=...)` runs
`fn(*args, **kwargs)`, the same picklable function the local path runs in its device process
(`vnp_core.engine.embed_shards`), in a Ray actor created with `num_gpus=1` and a share of the
node's CPUs, and returns `(result, where)`, `where` naming the node and the GPU, e.g.
"node 10.0.0.7 (gpu-03, 3f2a9c1e) GPU 1".

Why this piece of dagster-ray, and not the others (dagster-ray 0.4.8, Ray 2.60):

- `ray_executor` / `RayRunLauncher` submit whole Dagster steps or runs as Ray jobs: every step of
  the job would leave the Dagster host (the issue keeps CPU steps where they are), each step's
  process on a node would need the Dagster instance's storage (not the SQLite of `vnp run` and
  `dagster dev`) and would still have to find its GPU itself.
- `PipesRayJobClient` submits one Ray job per call: an entrypoint command, the call and its result
  carried as environment variables or Pipes messages (JSON), the job API of the dashboard, and an
  asset `context` where the GPU pool only has a logger. A job also outlives a killed step: the
  step's retry would then write the shard's checkpoint beside an orphan still writing it, and a
  job still waiting for a GPU fails after `RAY_JOB_START_TIMEOUT_SECONDS` (900 s), where a shard
  may well wait hours behind other runs.
- `RayResource` connects the step's process to the cluster (`ray.init`, client mode for a `ray://`
  address, as every dagster-ray resource does, or as a driver on a cluster node for `HOST:PORT`),
  with dagster-ray's configuration (`ray_init_options`, `env_vars`) and lifecycle: as a nested
  resource, Dagster connects it when the step starts and disconnects it when it ends. Its `connect`
  is overridden for two things a GPU step must not pay for (see `_ray_init`). The step's process
  is the Ray driver: Ray keeps the GPU work only while the step lives (after a SIGKILL of a step's
  process, the next step had the GPU 5-8 s later, its own start included, as a driver and through
  Ray Client alike), and the pickled function travels as an argument.

Why an actor per call rather than a task: the step must know where its shard runs before the work
starts (a worker killed mid-shard is then named by node and GPU), and must log the engine's
progress while it works. Through Ray Client a streaming generator task cannot be iterated (its ref
is not iterable), and a task that reports back needs an actor to report to anyway; an actor answers
`placement()` as soon as it exists and `progress()` while `run()` works (two threads). It lives for
one call and is then killed: each step gets a fresh process, no CUDA state carried over, as the
local device process does. It has `max_restarts=0` and `max_task_retries=0`: Ray never reruns a
step; Dagster's retry or a backfill does, and the engine resumes from the shard's checkpoint on the
shared storage. A process may start its next step's actor ahead (`start_ahead`: `vnp run`'s shard
workers do, while the index is built), its imports done by the time the step asks for it, as the
local path's spare device process is; one that died meanwhile is replaced by a new one.

Ray sets `CUDA_VISIBLE_DEVICES` in the actor's process to the physical id it grants, before any of
our code runs, and `OMP_NUM_THREADS` to its CPU share. A GPU subset is expressed the Ray way:
`CUDA_VISIBLE_DEVICES=2,3 ray start ... --num-gpus=2` on that node. The actor also takes the local
path's per-GPU flock on its node (`lock_dir`), so a local run and a Ray step never share a GPU.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from logging import Logger
from types import SimpleNamespace
from typing import Any

from dagster_ray import RayResource
from pydantic import Field, PrivateAttr

from vnp_assets.ray_worker import GpuStepActor, Placement

CLIENT_PORT = 10001  # Ray Client's port on the head (`ray start --ray-client-server-port`)
GCS_PORT = 6379  # the head's GCS port (`ray start --port`)

_connect_lock = threading.Lock()
# The actor this process started for its next GPU step (`RayGpuCluster.start_ahead`), by cluster address.
_started_ahead: dict[str, Any] = {}


# Ray Client's proxy starts a server per connection, a process that dies now and then while it starts
# (ray-project/ray#63202), each time after ~30-60 s; the proxy then answers with one of these.
CLIENT_SERVER_FAILURES = ("Starting Ray client server failed", "Proxy failed to Connect to backend", "in start_specific_server")


class RayClusterUnreachable(ConnectionError):
    """The Ray cluster at the configured address did not answer, or would not take a connection."""


class RayGpuStepError(RuntimeError):
    """A GPU step's Ray worker died (killed, out of memory, its node gone) before it returned."""


def split_address(address: str) -> tuple[bool, str, int]:
    """`ray://HOST[:PORT]` (Ray Client) or `HOST[:PORT]` (a GCS address): (client mode, host, port)."""
    client = address.startswith("ray://")
    rest = address.removeprefix("ray://").rstrip("/")
    host, _, port = rest.rpartition(":") if ":" in rest else (rest, "", "")
    if not host or (port and not port.isdigit()):
        raise ValueError(f"ray_address {address!r}: expected ray://HOST:PORT (Ray Client, e.g. ray://head:10001) "
                         f"or HOST:PORT (the head's GCS, e.g. head:6379, from a node of the cluster)")
    return client, host.strip("[]"), int(port) if port else (CLIENT_PORT if client else GCS_PORT)


def check_reachable(address: str, timeout_s: float) -> None:
    """Raise `RayClusterUnreachable` (one line) unless Ray answers at `address` within `timeout_s`.

    `ray.init` itself waits 30 s (Ray Client) to minutes (a GCS address) before giving up on an
    address nobody answers at. A TCP connection, even an HTTP/2 one, proves little (a proxy or a
    firewall may take it); so this asks Ray's own question: the ping Ray Client starts with, or the
    GCS's cluster id, which `ray.init` asks first.
    """
    import grpc

    client, host, port = split_address(address)
    deadline = time.monotonic() + timeout_s
    reason = None
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as error:
        reason = "no answer" if isinstance(error, TimeoutError) else (error.strerror or type(error).__name__).lower()
    if reason is None:
        channel = grpc.insecure_channel(f"{host}:{port}")
        try:
            _ask_ray(channel, client, timeout=max(0.1, deadline - time.monotonic()))
        except grpc.RpcError as error:
            reason = ("no answer" if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                      else f"what answers there is not {'Ray Client' if client else 'a Ray GCS'} (gRPC {error.code().name})")
        finally:
            channel.close()
    if reason is not None:
        how = (f"`ray start --head --ray-client-server-port={port}` on the head" if client
               else f"`ray start --head --port={port}` on the head")
        raise RayClusterUnreachable(
            f"Ray cluster at {address} cannot be reached: {reason} (waited at most {timeout_s:g} s); start it "
            f"({how}) or set ray_address (VNP_SETTINGS, or vnp run --ray-address) to a running head")


def _ask_ray(channel, client: bool, timeout: float) -> None:
    if client:
        from ray.core.generated import ray_client_pb2, ray_client_pb2_grpc

        ping = ray_client_pb2.ClusterInfoRequest(type=ray_client_pb2.ClusterInfoType.PING)
        ray_client_pb2_grpc.RayletDriverStub(channel).ClusterInfo(ping, timeout=timeout)
    else:
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

        gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(gcs_service_pb2.GetClusterIdRequest(),
                                                                          timeout=timeout)


class RayGpuCluster(RayResource):
    """An existing Ray cluster, reached at `address`, that runs GPU steps one GPU each (`run_on_gpu`)."""

    address: str = Field(description="ray://HOST:10001 (Ray Client, from outside the cluster) or HOST:6379 "
                                     "(the head's GCS, when Dagster runs on a node of the cluster).")
    connect_timeout_s: float = Field(default=10.0, description="How long the cluster has to answer before a step fails.")
    client_connect_attempts: int = Field(
        default=3, description="Ray Client connections tried when its server fails to start (ray-project/ray#63202).")
    cpus_per_gpu: float | None = Field(
        default=None, description="CPUs a GPU step asks for. Default: the fewest CPUs per GPU of the cluster's GPU nodes.")
    gpu_wait_timeout_s: float | None = Field(
        default=24 * 3600.0, description="How long a step waits for a free GPU of the cluster (None: forever).")
    lock_dir: str | None = Field(
        default="/tmp/vnp-gpu-locks", description="The local path's per-GPU lock folder, on each node (None: no node lease).")
    lock_timeout_s: float | None = Field(
        default=24 * 3600.0, description="How long a step on its GPU waits for a local run there to free it (None: forever).")
    log_every_s: float = Field(default=30.0, description="How often a step logs its progress.")

    _mode: str = PrivateAttr(default="")

    @property
    def host(self) -> str:
        return split_address(self.address)[1]

    @property
    def name(self) -> str:
        return f"Ray cluster at {self.address}"

    @property
    def ray_address(self) -> str:  # the address as given: RayResource's own is always ray://host:redis_port
        return self.address

    @property
    def created(self) -> bool:  # an existing cluster: nothing to create or wait for, only to connect to
        return True

    @property
    def ready(self) -> bool:
        return True

    def connect(self, context):
        check_reachable(self.address, self.connect_timeout_s)
        client = split_address(self.address)[0]
        self._mode = "Ray Client" if client else "a driver on a cluster node"
        for attempt in range(1, self.client_connect_attempts + 1):
            try:
                return self._ray_init()
            except ConnectionAbortedError as error:
                import ray

                # A failed Ray Client connect leaves Ray's client mode on: the process's next `ray.init`
                # as a driver would then fail on an assert. `shutdown` turns it off.
                ray.shutdown()
                if not (client and any(sign in str(error) for sign in CLIENT_SERVER_FAILURES)):
                    raise
                if attempt == self.client_connect_attempts:
                    raise RayClusterUnreachable(
                        f"Ray cluster at {self.address}: Ray Client's server for this connection failed to start {attempt} "
                        f"times (ray-project/ray#63202); try again, or connect as a driver from a cluster node (HOST:{GCS_PORT})") from error
                context.log.warning(f"Ray Client's server for this step failed to start (attempt {attempt} of "
                                    f"{self.client_connect_attempts}, ray-project/ray#63202): connecting again")

    def _ray_init(self):
        """dagster-ray's `RayResource.connect` (`ray_init_options` with Dagster's EnvVars resolved, plus the
        environment variables it injects), less two things a GPU step does not want: applying Ray Data's
        options (an import of ray.data, pandas and pyarrow, here and in a task on the cluster), and a
        `runtime_env` with nothing in it, which dagster-ray always sends: Ray Client's proxy then asks the
        head's runtime-env agent for it, and the fork of its per-connection server failed 2 times in 8 on
        a loopback head (once in 48 without one; never in 48 with GRPC_ENABLE_FORK_SUPPORT=false on the head)."""
        import ray
        from dagster_ray.utils import _process_dagster_env_vars

        options = _process_dagster_env_vars(dict(self.ray_init_options))
        runtime_env = dict(options.pop("runtime_env", None) or {})
        env_vars = {**runtime_env.get("env_vars", {}), **self.get_env_vars_to_inject()}
        runtime_env.pop("env_vars", None)
        if env_vars := {name: value for name, value in env_vars.items() if value is not None}:
            runtime_env["env_vars"] = env_vars
        if runtime_env:
            options["runtime_env"] = runtime_env
        self._context = ray.init(address=self.ray_address, **options)
        return self._context

    def on_connect(self, context) -> None:
        context.log.info(f"Connected to the {self.display_name} as {self._mode}")

    def ensure_connected(self, log: Logger) -> None:
        """Connect this process, unless it is already (this resource set up by Dagster, or an earlier call)."""
        import ray

        with _connect_lock:
            if self.connected or ray.is_initialized():
                return
            # Not dagster-ray's `_connect`, which logs a failure with its traceback: ours say it in one line.
            context = SimpleNamespace(log=log)  # all connecting needs of a Dagster context
            self.connect(context)
            self.on_connect(context)

    def disconnect(self) -> None:
        if self._context is not None:
            self._context.disconnect()
            self._context = None

    def gpu_count(self, log: Logger | None = None) -> int:
        """The GPUs of the cluster's nodes that are alive now: what the Dagster `gpu` pool is sized to."""
        import ray

        self.ensure_connected(log or logging.getLogger(__name__))
        return int(ray.cluster_resources().get("GPU", 0))

    def cpu_share(self) -> float:
        """CPUs per GPU step: `cpus_per_gpu`, else the fewest CPUs per GPU among the GPU nodes (so every GPU
        of every node can hold a step at once), rounded down to a whole CPU where there is at least one."""
        import ray

        if self.cpus_per_gpu is not None:
            return self.cpus_per_gpu
        shares = [node["Resources"].get("CPU", 0.0) / node["Resources"]["GPU"]
                  for node in ray.nodes() if node["Alive"] and node["Resources"].get("GPU", 0) > 0]
        share = min(shares, default=1.0)
        return float(math.floor(share)) if share >= 1 else share

    def run_on_gpu(self, fn: Callable[..., Any], /, *args, log: Logger, label: str | None = None,
                   with_progress: bool = False, **kwargs) -> tuple[Any, str]:
        """`fn(*args, **kwargs)` in a Ray actor holding one GPU of the cluster: (its result, where it ran).

        `label` names the step in messages (e.g. "shard 3 of sample S"). `with_progress`: `fn` also
        takes `progress=` (the engine's callback), whose reports are logged every `log_every_s`.
        `fn`'s exception is raised here with its traceback as a note; a worker that dies raises
        `RayGpuStepError` naming `label`, the node and the GPU.
        """
        import ray
        from ray.exceptions import GetTimeoutError, RayError

        label = label or getattr(fn, "__qualname__", repr(fn))
        self.ensure_connected(log)
        actor, ahead = self._actor_for_step(log, label)
        placement: Placement | None = None
        try:
            placement = self._await_placement(actor, log, label)
            where = placement.where
            log.info(f"{label}: on {where} of the {self.display_name} ({self.cpu_share():g} CPUs, CUDA_VISIBLE_DEVICES="
                     f"{placement.cuda_visible_devices}){'; its actor was started ahead' if ahead else ''}")
            running = actor.run.remote(fn, args, kwargs, with_progress)
            logged: dict[str, str] = {}
            while not ray.wait([running], timeout=self.log_every_s)[0]:
                if with_progress:
                    try:
                        reports = ray.get(actor.progress.remote(), timeout=60)
                    except GetTimeoutError:  # a busy actor: the next round will tell
                        continue
                    for line in _progress_lines(reports, logged):
                        log.info(f"{label}: {line}")
            returned, value, remote_traceback = ray.get(running)
        except (RayError, ConnectionError) as error:  # ConnectionError: Ray Client's connection lost
            raise RayGpuStepError(_failure_message(label, fn, placement, error, self.address)) from error
        finally:
            try:
                ray.kill(actor, no_restart=True)  # frees its GPU now; a failed step's actor is already gone
            except Exception:  # noqa: BLE001 - the cluster or the connection may be gone too
                pass
        if returned:
            return value, where
        value.add_note(f"raised in the Ray GPU step {label} on {where}:\n{remote_traceback}")
        raise value

    def start_ahead(self, preload: Sequence[str], log: Logger) -> None:
        """Create the actor of this process's next GPU step now, importing `preload` (the engine, the
        compiler) while other work goes on: `vnp run`'s shard workers do so while the index is built, as
        the local path starts a spare device process. The step then finds its process up and its imports
        done (both cost a fresh actor ~2-3 s on an H200 host). The actor holds its GPU from now on, and
        dies with this process if no step takes it."""
        self.ensure_connected(log)
        if self.address not in _started_ahead:
            _started_ahead[self.address] = self._new_actor(preload)

    def _new_actor(self, preload: Sequence[str] = ()):
        import ray

        return ray.remote(GpuStepActor).options(
            num_gpus=1, num_cpus=self.cpu_share(), max_restarts=0, max_task_retries=0, max_concurrency=2,
        ).remote(self.lock_dir, self.lock_timeout_s, tuple(preload))

    def _actor_for_step(self, log: Logger, label: str) -> tuple[Any, bool]:
        """The actor started ahead for this step if it is alive, else a new one; and which it is."""
        import ray
        from ray.exceptions import RayError

        actor = _started_ahead.pop(self.address, None)
        if actor is not None:
            asked = actor.placement.remote()
            try:
                if ray.wait([asked], timeout=self.connect_timeout_s)[0]:
                    ray.get(asked)  # raises if it died (its node left, its imports failed)
                return actor, True  # placed, or still waiting for a GPU or importing: the step waits as usual
            except (RayError, ConnectionError) as error:
                log.warning(f"{label}: the actor started ahead for this step is gone ({type(error).__name__}): "
                            "starting another")
                ray.kill(actor, no_restart=True)
        return self._new_actor(), False

    def _await_placement(self, actor, log: Logger, label: str) -> Placement:
        import ray

        asked = actor.placement.remote()
        started = time.monotonic()
        deadline = None if self.gpu_wait_timeout_s is None else started + self.gpu_wait_timeout_s
        while True:
            wait_s = 60.0 if deadline is None else max(0.0, min(60.0, deadline - time.monotonic()))
            if ray.wait([asked], timeout=wait_s)[0]:
                return ray.get(asked)
            if deadline is not None and time.monotonic() >= deadline:
                raise RayGpuStepError(f"{label}: no GPU of the {self.display_name} became free within "
                                      f"{self.gpu_wait_timeout_s:g} s ({self.gpu_count(log)} GPUs in the cluster)")
            log.info(f"{label}: waiting {time.monotonic() - started:.0f} s for a free GPU of the {self.display_name} "
                     f"({self.gpu_count(log)} GPUs in the cluster)")


@contextmanager
def ray_left_as_found(cluster: RayGpuCluster) -> Iterator[None]:
    """Within, `cluster` may connect this process to Ray; after, it is connected only if it was before.

    A caller's process outlives the runs it makes, and Ray ends a connected process once its cluster
    has been gone for 60 s ("Failed to connect to GCS ... The program will terminate").
    """
    import ray

    was_connected = ray.is_initialized()
    try:
        yield
    finally:
        if not was_connected and ray.is_initialized():
            _started_ahead.pop(cluster.address, None)  # an actor handle does not outlive its connection
            cluster.disconnect()
            ray.shutdown()  # a no-op unless another resource connected this process


def ray_gpu_count(address: str, *, connect_timeout_s: float = 10.0, log: Logger | None = None) -> int:
    """The GPUs of the Ray cluster at `address` (its alive nodes): the size of the Dagster `gpu` pool.
    Connects this process for the question only."""
    cluster = RayGpuCluster(address=address, connect_timeout_s=connect_timeout_s)
    with ray_left_as_found(cluster):
        return cluster.gpu_count(log)


def _progress_lines(reports: dict[str, dict], logged: dict[str, str]) -> list[str]:
    """The progress lines that changed since the last call, worded as the local path's (`vnp_assets.progress`)."""
    lines = []
    for kind, report in sorted(reports.items()):
        seconds = max(report["seconds"], 1e-9)
        line = (f"{kind}: {report['sequences_done']:,}/{report['sequences_total']:,} sequences, "
                f"{(report['sequences_done'] - report['resumed_from_rows']) / seconds:,.1f} sequences/s, "
                f"{report['tokens_done'] / seconds:,.0f} tokens/s")
        if logged.get(kind) != line:
            lines.append(line)
            logged[kind] = line
    return lines


def _failure_message(label: str, fn: Callable, placement: Placement | None, error: BaseException, address: str) -> str:
    """One line: which step, which node and GPU, what happened, what to do."""
    name = getattr(fn, "__qualname__", repr(fn))
    where = placement.where if placement is not None else "a node of the cluster, before it reported which"
    if isinstance(error, ConnectionError):
        what = f"the connection to the Ray cluster at {address} was lost while it ran ({' '.join(str(error).split())[:200]})"
    else:
        what = f"its Ray worker died ({_death_reason(error)})"
    return (f"{label}: {name} on {where}: {what}; Ray does not rerun it: a retry or a backfill of this "
            f"partition does, resuming from the shard's last checkpoint on the shared storage")


def _death_reason(error: BaseException) -> str:
    """A short reason out of Ray's multi-line error text."""
    text = str(error)
    if "error raised in its creation task" in text:
        return f"its actor failed to start: {text.strip().splitlines()[-1][:200]}"
    if "node has died" in text or "NODE_DIED" in text:
        return "its node left the cluster"
    if "running low on memory" in text:
        return "Ray's memory monitor killed it: the node ran low on memory"
    if "Worker exit detail" in text or "worker process has died" in text:
        return "its process ended without returning: killed (SIGKILL, the OOM killer) or crashed"
    return f"{type(error).__name__}: {text.strip().splitlines()[0][:200] if text.strip() else ''}"
