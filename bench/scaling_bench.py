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

Side by side in one call, `--runs` names each timed run as GPUS[:OPTION...], e.g.
    --runs 2:local,2:ray        issue 15: the same sample on 2 GPUs, local against a Ray cluster that
                                the script starts on those GPUs (`ray start --head`, stopped after)
    --runs 2:nostore,2 --dup-fraction 0.3   issue 17: the embedding store off against on
`--rerun-classifier` then reruns the last run's home with another classifier (`vnp run`'s
up-to-date stages skipped), timed end to end; `--reuse-homes` continues homes from an earlier call.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
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


def write_reads(workdir: Path, n: int, dup_fraction: float = 0.0, genomes_dir: Path | None = None) -> Path:
    """`n` simulated 150-bp reads from the example sample's two genomes (phiX174, an influenza segment:
    most reads repeat, so compare with the store off). With `genomes_dir` and `dup_fraction`: from its
    genomes, that share of the reads exact copies of the others, the rest distinct (`store_bench`'s sample)."""
    from vnp_core.fasta import read_fasta
    from vnp_core.simulate import simulate_reads

    if genomes_dir is not None:
        from store_bench import write_reads as write_distinct_and_copies

        path = workdir / f"reads{n}_dup{round(dup_fraction * 100)}.fasta"
        if not path.exists():
            write_distinct_and_copies(genomes_dir, n, dup_fraction, 0, path)
        return path
    genomes = {r.id: r.sequence.upper() for r in read_fasta(EXAMPLE).records if len(r.sequence) > 1000}
    path = workdir / f"reads{n}.fasta"
    if not path.exists():
        path.write_text("".join(f">{rid}\n{seq}\n" for rid, seq in simulate_reads(genomes, n, 150, seed=0)))
    return path


def parse_runs(spec: str) -> list[tuple[str, int, dict]]:
    """`2:local,2:ray,2:nostore,1:fp8,1:compiled` -> [(label, GPU count, run_sample settings)]."""
    runs = []
    for label in spec.split(","):
        count, *options = label.split("#")[0].split(":")  # `#tag`: the same run again, e.g. 1:nostore#2
        unknown = set(options) - {"local", "ray", "nostore", "fp8", "compiled"}
        if unknown or not count.isdigit() or label in [run[0] for run in runs]:
            raise SystemExit(f"--runs {label!r}: expected GPUS[:local|ray][:nostore][:fp8][:compiled], each label once")
        # `compiled`: both models compiled whatever the shard's size (compile_min_tokens 0).
        runs.append((label, int(count), {"executor": "ray" if "ray" in options else "local",
                                         "embedding_cache": "nostore" not in options, "fp8": "fp8" in options,
                                         **({"compile_min_tokens": 0} if "compiled" in options else {})}))
    return runs


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
    parser.add_argument("--runs", help="Timed runs in this order, GPUS[:local|ray][:nostore] each, e.g. 2:local,2:ray "
                                       "(ray: a one-node Ray cluster started on those GPUs). Replaces --gpus.")
    parser.add_argument("--genomes", type=Path, help="Simulate from these FASTA genomes (e.g. ../shared/data/real), "
                                                      "--dup-fraction of the reads copies of the others, the rest distinct.")
    parser.add_argument("--dup-fraction", type=float, default=0.0)
    parser.add_argument("--reuse-homes", action="store_true",
                        help="Continue each run's home from an earlier call (up-to-date stages are skipped) instead of a fresh one.")
    parser.add_argument("--rerun-classifier", action="store_true",
                        help="Then rerun the last run's sample with another classifier, to the end, timed.")
    args = parser.parse_args()
    runs = parse_runs(args.runs) if args.runs else [(c, int(c), {}) for c in args.gpus.split(",")]

    import torch

    from vnp_assets.run_sample import run_sample

    args.workdir.mkdir(parents=True, exist_ok=True)
    models = write_models(args.workdir, args.esm2_size, args.smoke)
    dtype = None if args.smoke else "float16"
    if args.prepare_only:
        write_reads(args.workdir, args.reads, args.dup_fraction, args.genomes)
        return
    # One compile cache for the warm-up and every timed run, as on a host whose homes share one.
    compile_cache = {"compile_cache_dir": str(args.workdir / "compile_cache")}
    if args.warmup_reads:
        warmup = run_sample(write_reads(args.workdir, args.warmup_reads), num_shards=1, dtype=dtype, until="embeddings",
                            home=args.workdir / f"home_warmup_{time.time_ns()}", devices=None if args.smoke else [0],
                            compile_min_tokens=0, **compile_cache, **models)
        print(f"warm-up (untimed):\n{warmup.summary()}", flush=True)
    reads = write_reads(args.workdir, args.reads, args.dup_fraction, args.genomes)
    results = json.loads(args.out.read_text()) if args.out.exists() else {"runs": {}}
    results.update({
        "command": " ".join(sys.argv), "reads": args.reads, "dup_fraction": args.dup_fraction,
        "esm2_size": "tiny" if args.smoke else args.esm2_size,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "gpus_on_host": torch.cuda.device_count(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                     **installed_versions("dagster", "polars", "h5py", "numpy", "tokenizers", "fair-esm")},
    })
    for label, count, options in runs:
        home = home_of(args.workdir, label)
        if home.exists() and not args.reuse_homes:
            shutil.rmtree(home)
        devices = None if args.smoke else list(range(args.first_gpu, args.first_gpu + count))
        settings = dict(num_shards=count, devices=devices, dtype=dtype, **compile_cache, **options, **models)
        with ray_cluster_if(options.get("executor") == "ray", args.workdir, count, devices) as address:
            if address:  # the cluster hands out the GPUs (fake slots with --smoke: the work runs on the CPU)
                settings.update(ray_address=address, devices=None, **({"ray_device": "cpu"} if args.smoke else {}))
            started = time.perf_counter()
            run = run_sample(reads, home=home, until=args.until, **settings)
            wall = time.perf_counter() - started
        results["runs"][label] = {"stage_seconds": run.stage_seconds, "total_seconds": sum(run.stage_seconds.values()),
                                  "run_sample_seconds": wall, "up_to_date": run.up_to_date, "until": args.until,
                                  "devices": devices, "settings": {k: v for k, v in settings.items() if k not in models},
                                  "command": " ".join(sys.argv), "shards": shard_metadata(home), "timeline": run_timeline(home)}
        print(run.summary(), flush=True)
        print_timeline(results["runs"][label]["timeline"])
        write_results(results, args.out)
    if args.rerun_classifier:
        results["classifier_rerun"] = rerun_with_another_classifier(reads, home, settings, args.workdir)
        write_results(results, args.out)
    results["shards_equal"] = compare_shards(args.workdir, [label for label, _, _ in runs])
    write_results(results, args.out)
    print_table(results)


