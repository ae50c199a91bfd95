"""Code versions from what each asset's output is made of: the model files' checksums, the precision
and the prep parameters, folded down the graph.

Replacing a model file (and reloading the code location) changes the code version of that model's
embeddings and of everything below them, and of nothing else: the UI marks exactly those stale, and
the automation condition (`checks.FLOW_ON_AFTER_CHECKS`) refreshes them in graph order.
Checksums of multi-gigabyte weights are computed once per file version (path, size, mtime) and kept
in a small JSON cache under the storage root.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from vnp_assets.resources import ModelSet, SampleProcessing, SampleStorage
from vnp_core.atomic import atomic_path
from vnp_core.models import MODELS
from vnp_core.models.checkpoint import sha256_files

CHECKSUM_CACHE = "model_checksums.json"


def asset_code_versions(storage: SampleStorage, processing: SampleProcessing, models: ModelSet) -> dict[str, str]:
    """Asset key -> code version, each a short digest of its own inputs and its upstream assets' versions."""
    paths = models.paths(processing.chunk_length)
    checksum = _ChecksumCache(Path(storage.storage_root) / CHECKSUM_CACHE)
    embed = models.embed_config("cuda")
    prep = processing.prep_config()
    versions = {"sequence_index": _digest(f"chunk_length={prep.chunk_length}", f"num_shards={prep.num_shards}",
                                          f"skip_bad_records={prep.skip_bad_records}",
                                          checksum(paths.embedders["dnabert_s"]))}  # it keeps DNABERT-S token ids
    for name in MODELS:
        versions[f"{name}_embeddings"] = _digest(versions["sequence_index"], checksum(paths.embedders[name]),
                                                 f"dtype={models.dtype}", f"max_residues={embed.max_protein_length}",
                                                 *(["fp8"] if name == "esm2" and models.fp8 else []))
    versions["merged_embeddings"] = _digest(*(versions[f"{name}_embeddings"] for name in MODELS))
    # FP8's check counts the calls that agree with fp32's, so there a new classifier means a new report;
    # in fp16 the calls are only reported, and a classifier rerun needs no GPU.
    versions["fp16_validation_report"] = _digest(versions["merged_embeddings"],
                                                 f"subset={processing.validation_sample_size} whole chunks",
                                                 *([checksum(paths.classifier)] if models.fp8 else []))
    versions["virnucpro_predictions"] = _digest(versions["fp16_validation_report"], checksum(paths.classifier))
    checksum.save()
    return versions


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


class _ChecksumCache:
    """sha256 of a file, or of a model directory's files, remembered by path, size and mtime."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.known = json.loads(path.read_text())
        except (OSError, ValueError):  # none yet, or unreadable: recompute
            self.known = {}
        self.changed = False

    def __call__(self, model: Path) -> str:
        if not Path(model).exists():
            raise FileNotFoundError(f"{model}: no such model file or directory: correct the model setting")
        files = sorted(p for p in Path(model).rglob("*") if p.is_file()) if Path(model).is_dir() else [Path(model)]
        stamp = json.dumps([[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files])
        if self.known.get(stamp) is None:
            self.known[stamp] = sha256_files(files)
            self.changed = True
        return self.known[stamp]

    def save(self) -> None:
        if self.changed:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.path) as tmp:
                tmp.write_text(json.dumps(self.known))
