"""The content-addressed embedding store (vnp_core.embedding_cache): exact round trips, identities kept
apart, several writing processes at once, a writer killed mid-write, stats and pruning, a full disk."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import resource
import signal
from pathlib import Path

import numpy as np
import pytest

from vnp_core import embedding_cache
from vnp_core.embedding_cache import CacheFullError, EmbeddingCache, ModelIdentity, sequence_keys

DIM = 16
ESM2 = ModelIdentity("esm2", "ab" * 32, "float16", 1022, "mean", "1", DIM)
ESM2_BF16 = ModelIdentity("esm2", "ab" * 32, "bfloat16", 1022, "mean", "1", DIM)
SPAWN = mp.get_context("spawn")  # LMDB environments must not cross a fork


def keys_for(ids: range | np.ndarray) -> list[bytes]:
    """One single-token sequence per id."""
    ids = np.asarray(ids, dtype=np.int32)
    return sequence_keys(ids, np.arange(len(ids) + 1))


def vectors_for(ids: range | np.ndarray, dim: int = DIM) -> np.ndarray:
    """A vector that depends only on its id, so any writer of an id writes the same bytes."""
    ids = np.asarray(ids, dtype=np.float32)
    return (ids[:, None] + np.arange(dim, dtype=np.float32) / dim).astype(np.float32)


def test_sequence_keys_hash_the_exact_int32_ids() -> None:
    tokens = np.array([0, 5, 7, 5, 7, 5, 7, 0], dtype=np.int64)  # int64 ids give the int32 keys
    offsets = np.array([0, 1, 3, 5, 8])
    keys = sequence_keys(tokens, offsets)
    assert keys[0] == hashlib.sha256(np.array([0], "<i4").tobytes()).digest()
    assert keys[1] == keys[2] != keys[3]  # identical sequences share a key; a longer one does not
    assert all(len(key) == 32 for key in keys)


def test_round_trip_is_bit_for_bit_and_put_is_idempotent(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((200, DIM)).astype(np.float32)
    special = np.array([0x7FC00001, 0xFFFFFFFF, 0x80000000, 0x7F800000, 0xFF800000, 0x00000001, 0x7F7FFFFF,
                        0x00800000, 0x3F800001, 0x7F800001, 0x80000001, 0, 0x12345678, 0xDEADBEEF, 1, 2],
                       dtype=np.uint32)  # NaN payloads, -0, infinities, subnormals, extremes
    vectors[0] = special.view(np.float32)
    keys = keys_for(range(200))
    with EmbeddingCache.open(tmp_path / "cache") as cache:
        assert cache.put(ESM2, keys, vectors) == 200
        found, got = cache.lookup(ESM2, keys)
        assert found.all() and np.array_equal(got.view(np.uint32), vectors.view(np.uint32))

        assert cache.put(ESM2, keys[:50], np.zeros((50, DIM), np.float32)) == 0  # stored keys keep their vectors
        twice = keys_for([500, 500])  # a key twice in one batch: the first row wins
        assert cache.put(ESM2, twice, vectors_for([500, 501])) == 1
        assert np.array_equal(cache.lookup(ESM2, twice[:1])[1], vectors_for([500]))
        assert cache.put(ESM2, [], np.zeros((0, DIM), np.float32)) == 0 and cache.lookup(ESM2, [])[1].shape == (0, DIM)
        unknown = keys_for(range(1000, 1010))
        found, got = cache.lookup(ESM2, unknown + keys[:3])
        assert found.tolist() == [False] * 10 + [True] * 3
        assert not got[:10].any() and np.array_equal(got[10:].view(np.uint32), vectors[:3].view(np.uint32))
        shard = np.full((13, DIM), 7.0, np.float32)  # into the caller's array: misses keep what was there
        found, got = cache.lookup(ESM2, unknown + keys[:3], out=shard)
        assert got is shard and (shard[:10] == 7).all() and np.array_equal(shard[10:], vectors[:3], equal_nan=True)
        with pytest.raises(ValueError, match="out must be"):
            cache.lookup(ESM2, keys[:3], out=np.zeros((3, DIM), np.float64))

    with EmbeddingCache.open(tmp_path / "cache") as cache:  # and after reopening
        assert np.array_equal(cache.lookup(ESM2, keys)[1].view(np.uint32), vectors.view(np.uint32))


def test_put_rejects_vectors_that_do_not_fit_the_identity(tmp_path: Path) -> None:
    with EmbeddingCache.open(tmp_path / "cache") as cache:
        with pytest.raises(ValueError, match="float32"):
            cache.put(ESM2, keys_for(range(3)), vectors_for(range(3)).astype(np.float16))
        with pytest.raises(ValueError, match="shape"):
            cache.put(ESM2, keys_for(range(3)), vectors_for(range(3), DIM + 1))
        with pytest.raises(ValueError, match="32-byte"):
            cache.put(ESM2, [b"short"], vectors_for(range(1)))


def test_identities_are_separate(tmp_path: Path) -> None:
    assert ESM2.key != ESM2_BF16.key
    assert ESM2.key == ModelIdentity("esm2", "ab" * 32, "float16", 1022, "mean", "1", DIM).key == "a5c4941094b3408c"
    keys = keys_for(range(10))
    with EmbeddingCache.open(tmp_path / "cache") as cache:
        cache.put(ESM2, keys, vectors_for(range(10)))
        assert not cache.lookup(ESM2_BF16, keys)[0].any()
        cache.put(ESM2_BF16, keys, -vectors_for(range(10)))
        assert np.array_equal(cache.lookup(ESM2, keys)[1], vectors_for(range(10)))
        assert np.array_equal(cache.lookup(ESM2_BF16, keys)[1], -vectors_for(range(10)))


def put_ids(root: Path, start: int, stop: int, barrier) -> None:
    """Child process: wait for the others, then store ids start..stop in batches of 100."""
    with EmbeddingCache.open(root) as cache:
        barrier.wait()
        for batch in range(start, stop, 100):
            ids = range(batch, min(batch + 100, stop))
            cache.put(ESM2, keys_for(ids), vectors_for(ids))


def test_concurrent_writers_all_succeed(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    barrier = SPAWN.Barrier(3)
    # Overlapping ranges: ids 1000-2999 are written by two processes each.
    writers = [SPAWN.Process(target=put_ids, args=(root, 1000 * i, 1000 * i + 2000, barrier)) for i in range(3)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)
    assert [writer.exitcode for writer in writers] == [0, 0, 0]
    with EmbeddingCache.open(root) as cache:
        found, got = cache.lookup(ESM2, keys_for(range(4000)))
        assert found.all() and np.array_equal(got, vectors_for(range(4000)))
        assert cache.stats()[0].entries == 4000


def test_a_reader_does_not_block_a_writer(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    with EmbeddingCache.open(root) as cache:
        cache.put(ESM2, keys_for(range(10)), vectors_for(range(10)))
        with cache.env.begin():  # a read transaction held open while another process writes
            barrier = SPAWN.Barrier(1)
            writer = SPAWN.Process(target=put_ids, args=(root, 10, 500, barrier))
            writer.start()
            writer.join(timeout=60)
            assert writer.exitcode == 0
        assert cache.lookup(ESM2, keys_for(range(500)))[0].all()


BATCH = 2000
BATCH_DIM = 256


def put_batches_forever(root: Path, committed) -> None:
    """Child process: store batch after batch, saying after each commit which batch it was."""
    with EmbeddingCache.open(root) as cache:
        for batch in range(10_000):
            ids = range(batch * BATCH, (batch + 1) * BATCH)
            cache.put(ESM2_WIDE, keys_for(ids), vectors_for(ids, BATCH_DIM))
            committed.put(batch)


ESM2_WIDE = ModelIdentity("esm2", "cd" * 32, "float16", 1022, "mean", "1", BATCH_DIM)


def test_a_writer_killed_mid_series_leaves_every_committed_batch(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    committed = SPAWN.Queue()
    writer = SPAWN.Process(target=put_batches_forever, args=(root, committed))
    writer.start()
    last = -1
    while last < 5:  # then it is well into the next batch: a 2 MB transaction
        last = committed.get(timeout=60)
    os.kill(writer.pid, signal.SIGKILL)
    writer.join()
    assert writer.exitcode == -signal.SIGKILL

    with EmbeddingCache.open(root) as cache:
        for batch in range(last + 3):  # each batch is stored whole or not at all
            ids = range(batch * BATCH, (batch + 1) * BATCH)
            found, got = cache.lookup(ESM2_WIDE, keys_for(ids))
            assert found.all() or (batch > last and not found.any())
            assert np.array_equal(got[found], vectors_for(ids, BATCH_DIM)[found])
        ids = range(10**7, 10**7 + BATCH)
        assert cache.put(ESM2_WIDE, keys_for(ids), vectors_for(ids, BATCH_DIM)) == BATCH


def hold_the_write_lock(root: Path, holding) -> None:
    """Child process: commit ids 0-99, then write 8 MB in a transaction that never commits."""
    with EmbeddingCache.open(root) as cache:
        cache.put(ESM2, keys_for(range(100)), vectors_for(range(100)))
        txn = cache.env.begin(write=True)
        for i in range(2000):
            txn.put(b"junk%d" % i, bytes(4096))
        holding.set()
        signal.pause()


def test_a_writer_killed_holding_the_write_lock_leaves_the_store_writable(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    holding = SPAWN.Event()
    writer = SPAWN.Process(target=hold_the_write_lock, args=(root, holding))
    writer.start()
    assert holding.wait(timeout=60)
    os.kill(writer.pid, signal.SIGKILL)
    writer.join()
    with EmbeddingCache.open(root) as cache:
        assert cache.lookup(ESM2, keys_for(range(100)))[0].all()
        with cache.env.begin() as txn:
            assert txn.get(b"junk0") is None
        assert cache.put(ESM2, keys_for(range(100, 200)), vectors_for(range(100, 200))) == 100


def test_stats_count_entries_bytes_hits_and_misses(tmp_path: Path) -> None:
    with EmbeddingCache.open(tmp_path / "cache") as cache:
        assert cache.stats() == []
        cache.put(ESM2, keys_for(range(100)), vectors_for(range(100)))
        found, _ = cache.lookup(ESM2, keys_for(range(50, 150)))
        cache.record_use(ESM2, hits=int(found.sum()), misses=int((~found).sum()))
        cache.record_use(ESM2_BF16, hits=0, misses=7)  # looked up, nothing stored yet
        bf16, esm2 = cache.stats()  # most recently used first
        assert (esm2.identity, esm2.entries, esm2.hits, esm2.misses, esm2.hit_rate) == (ESM2, 100, 50, 50, 0.5)
        assert esm2.size_bytes >= 100 * DIM * 4 and esm2.last_used <= bf16.last_used
        assert (bf16.identity, bf16.entries, bf16.size_bytes, bf16.misses) == (ESM2_BF16, 0, 0, 7)
        assert "esm2 float16 dim=16 max_length=1022" in esm2.identity.description


def test_prune_by_identity_and_by_age(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = keys_for(range(10))
    with EmbeddingCache.open(tmp_path / "cache") as cache:
        with pytest.raises(ValueError):
            cache.prune()
        cache.put(ESM2, keys, vectors_for(range(10)))
        now = embedding_cache.time.time()
        monkeypatch.setattr(embedding_cache.time, "time", lambda: now + 3600)
        cache.put(ESM2_BF16, keys, vectors_for(range(10)))  # used an hour after ESM2

        assert cache.prune(older_than_s=7200) == []
        assert cache.prune(identity_key=ESM2_BF16.key, older_than_s=1800) == []  # not old enough
        assert cache.prune(older_than_s=1800) == [ESM2.key]
        assert [row.identity for row in cache.stats()] == [ESM2_BF16]
        assert not cache.lookup(ESM2, keys)[0].any()

        assert cache.prune(identity_key=ESM2_BF16.key) == [ESM2_BF16.key]
        assert cache.stats() == []
        assert cache.put(ESM2, keys, vectors_for(range(10))) == 10  # a pruned identity can come back


def test_the_map_grows_when_full(tmp_path: Path) -> None:
    with EmbeddingCache.open(tmp_path / "cache", map_size=1 << 20) as cache:
        ids = range(20_000)  # about 5 MB with a 1 MB map
        cache.put(ESM2_WIDE, keys_for(ids), vectors_for(ids, BATCH_DIM))
        assert cache.env.info()["map_size"] > 1 << 20
        assert cache.lookup(ESM2_WIDE, keys_for(ids))[0].all()


def put_until_the_disk_is_full(root: Path, errors) -> None:
    """Child process: a file-size limit stands in for a full disk (write() fails the same way)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    with EmbeddingCache.open(root) as cache:
        resource.setrlimit(resource.RLIMIT_FSIZE, ((root / "data.mdb").stat().st_size + (4 << 20), resource.RLIM_INFINITY))
        try:
            for batch in range(1, 100):
                ids = range(batch * BATCH, (batch + 1) * BATCH)
                cache.put(ESM2_WIDE, keys_for(ids), vectors_for(ids, BATCH_DIM))
        except CacheFullError as error:
            errors.put(str(error))