@contextmanager
def ray_cluster_if(wanted: bool, workdir: Path, gpus: int, devices: list[int] | None):
    """A one-node Ray cluster on `devices` (fake GPU slots when None), its address; None when not `wanted`."""
    if not wanted:
        yield None
        return
    import os

    from ray_cpu_bench import start_head, stop_head

    temp = Path(tempfile.mkdtemp(prefix="ray_", dir=workdir))
    head, address = start_head(temp, gpus=gpus, cpus=os.cpu_count() or 2,
                               visible_devices=None if devices is None else ",".join(map(str, devices)))
    try:
        yield address
    finally:
        left = stop_head(head)
        print(f"Ray head stopped; processes left: {left or 'none'}", flush=True)


def rerun_with_another_classifier(reads: Path, home: Path, settings: dict, workdir: Path) -> dict:
    """The same sample, finished, then again with another classifier: what a user pays for a new classifier."""
    from vnp_assets.run_sample import run_sample
    from vnp_core.tiny_models import tiny_feature_width, write_tiny_classifier

    finished = run_sample(reads, home=home, until="virnucpro_predictions", **settings)
    print(f"finished:\n{finished.summary()}", flush=True)
    other = write_tiny_classifier(workdir / "classifier_other", chunk_length=500, seed=1,
                                  in_features=tiny_feature_width(Path(settings["esm2_model"]), Path(settings["dnabert_s_model"])))
    # As a user reruns it: `vnp run` in a fresh process, its start-up and imports included.
    command = [sys.executable, "-m", "vnp_assets.cli", "run", str(reads), "--home", str(home),
               "--esm2-model", settings["esm2_model"], "--dnabert-s-model", settings["dnabert_s_model"],
               "--classifier", str(other["state_dict"]), "--shards", str(settings["num_shards"]),
               *(["--dtype", settings["dtype"]] if settings["dtype"] else []),
               *(["--devices", ",".join(map(str, settings["devices"]))] if settings["devices"] else []),
               *([] if settings.get("embedding_cache", True) else ["--no-cache"])]
    started = time.perf_counter()
    rerun = subprocess.run(command, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - started
    print(f"classifier rerun (`{' '.join(command[3:])}`), exit {rerun.returncode}, {wall:.1f} s end to end:\n"
          f"{rerun.stdout}{rerun.stderr[-2000:] if rerun.returncode else ''}", flush=True)
    return {"finish_stage_seconds": finished.stage_seconds, "finish_up_to_date": finished.up_to_date,
            "rerun_command": " ".join(command), "rerun_exit": rerun.returncode, "rerun_seconds": wall,
            "rerun_stdout": rerun.stdout, "rerun_up_to_date": [line.split(":")[0] for line in rerun.stdout.splitlines()
                                                                if "up to date" in line]}


def compare_shards(workdir: Path, labels: list[str]) -> dict[str, bool]:
    """Each run's shard `embeddings` against the first run's, bit for bit (`np.array_equal`), per model."""
    import h5py
    import numpy as np

    homes = [home_of(workdir, label) for label in labels]
    first = {p.relative_to(homes[0]): p for p in homes[0].glob("storage/samples/*/embeddings/*/shard-*.h5")}
    equal = {}
    for label, home in zip(labels[1:], homes[1:]):
        for relative, path in first.items():
            with h5py.File(path) as a, h5py.File(home / relative) as b:
                x, y = a["embeddings"][:].astype(np.float64), b["embeddings"][:].astype(np.float64)
                cosine = (x * y).sum(1) / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1), 1e-30)
                equal[f"{label} {relative.parent.name}/{relative.name}"] = {
                    "bit_identical": bool(np.array_equal(a["ids"][:], b["ids"][:]) and np.array_equal(x, y)),
                    "identical_rows": int((x == y).all(1).sum()), "rows": len(x), "min_cosine": float(cosine.min())}
    return equal


