"""A tiny ESM-2 built to overflow in float16: the engine refuses its NaN/Inf, naming the sequences,
and through Dagster the failed shard keeps everything downstream from running.

The checkpoint is fair-esm's own format (written by `write_tiny_esm2`, edited, saved back),
so it goes through the same loader as the released weights.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import polars as pl
import pytest
import torch
from dagster import AssetKey, DagsterInstance, evaluate_automation_conditions, materialize
from fake_embedder import fake_embed_shards

import vnp_assets.assets.embeddings as embeddings_module
from vnp_assets.assets import build_assets
from vnp_assets.platform import build_definitions
from vnp_assets.partitions import sample_shard_key
from vnp_core.config import EmbedConfig, PrepConfig
from vnp_core.engine import NonFiniteEmbeddingError, embed_sequences
from vnp_core.fasta import read_fasta
from vnp_core.models import model_spec
from vnp_core.models.esm2 import TOKENS
from vnp_core.prep import prepare_records
from vnp_core.store import checkpoint_path, read_embeddings
from vnp_core.tiny_models import write_tiny_esm2
from real_genomes import REAL_DATA

OVERFLOWING_RESIDUE = "H"
DOWNSTREAM = ("merged_embeddings", "fp16_validation_report", "virnucpro_predictions")
ASSETS = build_assets(num_shards=1)


def write_overflowing_checkpoint(path: Path) -> Path:
    """A tiny ESM-2 whose activations pass float16's largest finite value (65504) at every histidine.

    H's embedding is 60,000 in every dimension and layer 0's feed-forward adds 20,000 to every
    position: after token dropout's x0.88 rescale, an H's residual stream reaches 72,800, Inf in
    float16 and unremarkable in float32. Both numbers are exact in float16, so the weights load
    intact and only the activations overflow. Attention keeps the NaN that follows within its own
    sequence, so only the sequences holding an H go bad.
    """
    write_tiny_esm2(path)
    checkpoint = torch.load(path, weights_only=False)  # fair-esm pickles its config as an argparse.Namespace
    weights = checkpoint["model"]
    weights["embed_tokens.weight"][TOKENS.index(OVERFLOWING_RESIDUE)] = 60_000.0
    weights["layers.0.fc2.bias"][:] = 20_000.0
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def overflowing_esm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_overflowing_checkpoint(tmp_path_factory.mktemp("esm2") / "esm2_overflow.pt")


@pytest.fixture(scope="module")
def phix_frames() -> pl.DataFrame:
    return prepare_records(read_fasta(REAL_DATA / "phiX174.fasta").records, PrepConfig(chunk_length=500)).frames


def overflowing_frames(frames: pl.DataFrame) -> list[str]:
    return frames.filter(pl.col("protein").str.contains(OVERFLOWING_RESIDUE))["frame_id"].to_list()


def named_ids(message: str, ids: list[str]) -> list[str]:
    """The ids quoted in `message`, in the order of `ids`."""
    return [record_id for record_id in ids if repr(record_id) in message]


def test_float16_overflow_is_refused_naming_its_sequences_and_nothing_is_written(
        overflowing_esm2: Path, phix_frames: pl.DataFrame, tmp_path: Path) -> None:
    ids, proteins = phix_frames["frame_id"].to_list(), phix_frames["protein"].to_list()
    overflowing = overflowing_frames(phix_frames)
    assert 0 < len(overflowing) < len(ids)  # some frames overflow, some do not: the message must tell which

    fp32 = EmbedConfig(device="cpu", dtype="float32")
    embed_sequences(model_spec("esm2").load(overflowing_esm2, fp32), ids, proteins, tmp_path / "fp32.h5", fp32)
    assert np.isfinite(read_embeddings(tmp_path / "fp32.h5").embeddings).all()

    fp16 = EmbedConfig(device="cpu", dtype="float16")
    out = tmp_path / "fp16.h5"
    with pytest.raises(NonFiniteEmbeddingError, match=f"NaN/Inf embeddings for {len(overflowing)} of the") as failure:
        embed_sequences(model_spec("esm2").load(overflowing_esm2, fp16), ids, proteins, out, fp16)
    assert named_ids(str(failure.value), ids) == overflowing
    assert not out.exists()
    with h5py.File(checkpoint_path(out)) as checkpoint:  # what a rerun resumes from holds no row of the bad pack
        assert checkpoint.attrs["rows_done"] == 0 and checkpoint["embeddings"].shape[0] == 0


def test_a_float16_overflow_fails_its_shard_and_nothing_downstream_runs(
        make_resources, instance: DagsterInstance, add_sample, overflowing_esm2: Path,
        phix_frames: pl.DataFrame, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = make_resources(num_shards=1, esm2_model=str(overflowing_esm2), dtype="float16")
    shard = sample_shard_key("phix", 0)

    def run(asset: str, partition: str):
        return materialize(ASSETS, selection=[asset], partition_key=partition, resources=settings,
                           instance=instance, raise_on_error=False)

    defs = build_definitions(settings)
    automation = evaluate_automation_conditions(defs, instance=instance)  # the daemon ticks before the sample arrives
    add_sample("phix", REAL_DATA / "phiX174.fasta")
    assert run("sequence_index", "phix").success
    automation = evaluate_automation_conditions(defs, instance=instance, cursor=automation.cursor)
    with monkeypatch.context() as patch:
        patch.setattr(embeddings_module, "embed_shards", fake_embed_shards)  # DNABERT-S is not under test here
        assert run("dnabert_s_embeddings", shard).success

    failed = run("esm2_embeddings", shard)  # the real engine, in its device process
    assert not failed.success and failed.get_asset_materialization_events() == []
    error = failed.get_step_failure_events()[0].step_failure_data.error.cause
    assert error.cls_name == "NonFiniteEmbeddingError"
    assert named_ids(error.message, phix_frames["frame_id"].to_list()) == overflowing_frames(phix_frames)
    assert not settings["storage"].layout("phix").embeddings("esm2", 0).exists()

    automation = evaluate_automation_conditions(defs, instance=instance, cursor=automation.cursor)
    assert {asset: automation.get_num_requested(AssetKey(asset)) for asset in DOWNSTREAM} == dict.fromkeys(DOWNSTREAM, 0)

    # Once the shard is written (here by the stand-in), the sample flows on: the failure was what held it.
    monkeypatch.setattr(embeddings_module, "embed_shards", fake_embed_shards)
    assert run("esm2_embeddings", shard).success
    automation = evaluate_automation_conditions(defs, instance=instance, cursor=automation.cursor)
    assert automation.get_requested_partitions(AssetKey("merged_embeddings")) == {"phix"}
