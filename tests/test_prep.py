import gzip
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vnp_assets.cli import app
from vnp_core.config import PrepConfig
from vnp_core.fasta import FastaRecord, read_fasta
from vnp_core.prep import chunk_bounds, fasta_stem, prepare_fasta, prepare_records
from vnp_core.simulate import simulate_reads
from real_genomes import REAL_DATA

GENOMES = sorted(REAL_DATA.glob("*.fasta"))

# ---------------------------------------------------------------------------------------------
# A deliberately plain reference, one record at a time, transcribed from
# ../shared/spec/virnucpro-prep.md the way the original tool does it.

CODONS = {
    "TTT": "F", "TTC": "F", "TTA": "L", "TTG": "L", "TCT": "S", "TCC": "S", "TCA": "S", "TCG": "S",
    "TAT": "Y", "TAC": "Y", "TAA": "*", "TAG": "*", "TGT": "C", "TGC": "C", "TGA": "*", "TGG": "W",
    "CTT": "L", "CTC": "L", "CTA": "L", "CTG": "L", "CCT": "P", "CCC": "P", "CCA": "P", "CCG": "P",
    "CAT": "H", "CAC": "H", "CAA": "Q", "CAG": "Q", "CGT": "R", "CGC": "R", "CGA": "R", "CGG": "R",
    "ATT": "I", "ATC": "I", "ATA": "I", "ATG": "M", "ACT": "T", "ACC": "T", "ACA": "T", "ACG": "T",
    "AAT": "N", "AAC": "N", "AAA": "K", "AAG": "K", "AGT": "S", "AGC": "S", "AGA": "R", "AGG": "R",
    "GTT": "V", "GTC": "V", "GTA": "V", "GTG": "V", "GCT": "A", "GCC": "A", "GCA": "A", "GCG": "A",
    "GAT": "D", "GAC": "D", "GAA": "E", "GAG": "E", "GGT": "G", "GGC": "G", "GGA": "G", "GGG": "G",
}
PAIRS = {"A": "T", "T": "A", "C": "G", "G": "C"}


def reference_parse(text: str) -> list[tuple[str, str]]:
    records = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(">"):
            records.append([line[1:].split()[0], ""])
        elif line:
            records[-1][1] += line
    return [(record_id, sequence) for record_id, sequence in records]


