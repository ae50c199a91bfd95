"""`make demo`'s stages, timed: `vnp run` on the bundled example into a fresh home, `--runs` times, on
this machine's CPU. With `--tree` another checkout's code runs (e.g. a worktree of an older commit),
with this checkout's interpreter, for a side-by-side comparison.

    python3 bench/demo_stages.py --runs 3 --out bench/results/demo_stages_cpu.json
    git worktree add /tmp/before <commit> && python3 bench/demo_stages.py --tree /tmp/before --runs 3 --out ...
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGE_LINE = re.compile(r"^(sequence_index|embeddings \(.*\)|merged_embeddings.*|fp16_validation_report|virnucpro_predictions): ([0-9.]+) s$")


def one_run(tree: Path) -> dict:
    home = Path(tempfile.mkdtemp(prefix="vnp-demo-"))
    code = "import sys; from vnp_assets.cli import app; sys.argv[0] = 'vnp'; app()"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, "run", "vnp_core/data/example.fasta", "--home", str(home / "h")],
                          cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - start
    shutil.rmtree(home, ignore_errors=True)
    if done.returncode:
        raise SystemExit(f"vnp run failed in {tree}:\n{done.stdout}\n{done.stderr}")
    stages = {m[1]: float(m[2]) for line in done.stdout.splitlines() if (m := STAGE_LINE.match(line.strip()))}
    return {"wall_seconds": round(wall, 2), "stage_seconds": stages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=args.tree, capture_output=True, text=True).stdout.strip()
    runs = [one_run(args.tree.resolve()) for _ in range(args.runs)]
    result = {"command": " ".join(sys.argv), "tree_commit": commit, "cpu_count": os.cpu_count(),
              "versions": {"python": platform.python_version()}, "runs": runs}
    args.out.write_text(json.dumps(result, indent=1))
    for run in runs:
        print(f"wall {run['wall_seconds']} s | " + " | ".join(f"{k}: {v}" for k, v in run["stage_seconds"].items()))


if __name__ == "__main__":
    main()
