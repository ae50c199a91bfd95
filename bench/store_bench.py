"""Issue 17's embedding store on a GPU: one sample's embedding stage with the store off, on, and on again.

The sample: simulated 150-bp reads from real genomes in which `--dup-fraction` of the reads are exact
copies of other reads of the sample (the rest are distinct sequences). It goes through the product's
path: `prepare_fasta` and `build_index` (DNABERT-S token ids kept in the index), then `embed_shards`
with one `ShardJob` per model (DNABERT-S, then ESM-2) on one shard, as the embedding asset runs them,
in this order, in one process, after an untimed warm-up on other reads (it pays the compilation):

- `off`: `cache_dir=None`, every row embedded;
- `on`: an empty store: each distinct sequence embedded once, the store filled;
- `on_rerun`: the same sample into new shard files, the store now full: nothing to embed (the "same
  sample, another classifier" case).

Checks: `on` against `off` per row (cosine, and how many rows are bit-identical: duplicates are
embedded once and packs differ, so fp16 GEMMs may round differently), `on_rerun` against `on`
bit for bit, and the ids. Models: ESM-2 3B (36 x 2560) in fair-esm's `.pt` format with random weights,
N(0, 0.02) for linear and embedding weights, zero biases, LayerNorms 1/0 (Hugging Face's init); the
DNABERT-S shape (12 x 768) from `write_tiny_dnabert_s`, whose BPE vocabulary is the tiny one.

On the lent H200 (fair-esm, polars and lmdb carried as wheels):
    python3 bench/store_bench.py --reads 120000 --genomes .benchdata/real --out $OUT/store.json
(.benchdata/real: a copy of ../shared/data/real/*.fasta inside the checkout, carried, as ../shared does not travel.)
On a CPU, `--smoke` runs the same logic with tiny models.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
ESM2_3B = (36, 2560, 40)
DNABERT_S = dict(hidden=768, layers=12, heads=12, intermediate=3072)
VARIANTS = ("off", "on", "on_rerun")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------------------------------ models


def write_esm2_3b(path: Path) -> Path:
    """A random ESM-2 3B in fair-esm's release layout, its weights drawn on the GPU (seconds, not minutes)."""
    import argparse as ap

    from esm.model.esm2 import ESM2

    torch.manual_seed(0)
    layers, width, heads = ESM2_3B
    with torch.device("cuda"), torch.no_grad():
        model = ESM2(layers, width, heads)
        for name, param in model.named_parameters():
            if "layer_norm" in name:
                param.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.normal_(0.0, 0.02)
    state = {k: (v.half() if v.is_floating_point() else v).cpu() for k, v in model.state_dict().items()}
    del model
    torch.cuda.empty_cache()
    regression = {k: state.pop(k) for k in [k for k in state if k.startswith("contact_head.regression.")]}
    cfg = ap.Namespace(encoder_layers=layers, encoder_embed_dim=width, encoder_attention_heads=heads, token_dropout=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": regression}, path.with_name(f"{path.stem}-contact-regression.pt"))
    torch.save({"model": state, "cfg": {"model": cfg}}, path)
    return path


def write_models(workdir: Path, smoke: bool) -> dict[str, Path]:
    from vnp_core.tiny_models import write_tiny_dnabert_s, write_tiny_esm2

    esm2 = workdir / ("esm2_tiny.pt" if smoke else "esm2_3B_n002.pt")
    dnabert_s = workdir / ("dnabert_s_tiny" if smoke else "dnabert_s_random")
    if not esm2.exists():
        write_tiny_esm2(esm2) if smoke else write_esm2_3b(esm2)
    if not (dnabert_s / "model.safetensors").exists():
        write_tiny_dnabert_s(dnabert_s, **({} if smoke else DNABERT_S))
    return {"esm2": esm2, "dnabert_s": dnabert_s}


# ------------------------------------------------------------------------------------------ sample


def write_reads(genomes_dir: Path, n: int, dup_fraction: float, seed: int, path: Path) -> dict:
    """`n` reads of 150 bp: round(n * (1 - dup_fraction)) distinct sequences, the rest exact copies of them, shuffled."""
    from vnp_core.fasta import read_fasta
    from vnp_core.simulate import simulate_reads

    genomes = {r.id: r.sequence.upper() for p in sorted(genomes_dir.glob("*.fasta")) for r in read_fasta(p).records}
    distinct_wanted = round(n * (1 - dup_fraction))
    distinct: dict[str, str] = {}  # sequence -> id
    round_ = 0
    while len(distinct) < distinct_wanted:
        for read_id, sequence in simulate_reads(genomes, distinct_wanted, 150, seed=seed + round_):
            if len(distinct) == distinct_wanted:
                break
            distinct.setdefault(sequence, f"{read_id}_r{round_}")
        round_ += 1
    rng = np.random.default_rng(seed)
    base = [(read_id, sequence) for sequence, read_id in distinct.items()]
    copies = rng.integers(0, len(base), size=n - len(base))
    reads = base + [(f"{base[i][0]}_copy{j}", base[i][1]) for j, i in enumerate(copies.tolist())]
    reads = [reads[i] for i in rng.permutation(len(reads)).tolist()]
    path.write_text("".join(f">{rid}\n{seq}\n" for rid, seq in reads))
    return {"reads": n, "distinct_reads": len(base), "copies": len(copies),
            "distinct_reads_copied": int(len(np.unique(copies))), "genomes": sorted(p.name for p in genomes_dir.glob("*.fasta")),
            "genome_bp": sum(len(s) for s in genomes.values())}


def prepare_sample(reads: Path, sample_dir: Path, dnabert_s: Path) -> tuple[Path, dict]:
    """The product's `sequence_index` step: VirNucPro prep, then the index (one shard) with DNABERT-S ids."""
    from vnp_core.config import PrepConfig
    from vnp_core.index import build_index, index_summary, write_index
    from vnp_core.models.dnabert_s import DnabertSTokenizer
    from vnp_core.prep import prepare_fasta

    start = time.perf_counter()
    config = PrepConfig(chunk_length=500, num_shards=1)
    prep = prepare_fasta(reads, sample_dir / "prep", config)
    tokenizer = DnabertSTokenizer(dnabert_s / "tokenizer.json")
    index = build_index(prep.frames, num_shards=1, dnabert_tokenizer=tokenizer)
    path = sample_dir / "sequence_index.parquet"
    write_index(index, path, chunk_length=500, dnabert_tokenizer=tokenizer)
    summary = index_summary(index)
    return path, {"kept_frames": summary["kept_frames"], "esm2_tokens": summary["esm2_tokens"],
                  "dnabert_s_tokens": summary["dnabert_s_tokens"],
                  "distinct_proteins": index["protein"].n_unique(), "distinct_nucleotides": index["nucleotide"].n_unique(),
                  "prep_and_index_seconds": round(time.perf_counter() - start, 2)}


def jobs(index: Path, models: dict[str, Path], out_dir: Path, config, cache_dir: Path | None) -> list:
    """What `shard_embeddings` hands `embed_shards` for shard 0: one job per registry model, in registry order."""
    from vnp_core.engine import ShardJob
    from vnp_core.index import ShardRows
    from vnp_core.models import MODELS

    out_dir.mkdir(parents=True, exist_ok=True)
    result = []
    for name, spec in MODELS.items():
        rows = ShardRows(index, 0, spec.index_column)
        result.append(ShardJob(name, models[name], rows, out_dir / f"{name}.h5", config, {"sample": "bench", "chunk_length": 500},
                               tokens=rows.tokens, cache_dir=cache_dir))
    return result


def run_stage(job_list: list) -> tuple[float, dict]:
    from vnp_core.engine import embed_shards

    start = time.perf_counter()
    outcomes = embed_shards(job_list)
    seconds = time.perf_counter() - start
    per_job = {}
    for job, outcome in zip(job_list, outcomes):
        if isinstance(outcome, Exception):
            raise outcome
        per_job[job.model] = {**asdict(outcome), "summary": outcome.summary()}
    return seconds, per_job


# ------------------------------------------------------------------------------------------ checks


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def compare(dirs: dict[str, Path], models: list[str]) -> dict:
    from vnp_core.store import read_embeddings

    shards = {variant: {m: read_embeddings(d / f"{m}.h5") for m in models} for variant, d in dirs.items()}
    checks = {}
    for m in models:
        off, on = shards["off"][m], shards["on"][m]
        cos = cosine_rows(off.embeddings, on.embeddings)
        equal_rows = (off.embeddings == on.embeddings).all(axis=1)
        checks[m] = {
            "rows": len(off.ids), "ids_equal_off_on": off.ids == on.ids,
            "on_vs_off_min_cosine": float(cos.min()), "on_vs_off_p001_cosine": float(np.quantile(cos, 0.001)),
            "on_vs_off_rows_ge_0.99999": float((cos >= 0.99999).mean()),
            "on_vs_off_bit_identical_rows": int(equal_rows.sum()),
            "on_vs_off_max_abs_diff": float(np.abs(off.embeddings - on.embeddings).max()),
            "all_finite": bool(np.isfinite(on.embeddings).all() and np.isfinite(off.embeddings).all()),
        }
        if "on_rerun" in shards:
            rerun = shards["on_rerun"][m]
            checks[m]["rerun_array_equal_on"] = bool(np.array_equal(rerun.embeddings, on.embeddings))
            checks[m]["rerun_ids_equal"] = rerun.ids == on.ids
        # Rows of the same sequence must hold the same vector within a store-on shard (duplicates served once).
        checks[m]["store_on_attrs_rows_from_cache"] = int(on.attrs.get("rows_from_cache", -1))
    # The merged features are [DNABERT-S | ESM-2] per row: the same check over the concatenation.
    if all(shards["off"][m].ids == shards["off"][models[0]].ids for m in models):
        merged = {v: np.concatenate([shards[v][m].embeddings for m in models], axis=1) for v in shards}
        cos = cosine_rows(merged["off"], merged["on"])
        checks["merged"] = {"on_vs_off_min_cosine": float(cos.min()),
                            "on_vs_off_rows_ge_0.99999": float((cos >= 0.99999).mean()),
                            "on_vs_off_bit_identical_rows": int((merged["off"] == merged["on"]).all(axis=1).sum())}
        if "on_rerun" in merged:
            checks["merged"]["rerun_array_equal_on"] = bool(np.array_equal(merged["on_rerun"], merged["on"]))
    return checks


def store_stats(cache_dir: Path) -> list[dict]:
    from vnp_core.embedding_cache import EmbeddingCache

    with EmbeddingCache.open(cache_dir) as cache:
        rows = cache.stats()
    disk = sum(f.stat().st_size for f in cache_dir.iterdir() if f.is_file())
    return [{"kind": r.identity.kind, "entries": r.entries, "size_bytes": r.size_bytes, "hits": r.hits,
             "misses": r.misses, "hit_rate": round(r.hit_rate, 4), "files_on_disk_bytes": disk} for r in rows]


# ------------------------------------------------------------------------------------------ main


def installed_versions(*packages: str) -> dict[str, str]:
    found = {}
    for package in packages:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reads", type=int, default=150_000)
    parser.add_argument("--dup-fraction", type=float, default=0.3)
    parser.add_argument("--warmup-reads", type=int, default=4000)
    parser.add_argument("--genomes", type=Path, default=ROOT.parent / "shared" / "data" / "real")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/vnp_store_bench"))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--smoke", action="store_true", help="Tiny models on the CPU: checks this script, measures nothing.")
    args = parser.parse_args()
    from vnp_core.config import EmbedConfig
    from vnp_core.models import MODELS

    device = "cpu" if args.smoke else "cuda"
    results: dict = {
        "benchmark": "issue 17: embedding stage (embed_shards, DNABERT-S then ESM-2, one shard) with the store off, on, on again",
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "commit": args.commit,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (smoke)",
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                     **installed_versions("transformers", "fair-esm", "polars", "lmdb", "h5py", "numpy", "tokenizers")},
        "models": "tiny (smoke)" if args.smoke else "ESM-2 3B (36x2560, N(0,0.02) random, fair-esm .pt, fp16 on disk); "
                                                     "DNABERT-S 12x768 random, tiny 384-token BPE",
    }

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, default=str))

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    models = write_models(work, args.smoke)
    results["model_write_seconds"] = round(time.perf_counter() - start, 1)
    log(f"models ready in {results['model_write_seconds']} s")

    sample = work / f"sample_{args.reads}_{args.dup_fraction}"
    sample.mkdir(parents=True, exist_ok=True)
    reads = sample / "reads.fasta"
    results["reads"] = write_reads(args.genomes, args.reads, args.dup_fraction, 0, reads)
    index, results["index"] = prepare_sample(reads, sample, models["dnabert_s"])
    log(f"sample: {results['reads']} -> {results['index']}")

    config = EmbedConfig(device=device, dtype="float32" if args.smoke else "float16")
    if device == "cuda":
        # As a spare device process does (vnp_core.gpu) before its call: a process that has not imported the
        # compiler races `embed_shards`' own import of it against the loading thread's compile_layers, and
        # Python's import of torch._dynamo then failed on a partially initialised torch._inductor.utils (seen
        # on the H200 at b14efd6).
        import importlib

        from vnp_core.engine import COMPILER_MODULES
        for module in COMPILER_MODULES:
            importlib.import_module(module)
    if args.warmup_reads:
        warm = work / f"warmup_{args.warmup_reads}"
        warm.mkdir(parents=True, exist_ok=True)
        write_reads(args.genomes, args.warmup_reads, 0.0, 12345, warm / "reads.fasta")
        warm_index, _ = prepare_sample(warm / "reads.fasta", warm, models["dnabert_s"])
        shutil.rmtree(warm / "out", ignore_errors=True)
        seconds, _ = run_stage(jobs(warm_index, models, warm / "out", EmbedConfig(
            device=device, dtype=config.dtype, compile_min_tokens=0), None))
        results["warmup_seconds"] = round(seconds, 1)
        log(f"warm-up (untimed, layers compiled whatever the size): {seconds:.1f} s")

    cache_dir = sample / "store"
    shutil.rmtree(cache_dir, ignore_errors=True)
    dirs = {}
    results["runs"] = {}
    for variant in args.variants.split(","):
        out = sample / f"out_{variant}"
        shutil.rmtree(out, ignore_errors=True)
        dirs[variant] = out
        seconds, per_job = run_stage(jobs(index, models, out, config, None if variant == "off" else cache_dir))
        results["runs"][variant] = {"stage_seconds": round(seconds, 2), "jobs": per_job}
        log(f"{variant}: {seconds:.1f} s; " + "; ".join(f"{m}: {j['summary']}" for m, j in per_job.items()))
        save()
    runs = results["runs"]
    if "off" in runs and "on" in runs:
        results["speedup_on_vs_off"] = round(runs["off"]["stage_seconds"] / runs["on"]["stage_seconds"], 3)
        results["distinct_share"] = {
            m: round(1 - runs["on"]["jobs"][m]["rows_from_cache"] / runs["on"]["jobs"][m]["sequences"], 4) for m in MODELS}
        results["checks"] = compare({v: d for v, d in dirs.items() if v in runs}, list(MODELS))
        results["store"] = store_stats(cache_dir)
    save()
    print_table(results)


def print_table(results: dict) -> None:
    runs = results.get("runs", {})
    print("\n| run | stage s | " + " | ".join(f"{m} rows embedded / tokens / tok/s / load s / first pack s"
                                            for m in next(iter(runs.values()))["jobs"]) + " |")
    for variant, run in runs.items():
        cells = []
        for m, j in run["jobs"].items():
            embedded = j["sequences"] - j["rows_from_cache"] - j["resumed_from_rows"]
            cells.append(f"{embedded:,} / {j['tokens']:,} / {j['tokens_per_s']:,.0f} / {j['load_seconds']:.1f} / {j['first_pack_seconds']:.1f}")
        print(f"| {variant} | {run['stage_seconds']:.1f} | " + " | ".join(cells) + " |")
    if "speedup_on_vs_off" in results:
        print(f"speed-up store on vs off: {results['speedup_on_vs_off']:.3f}x; distinct share {results['distinct_share']}")
        for m, c in results["checks"].items():
            print(m, json.dumps(c))


if __name__ == "__main__":
    main()
