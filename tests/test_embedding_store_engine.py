"""The engine with the embedding store: each distinct sequence embedded once per model identity, and what
comes back from the store is the vector computed earlier, bit for bit."""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from shard_rows import Rows
from vnp_core.config import EmbedConfig
from vnp_core.embedding_cache import EmbeddingCache
from vnp_core.engine import ShardJob, embed_shards, embed_tokenized, embed_with_cache, model_identity, tokenize
from vnp_core.models import MODELS, model_spec
from vnp_core.models.checkpoint import sha256_files
from vnp_core.store import read_attrs, read_embeddings
from vnp_core.tiny_models import write_tiny_models

LETTERS = "ACDEFGHIKLMNPQRSTVWY"


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_tiny_models(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def esm2(paths):
    return model_spec("esm2").load(paths["esm2"], EmbedConfig())


def proteins(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(list(LETTERS), size=int(rng.integers(20, 90)))) for _ in range(n)]


def embed(model, ids, sequences, out: Path, cache: Path | None, attrs: dict | None = None):
    tokenized = tokenize(model.tokenizer, ids, sequences, num_workers=0)
    if cache is None:
        return embed_tokenized(model, ids, tokenized, out, EmbedConfig(max_tokens=512), attrs=attrs)
    return embed_with_cache(model, ids, tokenized, out, EmbedConfig(max_tokens=512), cache, attrs=attrs)


def test_duplicates_are_embedded_once_and_a_second_sample_embeds_nothing(esm2, tmp_path: Path) -> None:
    distinct = proteins(40, seed=0)
    sequences = distinct + distinct[:15]  # 15 exact duplicates (PCR or optical) in one sample
    ids = [f"r{i}" for i in range(len(sequences))]
    cache = tmp_path / "store"

    first = embed(esm2, ids, sequences, tmp_path / "a.h5", cache)
    assert (first.rows_from_cache, first.sequences) == (15, 55)
    vectors = read_embeddings(tmp_path / "a.h5").embeddings
    assert np.array_equal(vectors[40:], vectors[:15])
    assert read_attrs(tmp_path / "a.h5")["rows_from_cache"] == 15
    assert not list(tmp_path.glob("a.new*"))  # the rows' own shard is gone once merged in

    # Another sample with the same reads, in another order: nothing to embed, the same vectors.
    order = np.random.default_rng(1).permutation(len(sequences))
    again = embed(esm2, [ids[i] for i in order], [sequences[i] for i in order], tmp_path / "b.h5", cache)
    assert (again.rows_from_cache, again.tokens) == (55, 0)
    assert "from the embedding store: nothing to embed" in again.summary()
    assert np.array_equal(read_embeddings(tmp_path / "b.h5").embeddings, vectors[order])

    # Without the store, the same vectors (one sequence's vector does not depend on its pack here).
    plain = embed(esm2, ids, sequences, tmp_path / "plain.h5", None)
    assert plain.rows_from_cache == 0
    np.testing.assert_allclose(read_embeddings(tmp_path / "plain.h5").embeddings, vectors, rtol=0, atol=1e-6)

    with EmbeddingCache.open(cache) as store:
        [stats] = store.stats()
    assert (stats.entries, stats.hits, stats.misses) == (40, 55, 40)  # hits: found in the store


def test_two_samples_that_share_reads_share_their_vectors(esm2, tmp_path: Path) -> None:
    shared, only_a, only_b = proteins(10, seed=2), proteins(5, seed=3), proteins(5, seed=4)
    cache = tmp_path / "store"
    embed(esm2, [f"a{i}" for i in range(15)], shared + only_a, tmp_path / "a.h5", cache)
    b = embed(esm2, [f"b{i}" for i in range(15)], only_b + shared, tmp_path / "b.h5", cache)

    assert b.rows_from_cache == 10
    a_vectors, b_vectors = read_embeddings(tmp_path / "a.h5").embeddings, read_embeddings(tmp_path / "b.h5").embeddings
    assert np.array_equal(a_vectors[:10], b_vectors[5:])


def test_a_complete_shard_is_not_recomputed_and_the_store_is_not_consulted(esm2, tmp_path: Path) -> None:
    ids, sequences = [f"r{i}" for i in range(12)], proteins(12, seed=5)
    embed(esm2, ids, sequences, tmp_path / "a.h5", tmp_path / "store")
    again = embed(esm2, ids, sequences, tmp_path / "a.h5", tmp_path / "store")
    assert again.resumed_from_rows == 12 and "already embedded" in again.summary()


# ----------------------------------------------------------------------------------------------
# A shard whose rows the store holds loads no model (`embed_shards`)


def esm2_job(paths, ids, sequences, out: Path, cache: Path | None) -> ShardJob:
    return ShardJob("esm2", paths["esm2"], Rows(tuple(ids), tuple(sequences)), out, EmbedConfig(max_tokens=512),
                    {"shard": 3}, cache_dir=cache)


