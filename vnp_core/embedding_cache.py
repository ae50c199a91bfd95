"""A content-addressed store of embeddings: one vector per (model identity, exact token ids), kept
across runs so that no sequence is embedded twice (issue 17).

Storage is LMDB: a memory-mapped B+tree with random access by key and ACID transactions, whose
single writer is serialised across processes by LMDB's own lock (several GPU steps can write) while
readers never wait; pages are copy-on-write, so a process killed mid-write leaves the last committed
state readable, and there is no server to run.

Layout: one LMDB environment per root directory; one named database per model identity (key: the
SHA-256 of the int32 token ids, value: the float32 vector's bytes, returned bit for bit); and a
`meta` database holding each identity's fields, hit and miss counters and last use, as JSON (nothing
read from the store is unpickled). Pruning drops whole identities, not single entries: a new model
or precision makes an identity obsolete as a whole. LMDB reuses freed pages but never shrinks its
file (`cache.env.copy(path, compact=True)` writes a compacted copy).
"""

from __future__ import annotations

import errno
import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import lmdb
import numpy as np

KEY_BYTES = 32
# The map is reserved address space, not disk: the file grows only as pages are written.
DEFAULT_MAP_SIZE = 1 << 40
# Named databases are slots searched linearly on open; one per model identity, plus `meta`.
MAX_DBS = 512
META_DB = b"meta"
# Write errors that mean "no room": a full disk, a quota, a file-size limit.
NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class CacheFullError(OSError):
    """The disk under the store (or a quota or file-size limit) has no room for a write."""


@dataclass(frozen=True)
class ModelIdentity:
    """Everything that decides a model's vectors: two runs with equal identities give equal vectors."""

    kind: str  # "esm2", "dnabert_s"
    weights_sha256: str
    dtype: str  # `LoadedModel.precision`: "float16", "bfloat16", "float32", "fp8_e4m3+float16"...
    max_length: int | None  # tokens the model sees at most (ESM-2: 1022 residues); None if unbounded
    pooling: str  # "mean", ...
    code_version: str  # bumped when the embedding code changes its numbers
    dim: int

    @property
    def key(self) -> str:
        canonical = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @property
    def description(self) -> str:
        return (f"{self.kind} {self.dtype} dim={self.dim} max_length={self.max_length} pooling={self.pooling} "
                f"code={self.code_version} weights=sha256:{self.weights_sha256[:12]}")

    def db_name(self) -> bytes:
        return b"emb/" + self.key.encode()


@dataclass(frozen=True)
class IdentityStats:
    identity: ModelIdentity
    entries: int
    size_bytes: int  # pages the identity's B+tree occupies
    hits: int
    misses: int
    last_used: float  # seconds since the epoch

    @property
    def hit_rate(self) -> float:
        return self.hits / (self.hits + self.misses) if self.hits + self.misses else 0.0


def sequence_keys(tokens: np.ndarray, offsets: np.ndarray) -> list[bytes]:
    """The store key of each sequence: SHA-256 of its token ids as little-endian int32.

    `tokens` holds the sequences' ids end to end, exactly as the model sees them (special tokens and
    truncation included); sequence i is tokens[offsets[i]:offsets[i + 1]].
    """
    data = memoryview(np.ascontiguousarray(tokens, dtype="<i4")).cast("B")
    bounds = (np.asarray(offsets, dtype=np.int64) * 4).tolist()
    sha256 = hashlib.sha256
    # Slicing a memoryview copies nothing; hashing runs at about 1.3M short sequences/s on one core.
    return [sha256(data[start:end]).digest() for start, end in zip(bounds[:-1], bounds[1:])]


