"""VirNucPro preprocessing, reproduced byte for byte (../shared/spec/virnucpro-prep.md).

Each record is cut into overlapping chunks; each chunk is translated in six frames; the frames
whose protein has no stop codon are kept, with the nucleotides they came from. The translation runs
on numpy arrays, one batch of equal-length chunks at a time, so a million reads take seconds.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from vnp_core.atomic import publish, temporary_path, write_error
from vnp_core.config import PrepConfig
from vnp_core.fasta import BadRecord, FastaRecord, read_fasta

FRAME_NAMES = ("F1", "F2", "F3", "R1", "R2", "R3")
# Sorting by this type puts a chunk's frames in VirNucPro's order.
Frame = pl.Enum(FRAME_NAMES)

# NCBI translation table 1, codons in TCAG order: TTT TTC TTA TTG TCT ... GGG.
_STANDARD_CODE = "FFLLSSSSYY**CC*WLLLLPPPPHHQQRRRRIIIMTTTTNNKKSSRRVVVVAAAADDEEGGGG"
_BASE_CODE = np.full(256, 4, dtype=np.uint8)  # 4: not A, C, G or T
_BASE_CODE[np.frombuffer(b"TCAG", dtype=np.uint8)] = np.arange(4)
# Indexed by 25*b1 + 5*b2 + b3: a codon holding a non-ACGT letter maps to 0, a codon VirNucPro
# drops without a trace (it is not translated as X).
_CODON_TABLE = np.zeros(125, dtype=np.uint8)
for _b1, _b2, _b3 in itertools.product(range(4), repeat=3):
    _CODON_TABLE[25 * _b1 + 5 * _b2 + _b3] = ord(_STANDARD_CODE[16 * _b1 + 4 * _b2 + _b3])
_STOP = ord("*")
# VirNucPro's reverse complement swaps only A<->T and C<->G; N and the IUPAC codes stay as they are.
COMPLEMENT = np.frombuffer(bytes(range(256)).translate(bytes.maketrans(b"ACGTacgt", b"TGCAtgca")), dtype=np.uint8)

_BATCH_CHUNKS = 65536  # bounds memory: a few arrays of 65536 x 500 bytes at a time
_FASTA_LINE_WIDTH = 60  # Biopython's wrapping of the chunk file
_WRITE_SLICE_ROWS = 100_000


def chunk_bounds(length: int, chunk_length: int) -> list[tuple[int, int]]:
    """`[start, end)` of each chunk of a record, with VirNucPro's overlap rule."""
    _, _, starts, ends = chunk_layout(np.array([length]), chunk_length)
    return list(zip(starts.tolist(), ends.tolist()))


