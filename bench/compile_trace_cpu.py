"""What tracing the layers' Python floats as constants (`configure_compiler`) saves a process's first
compiled call, on the CPU: each model's layers compiled by Inductor in a fresh process with a warm
compile cache, torch's default (floats symbolic: Dynamo traces the model, then again) against vnp's.

    .venv/bin/python bench/compile_trace_cpu.py --rounds 2
(needs a C compiler, as Inductor does on the CPU). Prints torch.compile's own times, per model and setting.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# DNABERT-S at its real shape; ESM-2 small enough to compile in seconds on a CPU.
MODELS = ("dnabert_s 12x768", "esm2 6x320")

ONE_PROCESS = """
import json, sys, time
from pathlib import Path
import torch
from torch._dynamo.utils import compilation_time_metrics, counters
from vnp_core.engine import configure_compiler
from vnp_core.models.dnabert_s import DnabertSConfig, PackedDnabertS
from vnp_core.models.esm2 import ESM2Config, PackedESM2
from vnp_core.packing import PackedBatch

model, setting, cache = sys.argv[1], sys.argv[2], Path(sys.argv[3])
configure_compiler(cache)
torch._dynamo.config.specialize_float = setting == "vnp"
if model.startswith("dnabert_s"):
    module = PackedDnabertS(DnabertSConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                           intermediate_size=3072, vocab_size=4096), "sdpa_padded").eval()
else:
    module = PackedESM2.from_config(ESM2Config(num_layers=6, embed_dim=320, attention_heads=20), "cpu", torch.float32,
                                    "sdpa_padded")
module.compile_layers()
lengths = [40] * 64
batch = PackedBatch(torch.randint(5, 24, (sum(lengths),)), torch.arange(0, 41 * 64, 40, dtype=torch.int32)[:65],
                    torch.arange(40).repeat(64), 40, torch.arange(64))
start = time.perf_counter()
with torch.inference_mode():
    module(batch)
first_call = time.perf_counter() - start
print(json.dumps({"first_call_s": first_call, "compile_inner_s": sum(compilation_time_metrics.get("_compile.compile_inner", [])),
                  "traces": counters["aot_autograd"]["total"], "fxgraph_cache_hits": counters["inductor"]["fxgraph_cache_hit"]}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="Warm-cache processes per model and setting, interleaved.")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.rounds < 1:
        raise SystemExit("--rounds: expected 1 or more")
    results = {"command": " ".join(sys.argv), "runs": []}
    for model in MODELS:
        with tempfile.TemporaryDirectory() as cache:
            for round_ in range(args.rounds + 1):  # round 0 fills the cache
                for setting in ("torch default", "vnp"):
                    done = subprocess.run([sys.executable, "-c", ONE_PROCESS, model, setting, cache], cwd=ROOT,
                                          capture_output=True, text=True, timeout=600)
                    if done.returncode:
                        raise SystemExit(f"{model} ({setting}) failed:\n{done.stderr[-2000:]}")
                    if round_:
                        run = {"model": model, "setting": setting, **json.loads(done.stdout.splitlines()[-1])}
                        results["runs"].append(run)
                        print(json.dumps(run), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    print("\n| model | setting | traces | torch.compile s | first call s |\n|---|---|---:|---:|---:|")
    for run in results["runs"]:
        print(f"| {run['model']} | {run['setting']} | {run['traces']} | {run['compile_inner_s']:.2f} | {run['first_call_s']:.2f} |")


if __name__ == "__main__":
    main()
