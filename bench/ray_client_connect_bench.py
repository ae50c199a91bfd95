"""How often a Ray Client connection fails because its server died while starting (ray-project/ray#63202).

Ray Client's proxy on the head starts a server process per connection. Now and then that process
dies at once and the connection fails after 30-60 s with "Starting Ray client server failed",
"Proxy failed to Connect to backend" or a `psutil.ZombieProcess` from `start_specific_server`.
The proxy's log then says "Other threads are currently calling into gRPC, skipping fork() handlers".

For each head setting, the script starts a one-node head of its own (`ray_cpu_bench.start_head`,
stopped by its process group), connects `--connects` times through Ray Client with a plain
`ray.init("ray://...")`, runs one task, disconnects, and counts the failures and their seconds.

    .venv/bin/python bench/ray_client_connect_bench.py --connects 12 --out bench/results/ray_client_connect_cpu_COMMIT.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from ray_cpu_bench import commit, free_port, start_head, stop_head, versions

HEADS = {"default": {}, "GRPC_ENABLE_FORK_SUPPORT=false": {"GRPC_ENABLE_FORK_SUPPORT": "false"}}


def connects(env: dict[str, str], count: int) -> dict:
    import ray

    temp_dir = Path(tempfile.mkdtemp(prefix="vnp-connect-", dir="/tmp"))  # Ray's socket paths stay short
    client_port = free_port()
    head, _ = start_head(temp_dir, gpus=2, cpus=2, client_port=client_port, env=env)
    failures, seconds = [], []
    try:
        for _ in range(count):
            started = time.monotonic()
            try:
                ray.init(address=f"ray://127.0.0.1:{client_port}", log_to_driver=False)
                ray.get(ray.remote(lambda: 1).remote())
            except ConnectionAbortedError as error:
                failures.append({"seconds": round(time.monotonic() - started, 1),
                                 "error": str(error).strip().splitlines()[-1]})
            finally:
                ray.shutdown()  # also after a failure: Ray leaves its client mode on (see RayGpuCluster.connect)
            seconds.append(round(time.monotonic() - started, 1))
    finally:
        stop_head(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
    return {"connects": count, "failed": len(failures), "failures": failures, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connects", type=int, default=12, help="connections per head setting")
    parser.add_argument("--out", type=Path, help="the results as JSON")
    args = parser.parse_args()
    results = {label: connects(env, args.connects) for label, env in HEADS.items()}
    record = {"command": f"bench/ray_client_connect_bench.py --connects {args.connects}", "commit": commit(),
              "versions": versions(), "heads": results}
    if args.out:
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    print("| head | connects | failed | seconds of a failed one |\n|---|---:|---:|---|")
    for label, result in results.items():
        failed = ", ".join(str(failure["seconds"]) for failure in result["failures"]) or "-"
        print(f"| {label} | {result['connects']} | {result['failed']} | {failed} |")


if __name__ == "__main__":
    main()
