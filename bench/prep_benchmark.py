"""CPU benchmark of `vnp prep`: 1,000,000 simulated 150-bp reads, end to end, at both chunk lengths.

The reads are simulated (error-free, both strands) from every real genome in ../shared/data/real
and written as FASTA to a temporary directory; the clock covers `prepare_fasta` only: reading and
validating the FASTA, chunking, six-frame translation, and writing the three VirNucPro files.

Usage, from the repository root: python bench/prep_benchmark.py [--reads N] [--out bench/results/prep_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

from vnp_core.config import PrepConfig
from vnp_core.fasta import read_fasta
from vnp_core.prep import prepare_fasta
from vnp_core.simulate import simulate_reads

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real"
READ_LENGTH = 150
SEED = 0


def machine() -> dict:
    cpu_model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor())
    return {"nproc": os.cpu_count(), "cpu_model": cpu_model, "python": platform.python_version(),
            "numpy": np.__version__, "polars": pl.__version__}


def code_version() -> str:
    return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reads", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "prep_cpu.json")
    args = parser.parse_args()

    # Every record counts, the eight influenza segments included; a read's id starts with its record's id.
    genomes = {record.id: record.sequence for path in sorted(REAL.glob("*.fasta")) for record in read_fasta(path).records}
    runs = []
    with tempfile.TemporaryDirectory() as work:
        reads_fasta = Path(work) / "reads.fasta"
        reads_fasta.write_text("".join(f">{read_id}\n{sequence}\n"
                                       for read_id, sequence in simulate_reads(genomes, args.reads, READ_LENGTH, SEED)))
        for chunk_length in (300, 500):
            started = time.perf_counter()
            result = prepare_fasta(reads_fasta, Path(work) / str(chunk_length), PrepConfig(chunk_length=chunk_length))
            seconds = time.perf_counter() - started
            runs.append({"chunk_length": chunk_length, "seconds": round(seconds, 2),
                         # The machine may be shared: other work running beside the benchmark slows it.
                         "load_average_1min_after": round(os.getloadavg()[0], 2),
                         "reads_per_second": round(args.reads / seconds), "records": result.records,
                         "chunks": result.chunks, "kept_frames": result.kept_frames,
                         "chunks_without_kept_frame": result.chunks_without_kept_frame})
            print(f"chunk length {chunk_length}: {seconds:.1f} s, {args.reads / seconds:,.0f} reads/s", file=sys.stderr)
        input_bytes = reads_fasta.stat().st_size

    report = {
        "benchmark": "vnp prep (prepare_fasta) on simulated reads, CPU",
        "command": " ".join(["python", *sys.argv]),
        "code_version": code_version(),
        "machine": machine(),
        "input": {"reads": args.reads, "read_length": READ_LENGTH, "seed": SEED, "fasta_bytes": input_bytes,
                  "genomes": sorted(genomes)},
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