def key_order(keys: Sequence[bytes]) -> np.ndarray:
    """The permutation that sorts `keys` (near enough: by their first 8 bytes, as LMDB compares them)."""
    if any(len(key) != KEY_BYTES for key in keys):
        raise ValueError(f"keys must be {KEY_BYTES}-byte digests (see sequence_keys)")
    return np.argsort(np.frombuffer(b"".join(keys), dtype=">u8")[::KEY_BYTES // 8], kind="stable")


class EmbeddingCache:
    """Use one per process (LMDB allows one environment per file per process); open with `open`."""

    def __init__(self, root: Path, map_size: int = DEFAULT_MAP_SIZE):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        # Readahead stays on (from the page cache it makes no difference, measured): lookups go in key order
        # and a put lays its batch out in key order, so pages read around a miss tend to be wanted next.
        # writemap stays off: with it a full disk is a SIGBUS, without it a failed write() and an abort.
        made = [path for path in (self.root / "data.mdb", self.root / "lock.mdb") if not path.exists()]
        try:
            self.env = lmdb.open(str(self.root), map_size=map_size, subdir=True, lock=True, max_dbs=MAX_DBS)
        except lmdb.Error:  # e.g. a data.mdb that is no LMDB file: leave nothing of this attempt behind
            for path in made:
                path.unlink(missing_ok=True)
            raise
        self.env.reader_check()  # frees reader slots left by killed processes

    @classmethod
    @contextmanager
    def open(cls, root: Path, *, map_size: int = DEFAULT_MAP_SIZE) -> Iterator[EmbeddingCache]:
        cache = cls(root, map_size)
        try:
            yield cache
        finally:
            cache.env.close()

    def _transact(self, work: Callable[[lmdb.Transaction], object], write: bool = False, buffers: bool = False):
        """Run `work` in one transaction, growing the map when it is full or another process grew it."""
        while True:
            try:
                with self.env.begin(write=write, buffers=buffers) as txn:
                    return work(txn)
            except lmdb.MapFullError:
                self.env.set_mapsize(self.env.info()["map_size"] * 2)
            except lmdb.MapResizedError:
                self.env.set_mapsize(0)
            except lmdb.Error as error:
                if error.code in NO_ROOM:
                    raise CacheFullError(error.code, f"no room to write the embedding cache at {self.root} "
                                         f"({error.reason}): free disk space there, prune the cache "
                                         "(vnp cache prune) or turn it off (--no-cache)") from error
                raise

    def lookup(self, identity: ModelIdentity, keys: Sequence[bytes],
               out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(found (N,) bool, vectors (N, dim) float32): the stored vectors where found, zeros elsewhere.

        With `out` (C-contiguous float32 (N, dim), e.g. the shard's own embedding array) the vectors are
        written there, rows not found left as they were, and no other (N, dim) array is allocated.
        A read only: it never waits for a writer. Count its hits and misses with `record_use`.
        """
        found = np.zeros(len(keys), dtype=bool)
        vectors = np.zeros((len(keys), identity.dim), dtype=np.float32) if out is None else out
        if vectors.dtype != np.float32 or vectors.shape != (len(keys), identity.dim) or not vectors.flags.c_contiguous:
            raise ValueError(f"out must be C-contiguous float32 of shape ({len(keys)}, {identity.dim})")
        row_bytes = identity.dim * 4
        rows = memoryview(vectors.reshape(-1).view(np.uint8))

        def read(txn: lmdb.Transaction) -> None:
            try:
                db = self.env.open_db(identity.db_name(), txn=txn, create=False)
            except lmdb.NotFoundError:
                return  # nothing stored for this identity yet
            get = txn.cursor(db).get
            for i in key_order(keys).tolist():
                value = get(keys[i])
                if value is not None:
                    if len(value) != row_bytes:
                        raise ValueError(f"{self.root}: a {identity.kind} entry has {len(value)} bytes, "
                                         f"not {row_bytes}; the store does not match its identity")
                    rows[i * row_bytes:(i + 1) * row_bytes] = value
                    found[i] = True

        self._transact(read, buffers=True)  # values are views of the map, copied once, into `vectors`
        return found, vectors

    def put(self, identity: ModelIdentity, keys: Sequence[bytes], vectors: np.ndarray) -> int:
        """Store vectors under their keys in one transaction; returns how many were new.

        A key already present keeps its vector (equal identities give equal vectors, so the first wins).
        """
        if vectors.dtype != np.float32 or vectors.shape != (len(keys), identity.dim):
            raise ValueError(f"vectors must be float32 of shape ({len(keys)}, {identity.dim}), "
                             f"not {vectors.dtype} {vectors.shape}")
        rows = memoryview(np.ascontiguousarray(vectors).reshape(-1).view(np.uint8))
        row_bytes = identity.dim * 4
        # In key order, a batch fills B+tree pages one after another and lays its vectors out in the order
        # a lookup reads them.
        items = [(keys[i], rows[i * row_bytes:(i + 1) * row_bytes]) for i in key_order(keys).tolist()]

        def write(txn: lmdb.Transaction) -> int:
            db = self.env.open_db(identity.db_name(), txn=txn)
            _, added = txn.cursor(db).putmulti(items, dupdata=False, overwrite=False)
            self._touch(txn, identity)
            return added

        return self._transact(write, write=True)

    def record_use(self, identity: ModelIdentity, hits: int, misses: int) -> None:
        """Add a lookup's hits and misses to the identity's counters (one small write transaction)."""
        self._transact(lambda txn: self._touch(txn, identity, hits, misses), write=True)

    def _touch(self, txn: lmdb.Transaction, identity: ModelIdentity, hits: int = 0, misses: int = 0) -> None:
        meta = self.env.open_db(META_DB, txn=txn)
        stored = txn.get(identity.key.encode(), db=meta)
        record = json.loads(stored) if stored else {"identity": asdict(identity), "description": identity.description,
                                                    "hits": 0, "misses": 0}
        record.update(hits=record["hits"] + hits, misses=record["misses"] + misses, last_used=time.time())
        txn.put(identity.key.encode(), json.dumps(record).encode(), db=meta)

    def _records(self, txn: lmdb.Transaction) -> list[dict]:
        try:
            meta = self.env.open_db(META_DB, txn=txn, create=False)
        except lmdb.NotFoundError:
            return []
        return [json.loads(value) for _, value in txn.cursor(meta)]

    def stats(self) -> list[IdentityStats]:
        """One row per model identity the store holds, most recently used first."""

        def read(txn: lmdb.Transaction) -> list[IdentityStats]:
            rows = []
            for record in self._records(txn):
                identity = ModelIdentity(**record["identity"])
                try:
                    db_stat = txn.stat(self.env.open_db(identity.db_name(), txn=txn, create=False))
                except lmdb.NotFoundError:  # counted a lookup, stored nothing yet
                    db_stat = {"entries": 0, "psize": 0, "branch_pages": 0, "leaf_pages": 0, "overflow_pages": 0}
                pages = db_stat["branch_pages"] + db_stat["leaf_pages"] + db_stat["overflow_pages"]
                rows.append(IdentityStats(identity, db_stat["entries"], pages * db_stat["psize"],
                                          record["hits"], record["misses"], record["last_used"]))
            return sorted(rows, key=lambda row: row.last_used, reverse=True)

        return self._transact(read)

    def prune(self, identity_key: str | None = None, older_than_s: float | None = None) -> list[str]:
        """Drop whole identities: the one with `identity_key`, and/or those unused for `older_than_s`
        seconds (both given: only if both hold). Returns the keys of the dropped identities."""
        if identity_key is None and older_than_s is None:
            raise ValueError("prune needs an identity key, an age, or both")

        def drop(txn: lmdb.Transaction) -> list[str]:
            now, dropped = time.time(), []
            meta = self.env.open_db(META_DB, txn=txn)
            for record in self._records(txn):
                identity = ModelIdentity(**record["identity"])
                if identity_key not in (None, identity.key):
                    continue
                if older_than_s is not None and now - record["last_used"] <= older_than_s:
                    continue
                # Emptied, not deleted: another process's open handle to a deleted database turns stale.
                txn.drop(self.env.open_db(identity.db_name(), txn=txn), delete=False)
                txn.delete(identity.key.encode(), db=meta)
                dropped.append(identity.key)
            return dropped

        return self._transact(drop, write=True)
