"""CPU benchmark of the embedding store (vnp_core.embedding_cache): 1M keys hashed, stored, looked up.

1,000,000 random protein-like token sequences (40-170 ids, as the frames of 150-bp reads up to 500-bp
chunks) are hashed into keys (timed alone), stored in a fresh store, then all looked up in a shuffled
order (every key found), and 500k of them with 500k unknown keys (half found). Once per vector width:
64 and 768 (DNABERT-S); ESM-2 3B's 2560 would need 12 GB of disk per million rows. The store was just
written, so its pages are in the page cache: these are warm-cache figures.

Usage, from the repository root: python bench/cache_lookup_bench.py [--rows N] [--dims 64 768] [--out ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lmdb
import numpy as np

from vnp_core.embedding_cache import EmbeddingCache, ModelIdentity, sequence_keys

ROOT = Path(__file__).resolve().parents[1]
PUT_BATCH = 50_000
SEED = 0


def machine() -> dict:
    cpu_model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor())
    return {"nproc": os.cpu_count(), "cpu_model": cpu_model, "python": platform.python_version(),
            "numpy": np.__version__, "lmdb": lmdb.__version__, "lmdb_library": ".".join(map(str, lmdb.version()))}


def code_version() -> str:
    return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(work) -> tuple[object, float, float]:
    """(result, wall seconds, CPU seconds): other jobs share this machine's 2 cores, so both count."""
    start, start_cpu = time.perf_counter(), cpu_s()
    result = work()
    return result, time.perf_counter() - start, cpu_s() - start_cpu


def bench_dim(work: Path, keys: list[bytes], unknown: list[bytes], dim: int, rng: np.random.Generator) -> dict:
    identity = ModelIdentity("bench", "00" * 32, "float16", 1022, "mean", "bench", dim)
    root = work / f"cache_{dim}"
    with EmbeddingCache.open(root) as cache:
        put_s = put_cpu_s = 0.0
        for start in range(0, len(keys), PUT_BATCH):
            batch = keys[start:start + PUT_BATCH]
            vectors = rng.standard_normal((len(batch), dim), dtype=np.float32)
            _, wall, cpu = timed(lambda: cache.put(identity, batch, vectors))
            put_s, put_cpu_s = put_s + wall, put_cpu_s + cpu
        stats = cache.stats()[0]
    shuffled = [keys[i] for i in rng.permutation(len(keys))]
    half = shuffled[:len(keys) // 2] + unknown[:len(keys) - len(keys) // 2]
    result = {"dim": dim, "rows": len(keys), "put_s": round(put_s, 2), "put_cpu_s": round(put_cpu_s, 2),
              "put_rows_per_s": round(len(keys) / put_s), "store_bytes": stats.size_bytes,
              "data_mdb_disk_bytes": (root / "data.mdb").stat().st_blocks * 512}
    # Each lookup in a freshly opened store, as a GPU step's process would do it: into a new array (which
    # the kernel must zero-fill: 3 GB at dim 768), and into an array the caller already has (`out=`),
    # written once before (np.ones) so that its pages exist.
    shard = np.ones((len(keys), dim), dtype=np.float32)
    for name, lookup_keys, expected_hits in (("all_hits", shuffled, len(keys)), ("half_hits", half, len(keys) // 2)):
        for into, out in (("new_array", None), ("out", shard)):
            with EmbeddingCache.open(root) as cache:
                (found, _), wall, cpu = timed(lambda: cache.lookup(identity, lookup_keys, out=out))
            assert found.sum() == expected_hits
            result |= {f"lookup_{name}_{into}_s": round(wall, 3), f"lookup_{name}_{into}_cpu_s": round(cpu, 3),
                       f"lookup_{name}_{into}_keys_per_s": round(len(lookup_keys) / wall)}
    shutil.rmtree(root)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 768])
    parser.add_argument("--work-dir", type=Path, default=None, help="where the stores are built (default: a temporary directory)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cache_lookup_cpu.json")
    args = parser.parse_args()

    load_before = os.getloadavg()
    rng = np.random.default_rng(SEED)
    lengths = rng.integers(40, 171, 2 * args.rows)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = rng.integers(4, 29, offsets[-1], dtype=np.int32)  # ESM-2's amino-acid ids
    all_keys, hash_s, hash_cpu_s = timed(lambda: sequence_keys(tokens, offsets))
    keys, unknown = all_keys[:args.rows], all_keys[args.rows:]
    print(f"hashed {len(all_keys):,} sequences in {hash_s:.2f} s", flush=True)

    runs = []
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        for dim in args.dims:
            needed = args.rows * (4096 if dim * 4 > 2000 else dim * 4 + 100) * 1.2  # values past ~2 KB take a page
            free = shutil.disk_usage(work).free
            if free < needed:
                runs.append({"dim": dim, "skipped": f"needs about {needed / 1e9:.1f} GB, {free / 1e9:.1f} GB free"})
                continue
            runs.append(bench_dim(Path(work), keys, unknown, dim, rng))
            print(json.dumps(runs[-1]), flush=True)

    result = {
        "benchmark": "embedding store (LMDB): hash, put and look up 1M keys, CPU, warm page cache",
        "command": "python " + " ".join([Path(sys.argv[0]).relative_to(ROOT).as_posix() if Path(sys.argv[0]).is_absolute() else sys.argv[0], *sys.argv[1:]]),
        "code_version": code_version(),
        "machine": machine(),
        "input": {"rows": args.rows, "sequence_tokens": "40-170 uniform", "seed": SEED, "put_batch": PUT_BATCH},
        "note": "other jobs share the machine's 2 cores (load averages below): *_s are wall seconds, inflated by "
                "them; *_cpu_s are this process's CPU seconds, what a lookup (one thread) takes on an idle machine",
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "hash": {"sequences": len(all_keys), "seconds": round(hash_s, 3), "cpu_s": round(hash_cpu_s, 3),
                 "sequences_per_s": round(len(all_keys) / hash_s), "seconds_per_1m": round(hash_s * 1e6 / len(all_keys), 3),
                 "cpu_s_per_1m": round(hash_cpu_s * 1e6 / len(all_keys), 3)},
        "runs": runs,
        "goal": "1M keys looked up in <= 10 s on the 2-core machine (issue 17)",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