def chunk_layout(lengths: np.ndarray, chunk_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every chunk of records of the given lengths, records in order: arrays of the record's row,
    the chunk's 0-based number within its record, its start and its end.

    VirNucPro: n = ceil(L / c) chunks, total overlap R = n*c - L, q = floor(R / n) (divided by n,
    not n - 1: a quirk kept), k = R - q*(n - 1); junction overlaps are [q+1]*k + [q]*(n-1-k), of
    which the first n - 1 are used. Chunk j (0-based) thus starts at j*c - j*q - min(j, k); when
    k > n - 1 every junction overlaps by q + 1 and the last chunk comes out shorter than c.
    """
    counts = -(-lengths // chunk_length)
    total_overlap = counts * chunk_length - lengths
    q = total_overlap // counts
    k = total_overlap - q * (counts - 1)
    rows = np.repeat(np.arange(len(lengths)), counts)
    j = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)  # chunk number within its record
    starts = j * (chunk_length - q[rows]) - np.minimum(j, k[rows])
    return rows, j, starts, np.minimum(starts + chunk_length, lengths[rows])


@dataclass(frozen=True)
class Prepared:
    """Every chunk (input case kept) and every kept frame, in VirNucPro's output order."""

    chunks: pl.DataFrame  # chunk_id, record_id, chunk_index (1-based), chunk_start, chunk_end, sequence
    frames: pl.DataFrame  # frame_id, record_id, chunk_index, chunk_start, chunk_end, frame, nucleotide, protein

    @property
    def chunks_without_kept_frame(self) -> int:
        # Record ids are unique (validated), so (record_id, chunk_index) names one chunk.
        return self.chunks.height - self.frames.select("record_id", "chunk_index").n_unique()


def prepare_records(records: Sequence[FastaRecord], config: PrepConfig) -> Prepared:
    """Chunk, translate and keep the stop-free frames of validated records."""
    chunks = _chunk_table(records, config.chunk_length)
    return Prepared(chunks, _kept_frames(chunks))


@dataclass(frozen=True)
class PrepResult:
    input_fasta: Path
    chunk_length: int
    records: int
    skipped_records: list[BadRecord]
    chunks: int
    chunks_without_kept_frame: int  # VirNucPro drops these silently; we count them
    frames: pl.DataFrame  # the kept frames, as written (see `Prepared.frames`)
    chunked_fasta: Path
    nucleotide_fasta: Path
    protein_fasta: Path

    @property
    def kept_frames(self) -> int:
        return self.frames.height

    def summary(self) -> str:
        lines = [
            f"{self.input_fasta}: {self.records:,} records, {self.chunks:,} chunks of at most {self.chunk_length} bp, "
            f"{self.kept_frames:,} kept frames; {self.chunks_without_kept_frame:,} chunks had no stop-free frame",
        ]
        if self.skipped_records:
            lines.append(f"skipped {len(self.skipped_records):,} bad records:")
            lines += [f"  line {bad.line}: {bad.id!r}: {bad.problem}" for bad in self.skipped_records]
        lines += [f"wrote {path}" for path in (self.chunked_fasta, self.nucleotide_fasta, self.protein_fasta)]
        return "\n".join(lines)


def prepare_fasta(input: Path, out_dir: Path, config: PrepConfig) -> PrepResult:
    """Write VirNucPro's three files for `input` into `out_dir`: all of them, or none on any error."""
    fasta = read_fasta(input, skip_bad_records=config.skip_bad_records)
    prepared = prepare_records(fasta.records, config)
    chunked, nucleotide, protein = (out_dir / name for name in output_names(fasta_stem(input), config.chunk_length))
    chunks, frames = prepared.chunks, prepared.frames
    _write_all_or_nothing({
        chunked: _fasta_texts(chunks, "chunk_id", _wrapped(pl.col("sequence"))),
        nucleotide: _fasta_texts(frames, "frame_id", pl.col("nucleotide")),
        protein: _fasta_texts(frames, "frame_id", pl.col("protein")),
    })
    return PrepResult(input, config.chunk_length, len(fasta.records), fasta.skipped, chunks.height,
                      prepared.chunks_without_kept_frame, frames, chunked, nucleotide, protein)


def output_names(stem: str, chunk_length: int) -> tuple[str, str, str]:
    """The names of VirNucPro's three files for an input of this stem: chunks, kept nucleotides, kept proteins."""
    return f"{stem}_chunked{chunk_length}.fa", f"{stem}_identified_nucleotide.fa", f"{stem}_identified_protein.faa"


def fasta_stem(path: Path) -> str:
    """The file name without its FASTA extension (and .gz): the original tool's output prefix."""
    name = path.name.removesuffix(".gz")
    for extension in (".fasta", ".fna", ".fa"):
        if name.endswith(extension):
            return name.removesuffix(extension)
    return name


def _chunk_table(records: Sequence[FastaRecord], chunk_length: int) -> pl.DataFrame:
    sequences = pl.Series([record.sequence for record in records])
    rows, j, starts, ends = chunk_layout(sequences.str.len_bytes().to_numpy().astype(np.int64), chunk_length)
    chunks = pl.DataFrame({
        "record_id": pl.Series([record.id for record in records]).gather(rows),
        "chunk_index": (j + 1).astype(np.int32),
        "chunk_start": starts,
        "chunk_end": ends,
        "sequence": sequences.gather(rows),
    })
    return chunks.select(
        pl.format("{}_chunk_{}", "record_id", "chunk_index").alias("chunk_id"),
        pl.exclude("sequence"),
        pl.col("sequence").str.slice(pl.col("chunk_start"), pl.col("chunk_end") - pl.col("chunk_start")),
    )


def _kept_frames(chunks: pl.DataFrame) -> pl.DataFrame:
    """Translate equal-length chunks together, then restore chunk order and F1..R3 within a chunk."""
    lengths = (chunks["chunk_end"] - chunks["chunk_start"]).to_numpy()
    pieces = []
    for length in np.unique(lengths):
        rows_of_length = np.flatnonzero(lengths == length)
        for first in range(0, len(rows_of_length), _BATCH_CHUNKS):
            rows = rows_of_length[first:first + _BATCH_CHUNKS]
            # The chunk is upper-cased before translation; its letters are all ASCII (validated).
            letters = chunks["sequence"].gather(rows).str.to_uppercase().str.join("").item().encode("ascii")
            forward = np.frombuffer(letters, dtype=np.uint8).reshape(len(rows), int(length))
            pieces += _six_frames(rows, forward)
    frames = pl.concat(pieces).sort("chunk_row", "frame")
    chunk_of_frame = chunks.drop("sequence").select(pl.all().gather(frames["chunk_row"]))
    return pl.concat([chunk_of_frame, frames.drop("chunk_row")], how="horizontal").select(
        pl.concat_str("chunk_id", pl.col("frame").cast(pl.String)).alias("frame_id"),
        "record_id", "chunk_index", "chunk_start", "chunk_end", "frame", "nucleotide", "protein",
    )


def _six_frames(rows: np.ndarray, forward: np.ndarray) -> list[pl.DataFrame]:
    """The kept frames of a batch of equal-length upper-case chunks, one table per frame."""
    reverse = COMPLEMENT[forward[:, ::-1]]
    tables = []
    for names, strand in ((FRAME_NAMES[:3], forward), (FRAME_NAMES[3:], reverse)):
        codes = _BASE_CODE[strand]
        for offset, name in enumerate(names):
            codons = max(0, (strand.shape[1] - offset) // 3)
            triplets = codes[:, offset:offset + 3 * codons].reshape(len(rows), codons, 3)
            amino_acids = _CODON_TABLE[25 * triplets[..., 0] + 5 * triplets[..., 1] + triplets[..., 2]]
            protein_lengths = np.count_nonzero(amino_acids, axis=1)
            kept = ~(amino_acids == _STOP).any(axis=1) & (protein_lengths > 0)
            # One base more than the codons used, as VirNucPro slices it (clipped at the chunk's end).
            nucleotides = strand[kept, offset:offset + 3 * codons + 1].copy()
            nucleotides[np.arange(nucleotides.shape[1]) > 3 * protein_lengths[kept, None]] = 0
            tables.append(pl.DataFrame({
                "chunk_row": rows[kept],
                "frame": pl.Series([name] * int(kept.sum()), dtype=Frame),
                "nucleotide": _strings(nucleotides),
                "protein": _strings(_drop_zeros(amino_acids[kept])),
            }))
    return tables


def _drop_zeros(rows: np.ndarray) -> np.ndarray:
    """Close, in place, the gaps left by dropped codons: each row's non-zero bytes first, zeros after."""
    gapped = (rows == 0).any(axis=1)
    order = np.argsort(rows[gapped] == 0, axis=1, kind="stable")
    rows[gapped] = np.take_along_axis(rows[gapped], order, axis=1)
    return rows


def _strings(rows: np.ndarray) -> pl.Series:
    """Rows of ASCII bytes as strings; numpy's fixed-width bytes type ends each one at its trailing zeros."""
    width = max(rows.shape[1], 1)  # chunks under 3 bp have no codons, and numpy has no S0 type
    fixed_width = np.ascontiguousarray(rows).view(f"S{width}").reshape(-1)
    return pl.Series(fixed_width, dtype=pl.Binary).cast(pl.String)


def _wrapped(sequence: pl.Expr) -> pl.Expr:
    """Biopython's FASTA lines: a line break after every 60 letters, except after the last letter."""
    return sequence.str.replace_all(f".{{{_FASTA_LINE_WIDTH}}}", "${0}\n").str.strip_suffix("\n")


def _fasta_texts(table: pl.DataFrame, id_column: str, sequence: pl.Expr) -> Iterator[str]:
    """One FASTA record per row, made a slice at a time so that a file's text is never all in memory."""
    for rows in table.iter_slices(_WRITE_SLICE_ROWS):
        yield rows.select(pl.format(">{}\n{}\n", id_column, sequence).str.join("")).item()


def _write_all_or_nothing(texts: dict[Path, Iterable[str]]) -> None:
    """Write each file under a temporary name; rename them once every one is complete, or keep none."""
    temporary: dict[Path, Path] = {}
    renamed: list[Path] = []
    path = next(iter(texts), Path("."))
    try:
        for path, lines in texts.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary[path] = temporary_path(path)
            with open(temporary[path], "w", encoding="utf-8", newline="\n") as handle:
                handle.writelines(lines)
        for path, written in temporary.items():
            publish(written, path)
            renamed.append(path)
    except BaseException as error:
        for done in renamed:  # the set would be half new, half old: keep none of it
            done.unlink()
        if isinstance(error, OSError) and error.errno is not None:
            raise write_error(path, error) from error  # ENOSPC stays ENOSPC, and names the file
        raise
    finally:
        for written in temporary.values():
            written.unlink(missing_ok=True)
