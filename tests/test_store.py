"""HDF5 shards, the shard checkpoint, per-sample merge and the `.pt` export."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from vnp_core import store
from vnp_core.store import (
    IncompleteShardError,
    MergeError,
    ShardCheckpoint,
    checkpoint_path,
    export_merged_to_pt,
    merge_sample,
    read_embeddings,
    read_ids,
    read_merged,
    read_rows,
    write_embeddings,
)


def _vectors(n: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def test_shard_round_trip_keeps_ids_order_vectors_and_attrs(tmp_path):
    ids = ["frame_2F", "contig β/1", "x" * 300, "a"]
    vectors = _vectors(4, 6, seed=0)
    path = tmp_path / "shard.h5"
    write_embeddings(path, ids, vectors, {"model_name": "esm2_t36_3B_UR50D", "chunk_length": 500, "truncated": 1})

    shard = read_embeddings(path)
    assert shard.ids == ids
    assert shard.embeddings.dtype == np.float32
    np.testing.assert_array_equal(shard.embeddings, vectors)
    assert shard.attrs == {"model_name": "esm2_t36_3B_UR50D", "chunk_length": 500, "truncated": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["shard.h5"]


def test_failed_write_keeps_the_old_file_and_names_the_path(tmp_path, monkeypatch):
    path = tmp_path / "shard.h5"
    write_embeddings(path, ["old"], _vectors(1, 3, seed=0), {})

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store.os, "fsync", disk_full)
    with pytest.raises(OSError, match="shard.h5") as excinfo:
        write_embeddings(path, ["new", "newer"], _vectors(2, 3, seed=1), {})
    assert excinfo.value.errno == errno.ENOSPC
    monkeypatch.undo()

    assert read_embeddings(path).ids == ["old"]
    assert [p.name for p in tmp_path.iterdir()] == ["shard.h5"]  # no temporary file left behind


def test_checkpoint_resumes_from_its_last_durable_rows(tmp_path):
    out = tmp_path / "shard.h5"
    ids = [f"s{i}" for i in range(7)]
    vectors = _vectors(7, 4, seed=2)
    checkpoint = ShardCheckpoint.open(out, "fingerprint-a", embed_dim=4)
    checkpoint.append(ids[:3], vectors[:3])
    checkpoint.flush_durable()
    checkpoint.append(ids[3:5], vectors[3:5])  # never made durable: a resumed run must not trust it
    checkpoint.close()

    resumed = ShardCheckpoint.open(out, "fingerprint-a", embed_dim=4)
    assert resumed.rows_done == 3
    resumed.append(ids[3:], vectors[3:])
    resumed.flush_durable()
    resumed.finalize(out, ids, {"dtype": "float16"})

    shard = read_embeddings(out)
    assert shard.ids == ids
    np.testing.assert_array_equal(shard.embeddings, vectors)
    assert shard.attrs == {"fingerprint": "fingerprint-a", "dtype": "float16"}
    assert not checkpoint_path(out).exists()


def test_checkpoint_of_other_input_starts_over(tmp_path, caplog):
    out = tmp_path / "shard.h5"
    checkpoint = ShardCheckpoint.open(out, "fingerprint-a", embed_dim=4)
    checkpoint.append(["a", "b"], _vectors(2, 4, seed=0))
    checkpoint.flush_durable()
    checkpoint.close()

    with caplog.at_level(logging.WARNING, logger="vnp_core.store"):
        fresh = ShardCheckpoint.open(out, "fingerprint-b", embed_dim=4)
    assert fresh.rows_done == 0
    assert "starting over" in caplog.text
    fresh.close()


def test_unreadable_checkpoint_starts_over(tmp_path):
    out = tmp_path / "shard.h5"
    checkpoint_path(out).write_bytes(b"\x89HDF\r\n\x1a\n but cut short by a crash")
    fresh = ShardCheckpoint.open(out, "fingerprint-a", embed_dim=4)
    assert fresh.rows_done == 0
    fresh.close()


def test_finalize_refuses_a_shard_whose_ids_do_not_match(tmp_path):
    out = tmp_path / "shard.h5"
    checkpoint = ShardCheckpoint.open(out, "fp", embed_dim=2)
    checkpoint.append(["a", "b", "b"], _vectors(3, 2, seed=0))
    checkpoint.flush_durable()
    with pytest.raises(IncompleteShardError, match=r"3 ids in, 3 rows out.*1 missing: 'c'.*1 duplicated: 'b'"):
        checkpoint.finalize(out, ["a", "b", "c"], {})
    checkpoint.close()
    assert not out.exists()


def _write_shards(tmp_path: Path, model: str, ids: list[str], index_ids: list[str], dim: int) -> list[Path]:
    """Two shards holding `ids` in a shuffled order; each vector is its id's index position, repeated."""
    shuffled = [ids[i] for i in np.random.default_rng(0).permutation(len(ids))]
    position = {record_id: float(i) for i, record_id in enumerate(index_ids)}
    paths = []
    for shard, part in enumerate((shuffled[: len(ids) // 2], shuffled[len(ids) // 2 :])):
        vectors = np.array([[position.get(record_id, -1.0)] * dim for record_id in part], dtype=np.float32)
        paths.append(tmp_path / f"{model}_{shard}.h5")
        write_embeddings(paths[-1], part, vectors.reshape(len(part), dim),
                         {"model_name": model, "dtype": "float16", "truncated": shard, "device": f"cuda:{shard}"})
    return paths


def _write_sample(tmp_path: Path, index_ids: list[str], *, esm2_ids=None, dnabert_ids=None):
    esm2 = _write_shards(tmp_path, "esm2", esm2_ids or index_ids, index_ids, dim=5)
    dnabert = _write_shards(tmp_path, "dnabert_s", dnabert_ids or index_ids, index_ids, dim=3)
    return esm2, dnabert


def test_merge_puts_both_models_in_index_order(tmp_path):
    index_ids = [f"read{i}_{frame}" for i in range(6) for frame in ("F1", "R2")]
    esm2, dnabert = _write_sample(tmp_path, index_ids)
    stats = merge_sample(index_ids, {"dnabert_s": dnabert, "esm2": esm2}, tmp_path / "merged.h5", {"chunk_length": 300})
    assert (stats.sequences, stats.dims["dnabert_s"], stats.dims["esm2"]) == (12, 3, 5)
    assert list(stats.dims) == ["dnabert_s", "esm2"] and stats.shards == {"dnabert_s": 2, "esm2": 2}

    merged = read_merged(tmp_path / "merged.h5")
    assert merged.ids == index_ids
    positions = np.arange(12, dtype=np.float32)[:, None]
    np.testing.assert_array_equal(merged.vectors["esm2"], np.repeat(positions, 5, axis=1))
    np.testing.assert_array_equal(merged.vectors["dnabert_s"], np.repeat(positions, 3, axis=1))
    assert merged.features().shape == (12, 8)
    np.testing.assert_array_equal(merged.features()[:, :3], merged.vectors["dnabert_s"])  # DNABERT-S first
    assert list(merged.vectors) == ["dnabert_s", "esm2"] and list(merged.attrs["models"]) == ["dnabert_s", "esm2"]
    assert merged.attrs["chunk_length"] == 300
    assert merged.attrs["esm2.model_name"] == "esm2"
    assert merged.attrs["dnabert_s.dtype"] == "float16"
    assert merged.attrs["esm2.truncated"] == 1  # 0 + 1 over the two shards
    assert "esm2.device" not in merged.attrs  # differs per shard: not a property of the matrix


def test_rows_read_by_id_from_the_shards_that_hold_them(tmp_path):
    index_ids = [f"read{i}_{frame}" for i in range(6) for frame in ("F1", "R2")]
    esm2, _ = _write_sample(tmp_path, index_ids)
    shard_of = {frame_id: read_embeddings(path) for path in esm2 for frame_id in read_ids(path)}

    wanted = ["read4_R2", "read0_F1", "read3_F1"]  # from both shards, not in their order
    rows = read_rows(esm2, wanted)
    for frame_id, vector in zip(wanted, rows, strict=True):
        shard = shard_of[frame_id]
        np.testing.assert_array_equal(vector, shard.embeddings[shard.ids.index(frame_id)])
    with pytest.raises(ValueError, match=r"no shard of .* holds id\(s\) 'read9_F1'"):
        read_rows(esm2, ["read0_F1", "read9_F1"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"esm2_ids": [f"r{i}" for i in range(9)]}, r"esm2 shards .* 1 missing: 'r9'"),
        ({"dnabert_ids": [f"r{i}" for i in range(10)] + ["r3", "r4"]}, r"dnabert_s shards .* 2 duplicated: 'r[34]', 'r[34]'"),
        ({"esm2_ids": [f"r{i}" for i in range(10)] + ["stray_1", "stray_2"]},
         r"esm2 shards .* 2 extra: 'stray_\d', 'stray_\d'"),
    ],
)
def test_merge_names_missing_duplicated_and_extra_ids(tmp_path, change, message):
    index_ids = [f"r{i}" for i in range(10)]
    esm2, dnabert = _write_sample(tmp_path, index_ids, **change)
    with pytest.raises(MergeError, match=message):
        merge_sample(index_ids, {"dnabert_s": dnabert, "esm2": esm2}, tmp_path / "merged.h5", {})
    assert not (tmp_path / "merged.h5").exists()


def test_merge_refuses_shards_computed_differently(tmp_path):
    index_ids = [f"r{i}" for i in range(4)]
    esm2, dnabert = _write_sample(tmp_path, index_ids)
    shard = read_embeddings(esm2[1])
    write_embeddings(esm2[1], shard.ids, shard.embeddings, {**shard.attrs, "dtype": "bfloat16"})
    with pytest.raises(MergeError, match="dtype='bfloat16'.*'float16'"):
        merge_sample(index_ids, {"dnabert_s": dnabert, "esm2": esm2}, tmp_path / "merged.h5", {})


def test_an_attribute_only_some_shards_have_is_not_the_merged_matrixs(tmp_path):
    index_ids = [f"r{i}" for i in range(4)]
    esm2, dnabert = _write_sample(tmp_path, index_ids)
    for path in esm2:  # both shards made through the store; one DNABERT-S shard remade without it
        shard = read_embeddings(path)
        write_embeddings(path, shard.ids, shard.embeddings, {**shard.attrs, "cache_identity": "abc"})
    shard = read_embeddings(dnabert[0])
    write_embeddings(dnabert[0], shard.ids, shard.embeddings, {**shard.attrs, "cache_identity": "def"})
    merge_sample(index_ids, {"dnabert_s": dnabert, "esm2": esm2}, tmp_path / "merged.h5", {})
    attrs = read_merged(tmp_path / "merged.h5").attrs
    assert attrs["esm2.cache_identity"] == "abc" and "dnabert_s.cache_identity" not in attrs


def test_pt_export_has_the_original_layout(tmp_path):
    index_ids = [f"r{i}" for i in range(5)]
    esm2, dnabert = _write_sample(tmp_path, index_ids)
    merge_sample(index_ids, {"dnabert_s": dnabert, "esm2": esm2}, tmp_path / "merged.h5", {})
    export_merged_to_pt(tmp_path / "merged.h5", tmp_path / "features.pt")

    exported = torch.load(tmp_path / "features.pt", weights_only=True)
    assert exported["ids"] == index_ids
    assert exported["data"].dtype == torch.float32
    np.testing.assert_array_equal(exported["data"].numpy(), read_merged(tmp_path / "merged.h5").features())


def test_a_merged_file_lists_its_models_and_one_without_the_list_is_refused(tmp_path):
    index_ids = [f"r{i}" for i in range(4)]
    esm2, dnabert = _write_sample(tmp_path, index_ids)
    merge_sample(index_ids, {"esm2": esm2, "dnabert_s": dnabert}, tmp_path / "merged.h5", {})
    merged = read_merged(tmp_path / "merged.h5")
    assert list(merged.vectors) == ["esm2", "dnabert_s"]  # the order the shards were given in
    np.testing.assert_array_equal(merged.features()[:, :5], merged.vectors["esm2"])

    with h5py.File(tmp_path / "merged.h5", "a") as f:
        del f.attrs["models"]
    with pytest.raises(ValueError, match="merged.h5: not a vnp merged embeddings file"):
        read_merged(tmp_path / "merged.h5")


def test_a_shard_hdf5_cannot_open_is_refused_naming_it(tmp_path):
    garbage = tmp_path / "shard-0.h5"
    garbage.write_bytes(b"not hdf5")
    for read in (read_ids, read_embeddings, lambda path: read_rows([path], ["r0"])):
        with pytest.raises(ValueError, match=r"shard-0.h5: not a readable HDF5 file \(.*\): an embeddings shard is expected there: remove it and rerun"):
            read(garbage)
    with pytest.raises(FileNotFoundError):  # the file system's own error, which names the path
        read_ids(tmp_path / "missing.h5")
