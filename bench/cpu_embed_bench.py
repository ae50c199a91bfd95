"""CPU embedding throughput, side by side in one run: vnp's packed ESM-2 against Hugging Face's
`EsmModel` with SDPA, on the same proteins and the same weights; and DNABERT-S's two back ends.

Proteins: reads simulated from every real genome in ../shared/data/real (mostly 150 bp, some 300
and 500 bp, as VirNucPro sees them), cut and translated by `prepare_records` (chunks of 500 bp):
VirNucPro's kept frames, ~50 residues on average. `--proteins` / `--nucleotides` read FASTA files
instead (e.g. `vnp prep`'s `*_identified_protein.faa` / `*_identified_nucleotide.fa`).

Per ESM-2 shape, one random Hugging Face `EsmModel` (N(0, 0.02) init, `attn_implementation="sdpa"`)
is saved and loaded by vnp's own loader, so both sides hold the same weights. Timed after a warm-up
pass of each, interleaved in `--rounds` rounds (medians reported):
- `vnp_old`: vnp's model over `plan_packs` packs in input order, as `vnp embed` ran on the CPU
  before: back end `sdpa_reference`, packs of 16,384 tokens;
- `vnp_auto`: the same with the back end `auto` picks and the engine's `CPU_MAX_TOKENS` now;
  `vnp_auto_16k`: `auto` in the old packs (the back end's share of the change);
- `vnp_engine`: `vnp_core.engine.embed_sequences` with `auto` (tokenising and the HDF5 shard included);
- `hf_sdpa_bN`: `EsmModel` over padded batches of N proteins sorted by length (what a user would
  write), mean over residues in fp32, as vnp pools. The ratios use the fastest batch size.
DNABERT-S (random weights in the checkpoint layout, the tiny tokenizer of `vnp models make-tiny`):
the `vnp_*` variants alone. Outputs are checked: cosine of vnp's pooled vectors against Hugging
Face's, and every vnp variant against `vnp_old`.

Usage, from the repository root: python bench/cpu_embed_bench.py [--reads 1500] [--rounds 3]
    [--threads 2] [--out bench/results/cpu_embed_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vnp_core.config import EmbedConfig
from vnp_core.models import model_spec
from vnp_core.packing import make_batch, plan_packs

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real"
SEED = 0
# (bp, share of the reads): VirNucPro's short reads, with some longer ones up to a whole 500-bp chunk.
READ_MIX = ((150, 0.8), (300, 0.1), (500, 0.1))
ESM2_SHAPES = {"tiny": (2, 64, 4), "8M": (6, 320, 20)}  # layers, width, heads (FFN 4x)
DNABERT_S_SHAPES = {"tiny": (2, 64, 4, 128), "small": (6, 384, 6, 1536)}  # layers, hidden, heads, intermediate
HF_BATCH_SIZES = (32, 64)  # its fastest on 2 threads (256 ran at about half of 64's speed)
OLD_CPU_MAX_TOKENS = 16384  # the engine's CPU pack budget before this benchmark
PAD, MASK = 1, 32


# ---------------------------------------------------------------------------------------- inputs


def simulated_sequences(reads: int) -> tuple[list[str], list[str]]:
    """VirNucPro's kept frames of simulated reads: (proteins, their nucleotides)."""
    from vnp_core.config import PrepConfig
    from vnp_core.fasta import FastaRecord, read_fasta
    from vnp_core.prep import prepare_records
    from vnp_core.simulate import simulate_reads

    genomes = {r.id: r.sequence for path in sorted(REAL.glob("*.fasta")) for r in read_fasta(path).records}
    simulated = [read for i, (length, share) in enumerate(READ_MIX)
                 for read in simulate_reads(genomes, round(reads * share), length, SEED + i)]
    np.random.default_rng(SEED).shuffle(simulated)  # one sample of mixed read lengths: packs mix them too
    records = [FastaRecord(read_id, "", sequence, line) for line, (read_id, sequence) in enumerate(simulated)]
    frames = prepare_records(records, PrepConfig(chunk_length=500)).frames
    return frames["protein"].to_list(), frames["nucleotide"].to_list()


def read_sequences(path: Path) -> list[str]:
    text = path.read_text()
    return ["".join(block.splitlines()[1:]) for block in text.split(">")[1:]]


