"""The VirNucPro classifier and the two prediction files the original tool writes.

Per kept frame the classifier turns `concat(dnabert_s, esm2)` into P(others) (`score1`) and
P(virus) (`score2`); a chunk is viral when `max(score2) >= max(score1)` over its frames.

Matched against the original `prediction.py` and `train.py` of github.com/Li-Jing-1997/VirNucPro
(commit 0b7e6f1): the module's attribute names (so its state dicts load), the `softmax` scores, the
`torch.max` label, and the text of both files.
"""

from __future__ import annotations

import pickle
import re
import types
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from torch import nn

from vnp_core.atomic import atomic_path
from vnp_core.models.checkpoint import sha256_files

FRAME_PREDICTIONS_FILE = "prediction_results.txt"
CHUNK_CALLS_FILE = "prediction_results_highestscore.csv"  # tab-separated, as the original writes it
FRAME_TABLE_FILE = "predictions_frames.parquet"
CHUNK_TABLE_FILE = "predictions_chunks.parquet"

# Enough rows per forward to keep the CPU busy without holding N x 512 activations at once.
_ROWS_PER_FORWARD = 65536


class VirNucProClassifier(nn.Module):
    """`Linear -> BatchNorm1d -> ReLU -> Dropout(0.5) -> Linear`, named as the original `MLPClassifier`."""

    def __init__(self, in_features: int = 768 + 2560, hidden_features: int = 512, num_classes: int = 2):
        super().__init__()
        self.hidden_layer = nn.Linear(in_features, hidden_features)
        self.bn1 = nn.BatchNorm1d(hidden_features)
        self.dropout = nn.Dropout(0.5)
        self.output_layer = nn.Linear(hidden_features, num_classes)
        self.eval()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.hidden_layer(features)))
        return self.output_layer(self.dropout(x))


@dataclass
class LoadedClassifier:
    module: VirNucProClassifier  # eval mode, CPU, float32
    chunk_length: int  # the chunk length its training features were made with (300 or 500)
    in_features: int
    source: Path
    weights_sha256: str


class _OriginalClassUnpickler(pickle.Unpickler):
    """Resolves the original's classifier class to ours.

    VirNucPro's `train.py` ran as a script and pickled its whole module, so the files name
    `__main__.MLPClassifier`, a class that exists in no importable module. Our class has the same
    attribute names, so the unpickled object's parameters are the original's.
    """

    def find_class(self, module: str, name: str):
        if name == "MLPClassifier":
            return VirNucProClassifier
        return super().find_class(module, name)


# `torch.load` takes a pickle module, not an unpickler: this one is `pickle` with the class above.
_original_pickle = types.ModuleType("virnucpro_pickle")
_original_pickle.Unpickler = _OriginalClassUnpickler
_original_pickle.load = pickle.load