def reference_chunks(length: int, c: int) -> list[tuple[int, int]]:
    if length <= c:
        return [(0, length)]
    n = -(-length // c)
    r = n * c - length
    q = r // n
    k = r - q * (n - 1)
    overlaps = [q + 1] * k + [q] * (n - 1 - k)
    bounds = []
    for j in range(1, n + 1):
        start = (j - 1) * c - sum(overlaps[: j - 1])
        bounds.append((start, min(start + c, length)))
    return bounds


def reference_reverse_complement(sequence: str) -> str:
    return "".join(PAIRS.get(letter, letter) for letter in reversed(sequence))


def reference_translate(strand: str, offset: int) -> str:
    protein = ""
    i = offset
    while i <= len(strand) - 3:
        protein += CODONS.get(strand[i:i + 3], "")
        i += 3
    return protein


def reference_prep(text: str, c: int) -> tuple[str, str, str]:
    chunked, nucleotide, protein = "", "", ""
    for record_id, sequence in reference_parse(text):
        for j, (start, end) in enumerate(reference_chunks(len(sequence), c), start=1):
            chunk_id = f"{record_id}_chunk_{j}"
            chunk = sequence[start:end]
            chunked += f">{chunk_id}\n" + "".join(chunk[i:i + 60] + "\n" for i in range(0, len(chunk), 60))
            upper = chunk.upper()
            for name, strand in (("F", upper), ("R", reference_reverse_complement(upper))):
                for offset in range(3):
                    translated = reference_translate(strand, offset)
                    if translated and "*" not in translated:
                        frame_id = f"{chunk_id}{name}{offset + 1}"
                        nucleotide += f">{frame_id}\n{strand[offset:offset + 3 * len(translated) + 1]}\n"
                        protein += f">{frame_id}\n{translated}\n"
    return chunked, nucleotide, protein


# ---------------------------------------------------------------------------------------------


def prep_files(path: Path, out_dir: Path, c: int) -> tuple[str, str, str]:
    result = prepare_fasta(path, out_dir, PrepConfig(chunk_length=c))
    return tuple(p.read_text() for p in (result.chunked_fasta, result.nucleotide_fasta, result.protein_fasta))


@pytest.mark.parametrize("c", [300, 500])
@pytest.mark.parametrize("genome", GENOMES, ids=lambda p: p.stem)
def test_byte_identical_to_the_reference_on_real_genomes(tmp_path, genome, c):
    assert prep_files(genome, tmp_path, c) == reference_prep(genome.read_text(), c)


@pytest.mark.parametrize("c", [300, 500])
def test_byte_identical_on_reads_with_n_iupac_and_lower_case(tmp_path, c):
    genomes = {path.stem: read_fasta(path).records[0].sequence
               for path in (REAL_DATA / "kutzneria_KK037166.fasta", REAL_DATA / "phiX174.fasta", REAL_DATA / "t4.fasta")}
    reads = simulate_reads(genomes, 3000, 150, seed=c)
    # Kutzneria's N runs, phiX174's lower case and T4's M/S/R are rare: add more, and U.
    rng = random.Random(c)
    noisy = []
    for read_id, sequence in reads:
        letters = list(sequence)
        for _ in range(rng.choice([0, 0, 1, 3])):
            letters[rng.randrange(len(letters))] = rng.choice("NRYSWKMBDHVUnacgt")
        noisy.append((read_id, "".join(letters)))
    text = "".join(f">{read_id} simulated\n{sequence}\n" for read_id, sequence in noisy)
    path = tmp_path / "reads.fa"
    path.write_text(text)
    assert prep_files(path, tmp_path / "out", c) == reference_prep(text, c)


def test_byte_identical_on_contigs_of_every_awkward_length(tmp_path):
    rng = random.Random(7)
    lengths = [1, 2, 3, 4, 299, 300, 301, 499, 500, 501, 599, 600, 601, 999, 1000, 1001, 1499, 1501, 4999, 5001]
    lengths += [rng.randrange(1, 4000) for _ in range(60)]
    text = "".join(f">contig{i}\n{''.join(rng.choice('ACGTACGTACGTNacgt') for _ in range(n))}\n"
                   for i, n in enumerate(lengths))
    path = tmp_path / "contigs.fasta"
    path.write_text(text)
    for c in (300, 500):
        assert prep_files(path, tmp_path / str(c), c) == reference_prep(text, c)


@pytest.mark.parametrize("length, bounds", [
    (600, [(0, 500), (299, 600)]),
    (501, [(0, 500), (250, 501)]),
    (1000, [(0, 500), (500, 1000)]),
    (1001, [(0, 500), (333, 833), (666, 1001)]),
    (5000, [(i, i + 500) for i in range(0, 5000, 500)]),
    (500, [(0, 500)]),
    (120, [(0, 120)]),
])
def test_chunk_bounds_worked_examples(length, bounds):
    assert chunk_bounds(length, 500) == bounds


def test_chunk_bounds_match_the_rule_for_every_length():
    for c in (300, 500):
        for length in range(1, 4 * c + 2):
            bounds = chunk_bounds(length, c)
            assert bounds == reference_chunks(length, c)
            assert bounds[0][0] == 0 and bounds[-1][1] == length


def test_the_last_chunk_is_short_when_every_junction_takes_the_larger_overlap():
    # L=1001, c=500: R=499, q=166, k=167 > n-1=2, so both junctions overlap by 167.
    assert [end - start for start, end in chunk_bounds(1001, 500)] == [500, 500, 335]


def frames_of(sequence: str, record_id: str = "s") -> dict[str, tuple[str, str]]:
    frames = prepare_records([FastaRecord(record_id, "", sequence, 1)], PrepConfig(chunk_length=300)).frames
    return {row["frame_id"]: (row["nucleotide"], row["protein"]) for row in frames.iter_rows(named=True)}


def test_six_frames_ids_and_nucleotide_one_base_longer_than_the_codons():
    # ATGAAACCC: F2 = TGA AAC -> stop; reverse complement GGGTTTCAT.
    assert frames_of("ATGAAACCC", "seq7") == {
        "seq7_chunk_1F1": ("ATGAAACCC", "MKP"),  # [0, 10) clipped at the chunk's end
        "seq7_chunk_1F3": ("GAAACCC", "ET"),  # [2, 9): 2 codons + 1 base
        "seq7_chunk_1R1": ("GGGTTTCAT", "GFH"),
        "seq7_chunk_1R2": ("GGTTTCA", "GF"),
        "seq7_chunk_1R3": ("GTTTCAT", "VS"),
    }


def test_codons_with_a_non_acgt_letter_are_dropped_not_translated_as_x():
    # The slice still takes 3 * len(protein) + 1 bases, so it no longer lines up with the protein.
    frames = frames_of("ATGNNNAAA")
    assert frames["s_chunk_1F1"] == ("ATGNNNA", "MK")
    assert frames["s_chunk_1R1"] == ("TTTNNNC", "FH")


def test_reverse_complement_keeps_other_letters_reversed_not_complemented():
    # AAARCCC -> reverse complement GGGRTTT (R stays R, it does not become Y).
    assert frames_of("AAARCCC")["s_chunk_1R2"] == ("GGRT", "F")


def test_any_stop_rejects_a_frame_even_a_terminal_one():
    assert "s_chunk_1F1" not in frames_of("ATGAAATAA")
    assert "s_chunk_1F1" in frames_of("ATGAAATAC")


def test_empty_proteins_are_dropped_and_the_chunk_is_counted():
    prepared = prepare_records([FastaRecord("n", "", "NNNNNNNN", 1), FastaRecord("short", "", "AC", 2)],
                               PrepConfig(chunk_length=300))
    assert prepared.frames.height == 0
    assert prepared.chunks_without_kept_frame == 2


def test_frames_come_in_record_then_chunk_order_then_f1_to_r3_across_mixed_lengths():
    # Without T neither strand has a stop codon (each stop holds a T; its complement an A), so
    # every frame is kept and the expected order is known in full.
    rng = random.Random(3)
    lengths = [700, 90, 1300, 90, 301]
    records = [FastaRecord(f"r{i}", "", "".join(rng.choice("ACG") for _ in range(n)), i) for i, n in enumerate(lengths)]
    frames = prepare_records(records, PrepConfig(chunk_length=300)).frames
    assert frames["frame_id"].to_list() == [
        f"r{i}_chunk_{j}{frame}"
        for i, n in enumerate(lengths) for j in range(1, len(chunk_bounds(n, 300)) + 1)
        for frame in ("F1", "F2", "F3", "R1", "R2", "R3")]


def test_lower_case_is_kept_in_chunks_and_upper_cased_for_translation(tmp_path):
    path = tmp_path / "lower.fa"
    path.write_text(">x desc\natgaaaccc\n")
    chunked, nucleotide, protein = prep_files(path, tmp_path / "out", 300)
    assert chunked == ">x_chunk_1\natgaaaccc\n"
    assert nucleotide.startswith(">x_chunk_1F1\nATGAAACCC\n") and protein.startswith(">x_chunk_1F1\nMKP\n")


def test_gzipped_input_gives_the_same_files_named_after_the_stem(tmp_path):
    source = REAL_DATA / "hiv1_hxb2.fasta"
    gzipped = tmp_path / "hiv.fasta.gz"
    gzipped.write_bytes(gzip.compress(source.read_bytes()))
    result = prepare_fasta(gzipped, tmp_path / "out", PrepConfig(chunk_length=300))
    assert [p.name for p in (result.chunked_fasta, result.nucleotide_fasta, result.protein_fasta)] == [
        "hiv_chunked300.fa", "hiv_identified_nucleotide.fa", "hiv_identified_protein.faa"]
    assert prep_files(gzipped, tmp_path / "out", 300) == prep_files(source, tmp_path / "plain", 300)


@pytest.mark.parametrize("name, stem", [
    ("a.fasta", "a"), ("a.fa", "a"), ("a.fna", "a"), ("a.fa.gz", "a"), ("a.b.fasta.gz", "a.b"), ("reads.txt", "reads.txt"),
])
def test_fasta_stem(name, stem):
    assert fasta_stem(Path(name)) == stem


def test_result_counts_and_summary(tmp_path):
    path = tmp_path / "mixed.fa"
    path.write_text(">good\nATGAAACCC\n>bad\nATGXAA\n>nothing\nNNNNNN\n")
    result = prepare_fasta(path, tmp_path / "out", PrepConfig(chunk_length=300, skip_bad_records=True))
    assert (result.records, result.chunks, result.kept_frames, result.chunks_without_kept_frame) == (2, 2, 5, 1)
    assert [(bad.id, bad.line) for bad in result.skipped_records] == [("bad", 4)]
    assert "2 records, 2 chunks of at most 300 bp, 5 kept frames; 1 chunks had no stop-free frame" in result.summary()
    assert "line 4: 'bad': invalid letter 'X' at column 4" in result.summary()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "mixed_chunked300.fa", "mixed_identified_nucleotide.fa", "mixed_identified_protein.faa"]


