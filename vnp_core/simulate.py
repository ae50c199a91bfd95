"""Deterministic simulated reads from real genomes, and the bundled example sample made with them."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from vnp_core.fasta import FastaRecord, read_fasta
from vnp_core.prep import COMPLEMENT


def simulate_reads(genomes: Mapping[str, str], n: int, length: int, seed: int) -> list[tuple[str, str]]:
    """`n` error-free reads of `length` bp, drawn uniformly over all genomes and from both strands.

    A read's id says where it comes from: `{genome}_{i}_{start}{+|-}` (start 1-based, on the + strand).
    Letters keep the genome's case; the reverse strand is complemented like VirNucPro does it.
    """
    names = [name for name, sequence in genomes.items() if len(sequence) >= length]
    if not names:
        raise ValueError(f"no genome is at least {length} bp long")
    sizes = np.array([len(genomes[name]) - length + 1 for name in names])
    rng = np.random.default_rng(seed)
    genome_of = rng.choice(len(names), size=n, p=sizes / sizes.sum())
    starts = rng.integers(0, sizes[genome_of])
    reverse = rng.random(n) < 0.5
    reads = np.empty((n, length), dtype=np.uint8)
    for g, name in enumerate(names):
        windows = sliding_window_view(np.frombuffer(genomes[name].encode("ascii"), dtype=np.uint8), length)
        reads[genome_of == g] = windows[starts[genome_of == g]]
    reads[reverse] = COMPLEMENT[reads[reverse, ::-1]]
    sequences = reads.view(f"S{length}").reshape(-1).astype(f"U{length}").tolist()
    return [
        (f"{names[g]}_{i}_{start + 1}{'-' if minus else '+'}", sequence)
        for i, (g, start, minus, sequence) in enumerate(zip(genome_of.tolist(), starts.tolist(), reverse.tolist(), sequences))
    ]


def example_fasta(real_genomes: Path) -> str:
    """The text of `vnp_core/data/example.fasta`: viral genomes and reads beside bacterial reads.

    phiX174's whole genome (lower case, one line), the influenza A HA segment, and 120 reads of
    150 bp from each of phage lambda and the Kutzneria scaffold (whose N runs some reads cross).
    """
    def first_record(file_name: str) -> FastaRecord:
        return read_fasta(real_genomes / file_name).records[0]

    influenza = read_fasta(real_genomes / "influenza_a_california_07_2009.fasta").records
    ha_segment = next(record for record in influenza if "_HA_" in record.id)
    reads = simulate_reads({"lambda": first_record("lambda.fasta").sequence}, 120, 150, seed=1) + \
        simulate_reads({"kutzneria": first_record("kutzneria_KK037166.fasta").sequence}, 120, 150, seed=2)
    genomes = [(f"{record.id} {record.description}", record.sequence) for record in (first_record("phiX174.fasta"), ha_segment)]
    return "".join(f">{header.rstrip()}\n{sequence}\n" for header, sequence in genomes + reads)