def counting_loads(monkeypatch, name: str) -> list[Path]:
    """The paths `name`'s spec loads from, from now on (its `load` wrapped)."""
    spec, loads = MODELS[name], []

    def load(path, config):
        loads.append(path)
        return spec.load(path, config)

    monkeypatch.setitem(MODELS, name, replace(spec, load=load))
    return loads


def test_a_shard_whose_every_row_is_stored_is_written_as_before_without_loading_the_model(
        paths, esm2, tmp_path: Path, monkeypatch) -> None:
    ids, sequences = [f"r{i}" for i in range(30)], proteins(25, seed=6) + proteins(5, seed=6)  # 5 duplicates
    cache = tmp_path / "store"
    [first] = embed_shards([esm2_job(paths, ids, sequences, tmp_path / "first.h5", cache)])
    assert (first.sequences, first.rows_from_cache) == (30, 5)
    # What the loaded model writes for a shard whose every row is stored.
    embed(esm2, ids, sequences, tmp_path / "loaded.h5", cache, attrs={"shard": 3})

    loads = counting_loads(monkeypatch, "esm2")
    [stats] = embed_shards([esm2_job(paths, ids, sequences, tmp_path / "described.h5", cache)])
    assert loads == []
    assert (stats.sequences, stats.rows_from_cache, stats.tokens) == (30, 30, 0)
    assert stats.summary() == "all 30 sequences came from the embedding store: nothing to embed"
    written, loaded = read_embeddings(tmp_path / "described.h5"), read_embeddings(tmp_path / "loaded.h5")
    assert written.ids == loaded.ids == ids
    embedded = read_embeddings(tmp_path / "first.h5").embeddings
    assert written.embeddings.tobytes() == loaded.embeddings.tobytes() == embedded.tobytes()  # bit for bit
    assert {"kind", "model_name", "weights_sha256", "dtype", "attention_backend", "pooling", "vnp_version", "truncated",
            "device", "max_tokens", "fingerprint", "rows_from_cache", "cache_identity", "shard"} == set(written.attrs)
    assert written.attrs == loaded.attrs  # max_tokens included: 0, no pack was planned
    with EmbeddingCache.open(cache) as store:
        [counts] = store.stats()
    assert (counts.entries, counts.hits, counts.misses) == (25, 60, 25)  # hits: rows found in the store


def test_a_shard_with_one_row_missing_loads_the_model_and_embeds_that_row_only(paths, tmp_path: Path, monkeypatch) -> None:
    ids, sequences = [f"r{i}" for i in range(20)], proteins(20, seed=7)
    cache = tmp_path / "store"
    embed_shards([esm2_job(paths, ids[1:], sequences[1:], tmp_path / "known.h5", cache)])

    loads = counting_loads(monkeypatch, "esm2")
    [stats] = embed_shards([esm2_job(paths, ids, sequences, tmp_path / "shard.h5", cache)])
    assert loads == [paths["esm2"]]
    assert (stats.sequences, stats.rows_from_cache, stats.tokens) == (20, 19, len(sequences[0]) + 2)
    written = read_embeddings(tmp_path / "shard.h5")
    assert written.ids == ids and written.attrs["rows_from_cache"] == 19
    np.testing.assert_array_equal(written.embeddings[1:], read_embeddings(tmp_path / "known.h5").embeddings)
    embed_shards([esm2_job(paths, ids[:1], sequences[:1], tmp_path / "alone.h5", None)])
    np.testing.assert_array_equal(written.embeddings[:1], read_embeddings(tmp_path / "alone.h5").embeddings)


@pytest.mark.parametrize("name, config", [
    ("esm2", EmbedConfig()), ("esm2", EmbedConfig(dtype="float16", fp8=True)),
    ("dnabert_s", EmbedConfig()), ("dnabert_s", EmbedConfig(dtype="bfloat16", attention_backend="sdpa_padded")),
], ids=["esm2", "esm2-fp8", "dnabert_s", "dnabert_s-bfloat16"])
def test_a_models_description_is_what_loading_it_gives(paths, name: str, config: EmbedConfig) -> None:
    spec = model_spec(name)
    description, loaded = spec.describe(paths[name], config), spec.load(paths[name], config)
    assert description == loaded.description and description.precision == loaded.precision
    assert model_identity(description, spec.tokenizer(paths[name], config)) == model_identity(loaded, loaded.tokenizer)


def test_a_remembered_checksum_is_made_again_once_the_file_changes(tmp_path: Path) -> None:
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"first")
    assert sha256_files([weights]) == sha256_files([weights]) == hashlib.sha256(b"first").hexdigest()
    weights.write_bytes(b"second")  # in place: another size
    assert sha256_files([weights]) == hashlib.sha256(b"second").hexdigest()
    (tmp_path / "new.bin").write_bytes(b"thirds")
    os.replace(tmp_path / "new.bin", weights)  # replaced: another inode, the same size
    assert sha256_files([weights]) == hashlib.sha256(b"thirds").hexdigest()
