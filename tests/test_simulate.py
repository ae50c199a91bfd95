from pathlib import Path

import pytest

import vnp_core
from vnp_core.fasta import read_fasta
from vnp_core.simulate import example_fasta, simulate_reads
from real_genomes import REAL_DATA

EXAMPLE = Path(vnp_core.__file__).parent / "data" / "example.fasta"
COMPLEMENT = str.maketrans("ACGTacgt", "TGCAtgca")


def test_reads_come_from_the_position_and_strand_their_id_names():
    genomes = {"phix": read_fasta(REAL_DATA / "phiX174.fasta").records[0].sequence,
               "hiv": read_fasta(REAL_DATA / "hiv1_hxb2.fasta").records[0].sequence}
    reads = simulate_reads(genomes, 400, 150, seed=5)
    assert len(reads) == 400 and len({read_id for read_id, _ in reads}) == 400
    strands = set()
    for read_id, sequence in reads:
        genome, _, position = read_id.split("_")
        start, strand = int(position[:-1]) - 1, position[-1]
        source = genomes[genome][start:start + 150]
        assert sequence == (source if strand == "+" else source.translate(COMPLEMENT)[::-1])
        strands.add((genome, strand))
    assert strands == {("phix", "+"), ("phix", "-"), ("hiv", "+"), ("hiv", "-")}
    assert simulate_reads(genomes, 400, 150, seed=5) == reads


def test_genomes_shorter_than_a_read_are_not_used():
    assert {read_id.split("_")[0] for read_id, _ in simulate_reads({"long": "ACGT" * 50, "short": "ACGT"}, 20, 100, 0)} == {"long"}
    with pytest.raises(ValueError, match="no genome is at least 100 bp long"):
        simulate_reads({"short": "ACGT"}, 1, 100, 0)


def test_the_bundled_example_is_what_its_documented_command_makes():
    assert EXAMPLE.read_text() == example_fasta(REAL_DATA)
    assert EXAMPLE.stat().st_size < 60_000
    records = read_fasta(EXAMPLE).records
    assert len(records) == 242 and records[0].sequence.islower()
