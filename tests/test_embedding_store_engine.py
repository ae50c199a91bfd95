"""The engine with the embedding store: each distinct sequence embedded once per model identity, and what
comes back from the store is the vector computed earlier, bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vnp_core.config import EmbedConfig
from vnp_core.embedding_cache import EmbeddingCache
from vnp_core.engine import embed_tokenized, embed_with_cache, tokenize
from vnp_core.models import model_spec
from vnp_core.store import read_attrs, read_embeddings
from vnp_core.tiny_models import write_tiny_models

LETTERS = "ACDEFGHIKLMNPQRSTVWY"


@pytest.fixture(scope="module")
def esm2(tmp_path_factory: pytest.TempPathFactory):
    paths = write_tiny_models(tmp_path_factory.mktemp("tiny"))
    return model_spec("esm2").load(paths["esm2"], EmbedConfig())


def proteins(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(list(LETTERS), size=int(rng.integers(20, 90)))) for _ in range(n)]


def embed(model, ids, sequences, out: Path, cache: Path | None):
    tokenized = tokenize(model.tokenizer, ids, sequences, num_workers=0)
    if cache is None:
        return embed_tokenized(model, ids, tokenized, out, EmbedConfig(max_tokens=512))
    return embed_with_cache(model, ids, tokenized, out, EmbedConfig(max_tokens=512), cache)


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
