"""Embedding files (HDF5): shards, the checkpoint a shard is built in, per-sample merge, `.pt` export.

Layout (../shared/spec/outputs.md): a shard holds `ids` (UTF-8 strings) and `embeddings` (float32,
N x D) in input order; a merged sample holds `ids` and one dataset per model (`dnabert_s`, `esm2`) in index order. Every file
is written under a temporary name beside its final path and renamed, so a reader only ever sees a
complete file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import polars as pl
import torch

from vnp_core.atomic import atomic_path, publish, write_error
from vnp_core.errors import first_line

log = logging.getLogger(__name__)

ID_DTYPE = h5py.string_dtype("utf-8")
# A merged file's attribute listing its models' datasets, in classifier feature order.
MODELS_ATTR = "models"
# Attributes that describe one shard's run rather than the model run as a whole.
PER_SHARD_ATTRS = ("fingerprint", "device", "max_tokens", "truncated", "rows_from_cache")


class MergeError(ValueError):
    """The shards of a sample do not hold each index id exactly once."""


class IncompleteShardError(RuntimeError):
    """A shard's rows do not match its input ids (count in != count out, or order)."""


def _plain(value):
    """HDF5 attributes come back as numpy scalars; callers want Python values."""
    return value.item() if isinstance(value, np.generic) else value


def _attrs(obj: h5py.File) -> dict:
    return {key: _plain(value) for key, value in obj.attrs.items()}


def describe_ids(ids: Sequence[str], limit: int = 5) -> str:
    """The first few ids, quoted: enough to find the records without flooding the message."""
    shown = ", ".join(repr(i) for i in ids[:limit])
    return f"{shown}, ..." if len(ids) > limit else shown


# ----------------------------------------------------------------------------------------------
# Shards


@dataclass
class EmbeddingFile:
    ids: list[str]
    embeddings: np.ndarray  # (N, D) float32, row i belongs to ids[i]
    attrs: dict


def write_embeddings(path: Path, ids: Sequence[str], embeddings: np.ndarray, attrs: dict) -> None:
    if len(ids) != len(embeddings):
        raise ValueError(f"{path}: {len(ids)} ids but {len(embeddings)} embedding rows")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("ids", data=np.asarray(ids, dtype=object), dtype=ID_DTYPE)
        f.create_dataset("embeddings", data=np.asarray(embeddings, dtype=np.float32))
        f.attrs.update(attrs)


_SHARD_HINT = "an embeddings shard is expected there: remove it and rerun its embedding step (or vnp run)"


def _read_h5(path: Path, hint: str = _SHARD_HINT) -> h5py.File:
    """`path` opened for reading; a file HDF5 cannot open is refused naming it (h5py's message does not)."""
    try:
        return h5py.File(path, "r")
    except OSError as error:
        if error.errno is not None:  # the file system's own error (missing, permissions) names the path
            raise
        raise ValueError(f"{path}: not a readable HDF5 file ({first_line(error)}): "
                         f"{hint}") from error


def read_embeddings(path: Path) -> EmbeddingFile:
    with _read_h5(path) as f:
        _require(f, path, ("ids", "embeddings"))
        return EmbeddingFile(f["ids"].asstr()[:].tolist(), f["embeddings"][:], _attrs(f))


def read_ids(path: Path) -> list[str]:
    with _read_h5(path) as f:
        _require(f, path, ("ids",))
        return f["ids"].asstr()[:].tolist()


def read_rows(paths: Sequence[Path], ids: Sequence[str]) -> np.ndarray:
    """The vectors of `ids`, in that order, from the shards at `paths` that hold them between them,
    reading only those rows (the validation compares 512 rows of shards that hold 8.5 GB at 450k reads)."""
    wanted = {frame_id: place for place, frame_id in enumerate(ids)}
    vectors, found = None, np.zeros(len(ids), dtype=bool)
    for path in paths:
        with _read_h5(path) as f:
            _require(f, path, ("ids", "embeddings"))
            hits = [(row, wanted[frame_id]) for row, frame_id in enumerate(f["ids"].asstr()[:]) if frame_id in wanted]
            if not hits:
                continue
            rows, places = (np.array(column, dtype=np.int64) for column in zip(*hits, strict=True))
            if vectors is None:
                vectors = np.empty((len(ids), f["embeddings"].shape[1]), dtype=np.float32)
            vectors[places] = f["embeddings"][rows]  # increasing rows, as HDF5 selections must be
            found[places] = True
    if not found.all():
        raise ValueError(f"no shard of {', '.join(str(path) for path in paths)} holds id(s) "
                         f"{describe_ids([ids[i] for i in np.flatnonzero(~found)])}")
    return vectors