def load_classifier(path: Path, *, trusted_pickle: bool = False) -> LoadedClassifier:
    """Load a VirNucPro classifier: a state dict, or (only when trusted) a pickled whole module.

    The chunk length comes from the file (`{"state_dict": ..., "chunk_length": c}`, as we save it)
    or from the original naming `300_model.pth` / `500_model.pth`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classifier weights not found: {path}")
    # torch.save has written zip archives since PyTorch 1.6 (the original files included).
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a PyTorch file (torch.save zip archive)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if not trusted_pickle:
            raise ValueError(
                f"{path} is a pickled Python object (the original VirNucPro 300_model.pth / 500_model.pth are "
                "whole pickled modules), not a plain state dict. Unpickling runs code stored in the file, so it "
                "is only done with trusted_pickle=True (CLI: --trust-classifier-pickle) for a file whose origin "
                "you trust."
            ) from error
        payload = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_original_pickle)

    if isinstance(payload, nn.Module):
        payload = {"state_dict": payload.state_dict()}
    if not isinstance(payload, dict):
        raise ValueError(f"{path}: expected a state dict or a classifier module, found {type(payload).__name__}")
    state_dict = payload.get("state_dict", payload)
    chunk_length = int(payload["chunk_length"]) if "chunk_length" in payload else _chunk_length_from_name(path)
    if chunk_length not in (300, 500):
        raise ValueError(f"{path}: chunk length must be 300 or 500, found {chunk_length}")

    module = _classifier_from_state_dict(state_dict, path)
    return LoadedClassifier(module=module, chunk_length=chunk_length, in_features=module.hidden_layer.in_features,
                            source=path, weights_sha256=sha256_files([path]))


def _chunk_length_from_name(path: Path) -> int:
    match = re.search(r"(?<!\d)(300|500)_model", path.name)
    if match is None:
        raise ValueError(
            f"{path}: cannot tell which chunk length this classifier was trained for. Name it 300_model.pth or "
            '500_model.pth as VirNucPro does, or save {"state_dict": ..., "chunk_length": 300 or 500}.'
        )
    return int(match.group(1))


def _classifier_from_state_dict(state_dict: dict[str, torch.Tensor], path: Path) -> VirNucProClassifier:
    if "hidden_layer.weight" not in state_dict or "output_layer.weight" not in state_dict:
        raise ValueError(f"{path}: not a VirNucPro classifier (keys: {sorted(state_dict)[:8]})")
    hidden_features, in_features = state_dict["hidden_layer.weight"].shape
    module = VirNucProClassifier(in_features, hidden_features, state_dict["output_layer.weight"].shape[0])
    if module.output_layer.out_features != 2:
        raise ValueError(f"{path}: expected 2 classes (others, virus), found {module.output_layer.out_features}")
    try:
        module.load_state_dict(state_dict)
    except RuntimeError as error:
        raise ValueError(f"{path}: state dict does not fit the VirNucPro classifier: {error}") from error
    return module.eval()


def predict(classifier: LoadedClassifier, ids: Sequence[str], features: np.ndarray | Sequence[np.ndarray], *,
            chunk_length: int, same_as: np.ndarray | None = None) -> pl.DataFrame:
    """Per frame: `frame_id`, `prediction` (`virus`/`others`), `score1` = P(others), `score2` = P(virus).

    `features`: the (N, in_features) classifier input, or its column groups in order (each model's
    vectors, as the merged file holds them). Groups are joined a block of rows at a time: a 640k-row
    sample's 8.5 GB input is never built whole. `chunk_length` is the one the features were made
    with; it must be the classifier's. `same_as` (optional, one row number per row): a row whose
    features are bit-identical, the row itself for the first of its copies; only those are scored,
    and every copy takes its first's scores.
    """
    if chunk_length != classifier.chunk_length:
        raise ValueError(
            f"features were made from {chunk_length}-bp chunks but the classifier {classifier.source} was trained "
            f"on {classifier.chunk_length}-bp chunks: use the {chunk_length}-bp classifier, or prepare the sample "
            f"with chunk length {classifier.chunk_length}"
        )
    groups = [features] if isinstance(features, np.ndarray) else list(features)
    shape = (min((len(group) for group in groups), default=0), sum(group.shape[1] for group in groups))
    if any(len(group) != len(ids) for group in groups) or shape[1] != classifier.in_features:
        raise ValueError(f"features have shape {shape}, expected ({len(ids)}, {classifier.in_features}) "
                         f"for {len(ids)} ids and the classifier {classifier.source}")
    everyone = np.arange(len(ids))
    scored = everyone if same_as is None else np.flatnonzero(same_as == everyone)

    probabilities, nonfinite = [], []
    with torch.inference_mode():
        # One forward per block of rows, the joined block the only copy made of the input.
        for start in range(0, len(scored), _ROWS_PER_FORWARD):
            block = scored[start:start + _ROWS_PER_FORWARD]
            rows = np.concatenate([group[block[0]:block[-1] + 1] if same_as is None else group[block]
                                   for group in groups], axis=1, dtype=np.float32)
            bad = np.flatnonzero(~np.isfinite(rows).all(axis=1))
            nonfinite.extend(block[bad].tolist())
            if not nonfinite:
                probabilities.append(F.softmax(classifier.module(torch.from_numpy(rows)), dim=1))
    if nonfinite:
        raise ValueError(f"{len(nonfinite)} feature rows contain NaN/Inf, e.g. {[ids[i] for i in nonfinite[:5]]}")
    scores = torch.cat(probabilities).numpy() if probabilities else np.empty((0, 2), dtype=np.float32)
    if same_as is not None:
        scores = scores[np.searchsorted(scored, same_as)]  # each copy's first is a scored row
    # The original labels with torch.max, which returns the first maximum: a tie is `others`.
    return pl.DataFrame({
        "frame_id": list(ids),
        "prediction": np.where(scores[:, 1] > scores[:, 0], "virus", "others"),
        "score1": scores[:, 0],
        "score2": scores[:, 1],
    })


def chunk_calls(frames: pl.DataFrame) -> pl.DataFrame:
    """Per chunk (frame id minus its last two characters): `is_virus = max(score2) >= max(score1)`.

    Sorted by chunk id as text, the order of the original's pandas `groupby`. The original compared
    the scores re-read from `prediction_results.txt`; that text round-trips each float32 exactly, so
    comparing the float32 scores gives the same calls, ties included.
    """
    return (
        frames.group_by(chunk_id=pl.col("frame_id").str.head(-2))
        .agg(max_score1=pl.col("score1").max(), max_score2=pl.col("score2").max(), n_frames=pl.len())
        .with_columns(is_virus=pl.col("max_score2") >= pl.col("max_score1"))
        .sort("chunk_id")
    )


def write_prediction_files(frames: pl.DataFrame, chunks: pl.DataFrame, out_dir: Path,
                           index: pl.DataFrame | None = None) -> dict[str, Path]:
    """The original's two text files, and Parquet tables per frame and per chunk.

    Frames are written in the order given or, with the sequence index, in prep order: that of
    `<stem>_identified_protein.faa`, as the original wrote them (up to 10,000 frames; beyond, it
    scored pieces of 10,000 in directory-listing order). Chunks keep the order of `chunks`. With the
    index, the tables also carry each frame's record id, chunk index, chunk coordinates and frame
    name, so calls join back to the input.
    """
    if index is not None:
        frames, chunks = _with_coordinates(frames, chunks, index)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "frame_predictions": out_dir / FRAME_PREDICTIONS_FILE,
        "chunk_calls": out_dir / CHUNK_CALLS_FILE,
        "frame_table": out_dir / FRAME_TABLE_FILE,
        "chunk_table": out_dir / CHUNK_TABLE_FILE,
    }
    # The original wrote `str()` of each float32 probability: numpy's shortest text that round-trips
    # in float32. (`{score1}` without `!s` would format it as a float64 and print more digits.)
    frame_lines = (
        f"{frame_id}\t{prediction}\t{score1!s}\t{score2!s}\n"
        for frame_id, prediction, score1, score2 in zip(
            frames["frame_id"], frames["prediction"], frames["score1"].cast(pl.Float32).to_numpy(),
            frames["score2"].cast(pl.Float32).to_numpy(), strict=True)
    )
    _write_text(paths["frame_predictions"], "Sequence_ID\tPrediction\tscore1\tscore2\n", frame_lines)
    chunk_lines = (f"{chunk_id}\t{is_virus}\n"
                   for chunk_id, is_virus in zip(chunks["chunk_id"], chunks["is_virus"], strict=True))
    _write_text(paths["chunk_calls"], "Modified_ID\tIs_Virus\n", chunk_lines)
    with atomic_path(paths["frame_table"]) as tmp:
        frames.write_parquet(tmp)
    with atomic_path(paths["chunk_table"]) as tmp:
        chunks.write_parquet(tmp)
    return paths


def _with_coordinates(frames: pl.DataFrame, chunks: pl.DataFrame, index: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    frame_coordinates = index.select("frame_id", "prep_order", "record_id", "chunk_index", "chunk_start", "chunk_end",
                                     "frame")
    missing = frames.join(frame_coordinates, on="frame_id", how="anti")["frame_id"]
    if len(missing):
        raise ValueError(f"{len(missing)} predicted frames are not in the sequence index, e.g. {missing.head(5).to_list()}")
    chunk_coordinates = (
        frame_coordinates.select(pl.col("frame_id").str.head(-2).alias("chunk_id"), "record_id", "chunk_index",
                                 "chunk_start", "chunk_end")
        .unique("chunk_id", keep="first", maintain_order=True)
    )
    return (frames.join(frame_coordinates, on="frame_id", how="left").sort("prep_order").drop("prep_order"),
            chunks.join(chunk_coordinates, on="chunk_id", how="left", maintain_order="left"))


def _write_text(path: Path, header: str, lines: Iterable[str]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8", newline="\n") as handle:
        handle.write(header)
        handle.writelines(lines)
