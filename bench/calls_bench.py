"""The VirNucPro calls stage's scoring, side by side: the joined feature matrix against column groups
joined a block at a time (`vnp_core.classify.predict`), on a merged file of the real widths.

    .venv/bin/python bench/calls_bench.py --rows 200000 --out bench/results/calls_cpu.json

Writes a merged file of `--rows` random rows (DNABERT-S 768 + ESM-2 3B 2560 wide), then, alternating,
scores it as the calls stage did (`read_merged`, `features()`, `predict`), with the models' vectors
as groups, and as groups with 56% of the rows copies of earlier ones, each scored once (`same_as`,
as a sample embedded through the store is scored; the copies are not really equal here: timing only). Both give the same frame table (checked); peak memory is read from
`ru_maxrss` of a fresh process per variant.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_merged(path: Path, rows: int) -> None:
    import numpy as np

    from vnp_core.store import merge_sample, write_embeddings

    rng = np.random.default_rng(0)
    ids = [f"r{i // 6}_chunk_1{'FR'[i % 2]}{i % 3 + 1}" for i in range(rows)]
    shards = {}
    for model, width in (("dnabert_s", 768), ("esm2", 2560)):
        shard = path.parent / f"{model}-shard-0.h5"
        write_embeddings(shard, ids, rng.standard_normal((rows, width), dtype=np.float32), {"model": model})
        shards[model] = [shard]
    merge_sample(ids, shards, path, {})


# The share of frames that copy an earlier one in the 450k-read sample with 30% copied reads.
COPIED_FRAMES = 0.56


def copies_of(rows: int, copied: float, seed: int = 0):
    """A `same_as` for `predict`: `copied` of the rows copy an earlier first row (timing only: the
    random rows are not actually equal)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    is_first = rng.random(rows) >= copied
    is_first[0] = True
    firsts = np.flatnonzero(is_first)
    earlier = np.searchsorted(firsts, np.arange(rows), side="right")  # firsts at or before each row
    return np.where(is_first, np.arange(rows), firsts[rng.integers(0, earlier)])


def score(path: Path, variant: str) -> dict:
    import polars as pl

    from vnp_core.classify import LoadedClassifier, VirNucProClassifier, predict
    from vnp_core.store import read_merged

    import torch

    torch.manual_seed(0)  # the same random classifier in every process
    classifier = LoadedClassifier(VirNucProClassifier().eval(), 500, 3328, path, "random")
    start = time.perf_counter()
    merged = read_merged(path)
    read = time.perf_counter() - start
    features = merged.features() if variant == "joined" else list(merged.vectors.values())
    frames = predict(classifier, merged.ids, features, chunk_length=500,
                     same_as=copies_of(len(merged.ids), COPIED_FRAMES) if variant == "copies_once" else None)
    total = time.perf_counter() - start
    frames.write_parquet(path.parent / f"frames_{variant}.parquet")
    return {"variant": variant, "read_s": read, "score_s": total - read, "total_s": total,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "rows": frames.height,
            "check": pl.read_parquet(path.parent / f"frames_{variant}.parquet").equals(frames)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/vnp_calls_bench"))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--one", nargs=2, metavar=("MERGED", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(score(Path(args.one[0]), args.one[1])))
        return
    import polars as pl

    args.workdir.mkdir(parents=True, exist_ok=True)
    merged = args.workdir / f"merged_{args.rows}.h5"
    if not merged.exists():
        write_merged(merged, args.rows)
    runs = []
    for _ in range(args.rounds):
        for variant in ("joined", "groups", "copies_once"):
            out = subprocess.run([sys.executable, __file__, "--one", str(merged), variant], capture_output=True,
                                 text=True, check=True, cwd=ROOT)
            runs.append(json.loads(out.stdout.splitlines()[-1]))
            print(runs[-1], flush=True)
    same = pl.read_parquet(args.workdir / "frames_joined.parquet").equals(pl.read_parquet(args.workdir / "frames_groups.parquet"))
    best = {v: min((r for r in runs if r["variant"] == v), key=lambda r: r["total_s"]) for v in ("joined", "groups", "copies_once")}
    result = {"command": " ".join(sys.argv), "rows": args.rows, "runs": runs, "same_frames": same,
              "speed_up": best["joined"]["total_s"] / best["groups"]["total_s"]}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    print("\n| variant | read s | score s | total s | peak RSS GB |\n|---|---:|---:|---:|---:|")
    for variant, run in best.items():
        print(f"| {variant} | {run['read_s']:.2f} | {run['score_s']:.2f} | {run['total_s']:.2f} | {run['peak_rss_gb']:.1f} |")
    print(f"same frame table: {same}; joined / groups: {result['speed_up']:.2f}x")


if __name__ == "__main__":
    main()