def nonfinite_rows(path: Path, block_bytes: int = 16 << 20) -> np.ndarray:
    """Rows of a shard with any NaN or Inf, read a block at a time (a 3B shard can exceed host memory).

    Blocks of ~16 MB stay in the CPU caches between the read and the scan.
    """
    with _read_h5(path) as f:
        _require(f, path, ("embeddings",))
        vectors = f["embeddings"]
        block_rows = max(1, block_bytes // (vectors.dtype.itemsize * max(1, vectors.shape[1])))
        return np.concatenate([start + np.flatnonzero(~np.isfinite(vectors[start : start + block_rows]).all(axis=1))
                               for start in range(0, len(vectors), block_rows)] or [np.empty(0, dtype=np.int64)])


def read_attrs(path: Path) -> dict:
    with _read_h5(path) as f:
        return _attrs(f)


def _require(f: h5py.File, path: Path, datasets: Sequence[str]) -> None:
    if missing := [name for name in datasets if name not in f]:
        raise ValueError(f"{path}: not a vnp embeddings file (no dataset {', '.join(missing)})")


def checkpoint_path(out_path: Path) -> Path:
    """The checkpoint sits beside the shard, where a resumed run looks for it."""
    return out_path.with_name(out_path.name + ".partial")


class ShardCheckpoint:
    """The file a shard is built in: rows appended in input order, renamed to the shard when complete.

    Only the first `rows_done` rows are trusted. That attribute is written after their data and
    then flushed and fsynced, so a run killed at any moment resumes from the last durable
    checkpoint; HDF5 is not crash-safe in between, hence a file that cannot be read is started over.
    """

    def __init__(self, path: Path, file: h5py.File):
        self.path = path
        self._file = file

    @classmethod
    def open(cls, out_path: Path, fingerprint: str, embed_dim: int) -> ShardCheckpoint:
        """Resume the checkpoint of `out_path` if it was made from the same input, else start a new one."""
        path = checkpoint_path(Path(out_path))
        if path.exists():
            resumed = cls._resume(path, fingerprint, embed_dim)
            if resumed is not None:
                return resumed
            path.unlink()
        try:
            file = h5py.File(path, "w")
        except OSError as error:
            raise write_error(path, error) from error
        file.attrs.update({"fingerprint": fingerprint, "rows_done": 0})
        file.create_dataset("ids", shape=(0,), maxshape=(None,), dtype=ID_DTYPE, chunks=(1 << 14,))
        # About 1 MiB per chunk: whole chunks are written at each checkpoint and read back whole.
        rows_per_chunk = max(1, (1 << 20) // (4 * embed_dim))
        file.create_dataset("embeddings", shape=(0, embed_dim), maxshape=(None, embed_dim), dtype=np.float32,
                            chunks=(rows_per_chunk, embed_dim))
        return cls(path, file)

    @classmethod
    def _resume(cls, path: Path, fingerprint: str, embed_dim: int) -> ShardCheckpoint | None:
        try:
            file = h5py.File(path, "r+")
        except BlockingIOError as error:
            raise BlockingIOError(error.errno, f"{path} is being written by another process") from error
        except OSError as error:
            log.warning("%s: unreadable checkpoint, starting over (%s)", path, error)
            return None
        embeddings, ids = file.get("embeddings"), file.get("ids")
        if (file.attrs.get("fingerprint") != fingerprint or embeddings is None or ids is None
                or embeddings.shape[1] != embed_dim):
            log.warning("%s: checkpoint of another input, model or dtype, starting over", path)
            file.close()
            return None
        # Rows written after the last durable checkpoint are not trusted; a run killed while
        # creating the file had made none durable.
        rows = int(file.attrs.get("rows_done", 0))
        ids.resize((rows,))
        embeddings.resize(rows, axis=0)
        return cls(path, file)

    @property
    def rows_done(self) -> int:
        return int(self._file.attrs["rows_done"])

    @property
    def attrs(self) -> dict:
        return _attrs(self._file)

    def update_attrs(self, attrs: dict) -> None:
        self._file.attrs.update(attrs)

    def append(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        """Write the next rows after every row written so far (not durable until `flush_durable`)."""
        ids_ds, emb_ds = self._file["ids"], self._file["embeddings"]
        start, stop = emb_ds.shape[0], emb_ds.shape[0] + len(ids)
        ids_ds.resize((stop,))
        emb_ds.resize(stop, axis=0)
        ids_ds[start:stop] = np.asarray(ids, dtype=object)
        emb_ds[start:stop] = vectors

    def flush_durable(self) -> None:
        """Make every appended row part of the checkpoint a resumed run starts from."""
        # Rows first, marker second: a kill between the two leaves the old, still true, marker.
        try:
            self._file.flush()
            os.fsync(self._file.id.get_vfd_handle())
            self._file.attrs["rows_done"] = self._file["embeddings"].shape[0]
            self._file.flush()
            os.fsync(self._file.id.get_vfd_handle())
        except OSError as error:  # a full disk: say which file
            raise write_error(self.path, error) from error

    def finalize(self, out_path: Path, expected_ids: Sequence[str], attrs: dict) -> None:
        """Check the rows are exactly `expected_ids` in order, then rename the checkpoint to `out_path`."""
        stored = self._file["ids"].asstr()[:].tolist()
        if stored != list(expected_ids):
            raise IncompleteShardError(f"{self.path}: {len(expected_ids)} ids in, {len(stored)} rows out; "
                                       + _id_mismatch(expected_ids, stored))
        self._file.attrs.update(attrs)
        self.close()
        try:
            publish(self.path, Path(out_path))
        except OSError as error:  # the checkpoint stays whole, `rows_done` included: a rerun resumes from it
            raise write_error(out_path, error) from error
        with h5py.File(out_path, "a") as shard:  # a finished shard has no checkpoint counter
            del shard.attrs["rows_done"]

    def close(self) -> None:
        self._file.close()


def _id_problems(expected: Sequence[str], found: Sequence[str]) -> str:
    """The ids `found` lacks, holds twice or should not hold ("" when each expected id is there once)."""
    expected_df = pl.DataFrame({"id": expected}, schema={"id": pl.String})
    found_df = pl.DataFrame({"id": found}, schema={"id": pl.String})
    problems = {
        "missing": expected_df.join(found_df, on="id", how="anti"),
        "duplicated": found_df.filter(pl.col("id").is_duplicated()),
        "extra": found_df.join(expected_df, on="id", how="anti"),
    }
    described = []
    for label, rows in problems.items():
        if ids := rows["id"].unique(maintain_order=True).to_list():
            described.append(f"{len(ids)} {label}: {describe_ids(ids)}")
    return "; ".join(described)


def _id_mismatch(expected: Sequence[str], found: Sequence[str]) -> str:
    if problems := _id_problems(expected, found):
        return problems
    row = next(i for i, (a, b) in enumerate(zip(expected, found)) if a != b)
    return f"ids out of order from row {row} ({found[row]!r} where {expected[row]!r} belongs)"


# ----------------------------------------------------------------------------------------------
# A sample's merged embeddings


@dataclass
class MergeStats:
    path: Path
    sequences: int
    dims: dict[str, int]  # model -> vector width
    shards: dict[str, int]  # model -> number of shards merged


@dataclass
class MergedEmbeddings:
    ids: list[str]
    vectors: dict[str, np.ndarray]  # model -> (N, D) float32, in the order the file lists them
    attrs: dict

    def features(self) -> np.ndarray:
        """(N, sum of D) classifier input: the models' vectors side by side, in the registry's order."""
        return np.concatenate(list(self.vectors.values()), axis=1)


def merge_sample(index_ids: Sequence[str], shards: Mapping[str, Sequence[Path]], out: Path, attrs: dict) -> MergeStats:
    """One file per sample with every model's vectors (`shards`: model -> its shard files, in classifier
    feature order) in index order; every id exactly once in each."""
    index = pl.DataFrame({"id": list(index_ids)}, schema={"id": pl.String}).with_row_index("position")
    if duplicated := index.filter(pl.col("id").is_duplicated())["id"].unique(maintain_order=True).to_list():
        raise MergeError(f"{out}: the index lists {len(duplicated)} id(s) more than once: {describe_ids(duplicated)}")
    dims = {}
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as merged:
        merged.create_dataset("ids", data=np.asarray(index_ids, dtype=object), dtype=ID_DTYPE)
        for model, paths in shards.items():
            matrix, model_attrs = _gather(model, index, list(paths), out)
            merged.create_dataset(model, data=matrix)
            merged.attrs.update({f"{model}.{key}": value for key, value in model_attrs.items()})
            dims[model] = matrix.shape[1]
        merged.attrs.update({**attrs, MODELS_ATTR: list(shards)})
    return MergeStats(Path(out), len(index), dims, {model: len(paths) for model, paths in shards.items()})


def _gather(model: str, index: pl.DataFrame, shard_paths: Sequence[Path], out: Path) -> tuple[np.ndarray, dict]:
    """(N, D) rows of one model's shards placed at their index positions, and the model's attributes."""
    if not shard_paths:
        raise MergeError(f"{out}: no {model} shards to merge")
    schema = {"id": pl.String, "shard": pl.Int64}
    rows = pl.concat([
        pl.DataFrame({"id": read_ids(path), "shard": shard}, schema=schema).with_row_index("row")
        for shard, path in enumerate(shard_paths)
    ])
    if problems := _id_problems(index["id"], rows["id"]):
        raise MergeError(f"{out}: {model} shards do not hold every index id exactly once: {problems}")

    placed = index.join(rows, on="id", how="inner")
    matrix, shard_attrs = None, []
    for shard, path in enumerate(shard_paths):
        data = read_embeddings(path)
        # Each of the shard's rows has one index position: in the shard's own order, a row's vector
        # goes straight to its place (no gathered copy of the shard first; 3.3 GB at 450k reads).
        positions = placed.filter(pl.col("shard") == shard).sort("row")["position"].to_numpy()
        if len(shard_paths) == 1 and np.array_equal(positions, np.arange(len(index))):
            return data.embeddings, _model_attrs(model, [(path, data.attrs)])  # already in index order
        if matrix is None:
            matrix = np.empty((len(index), data.embeddings.shape[1]), dtype=np.float32)
        elif data.embeddings.shape[1] != matrix.shape[1]:
            raise MergeError(f"{path}: {model} vectors of width {data.embeddings.shape[1]}, "
                             f"other shards have {matrix.shape[1]}")
        matrix[positions] = data.embeddings
        shard_attrs.append((path, data.attrs))
    return matrix, _model_attrs(model, shard_attrs)


def _model_attrs(model: str, shard_attrs: Sequence[tuple[Path, dict]]) -> dict:
    """What holds for a model's whole matrix: run attributes agree across shards, truncations add up."""
    merged = {"truncated": 0, "rows_from_cache": 0}
    for path, attrs in shard_attrs:
        merged["truncated"] += int(attrs.get("truncated", 0))
        merged["rows_from_cache"] += int(attrs.get("rows_from_cache", 0))
        for key, value in attrs.items():
            if key in PER_SHARD_ATTRS:
                continue
            # Rows from different weights, dtypes or back ends in one matrix would not be comparable.
            if merged.setdefault(key, value) != value:
                raise MergeError(f"{path}: {model} shard has {key}={value!r}, an earlier shard has {merged[key]!r}")
    # One that only some shards have does not hold for the matrix (e.g. the store's identity, when a
    # shard was remade without the store: its copies of a frame no longer share one vector).
    everywhere = set.intersection(*(set(attrs) for _, attrs in shard_attrs))
    return {key: value for key, value in merged.items() if key in everywhere or key in ("truncated", "rows_from_cache")}


def read_merged(path: Path) -> MergedEmbeddings:
    with _read_h5(path, "give a sample's merged embeddings (embeddings/merged.h5)") as f:
        models = _merged_models(f, path)
        return MergedEmbeddings(f["ids"].asstr()[:].tolist(), {model: f[model][:] for model in models}, _attrs(f))


def _merged_models(f: h5py.File, path: Path) -> list[str]:
    """The models a merged file lists, once its `ids` and their datasets are checked."""
    listed = f.attrs.get(MODELS_ATTR, [])
    models = [listed] if isinstance(listed, str) else [str(model) for model in listed]
    _require(f, path, ("ids", *models))
    if not models:
        raise ValueError(f"{path}: not a vnp merged embeddings file (no {MODELS_ATTR!r} attribute)")
    ids = f["ids"]
    for model in ("ids", *models):
        ok = isinstance(f[model], h5py.Dataset) and (
            f[model].dtype.kind in "OSU" and f[model].ndim == 1 if model == "ids"
            else f[model].dtype.kind == "f" and f[model].ndim == 2 and len(f[model]) == len(ids))
        if not ok:
            raise ValueError(f"{path}: not a vnp merged embeddings file ({model!r} is not "
                             f"{'a list of ids' if model == 'ids' else 'one float vector per id'})")
    return models


def export_merged_to_pt(merged: Path, out: Path) -> None:
    """The original tool's `{"ids": [...], "data": FloatTensor[N, D1 + D2]}` file, for existing scripts."""
    sample = read_merged(merged)
    with atomic_path(out) as tmp:
        torch.save({"ids": sample.ids, "data": torch.from_numpy(sample.features())}, tmp)
