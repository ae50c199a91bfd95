"""The GPU benchmark's own logic on tiny shapes on the CPU (`--smoke`): every section runs, no variant
fails. It measures nothing; it keeps a section from being lost before a device call finds out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {"esm2": "esm2_throughput_", "esm2_compile": "esm2_compile_", "esm2_fp8": "esm2_fp8_throughput_",
            "dnabert": "dnabert_throughput_"}


def test_gpu_embed_bench_runs_every_section_on_the_cpu(tmp_path):
    out = tmp_path / "smoke.json"
    subprocess.run([sys.executable, "bench/gpu_embed_bench.py", "--smoke", "--sections", ",".join(SECTIONS),
                    "--fp8-variants", "fp16,fp8", "--reps", "1", "--accuracy-n", "4", "--scale", "0.005",
                    "--workdir", str(tmp_path / "work"), "--out", str(out)],
                   cwd=ROOT, check=True, capture_output=True, timeout=600)
    results = json.loads(out.read_text())
    assert [key for key, value in results.items() if str(value).startswith("failed")] == []
    assert all(any(key.startswith(prefix) for key in results) for prefix in SECTIONS.values())


def test_gpu_embed_bench_refuses_an_unknown_section_or_variant_before_any_work(tmp_path):
    out = tmp_path / "results.json"
    for option, value, named in [("--sections", "esm2,esm3", "'esm3'"), ("--fp8-variants", "fp16,fp9", "'fp9'")]:
        done = subprocess.run([sys.executable, "bench/gpu_embed_bench.py", option, value, "--out", str(out)],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 1 and done.stderr.startswith(f"{option}: unknown {named}; expected some of ")
        assert done.stderr.count("\n") == 1
        assert not out.exists()