def home_of(workdir: Path, label: str) -> Path:
    return workdir / f"home_{label.replace(':', '_').replace('#', '_')}gpu"


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
                                                         "compiled_layers", "device_waited_seconds", "first_pack_seconds",
                                                         "compiled_graphs_from_cache", "compiled_graphs_anew",
                                                         "compile_seconds_at_first_pack", "device")
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
    embedding = {label: next((s for stage, s in run["stage_seconds"].items() if stage.startswith("embeddings")), 0.0)
                 for label, run in results["runs"].items()}
    base = next(iter(embedding))  # the first run measured
    results["embedding_seconds"] = embedding
    # Against the first run, per GPU: 2x on 2 GPUs is linear; `speed_up` is the plain ratio of the stages.
    results["speed_up"] = {label: embedding[base] / seconds if seconds else None for label, seconds in embedding.items()}
    results["embedding_scaling"] = {label: embedding[base] / seconds * gpus(base) if seconds else None
                                    for label, seconds in embedding.items()}
    results["scaling_efficiency"] = {label: s / gpus(label) if s else None for label, s in results["embedding_scaling"].items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str))


def gpus(label: str) -> int:
    return int(label.split(":")[0])


def print_table(results: dict) -> None:
    print("\n| run | embedding stage s | against the first | scaling | end to end s |\n|---|---:|---:|---:|---:|")
    for label, run in results["runs"].items():
        seconds, speed_up = results["embedding_seconds"][label], results["speed_up"][label]
        print(f"| {label} | {seconds:.1f} | {f'{speed_up:.3f}x' if speed_up else '-'} "
              f"| {results['embedding_scaling'][label] or 0:.2f}x | {run['total_seconds']:.1f} |")
    if "classifier_rerun" in results:
        print(f"\nclassifier rerun, end to end: {results['classifier_rerun']['rerun_seconds']:.1f} s, "
              f"skipped: {', '.join(results['classifier_rerun']['rerun_up_to_date'])}")
    for shard, same in results.get("shards_equal", {}).items():
        print(f"{shard} against the first run: {'bit-identical' if same['bit_identical'] else 'differs'}, "
              f"{same['identical_rows']:,} of {same['rows']:,} rows identical, min cosine {same['min_cosine']:.9f}")


if __name__ == "__main__":
    main()
