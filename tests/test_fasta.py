import gzip
from pathlib import Path

import pytest

from vnp_core.fasta import BadRecord, FastaError, FastaRecord, iter_records, read_fasta
from real_genomes import REAL_DATA


def write(tmp_path: Path, content: bytes, name: str = "in.fasta") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def test_multi_line_records_with_crlf_blank_lines_and_lower_case(tmp_path):
    path = write(tmp_path, b">r1 first read\r\nACGTN\r\nacgu\r\n\r\n>r2\nRYKM\nswbdhv\n")
    read = read_fasta(path)
    assert read.records == [FastaRecord("r1", "first read", "ACGTNacgu", 1), FastaRecord("r2", "", "RYKMswbdhv", 5)]
    assert read.skipped == []


def test_gzip_is_recognised_by_its_magic_bytes_not_its_name(tmp_path):
    plain = REAL_DATA / "influenza_a_california_07_2009.fasta"
    disguised = write(tmp_path, gzip.compress(plain.read_bytes()), name="segments.txt")
    assert read_fasta(disguised).records == read_fasta(plain).records


def test_real_genome_ids_and_lengths():
    records = read_fasta(REAL_DATA / "influenza_a_california_07_2009.fasta").records
    assert [r.id.rsplit("_", 1)[1] for r in records] == [
        "CY266197", "CY266193", "CY266191", "CY266198", "CY266195", "CY266196", "CY266194", "CY266192"]
    assert sum(len(r.sequence) for r in records) == 13_332
    lam = read_fasta(REAL_DATA / "lambda.fasta").records[0]
    assert (lam.id, lam.description) == ("gi|9626243|ref|NC_001416.1|", "Enterobacteria phage lambda, complete genome")
    assert len(lam.sequence) == 48_502


BAD_RECORDS = [
    (b">ok\nACGT\n>bad\nACGT\nACXT\n", "line 5: record 'bad': invalid letter 'X' at column 3"),
    (b">ok\nACGT\n>empty\n>next\nACGT\n", "line 3: record 'empty': record has no sequence"),
    (b">ok\nACGT\n>ok second copy\nAAAA\n", "line 3: record 'ok': duplicate id (first seen on line 1)"),
    (b">ok\nACGT\n> \nACGT\n", "line 3: record '': header has no id"),
    (b">ok\nACGT\n>gap\nAC-GT\n", "line 4: record 'gap': invalid letter '-' at column 3"),
]


@pytest.mark.parametrize("content, message", BAD_RECORDS)
def test_a_bad_record_fails_naming_file_line_and_record(tmp_path, content, message):
    path = write(tmp_path, content)
    with pytest.raises(FastaError) as error:
        read_fasta(path)
    assert str(error.value) == f"{path}: {message}"


@pytest.mark.parametrize("content, message", BAD_RECORDS)
def test_skipping_bad_records_reports_which(tmp_path, content, message):
    read = read_fasta(write(tmp_path, content), skip_bad_records=True)
    assert [r.id for r in read.records] == ["ok"] + (["next"] if b">next" in content else [])
    assert [f"line {bad.line}: record {bad.id!r}: {bad.problem}" for bad in read.skipped] == [message]


BAD_FILES = [
    (b"", "empty file"),
    (b"\n\n  \n", "no FASTA records (only blank lines)"),
    (b"@read1\nACGT\n+\nIIII\n", "line 1: looks like FASTQ ('@' header), not FASTA"),
    (b"\nsome notes\n>r1\nACGT\n", "line 2: text before the first '>' header: not a FASTA file"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary data, not a FASTA text file"),
]


@pytest.mark.parametrize("content, message", BAD_FILES)
def test_a_bad_file_always_fails(tmp_path, content, message):
    path = write(tmp_path, content)
    with pytest.raises(FastaError) as error:
        read_fasta(path, skip_bad_records=True)
    assert str(error.value) == f"{path}: {message}"


def test_truncated_gzip_fails_naming_the_line_and_record_reached(tmp_path):
    content = b"".join(b">r%d\n%s\n" % (i, b"ACGT" * 40) for i in range(2000))
    compressed = gzip.compress(content)
    path = write(tmp_path, compressed[: len(compressed) // 2], name="reads.fa.gz")
    with pytest.raises(FastaError, match=r"reads\.fa\.gz: line \d+: record 'r\d+': truncated or corrupt gzip"):
        read_fasta(path)


def test_corrupt_gzip_fails(tmp_path):
    path = write(tmp_path, b"\x1f\x8b" + bytes(range(200)))
    with pytest.raises(FastaError, match="truncated or corrupt gzip"):
        read_fasta(path)


def test_all_records_bad_fails_even_when_skipping(tmp_path):
    with pytest.raises(FastaError, match="no usable records: all 2 were bad and skipped"):
        read_fasta(write(tmp_path, b">a\nXX\n>b\n"), skip_bad_records=True)


def test_the_stream_yields_bad_records_in_place(tmp_path):
    items = list(iter_records(write(tmp_path, b">a\nAC\n>b\nAJ\n>c\nGT\n")))
    assert items == [FastaRecord("a", "", "AC", 1), BadRecord("b", 4, "invalid letter 'J' at column 2"),
                     FastaRecord("c", "", "GT", 5)]


def test_other_alphabets_can_be_read(tmp_path):
    path = write(tmp_path, b">p1\nMKV*\n")
    assert read_fasta(path, alphabet="ACDEFGHIKLMNPQRSTVWY*").records[0].sequence == "MKV*"
    with pytest.raises(FastaError, match=r"line 2: record 'p1': invalid letter '\*' at column 4"):
        read_fasta(path)
