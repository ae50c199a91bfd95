"""FASTA input: a streaming reader for plain or gzipped files, and strict validation.

A fault in one record (no id, no sequence, a letter outside the alphabet, a repeated id) can be
skipped when the user asks for it; a fault of the whole file (empty, not FASTA, FASTQ, binary, a
broken gzip stream) always fails. Every error names the file, the line and, where there is one,
the record.
"""

from __future__ import annotations

import gzip
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

# IUPAC nucleotide codes, U included (VirNucPro drops codons that hold one, like those with N).
NUCLEOTIDE_LETTERS = "ACGTURYSWKMBDHVN"

_GZIP_MAGIC = b"\x1f\x8b"
# Control bytes never occur in a text file; a few in the first block mean binary data.
_CONTROL_BYTES = re.compile(rb"[\x00-\x08\x0e-\x1f\x7f]")
_SNIFF_BYTES = 8192


class FastaError(ValueError):
    """A FASTA input that cannot be used; the message names the file, line and record."""

    def __init__(self, path: Path, problem: str, *, line: int | None = None, record_id: str | None = None) -> None:
        where = [str(path)]
        if line is not None:
            where.append(f"line {line}")
        if record_id is not None:
            where.append(f"record {record_id!r}")
        super().__init__(f"{': '.join(where)}: {problem}")
        self.path, self.line, self.record_id, self.problem = path, line, record_id, problem


class FastaRecord(NamedTuple):
    id: str  # first whitespace-separated word of the header
    description: str  # the rest of the header
    sequence: str  # letters as in the file (case kept), line breaks removed
    line: int  # line number of the header, 1-based


class BadRecord(NamedTuple):
    id: str
    line: int  # where the fault is
    problem: str


class FastaRead(NamedTuple):
    path: Path
    records: list[FastaRecord]
    skipped: list[BadRecord]  # empty unless bad records were skipped


def read_fasta(path: Path, *, skip_bad_records: bool = False, alphabet: str = NUCLEOTIDE_LETTERS) -> FastaRead:
    """Every good record of `path`, in file order; raises `FastaError` on the first fault unless skipping."""
    records: list[FastaRecord] = []
    skipped: list[BadRecord] = []
    first_seen: dict[str, int] = {}
    for item in iter_records(path, alphabet):
        if isinstance(item, FastaRecord) and item.id in first_seen:
            item = BadRecord(item.id, item.line, f"duplicate id (first seen on line {first_seen[item.id]})")
        if isinstance(item, BadRecord):
            if not skip_bad_records:
                raise FastaError(path, item.problem, line=item.line, record_id=item.id)
            skipped.append(item)
        else:
            first_seen[item.id] = item.line
            records.append(item)
    if not records:
        raise FastaError(path, f"no usable records: all {len(skipped)} were bad and skipped")
    return FastaRead(path, records, skipped)


def iter_records(path: Path, alphabet: str = NUCLEOTIDE_LETTERS) -> Iterator[FastaRecord | BadRecord]:
    """Stream the records of a FASTA file, yielding a `BadRecord` for each malformed one.

    Letters are checked line by line against `alphabet` (either case), so a bad letter is reported
    at its exact line and column. Faults of the whole file raise `FastaError`.
    """
    allowed = (alphabet.upper() + alphabet.lower()).encode("ascii")
    header: str | None = None
    header_line = 0
    parts: list[bytes] = []
    fault: tuple[int, str] | None = None
    line_number = 0
    try:
        with _open(path) as handle:
            if _CONTROL_BYTES.search(handle.peek(_SNIFF_BYTES)[:_SNIFF_BYTES]):
                raise FastaError(path, "binary data, not a FASTA text file")
            for line_number, raw in enumerate(handle, start=1):
                line = raw.rstrip()  # also removes the '\r' of CRLF line ends
                if line.startswith(b">"):
                    if header is not None:
                        yield _finish_record(header, header_line, parts, fault)
                    header, header_line, parts, fault = line[1:].decode("utf-8", "replace"), line_number, [], None
                    if "\ufffd" in header and not _is_utf8(line):
                        fault = (line_number, "header is not UTF-8 text")
                elif not line:
                    continue
                elif header is None:
                    problem = "looks like FASTQ ('@' header), not FASTA" if line.startswith(b"@") else \
                        "text before the first '>' header: not a FASTA file"
                    raise FastaError(path, problem, line=line_number)
                else:
                    if fault is None and (bad := line.translate(None, allowed)):
                        letter = repr(chr(bad[0])) if bad[0] < 128 else f"byte 0x{bad[0]:02x} (not ASCII)"
                        fault = (line_number, f"invalid letter {letter} at column {line.index(bad[:1]) + 1}")
                    parts.append(line)
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        # The stream broke while the line after the last complete one was being read.
        raise FastaError(path, f"truncated or corrupt gzip data ({error})", line=line_number + 1,
                         record_id=None if header is None else _split_header(header)[0]) from error
    if header is None:
        raise FastaError(path, "empty file" if line_number == 0 else "no FASTA records (only blank lines)")
    yield _finish_record(header, header_line, parts, fault)


def _is_utf8(line: bytes) -> bool:
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _open(path: Path) -> BinaryIO:
    """Gzip is recognised by its magic bytes, whatever the file is called."""
    with open(path, "rb") as raw:
        magic = raw.read(len(_GZIP_MAGIC))
    return gzip.open(path, "rb") if magic == _GZIP_MAGIC else open(path, "rb")


def _split_header(header: str) -> tuple[str, str]:
    words = header.split(maxsplit=1)
    return (words[0] if words else "", words[1] if len(words) > 1 else "")


def _finish_record(header: str, line: int, parts: list[bytes], fault: tuple[int, str] | None) -> FastaRecord | BadRecord:
    record_id, description = _split_header(header)
    if not record_id:
        return BadRecord(record_id, line, "header has no id")
    if fault is not None:
        return BadRecord(record_id, *fault)
    if not parts:
        return BadRecord(record_id, line, "record has no sequence")
    return FastaRecord(record_id, description, b"".join(parts).decode("ascii"), line)
