"""Tiny random models in the real checkpoint formats, so the whole platform runs on a laptop.

They go through the same loaders as the real weights (a fair-esm `.pt`, a Hugging Face DNABERT-S
directory, VirNucPro classifier files). Their outputs are placeholders with no biological meaning.
"""

from __future__ import annotations

from pathlib import Path

TINY_MODELS_NOTICE = "tiny random placeholder models: the embeddings and calls have no biological meaning"


def write_tiny_models(out_dir: Path) -> dict[str, Path]:
    """Write (or reuse, when already complete) the tiny ESM-2, DNABERT-S and classifiers under `out_dir`."""
    from vnp_core.classify import write_tiny_classifier
    from vnp_core.models.dnabert_s import write_tiny_model
    from vnp_core.models.esm2 import write_tiny_checkpoint

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    esm2_path = out_dir / "esm2_tiny.pt"
    paths["esm2"] = esm2_path if esm2_path.exists() else write_tiny_checkpoint(esm2_path)
    dnabert_dir = out_dir / "dnabert_s_tiny"
    paths["dnabert_s"] = dnabert_dir if (dnabert_dir / "config.json").exists() else write_tiny_model(dnabert_dir)
    in_features = tiny_feature_width(paths["esm2"], paths["dnabert_s"])
    for chunk_length in (300, 500):
        written = write_tiny_classifier(out_dir / f"classifier_{chunk_length}", in_features=in_features,
                                        chunk_length=chunk_length)
        paths[f"classifier_{chunk_length}"] = written["state_dict"]
        paths[f"classifier_{chunk_length}_pickled"] = written["pickled_module"]
    return paths


def tiny_feature_width(esm2_checkpoint: Path, dnabert_s_dir: Path) -> int:
    """DNABERT-S width + ESM-2 width: the classifier's input (3328 for the real models)."""
    import json

    import torch

    dnabert_width = json.loads((Path(dnabert_s_dir) / "config.json").read_text())["hidden_size"]
    esm2_width = torch.load(esm2_checkpoint, map_location="cpu", weights_only=False)["model"]["embed_tokens.weight"].shape[1]
    return int(dnabert_width + esm2_width)
