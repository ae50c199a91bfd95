"""Multi-GPU scaling of one sample through Dagster (`vnp run`): the same sample on 1, 2, ... GPUs.

Each device count gets a fresh instance and `--shards` equal to that count, so every GPU holds one
shard of each model; the embedding stage's wall time is what scales. Models are randomly
initialised at the real sizes (ESM-2 3B, DNABERT-S) in the real checkpoint formats; reads are
simulated from the genomes of the bundled example sample.

On a lent machine with 2+ GPUs (dagster, fair-esm and polars carried as wheels):
    python bench/scaling_bench.py --reads 1000000 --gpus 1,2 --out $OUT/scaling.json
A run too long for one device call can be split: `--gpus 4,2` then `--gpus 1` with the same `--out`
and `--workdir` (the models and reads are written once, the results file gathers the runs); or,
after `--prepare-only`, counts can run at once on disjoint GPUs (`--gpus 2` and `--gpus 1 --first-gpu 2`).
On this CPU-only machine, `--smoke` checks the script with tiny models and 1 shard on the CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EXAMPLE = Path(__file__).resolve().parents[1] / "vnp_core" / "data" / "example.fasta"
ESM2_SIZES = {"8M": (6, 320, 20), "150M": (30, 640, 20), "650M": (33, 1280, 20), "3B": (36, 2560, 40)}


def write_models(workdir: Path, esm2_size: str, smoke: bool) -> dict[str, str]:
    """Random models in the real formats, written once per workdir: `run_sample`'s model settings."""
    import torch

    from vnp_core.tiny_models import tiny_feature_width, write_tiny_classifier, write_tiny_dnabert_s, write_tiny_esm2

    esm2 = workdir / f"esm2_{esm2_size}_random.pt"
    dnabert_s = workdir / "dnabert_s_random"
    if not esm2.exists():
        layers, width, heads = (2, 64, 4) if smoke else ESM2_SIZES[esm2_size]
        write_tiny_esm2(esm2, num_layers=layers, embed_dim=width, attention_heads=heads,
                        dtype=torch.float32 if smoke else torch.float16)
    if not (dnabert_s / "model.safetensors").exists():
        shape = dict(hidden=64, layers=2, heads=4, intermediate=128) if smoke else \
            dict(hidden=768, layers=12, heads=12, intermediate=3072)
        write_tiny_dnabert_s(dnabert_s, **shape)
    classifier = write_tiny_classifier(workdir / "classifier", in_features=tiny_feature_width(esm2, dnabert_s),
                                       chunk_length=500)["state_dict"]
    return {"esm2_model": str(esm2), "dnabert_s_model": str(dnabert_s), "classifier": str(classifier)}


def write_reads(workdir: Path, n: int) -> Path:
    from vnp_core.fasta import read_fasta
    from vnp_core.simulate import simulate_reads

    genomes = {r.id: r.sequence.upper() for r in read_fasta(EXAMPLE).records if len(r.sequence) > 1000}
    path = workdir / f"reads{n}.fasta"
    if not path.exists():
        path.write_text("".join(f">{rid}\n{seq}\n" for rid, seq in simulate_reads(genomes, n, 150, seed=0)))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True,
                        help="JSON results; runs already in it are kept, so device counts can be measured in turns.")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/vnp_scaling"))
    parser.add_argument("--reads", type=int, default=1_000_000)
    parser.add_argument("--gpus", default="1,2", help="Device counts to measure, in this order, e.g. 1,2,4,8.")
    parser.add_argument("--esm2-size", choices=sorted(ESM2_SIZES), default="3B")
    parser.add_argument("--warmup-reads", type=int, default=15000,
                        help="An untimed run of this many reads first, on GPU 0 (0: none), with its layers compiled "
                             "whatever its size: it fills torch.compile's cache, as any earlier sample on the host "
                             "would, so no timed run pays a cold compilation. The cache is hit only if the first "
                             "pack has the timed runs' shape: ESM-2's first pack holds the longest proteins, 5,041 "
                             "of 52 tokens from 150-bp reads, which takes ~15,000 reads.")
    parser.add_argument("--first-gpu", type=int, default=0,
                        help="Use GPUs first-gpu, first-gpu + 1, ...: two invocations on disjoint GPUs can run at once.")
    parser.add_argument("--prepare-only", action="store_true", help="Write the models and reads, then stop.")
    parser.add_argument("--until", default="virnucpro_predictions",
                        help="Last stage of each timed run (`vnp run --until`): 'embeddings' keeps a long run in one call.")
    parser.add_argument("--smoke", action="store_true", help="Tiny models on the CPU, one shard: checks the script only.")
    args = parser.parse_args()

    import torch

    from vnp_assets.run_sample import run_sample

    args.workdir.mkdir(parents=True, exist_ok=True)
    models = write_models(args.workdir, args.esm2_size, args.smoke)
    dtype = None if args.smoke else "float16"
    if args.prepare_only:
        write_reads(args.workdir, args.reads)
        return
    if args.warmup_reads:
        warmup = run_sample(write_reads(args.workdir, args.warmup_reads), num_shards=1, dtype=dtype, until="embeddings",
                            home=args.workdir / f"home_warmup_{time.time_ns()}", devices=None if args.smoke else [0],
                            compile_min_tokens=0, **models)
        print(f"warm-up (untimed):\n{warmup.summary()}", flush=True)
    reads = write_reads(args.workdir, args.reads)
    results = json.loads(args.out.read_text()) if args.out.exists() else {"runs": {}}
    results.update({
        "command": " ".join(sys.argv), "reads": args.reads, "esm2_size": "tiny" if args.smoke else args.esm2_size,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "gpus_on_host": torch.cuda.device_count(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                     **installed_versions("dagster", "polars", "h5py", "numpy", "tokenizers", "fair-esm")},
    })
    for count in [int(c) for c in args.gpus.split(",")]:
        home = args.workdir / f"home_{count}gpu_{time.time_ns()}"
        devices = None if args.smoke else list(range(args.first_gpu, args.first_gpu + count))
        run = run_sample(reads, num_shards=count, home=home, devices=devices, dtype=dtype, until=args.until, **models)
        results["runs"][str(count)] = {"stage_seconds": run.stage_seconds, "total_seconds": sum(run.stage_seconds.values()),
                                       "until": args.until, "devices": devices, "command": " ".join(sys.argv),
                                       "shards": shard_metadata(home), "timeline": run_timeline(home)}
        print(run.summary(), flush=True)
        print_timeline(results["runs"][str(count)]["timeline"])
        write_results(results, args.out)
    print_table(results)