def length_summary(lengths: np.ndarray) -> dict:
    return {"count": int(len(lengths)), "total": int(lengths.sum()), "mean": round(float(lengths.mean()), 1),
            "min": int(lengths.min()), "p50": int(np.median(lengths)), "max": int(lengths.max())}


# ---------------------------------------------------------------------------------------- models


def hf_esm(num_layers: int, width: int, heads: int, seed: int):
    from transformers import EsmConfig, EsmModel

    config = EsmConfig(vocab_size=33, hidden_size=width, num_hidden_layers=num_layers, num_attention_heads=heads,
                       intermediate_size=4 * width, position_embedding_type="rotary", token_dropout=True,
                       mask_token_id=MASK, pad_token_id=PAD, max_position_embeddings=1026,
                       emb_layer_norm_before=False, layer_norm_eps=1e-5, initializer_range=0.02,
                       attn_implementation="sdpa")
    torch.manual_seed(seed)
    model = EsmModel(config, add_pooling_layer=False)  # init: N(0, 0.02), LayerNorm 1/0
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    return model.eval().requires_grad_(False)


def hf_embed(model, token_ids: list[np.ndarray], batch_size: int) -> np.ndarray:
    """What a user would write: sort by length, pad batches, mean over residues (BOS/EOS and padding out)."""
    order = np.argsort([len(t) for t in token_ids], kind="stable")
    out = np.empty((len(token_ids), model.config.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            lengths = torch.tensor([len(token_ids[i]) for i in rows])
            ids = torch.full((len(rows), int(lengths.max())), PAD, dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, : lengths[r]] = torch.from_numpy(token_ids[i])
            hidden = model(input_ids=ids, attention_mask=(ids != PAD).long()).last_hidden_state.float()
            position = torch.arange(ids.shape[1])
            residue = ((position >= 1) & (position[None] < lengths[:, None] - 1)).float()[..., None]
            out[rows] = ((hidden * residue).sum(1) / residue.sum(1)).numpy()
    return out


def packed_embed(module, token_ids: list[np.ndarray], max_tokens: int) -> np.ndarray:
    """vnp's model over greedy in-order packs, as the engine plans them."""
    vectors = []
    for pack in plan_packs([len(t) for t in token_ids], max_tokens):
        vectors.append(module.embed(make_batch([token_ids[i] for i in pack], pack)).numpy())
    return np.concatenate(vectors)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# ---------------------------------------------------------------------------------------- timing


def interleaved(variants: dict, tokens: int, rounds: int) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """Each variant once per round, in turn, so that a busy machine slows them alike: medians, and outputs."""
    seconds = {name: [] for name in variants}
    outputs = {}
    for _ in range(rounds):
        for name, run in variants.items():
            start = time.perf_counter()
            outputs[name] = run()
            seconds[name].append(time.perf_counter() - start)
    timed = {name: {"tokens_per_s": round(tokens / statistics.median(s)), "seconds": [round(x, 3) for x in s]}
             for name, s in seconds.items()}
    return timed, outputs


def packed_variants(loaded: dict, token_ids: list[np.ndarray], max_tokens: int) -> dict:
    """Today's CPU path against the new one, and the back end's share of the change apart from the pack size's."""
    return {
        "vnp_old": lambda: packed_embed(loaded["sdpa_reference"].module, token_ids, OLD_CPU_MAX_TOKENS),
        "vnp_auto_16k": lambda: packed_embed(loaded["auto"].module, token_ids, OLD_CPU_MAX_TOKENS),
        "vnp_auto": lambda: packed_embed(loaded["auto"].module, token_ids, max_tokens),
    }


def ratio(timed: dict, a: str, b: str) -> float:
    return round(timed[a]["tokens_per_s"] / timed[b]["tokens_per_s"], 2)


def max_abs_diff(outputs: dict, a: str, b: str) -> float:
    return float(np.abs(outputs[a] - outputs[b]).max())


def esm2_section(name: str, shape: tuple[int, int, int], proteins: list[str], args, work: Path) -> dict:
    spec = model_spec("esm2")
    hf = hf_esm(*shape, seed=SEED)
    hf_dir = work / f"esm2_{name}"
    hf.save_pretrained(hf_dir)
    loaded = {backend: spec.load(hf_dir, EmbedConfig(attention_backend=backend)) for backend in ("sdpa_reference", "auto")}
    token_ids = [loaded["auto"].tokenizer.encode(p, str(i))[0] for i, p in enumerate(proteins)]
    tokens = sum(len(t) for t in token_ids)

    variants = packed_variants(loaded, token_ids, args.max_tokens)
    try:
        from vnp_core.engine import embed_sequences
        from vnp_core.store import read_embeddings
    except ImportError as error:  # e.g. polars missing on a machine that only runs the model
        print(f"engine path skipped: {error}", file=sys.stderr)
    else:
        def engine() -> np.ndarray:
            out = work / f"engine_{name}.h5"
            out.unlink(missing_ok=True)
            ids = [f"p{i}" for i in range(len(proteins))]
            embed_sequences(loaded["auto"], ids, proteins, out, EmbedConfig(max_tokens=args.max_tokens))
            return read_embeddings(out).embeddings
        variants["vnp_engine"] = engine
    for batch_size in args.hf_batch_sizes:
        variants[f"hf_sdpa_b{batch_size}"] = lambda b=batch_size: hf_embed(hf, token_ids, b)

    for run in variants.values():  # warm-up: first-call allocations, lazy imports, the HDF5 writer
        run()
    timed, outputs = interleaved(variants, tokens, args.rounds)
    hf_best = max((k for k in timed if k.startswith("hf_")), key=lambda k: timed[k]["tokens_per_s"])
    vnp_names = [k for k in timed if k.startswith("vnp_")]
    return {
        "shape": {"layers": shape[0], "width": shape[1], "heads": shape[2], "ffn": 4 * shape[1]},
        "backend_auto": loaded["auto"].attention_backend,
        "tokens": tokens, "sequences": len(proteins),
        "variants": timed,
        "hf_best": hf_best,
        "ratios": {"vnp_auto / vnp_old": ratio(timed, "vnp_auto", "vnp_old"),
                   **{f"{k} / {hf_best}": ratio(timed, k, hf_best) for k in vnp_names}},
        "checks": {
            "min_cosine_vnp_auto_vs_hf": float(cosine(outputs["vnp_auto"], outputs[hf_best]).min()),
            **{f"max_abs_diff_{k}_vs_vnp_old": max_abs_diff(outputs, k, "vnp_old") for k in vnp_names if k != "vnp_old"},
        },
    }


def dnabert_s_section(name: str, shape: tuple[int, int, int, int], nucleotides: list[str], args, work: Path) -> dict:
    from vnp_core.tiny_models import write_tiny_dnabert_s

    layers, hidden, heads, intermediate = shape
    model_dir = write_tiny_dnabert_s(work / f"dnabert_s_{name}", hidden=hidden, layers=layers, heads=heads,
                                     intermediate=intermediate)
    spec = model_spec("dnabert_s")
    loaded = {backend: spec.load(model_dir, EmbedConfig(attention_backend=backend)) for backend in ("sdpa_reference", "auto")}
    tokenized = loaded["auto"].tokenizer.encode_many(nucleotides, [str(i) for i in range(len(nucleotides))])
    token_ids = np.split(tokenized.tokens, np.cumsum(tokenized.lengths)[:-1])
    tokens = sum(len(t) for t in token_ids)

    variants = packed_variants(loaded, token_ids, args.max_tokens)
    for run in variants.values():
        run()
    timed, outputs = interleaved(variants, tokens, args.rounds)
    return {
        "shape": {"layers": layers, "hidden": hidden, "heads": heads, "intermediate": intermediate},
        "backend_auto": loaded["auto"].attention_backend,
        "tokens": tokens, "sequences": len(nucleotides),
        "token_lengths": length_summary(np.array([len(t) for t in token_ids])),
        "variants": timed,
        "ratios": {"vnp_auto / vnp_old": ratio(timed, "vnp_auto", "vnp_old"),
                   "vnp_auto_16k / vnp_old": ratio(timed, "vnp_auto_16k", "vnp_old")},
        "checks": {f"max_abs_diff_{k}_vs_vnp_old": max_abs_diff(outputs, k, "vnp_old") for k in ("vnp_auto_16k", "vnp_auto")},
    }


# ---------------------------------------------------------------------------------------- report


def machine(threads: int) -> dict:
    import transformers

    cpu_model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor())
    return {"nproc": os.cpu_count(), "cpu_model": cpu_model, "torch_threads": threads, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "load_average_at_start": os.getloadavg()}


def code_version() -> str:
    return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def print_table(results: dict) -> None:
    columns = ("vnp_old", "vnp_auto_16k", "vnp_auto", "vnp_engine")
    print(f"\n{'model':<16}{'old: reference 16k':>19}{'auto 16k':>10}{'auto':>10}{'engine':>10}{'HF SDPA best':>14}"
          f"{'auto/old':>10}{'auto/HF':>9}{'engine/HF':>11}")
    for model in ("esm2", "dnabert_s"):
        for name, section in results[model].items():
            rates = {k: v["tokens_per_s"] for k, v in section["variants"].items()}
            hf = rates.get(section.get("hf_best"))
            cells = "".join(f"{rates[k]:>{w},}" if k in rates else f"{'-':>{w}}" for k, w in zip(columns, (19, 10, 10, 10)))
            versus_hf = [f"{rates[k] / hf:.2f}" if hf and k in rates else "-" for k in ("vnp_auto", "vnp_engine")]
            print(f"{model + ' ' + name:<16}{cells}{(f'{hf:,}' if hf else '-'):>14}{rates['vnp_auto'] / rates['vnp_old']:>10.2f}"
                  f"{versus_hf[0]:>9}{versus_hf[1]:>11}")
    backend = next((s["backend_auto"] for m in ("esm2", "dnabert_s") for s in results[m].values()), "auto")
    print(f"tokens/s, medians of interleaved rounds; the same sequences and weights in every column. old: sdpa_reference "
          f"in packs of {OLD_CPU_MAX_TOKENS:,} tokens; auto: {backend} in packs of {results['input']['max_tokens']:,} "
          f"(auto 16k: in packs of {OLD_CPU_MAX_TOKENS:,}); engine: embed_sequences, auto")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reads", type=int, default=1500, help="simulated reads (ignored with --proteins)")
    parser.add_argument("--proteins", type=Path, help="protein FASTA to use instead of simulated reads")
    parser.add_argument("--nucleotides", type=Path, help="nucleotide FASTA for DNABERT-S (with --proteins)")
    parser.add_argument("--limit", type=int, help="only the first N sequences of each kind")
    parser.add_argument("--esm2-shapes", default="tiny,8M", help=f"of {sorted(ESM2_SHAPES)}")
    parser.add_argument("--dnabert-s-shapes", default="tiny,small", help=f"of {sorted(DNABERT_S_SHAPES)}; '' for none")
    parser.add_argument("--hf-batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=list(HF_BATCH_SIZES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=None, help="pack budget (default: the engine's CPU_MAX_TOKENS)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cpu_embed_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.max_tokens is None:
        try:
            from vnp_core.engine import CPU_MAX_TOKENS
        except ImportError as error:
            parser.error(f"--max-tokens is needed where vnp_core.engine does not import ({error})")
        args.max_tokens = CPU_MAX_TOKENS

    if args.proteins:
        proteins = read_sequences(args.proteins)
        nucleotides = read_sequences(args.nucleotides) if args.nucleotides else []
    else:
        proteins, nucleotides = simulated_sequences(args.reads)
    proteins, nucleotides = proteins[: args.limit], nucleotides[: args.limit]
    results = {
        "benchmark": "CPU embedding: vnp packed (old: sdpa_reference, 16k packs; new: auto) against Hugging Face "
                     "EsmModel SDPA, same run",
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "code_version": code_version(),
        "machine": machine(args.threads),
        "input": {"source": str(args.proteins) if args.proteins else f"{args.reads} simulated reads {READ_MIX}, chunks of 500 bp",
                  "protein_residues": length_summary(np.array([len(p) for p in proteins])),
                  "max_tokens": args.max_tokens, "rounds": args.rounds},
        "esm2": {}, "dnabert_s": {},
    }
    with tempfile.TemporaryDirectory() as work:
        for name in filter(None, args.esm2_shapes.split(",")):
            results["esm2"][name] = esm2_section(name, ESM2_SHAPES[name], proteins, args, Path(work))
            print(name, json.dumps(results["esm2"][name]["ratios"]), flush=True)
        for name in filter(None, args.dnabert_s_shapes.split(",")):
            if nucleotides:
                results["dnabert_s"][name] = dnabert_s_section(name, DNABERT_S_SHAPES[name], nucleotides, args, Path(work))
                print(name, json.dumps(results["dnabert_s"][name]["ratios"]), flush=True)
    results["machine"]["load_average_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")
    print_table(results)


if __name__ == "__main__":
    main()
