"""A stand-in for `vnp_core.engine.embed_shards` (as the embedding step calls it), for the asset tests.

It runs where the real one runs (in the device process) and reads its rows as the real one does,
but loads no model and imports no torch, so a test step costs a process start, not a model load.
It notes the CUDA_VISIBLE_DEVICES it was started with and when it ran, and obeys marker files
beside each output: `<out>.kill` (SIGKILL itself, once), `<out>.nan` (write a NaN) and `<out>.fail`
(that job raises; the others go on, as in the engine).
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass

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
    """The fields of `vnp_core.engine.EmbedStats` that the step reads."""

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
    compiled: bool = False
    waited_seconds: float = 0.0
    rows_from_cache: int = 0
    first_pack_seconds: float = 0.0
    compile_at_first_pack: tuple[int, int, float] | None = None

    def summary(self) -> str:
        return f"fake: {self.sequences} sequences"


def fake_embed_shards(jobs, progress) -> list:
    started = time.time()
    outcomes = []
    for job in jobs:
        ids, _ = job.rows()
        if job.out.with_suffix(".kill").exists():
            job.out.with_suffix(".kill").unlink()
            os.kill(os.getpid(), signal.SIGKILL)
        if job.out.with_suffix(".fail").exists():
            outcomes.append(RuntimeError(f"{job.model} failed on purpose"))
            continue
        progress(job.model, FakeProgress(len(ids) // 2, len(ids), 100, 0.1, 0))
        time.sleep(0.3)  # long enough for concurrent steps to overlap, were they not kept apart by leases
        vectors = np.ones((len(ids), WIDTH), dtype=np.float32)
        if job.out.with_suffix(".nan").exists():
            vectors[0, 0] = np.nan
        with h5py.File(job.out, "w") as f:
            f.create_dataset("ids", data=np.asarray(ids, dtype=object), dtype=h5py.string_dtype("utf-8"))
            f.create_dataset("embeddings", data=vectors)
            f.attrs.update({"kind": job.model, "dtype": job.config.dtype, **job.attrs})
        job.out.with_suffix(".device.json").write_text(json.dumps(
            {"visible": os.environ["CUDA_VISIBLE_DEVICES"], "start": started, "end": time.time()}))
        outcomes.append(FakeEmbedStats(len(ids), job.config.dtype))
    return outcomes
