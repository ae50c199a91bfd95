"""Issue 15 on the CPU: the Ray path's fixed cost against the local path's, through Dagster (`vnp run`).

CPU-side, on a loopback Ray cluster with fake GPU slots: this measures what a GPU step pays to run on
Ray (connect, actor placement, its process and imports) against the local device process, not GPU
throughput. Ray's wheel (79 MB) cannot be carried to a lent GPU machine, so issue 15's H200 figure
is not measured here.

The script starts its own one-node cluster (`ray start --head --block ... --num-cpus=2 --num-gpus=2`
in a process group of its own, a free port, a temp folder of its own) and stops it at the end by its
process group: never `ray stop`, which stops every Ray process on the machine.

Then the same sample (reads simulated from ../shared/data/real, tiny models) goes through
`run_sample(..., until="embeddings", num_shards=2, embedding_cache=False)` four times, local, ray,
local, ray, each in a fresh home and a fresh Python process. Recorded per run: the embedding stage's
wall time (`SampleRun.stage_seconds`), and per shard step, from the instance's events: the step's
duration, the engine's device seconds of both models (`seconds` metadata), the first model's load
(`model_load_seconds`), and the fixed cost = step duration - both models' device seconds. Last, the
shard HDF5 `embeddings` datasets of every run are compared bit for bit with the first local run's.

On a host without GPUs the local path has one GPU slot's worth of workers (one step at a time, on
every core), the Ray path one per fake slot (two steps at once, one CPU each, Ray's OMP_NUM_THREADS=1).

    .venv/bin/python bench/ray_cpu_bench.py --reads 3000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REAL = ROOT.parent / "shared" / "data" / "real"
# `ray` beside this Python, or on the PATH (a `pip install --target` puts it in <target>/bin), or its module.
RAY = ([str(Path(sys.executable).with_name("ray"))] if Path(sys.executable).with_name("ray").exists()
       else [shutil.which("ray")] if shutil.which("ray")
       else [sys.executable, "-c", "import sys; from ray.scripts.scripts import main; sys.exit(main())"])
MODELS = ("dnabert_s", "esm2")


# The cluster: ours, in its own process group.

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_members(group: int) -> list[str]:
    """The live (not zombie) processes of a process group, as "pid (comm)"."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        if int(fields[2]) == group and fields[0] != "Z":
            members.append(f"{stat.parent.name} {text[text.index('('): text.rindex(')') + 1]}")
    return members


