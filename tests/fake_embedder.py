"""A stand-in for `vnp_core.engine.embed_shard` (as the embedding assets call it), for the asset tests.

It runs where the real one runs (in the device process) but loads no model and imports no torch,
so a test step costs a process start, not a model load. It notes the CUDA_VISIBLE_DEVICES it was
started with and when it ran, and obeys marker files beside its output: `<out>.kill` (SIGKILL
itself, once) and `<out>.nan` (write a NaN).
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

WIDTH = 8


@dataclass
class FakeProgress:
    """The fields of `vnp_core.engine.Progress`."""

    sequences_done: int
    sequences_total: int
    tokens_done: int
    seconds: float
    resumed_from_rows: int


@dataclass
class FakeEmbedStats:
    """The fields of `vnp_core.engine.EmbedStats` that the asset reads."""

    sequences: int
    dtype: str
    tokens: int = 0
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    truncated: int = 0
    attention_backend: str = "fake"
    max_tokens: int = 0
    resumed_from_rows: int = 0
    load_seconds: float = 0.0
    first_pack_seconds: float = 0.0

    def summary(self) -> str:
        return f"fake: {self.sequences} sequences"


def fake_embed_shard(kind: str, model_path: Path, ids: list[str], sequences: list[str], out: Path, config, attrs: dict,
                     progress) -> FakeEmbedStats:
    started = time.time()
    if out.with_suffix(".kill").exists():
        out.with_suffix(".kill").unlink()
        os.kill(os.getpid(), signal.SIGKILL)
    progress(FakeProgress(len(ids) // 2, len(ids), 100, 0.1, 0))
    time.sleep(0.3)  # long enough for concurrent steps to overlap, were they not kept apart by leases
    vectors = np.ones((len(ids), WIDTH), dtype=np.float32)
    if out.with_suffix(".nan").exists():
        vectors[0, 0] = np.nan
    with h5py.File(out, "w") as f:
        f.create_dataset("ids", data=np.asarray(ids, dtype=object), dtype=h5py.string_dtype("utf-8"))
        f.create_dataset("embeddings", data=vectors)
        f.attrs.update({"kind": kind, "dtype": config.dtype, **attrs})
    out.with_suffix(".device.json").write_text(json.dumps(
        {"visible": os.environ["CUDA_VISIBLE_DEVICES"], "start": started, "end": time.time()}))
    return FakeEmbedStats(len(ids), config.dtype)
