"""What a persistent compile cache saves a GPU step: the first pack eager, compiled with an empty
cache, and compiled again in a fresh process with the cache the first compile left (a host that has
run before), per model. Each variant runs in a process of its own, as a GPU step does.

On the lent H200 (the device README's wheels first):
    python bench/compile_cache_bench.py --workdir /tmp/vnp_s --out $OUT/compile_cache.json
The "floats symbolic" variants leave torch's default of tracing the layers' Python floats as symbols,
which `configure_compiler` turns off (Dynamo then traces each model once, not twice).
On this CPU-only machine, `--smoke` checks the script with tiny models (nothing compiles on the CPU).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# (variant, compile the layers, empty the cache first, floats symbolic)
VARIANTS = [("eager", False, False, False), ("compiled, empty cache", True, True, False),
            ("compiled, warm cache", True, False, False), ("compiled, warm cache, floats symbolic", True, False, True),
            ("compiled, warm cache again", True, False, False),
            ("compiled, warm cache, floats symbolic again", True, False, True)]


def sequences(model: str, count: int, seed: int = 0) -> list[str]:
    """Random sequences of the lengths 150-bp reads give: 100-150 bp, or their 20-50-residue frames."""
    rng = random.Random(seed)
    if model == "dnabert_s":
        return ["".join(rng.choices("ACGT", k=rng.randint(100, 150))) for _ in range(count)]
    return ["".join(rng.choices("ACDEFGHIKLMNPQRSTVWY", k=rng.randint(20, 50))) for _ in range(count)]


def one_variant(model: str, model_path: str, count: int, compiled: bool, cache: str, out: str, device: str,
                symbolic_floats: bool) -> dict:
    """In a fresh process: load, tokenise, maybe compile, embed; the engine's own figures."""
    import torch._dynamo

    from vnp_core.config import EmbedConfig
    from vnp_core.engine import compile_if_worth_it, embed_tokenized, tokenize
    from vnp_core.models import model_spec

    config = EmbedConfig(device=device, dtype="float16" if device == "cuda" else "float32", compile_layers=compiled,
                         compile_min_tokens=0, compile_cache_dir=Path(cache))
    spec = model_spec(model)
    start = time.perf_counter()
    loaded = spec.load(Path(model_path), config)
    load_seconds = time.perf_counter() - start
    rows = sequences(model, count)
    ids = [f"s{i}" for i in range(len(rows))]
    tokenized = tokenize(loaded.tokenizer, ids, rows, 0)
    loaded = compile_if_worth_it(loaded, config, len(tokenized.tokens))
    if symbolic_floats:  # torch's default back, after the engine's `configure_compiler`; tracing starts at the first pack
        torch._dynamo.config.specialize_float = False
    stats = embed_tokenized(loaded, ids, tokenized, Path(out), config)
    return {"load_seconds": load_seconds, "tokens": stats.tokens, "seconds": stats.seconds,
            "tokens_per_s": stats.tokens_per_s, "first_pack_seconds": stats.first_pack_seconds,
            "compiled": stats.compiled, "max_tokens": stats.max_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/vnp_compile"))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--esm2-size", default="3B")
    parser.add_argument("--esm2-sequences", type=int, default=30000)
    parser.add_argument("--dnabert-s-sequences", type=int, default=150000)
    parser.add_argument("--models", default="dnabert_s,esm2")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--worker", nargs=7, metavar=("MODEL", "PATH", "COUNT", "COMPILED", "CACHE", "OUT", "SYMBOLIC"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = "cpu" if args.smoke else "cuda"
    if args.worker:
        model, path, count, compiled, cache, out, symbolic = args.worker
        print(json.dumps(one_variant(model, path, int(count), compiled == "1", cache, out, device, symbolic == "1")))
        return

    import platform

    import torch

    from scaling_bench import installed_versions, write_models

    args.workdir.mkdir(parents=True, exist_ok=True)
    models = write_models(args.workdir, args.esm2_size, args.smoke)
    counts = {"dnabert_s": args.dnabert_s_sequences, "esm2": args.esm2_sequences}
    results = {"command": " ".join(sys.argv), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
               "esm2_size": "tiny" if args.smoke else args.esm2_size,
               "versions": {"python": platform.python_version(), "torch": torch.__version__,
                            **installed_versions("fair-esm", "h5py", "tokenizers")},
               "runs": []}
    if unknown := set(args.models.split(",")) - {"dnabert_s", "esm2"}:
        raise SystemExit(f"--models: unknown {', '.join(sorted(unknown))} (expected dnabert_s, esm2 or both)")
    for model in args.models.split(","):
        cache = args.workdir / f"compile_cache_{model}"
        for variant, compiled, empty, symbolic in VARIANTS:
            if empty:
                shutil.rmtree(cache, ignore_errors=True)
            out = args.workdir / f"{model}_compile_bench.h5"
            out.unlink(missing_ok=True)
            started = time.perf_counter()
            done = subprocess.run([sys.executable, __file__, *(["--smoke"] if args.smoke else []), "--worker", model,
                                   models[f"{model}_model"], str(counts[model]), "1" if compiled else "0", str(cache),
                                   str(out), "1" if symbolic else "0"], capture_output=True, text=True, timeout=600)
            if done.returncode:
                raise SystemExit(f"{model} {variant} failed:\n{done.stderr[-3000:]}")
            run = {"model": model, "variant": variant, "process_seconds": time.perf_counter() - started,
                   **json.loads(done.stdout.strip().splitlines()[-1])}
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
    args.out.write_text(json.dumps(results, indent=1))
    print("\n| model | variant | first pack s | over eager's | tokens/s | step process s |\n|---|---|---:|---:|---:|---:|")
    eager = {run["model"]: run["first_pack_seconds"] for run in results["runs"] if run["variant"] == "eager"}
    for run in results["runs"]:
        print(f"| {run['model']} | {run['variant']} | {run['first_pack_seconds']:.2f} | "
              f"{run['first_pack_seconds'] - eager[run['model']]:+.2f} | {run['tokens_per_s']:,.0f} | "
              f"{run['process_seconds']:.1f} |")


if __name__ == "__main__":
    main()