def test_a_full_disk_raises_a_clear_error_and_keeps_the_store(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    with EmbeddingCache.open(root) as cache:
        cache.put(ESM2_WIDE, keys_for(range(BATCH)), vectors_for(range(BATCH), BATCH_DIM))
    errors = SPAWN.Queue()
    writer = SPAWN.Process(target=put_until_the_disk_is_full, args=(root, errors))
    writer.start()
    writer.join(timeout=60)
    message = errors.get(timeout=5)
    assert str(root) in message and "free disk space" in message
    with EmbeddingCache.open(root) as cache:
        assert cache.lookup(ESM2_WIDE, keys_for(range(BATCH)))[0].all()
        stored = cache.stats()[0].entries
        assert stored % BATCH == 0 and 0 < stored < 99 * BATCH  # whole batches only
        ids = range(10**7, 10**7 + 10)
        assert cache.put(ESM2_WIDE, keys_for(ids), vectors_for(ids, BATCH_DIM)) == 10


def test_a_file_that_is_no_store_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    import lmdb

    (tmp_path / "data.mdb").write_bytes(b"garbage!")
    with pytest.raises(lmdb.InvalidError):
        with EmbeddingCache.open(tmp_path):
            pass
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data.mdb"]
    assert (tmp_path / "data.mdb").read_bytes() == b"garbage!"