def installed_versions(*packages: str) -> dict[str, str]:
    found = {}
    for package in packages:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def shard_metadata(home: Path) -> dict[str, dict]:
    """What each embedding step recorded (tokens/s, model load, how long the device waited, first pack)."""
    from dagster import AssetKey, AssetRecordsFilter

    from dagster import DagsterInstance
    from vnp_core.models import MODELS

    shards = {}
    with DagsterInstance.from_config(str(home)) as instance:
        for kind in MODELS:
            records = instance.fetch_materializations(AssetRecordsFilter(asset_key=AssetKey(f"{kind}_embeddings")),
                                                      limit=100).records
            for record in records:
                metadata = record.asset_materialization.metadata
                shards[f"{kind} {record.asset_materialization.partition}"] = {
                    key: metadata[key].value for key in ("rows", "tokens", "seconds", "tokens_per_s", "model_load_seconds",
                                                         "compiled_layers", "device_waited_seconds", "first_pack_seconds", "device")
                    if key in metadata}
    return shards


def run_timeline(home: Path) -> list[dict]:
    """Every event of the sample's Dagster runs, in seconds from the end of the index run (about when
    the embedding stage starts): where a step's time goes outside its device work."""
    from dagster import DagsterInstance

    with DagsterInstance.from_config(str(home)) as instance:
        runs = sorted(instance.get_runs(), key=lambda run: instance.all_logs(run.run_id)[0].timestamp)
        origin = instance.all_logs(runs[0].run_id)[-1].timestamp
        return [{"run": run.run_id[:8], "seconds": round(event.timestamp - origin, 3),
                 "event": event.dagster_event.event_type_value if event.dagster_event else "log",
                 "message": (event.user_message or "")[:160]}
                for run in runs[1:] for event in instance.all_logs(run.run_id)]


def print_timeline(timeline: list[dict]) -> None:
    for event in timeline:
        if event["event"] in ("PIPELINE_START", "STEP_START", "log", "ASSET_MATERIALIZATION", "STEP_SUCCESS",
                              "PIPELINE_SUCCESS"):
            print(f"{event['seconds']:8.2f} {event['run']} {event['event']:22s} {event['message'][:110]}")


def write_results(results: dict, out: Path) -> None:
    """Adds the embedding stage's scaling against the fewest GPUs measured, and writes the JSON."""
    embedding = {count: next(s for stage, s in run["stage_seconds"].items() if stage.startswith("embeddings"))
                 for count, run in results["runs"].items()}
    base = min(embedding, key=int)
    results["embedding_seconds"] = embedding
    results["embedding_scaling"] = {count: embedding[base] / seconds * int(base) for count, seconds in embedding.items()}
    results["scaling_efficiency"] = {count: s / int(count) for count, s in results["embedding_scaling"].items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str))


def print_table(results: dict) -> None:
    print("\n| GPUs | embedding stage s | speed-up | of linear | end to end s |\n|---:|---:|---:|---:|---:|")
    for count, run in sorted(results["runs"].items(), key=lambda item: int(item[0])):
        print(f"| {count} | {results['embedding_seconds'][count]:.1f} | {results['embedding_scaling'][count]:.2f}x "
              f"| {results['scaling_efficiency'][count]:.0%} | {run['total_seconds']:.1f} |")


if __name__ == "__main__":
    main()