def start_head(temp_dir: Path, gpus: int, cpus: int, visible_devices: str | None = None, *,
               client_port: int | None = None, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """A one-node cluster with `gpus` GPU slots (fake ones on a host without GPUs; with `visible_devices`,
    the physical GPUs it may hand out, the Ray way: the head's CUDA_VISIBLE_DEVICES), Ray Client on
    `client_port` if given, and `env` added to the head's environment."""
    port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    if visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible_devices
    client = [f"--ray-client-server-port={client_port}"] if client_port is not None else []
    log = open(temp_dir / "head.log", "w")  # noqa: SIM115 - lives as long as the head
    head = subprocess.Popen(
        [*RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}", *client,
         f"--num-cpus={cpus}", f"--num-gpus={gpus}", "--include-dashboard=false", "--disable-usage-stats",
         f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={temp_dir / 'ray'}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        wait_for_gpus(head, address, gpus, temp_dir)
    except BaseException:
        stop_head(head)
        raise
    return head, address


def wait_for_gpus(head: subprocess.Popen, address: str, gpus: int, temp_dir: Path, timeout_s: float = 90) -> None:
    """Wait for the GCS port, then for the node's GPUs, in a child process (this one stays unconnected)."""
    host, port = address.split(":")
    deadline = time.monotonic() + timeout_s
    while True:
        if head.poll() is not None:
            raise RuntimeError(f"the Ray head exited ({head.returncode}):\n{(temp_dir / 'head.log').read_text()[-3000:]}")
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Ray head did not open {address} within {timeout_s:g} s") from None
            time.sleep(0.2)
    check = (f"from vnp_assets.ray_execution import ray_gpu_count; import time\n"
             f"deadline = time.monotonic() + {timeout_s}\n"
             f"while ray_gpu_count({address!r}) < {gpus}:\n"
             f"    assert time.monotonic() < deadline, 'no GPUs'\n    time.sleep(0.5)\n")
    try:
        subprocess.run([sys.executable, "-c", check], check=True, cwd=ROOT, timeout=timeout_s + 30)
    except subprocess.SubprocessError:
        raise RuntimeError(f"the Ray head at {address} showed no {gpus} GPU(s); its logs end:\n{head_logs(temp_dir)}") from None


def head_logs(temp_dir: Path, chars: int = 1500) -> str:
    """The end of the head's own log and of its raylet's and GCS's, for a head that did not come up."""
    logs = [temp_dir / "head.log", *sorted((temp_dir / "ray").glob("session_latest/logs/raylet.*")),
            *sorted((temp_dir / "ray").glob("session_latest/logs/gcs_server.*"))]
    return "\n".join(f"== {log.name}\n{log.read_text(errors='replace')[-chars:]}" for log in logs if log.is_file())


def stop_head(head: subprocess.Popen) -> list[str]:
    """SIGTERM to `ray start --block` (it stops its node), then SIGKILL to whatever of its group is left."""
    if head.poll() is None:
        head.terminate()
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    deadline = time.monotonic() + 15
    while group_members(head.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if group_members(head.pid):
        os.killpg(head.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while group_members(head.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
    if head.poll() is None:
        head.kill()
        head.wait()
    return group_members(head.pid)


# The sample.

def write_reads(path: Path, n: int, length: int = 150, seed: int = 0) -> Path:
    from vnp_core.fasta import read_fasta
    from vnp_core.simulate import simulate_reads

    genomes = {record.id: record.sequence.upper()
               for fasta in sorted(REAL.glob("*.fasta")) for record in read_fasta(fasta).records}
    path.write_text("".join(f">{rid}\n{seq}\n" for rid, seq in simulate_reads(genomes, n, length, seed=seed)))
    return path


# One run, in a fresh process (`--one`): run_sample, then what the instance recorded.

def one_run(reads: Path, home: Path, executor: str, address: str | None, lock_dir: Path) -> dict:
    from vnp_assets.run_sample import run_sample

    settings = dict(until="embeddings", num_shards=2, embedding_cache=False, lock_dir=str(lock_dir),
                    console_log_level="WARNING")
    if executor == "ray":
        settings.update(executor="ray", ray_address=address, ray_device="cpu")
    started = time.perf_counter()
    run = run_sample(reads, home=home, **settings)
    total = time.perf_counter() - started
    stage, seconds = next((stage, s) for stage, s in run.stage_seconds.items() if stage.startswith("embeddings"))
    return {"executor": executor, "home": str(home), "sample": run.sample, "stage_seconds": run.stage_seconds,
            "embedding_stage": stage, "embedding_seconds": seconds, "run_sample_seconds": total,
            "steps": shard_steps(home), "shard_files": {str(path.relative_to(home)): str(path)
                                                        for path in sorted(home.glob("storage/samples/*/embeddings/*/shard-*.h5"))}}


def shard_steps(home: Path) -> dict[str, dict]:
    """Each `embed_shard` run's step: duration, device seconds, model load, fixed cost, and when the
    step said where it runs ("on node ..." for Ray), from the instance's event log."""
    from dagster import DagsterEventType, DagsterInstance

    steps = {}
    with DagsterInstance.from_config(str(home)) as instance:
        runs = instance.get_runs()
        # About when the embedding stage starts: the index run's last event (its end).
        origin = max(instance.all_logs(run.run_id)[-1].timestamp for run in runs if run.job_name == "index_sample")
        for run in runs:
            if run.job_name != "embed_shard":
                continue
            events = instance.all_logs(run.run_id)
            start = next(e.timestamp for e in events if e.dagster_event and e.dagster_event.event_type == DagsterEventType.STEP_START)
            end = next(e.timestamp for e in events if e.dagster_event and e.dagster_event.event_type == DagsterEventType.STEP_SUCCESS)
            placed_event = next((e for e in events if not e.dagster_event and ": on node " in (e.user_message or "")), None)
            placed = None if placed_event is None else placed_event.timestamp
            ray_gpu = None if placed_event is None else \
                re.search(r"CUDA_VISIBLE_DEVICES=(\S+?)\)", placed_event.user_message).group(1)
            models = {}
            for e in events:
                if e.dagster_event and e.dagster_event.event_type == DagsterEventType.ASSET_MATERIALIZATION:
                    materialization = e.dagster_event.step_materialization_data.materialization
                    meta = materialization.metadata
                    models[materialization.asset_key.path[-1].removesuffix("_embeddings")] = {
                        key: meta[key].value for key in ("rows", "tokens", "seconds", "model_load_seconds",
                                                         "device_waited_seconds", "device") if key in meta}
            device = sum(m["seconds"] for m in models.values())
            first = next(iter(models.values()))  # the first model's load is what the device waits for
            duration = end - start
            steps[run.tags.get("dagster/partition", run.run_id[:8])] = {
                "step_seconds": duration, "device_seconds": device, "fixed_seconds": duration - device,
                "first_model_load_seconds": first.get("model_load_seconds", 0.0),
                "fixed_less_first_load_seconds": duration - device - first.get("model_load_seconds", 0.0),
                "step_start_to_placed_seconds": None if placed is None else placed - start,
                "ray_gpu": ray_gpu, "step_start_epoch": start, "step_end_epoch": end,
                # From the index run's end (about the stage's start): the run's first event, its step's
                # start and end, its last event; the gaps are Dagster's run around the step.
                "timeline": {"run_first_event": events[0].timestamp - origin, "step_start": start - origin,
                             "step_end": end - origin, "run_last_event": events[-1].timestamp - origin},
                "models": models}
    return dict(sorted(steps.items()))


# When the step's function starts, from the device side's log lines (stderr of the run's process: the
# local device process's own, the Ray actors' as Ray forwards them to the driver).
LINE_TIME = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})"
LOCAL_READY = re.compile(LINE_TIME + r" - vnp device process on .* - embed_shards ready to run ([\d.]+) s after the call")
RAY_STARTING = re.compile(LINE_TIME + r" - vnp Ray GPU step - embed_shards starting on GPU (\S+) ")


def _epoch(stamp: str) -> float:
    from datetime import datetime

    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()  # logging's asctime: local time


def add_function_start(run: dict, stderr: str) -> None:
    """Each step's `step_start_to_function_seconds`: Dagster's step start to the device side's line saying
    `embed_shards` starts (local: "ready to run", in the device process; Ray: "starting on GPU N", in the
    actor, matched to its step by the GPU the step logged). Lines have millisecond stamps."""
    lines = {"local": [(m.group(1), None) for m in LOCAL_READY.finditer(stderr)],
             "ray": [(m.group(1), m.group(2)) for m in RAY_STARTING.finditer(stderr)]}[run["executor"]]
    run["device_side_lines"] = [line for line in stderr.splitlines()
                                if "ready to run" in line or "starting on GPU" in line or "written after" in line
                                or "model and rows ready" in line]
    for step in run["steps"].values():
        step["step_start_to_function_seconds"] = None
        for stamp, gpu in lines:
            at = _epoch(stamp)
            if step["step_start_epoch"] - 0.01 <= at <= step["step_end_epoch"] and (gpu is None or gpu == step["ray_gpu"]):
                step["step_start_to_function_seconds"] = at - step["step_start_epoch"]
                break


# The comparison.

def compare(runs: list[dict]) -> dict:
    """Every run's shard `embeddings` datasets against the first local run's: bit for bit."""
    import h5py
    import numpy as np

    reference = next((run for run in runs if run["executor"] == "local"), runs[0])
    out = {}
    for i, run in enumerate(runs):
        same, worst = [], 0.0
        for rel, path in reference["shard_files"].items():
            with h5py.File(path) as a, h5py.File(run["shard_files"][rel]) as b:
                x, y = a["embeddings"][()], b["embeddings"][()]
                ids_equal = "ids" not in a or np.array_equal(a["ids"][()], b["ids"][()])
                same.append(bool(ids_equal and x.shape == y.shape and np.array_equal(x, y)))
                if x.shape == y.shape:
                    worst = max(worst, float(np.abs(x.astype(np.float64) - y.astype(np.float64)).max()))
        out[f"{i + 1} {run['executor']}"] = {"files": len(same), "bit_identical": all(same), "max_abs_diff": worst}
    return out


def versions() -> dict:
    found = {"python": platform.python_version()}
    for package in ("ray", "dagster", "dagster-ray", "torch", "numpy", "h5py"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def tree_changes() -> str:
    """What the working tree changes against HEAD (tracked files), as `git diff --stat`'s summary."""
    return subprocess.run(["git", "diff", "--stat", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    return head + ("-dirty" if dirty else "")


def table(runs: list[dict], equal: dict) -> str:
    lines = ["| run | executor | embedding stage s | step s (shard 0 / 1) | fixed cost s (0 / 1) | "
             "first model load s (0 / 1) | start to placed s (0 / 1) | start to function s (0 / 1) | "
             "bit-identical to run 1 |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for i, run in enumerate(runs):
        steps = list(run["steps"].values())

        def pair(key, steps=steps):
            return " / ".join("-" if s[key] is None else f"{s[key]:.2f}" for s in steps)

        check = equal[f"{i + 1} {run['executor']}"]
        lines.append(f"| {i + 1} | {run['executor']} | {run['embedding_seconds']:.2f} | {pair('step_seconds')} | "
                     f"{pair('fixed_seconds')} | {pair('first_model_load_seconds')} | {pair('step_start_to_placed_seconds')} | "
                     f"{pair('step_start_to_function_seconds')} | "
                     f"{'yes' if check['bit_identical'] else 'NO (max abs diff %.3g)' % check['max_abs_diff']} |")
    for executor in ("local", "ray"):
        mine = [run for run in runs if run["executor"] == executor]
        if not mine:
            continue
        stage = sum(run["embedding_seconds"] for run in mine) / len(mine)
        fixed = [s["fixed_seconds"] for run in mine for s in run["steps"].values()]
        lines.append(f"| mean | {executor} | {stage:.2f} | | {sum(fixed) / len(fixed):.2f} | | | | |")
    lines += ["", "Where the embedding stage goes, s from the index run's end: each shard's run "
              "(first event, step start, step end, last event)", ""]
    for i, run in enumerate(runs):
        lines.append(f"run {i + 1} {run['executor']} ({run['embedding_seconds']:.2f} s): " + "; ".join(
            f"shard {key.split('|')[-1]}: " + " / ".join(f"{t:.2f}" for t in step["timeline"].values())
            for key, step in run["steps"].items()))
    return "\n".join(lines)


def summary(runs: list[dict]) -> dict:
    def mean(values):
        return sum(values) / len(values)

    by = {executor: [run for run in runs if run["executor"] == executor] for executor in ("local", "ray")}
    if not all(by.values()):
        return {}
    out = {executor: {"embedding_seconds_mean": mean([r["embedding_seconds"] for r in mine]),
                      "fixed_seconds_mean": mean([s["fixed_seconds"] for r in mine for s in r["steps"].values()]),
                      "step_seconds_mean": mean([s["step_seconds"] for r in mine for s in r["steps"].values()]),
                      "device_seconds_mean": mean([s["device_seconds"] for r in mine for s in r["steps"].values()]),
                      "step_start_to_function_seconds_mean": mean(
                          [s["step_start_to_function_seconds"] for r in mine for s in r["steps"].values()
                           if s.get("step_start_to_function_seconds") is not None] or [float("nan")])}
           for executor, mine in by.items()}
    out["ray_over_local_embedding_stage"] = out["ray"]["embedding_seconds_mean"] / out["local"]["embedding_seconds_mean"]
    out["ray_minus_local_fixed_seconds"] = out["ray"]["fixed_seconds_mean"] - out["local"]["fixed_seconds_mean"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=3000, help="simulated 150-bp reads")
    parser.add_argument("--order", default="local,ray,local,ray", help="executors, in this order")
    parser.add_argument("--out", type=Path, help="JSON results (default: bench/results/ray_vs_local_cpu_<commit>.json)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (homes, reads)")
    parser.add_argument("--one", nargs=5, metavar=("READS", "HOME", "EXECUTOR", "ADDRESS", "LOCK_DIR"),
                        help=argparse.SUPPRESS)  # one run, in a fresh process: its JSON on stdout's last line
    args = parser.parse_args()
    if args.one:
        reads, home, executor, address, lock_dir = args.one
        print(json.dumps(one_run(Path(reads), Path(home), executor, None if address == "-" else address, Path(lock_dir))))
        return

    command = " ".join([sys.executable, *sys.argv])
    load_before = os.getloadavg()
    changes_at_start = tree_changes()
    work = Path(tempfile.mkdtemp(prefix="vnp-raybench-", dir="/tmp"))  # short: Ray's socket paths stay < 108 bytes
    reads = write_reads(work / "reads.fasta", args.reads)
    lock_dir = work / "gpu-locks"  # ours: never another session's leases
    head, address = start_head(work, gpus=2, cpus=2)
    print(f"Ray head at {address} (process group {head.pid}), work folder {work}", flush=True)
    runs = []
    left: list[str] = []
    try:
        for i, executor in enumerate(args.order.split(",")):
            home = work / f"home{i + 1}_{executor}"
            started = time.perf_counter()
            done = subprocess.run([sys.executable, __file__, "--one", str(reads), str(home), executor,
                                   address if executor == "ray" else "-", str(lock_dir)],
                                  cwd=ROOT, capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                raise RuntimeError(f"run {i + 1} ({executor}) failed:\n{done.stderr[-5000:]}")
            (work / f"run{i + 1}_{executor}.stderr").write_text(done.stderr)
            run = json.loads(done.stdout.strip().splitlines()[-1])
            run["process_seconds"] = time.perf_counter() - started
            add_function_start(run, done.stderr)
            runs.append(run)
            print(f"run {i + 1} {executor}: embedding stage {run['embedding_seconds']:.2f} s, steps "
                  + ", ".join(f"{k}: {s['step_seconds']:.2f} s (fixed {s['fixed_seconds']:.2f} s)"
                              for k, s in run["steps"].items()), flush=True)
    finally:
        left = stop_head(head)
    load_after = os.getloadavg()
    equal = compare(runs)
    results = {
        "what": "CPU-side, loopback cluster, fake GPU slots: measures the Ray path's fixed cost, not GPU throughput",
        "command": command, "cwd": str(ROOT), "commit": commit(), "tree_changes_at_start": changes_at_start,
        "tree_changes_at_end": tree_changes(), "nproc": os.cpu_count(),
        "load_average_before": load_before, "load_average_after": load_after, "versions": versions(),
        "reads": args.reads, "read_length": 150, "genomes": str(REAL), "num_shards": 2, "until": "embeddings",
        "embedding_cache": False, "models": "tiny (the default: no model path given)",
        "cluster": {"gcs_address": address, "num_cpus": 2, "num_gpus": 2, "processes_left_after_stop": left},
        "fixed_cost_definition": "Dagster STEP_START to STEP_SUCCESS of the shard's embed_shard run, minus the engine's "
                                 "`seconds` metadata of both models' materializations",
        "runs": runs, "bit_identical_to_first_local": equal, "summary": summary(runs),
    }
    out = args.out or ROOT / "bench" / "results" / f"ray_vs_local_cpu_{results['commit'].split('-')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nload average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min); {os.cpu_count()} CPUs; "
          f"Ray processes left after stop: {len(left)}; results: {out}")
    s = results["summary"]
    if s:
        print(f"ray / local embedding stage: {s['ray_over_local_embedding_stage']:.3f}; "
              f"ray - local fixed cost per step: {s['ray_minus_local_fixed_seconds']:+.2f} s\n")
    print(table(runs, equal))


if __name__ == "__main__":
    main()
