"""The tiny placeholder models: every file in its real format, written once, safe under concurrent use."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from vnp_core.classify import load_classifier
from vnp_core.config import EmbedConfig
from vnp_core.engine import load_model
from vnp_core.tiny_models import tiny_feature_width, write_tiny_models


def test_every_tiny_model_loads_through_the_real_loaders(tmp_path: Path) -> None:
    paths = write_tiny_models(tmp_path / "tiny")
    esm2 = load_model("esm2", paths["esm2"], EmbedConfig())
    dnabert_s = load_model("dnabert_s", paths["dnabert_s"], EmbedConfig())
    width = tiny_feature_width(paths["esm2"], paths["dnabert_s"])
    assert width == esm2.embed_dim + dnabert_s.embed_dim
    for chunk_length in (300, 500):
        assert load_classifier(paths[f"classifier_{chunk_length}"]).chunk_length == chunk_length
        pickled = load_classifier(paths[f"classifier_{chunk_length}_pickled"], trusted_pickle=True)
        assert pickled.in_features == width


def test_a_second_call_reuses_the_folder(tmp_path: Path) -> None:
    first = write_tiny_models(tmp_path / "tiny")
    stamp = first["esm2"].stat().st_mtime_ns
    assert write_tiny_models(tmp_path / "tiny") == first
    assert first["esm2"].stat().st_mtime_ns == stamp


def test_processes_asking_at_once_all_get_complete_models(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    with context.Pool(3) as pool:
        results = pool.map(write_tiny_models, [tmp_path / "tiny"] * 3)
    assert all(result == results[0] for result in results)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # no staging folder left behind
    load_model("dnabert_s", results[0]["dnabert_s"], EmbedConfig())