BAD_INPUTS = [
    (b"", "empty file"),
    (b"\n\n", "no FASTA records"),
    (b"@r1\nACGT\n+\nIIII\n", "line 1: looks like FASTQ"),
    (b"\x00\x01binary\x02", "binary data"),
    (gzip.compress(b">r1\n" + b"ACGT" * 5000 + b"\n")[:-12], "line 2: record 'r1': truncated or corrupt gzip"),
    (b">r1\nACGT\n>r2\n", "line 3: record 'r2': record has no sequence"),
    (b">r1\nACGT\n>r1\nACGT\n", "line 3: record 'r1': duplicate id"),
    (b">r1\nACGT\n>r2\nACGTZ\n", "line 4: record 'r2': invalid letter 'Z' at column 5"),
]


@pytest.mark.parametrize("content, message", BAD_INPUTS)
def test_bad_input_fails_clearly_and_writes_nothing(tmp_path, content, message):
    path = tmp_path / "sample.fa"
    path.write_bytes(content)
    out_dir = tmp_path / "out"
    with pytest.raises(ValueError) as error:
        prepare_fasta(path, out_dir, PrepConfig())
    assert str(error.value).startswith(str(path)) and message in str(error.value)
    assert not out_dir.exists()


def test_a_failed_write_leaves_no_output_and_no_temporary_file(tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "x_identified_protein.faa").mkdir()  # the last rename cannot replace a directory
    path = tmp_path / "x.fa"
    path.write_text(">r\nATGAAACCC\n")
    with pytest.raises(OSError):
        prepare_fasta(path, out_dir, PrepConfig(chunk_length=300))
    assert [p.name for p in out_dir.iterdir()] == ["x_identified_protein.faa"]


def test_cli_prep(tmp_path):
    genome = REAL_DATA / "phiX174.fasta"
    result = CliRunner().invoke(app, ["prep", str(genome), "--out-dir", str(tmp_path), "--chunk-length", "300"])
    assert result.exit_code == 0, result.output
    assert f"{genome}: 1 records, 18 chunks of at most 300 bp" in result.output
    assert (tmp_path / "phiX174_identified_protein.faa").read_text() == reference_prep(genome.read_text(), 300)[2]

    bad = tmp_path / "bad.fa"
    bad.write_text(">r1\nACGU-\n")
    result = CliRunner().invoke(app, ["prep", str(bad), "--out-dir", str(tmp_path / "none")])
    assert result.exit_code == 1
    assert f"{bad}: line 2: record 'r1': invalid letter '-' at column 5" in result.output
