"""The tiny placeholder models: every file in its real format, written once, safe under concurrent use."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from vnp_core.classify import load_classifier
from vnp_core.config import EmbedConfig
from vnp_core.models import model_spec
from vnp_core.tiny_models import tiny_feature_width, tiny_model_paths, write_tiny_models


def test_every_tiny_model_loads_through_the_real_loaders(tmp_path: Path) -> None:
    paths = write_tiny_models(tmp_path / "tiny")
    esm2 = model_spec("esm2").load(paths["esm2"], EmbedConfig())
    dnabert_s = model_spec("dnabert_s").load(paths["dnabert_s"], EmbedConfig())
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
    model_spec("dnabert_s").load(results[0]["dnabert_s"], EmbedConfig())


def test_tiny_model_paths_names_what_write_tiny_models_wrote(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no tiny placeholder models there"):
        tiny_model_paths(tmp_path / "tiny", 300)
    written = write_tiny_models(tmp_path / "tiny")
    for chunk_length in (300, 500):
        paths = tiny_model_paths(tmp_path / "tiny", chunk_length)
        assert paths == {"esm2": written["esm2"], "dnabert_s": written["dnabert_s"],
                         "classifier": written[f"classifier_{chunk_length}"]}
        assert load_classifier(paths["classifier"]).chunk_length == chunk_length
