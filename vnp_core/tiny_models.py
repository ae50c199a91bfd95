"""Tiny random models in the real checkpoint formats, so the whole platform runs on a laptop.

They go through the same loaders as the real weights (a fair-esm `.pt`, a Hugging Face DNABERT-S
directory, VirNucPro classifier files). Their outputs are placeholders with no biological meaning.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

TINY_MODELS_NOTICE = "tiny random placeholder models: the embeddings and calls have no biological meaning"
_COMPLETE = ".complete"


def write_tiny_models(out_dir: Path) -> dict[str, Path]:
    """The tiny ESM-2, DNABERT-S and classifiers under `out_dir`, written once and reused after.

    Several processes may ask at once (parallel shard steps): each writes a private staging folder
    and renames it into place, so no process ever reads a half-written model.
    """
    out_dir = Path(out_dir)
    if not (out_dir / _COMPLETE).exists():
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
        try:
            _write(staging)
            (staging / _COMPLETE).touch()
            try:
                os.rename(staging, out_dir)
            except OSError as error:  # out_dir exists: fine when another process completed it first
                if not (out_dir / _COMPLETE).exists():
                    raise OSError(f"{out_dir} exists and is not a complete tiny-model folder: "
                                  "remove it or choose another") from error
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # left only when another process got there first
    return _paths(out_dir)


def _paths(out_dir: Path) -> dict[str, Path]:
    paths = {"esm2": out_dir / "esm2_tiny.pt", "dnabert_s": out_dir / "dnabert_s_tiny"}
    for chunk_length in (300, 500):
        paths[f"classifier_{chunk_length}"] = out_dir / f"classifier_{chunk_length}" / f"{chunk_length}_model.state_dict.pt"
        paths[f"classifier_{chunk_length}_pickled"] = out_dir / f"classifier_{chunk_length}" / f"{chunk_length}_model.pth"
    return paths


def _write(out_dir: Path) -> None:
    from vnp_core.classify import write_tiny_classifier
    from vnp_core.models.dnabert_s import write_tiny_model
    from vnp_core.models.esm2 import write_tiny_checkpoint

    paths = _paths(out_dir)
    write_tiny_checkpoint(paths["esm2"])
    write_tiny_model(paths["dnabert_s"])
    in_features = tiny_feature_width(paths["esm2"], paths["dnabert_s"])
    for chunk_length in (300, 500):
        write_tiny_classifier(out_dir / f"classifier_{chunk_length}", in_features=in_features, chunk_length=chunk_length)


def tiny_feature_width(esm2_checkpoint: Path, dnabert_s_dir: Path) -> int:
    """DNABERT-S width + ESM-2 width: the classifier's input (3328 for the real models)."""
    from vnp_core.models.dnabert_s import DnabertSConfig
    from vnp_core.models.esm2 import read_esm2_weights

    esm2_config, _ = read_esm2_weights(Path(esm2_checkpoint))
    return DnabertSConfig.from_json(Path(dnabert_s_dir) / "config.json").hidden_size + esm2_config.embed_dim
