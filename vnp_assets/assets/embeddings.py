"""`dnabert_s_embeddings` and `esm2_embeddings`: one shard of a sample, on one leased GPU.

Both assets come from one step per shard (a multi-asset): the step leases a GPU among every run on
the host (a flock under `gpu_lock_dir`), then runs both models in one process bound to that
physical GPU (a spare started ahead, where the step's process has one), so a GPU pays one process
start and one lease per shard, and the second model loads and compiles while the first one
computes. Either asset can still be materialized alone (a rerun of a failed shard). On a host
without GPUs the step runs on the CPU.
"""

from collections.abc import Iterator

from dagster import (
    AssetCheckKey,
    AssetDep,
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    AssetSpec,
    MaterializeResult,
    MetadataValue,
    MultiPartitionsDefinition,
    multi_asset,
)

from vnp_assets.assets.sequence_index import sequence_index
from vnp_assets.checks import EAGER_AFTER_CHECKS, shard_check_results, shard_check_specs
from vnp_assets.metadata import warn_if_tiny
from vnp_assets.partitions import by_sample
from vnp_assets.progress import run_logging_progress
from vnp_assets.resources import VnpSettings
# What the device process runs; it lives in vnp_core so that process imports no Dagster.
from vnp_core.config import ShardJob
from vnp_core.engine import embed_shards
from vnp_core.index import ShardRows

# The order the device process runs them in: DNABERT-S is small and quick to load, so the device
# starts early, and the 3B ESM-2 loads, tokenises and compiles while DNABERT-S computes.
MODELS = ("dnabert_s", "esm2")
# Which index column each model embeds.
MODEL_INPUT = {"esm2": "protein", "dnabert_s": "nucleotide"}


def embedding_key(kind: str) -> AssetKey:
    return AssetKey(f"{kind}_embeddings")


def build_embedding_assets(partitions_def: MultiPartitionsDefinition) -> AssetsDefinition:
    specs = [
        AssetSpec(
            embedding_key(kind),
            deps=[AssetDep(sequence_index, partition_mapping=by_sample)],
            automation_condition=EAGER_AFTER_CHECKS,
            kinds={"pytorch", "hdf5"},
            description=f"{kind} embeddings of one shard of a sample's kept frames (HDF5), made on one leased GPU.",
        )
        for kind in MODELS
    ]

    @multi_asset(
        name="shard_embeddings",
        specs=specs,
        partitions_def=partitions_def,
        can_subset=True,
        pool="gpu",
        check_specs=[spec for kind in MODELS for spec in shard_check_specs(embedding_key(kind))],
    )
    def shard_embeddings(context: AssetExecutionContext, vnp: VnpSettings) -> Iterator[MaterializeResult]:
        keys = context.partition_key.keys_by_dimension
        sample, shard = keys["sample"], int(keys["shard"])
        kinds = [kind for kind in MODELS if embedding_key(kind) in context.selected_asset_keys]
        layout = vnp.sample_layout(sample)
        rows = {kind: ShardRows(layout.index, shard, MODEL_INPUT[kind]) for kind in kinds}
        expected_rows = rows[kinds[0]].count()
        with vnp.gpu_lease() as device:
            where = "cpu" if device is None else f"GPU {device}"
            context.log.info(f"shard {shard} of {sample}: {expected_rows:,} sequences, {' then '.join(kinds)} on {where}")
            config = vnp.vnp_config("cpu" if device is None else "cuda")
            jobs = []
            for kind in kinds:
                layout.embeddings(kind, shard).parent.mkdir(parents=True, exist_ok=True)
                jobs.append(ShardJob(kind, getattr(config.models, kind), rows[kind], layout.embeddings(kind, shard),
                                     getattr(config, kind), {"sample": sample, "chunk_length": vnp.chunk_length},
                                     tokens=rows[kind].tokens))
            outcomes = run_logging_progress(context.log, embed_shards, jobs, device=device,
                                            cpu_threads=None if device is None else vnp.cpu_threads_per_gpu())

        failed = []
        for kind, outcome in zip(kinds, outcomes, strict=True):
            if isinstance(outcome, Exception):
                context.log.error(f"{kind} shard {shard} of {sample} failed: {outcome}")
                failed.append(outcome)
                continue
            context.log.info(f"{kind}: {outcome.summary()}")
            key = embedding_key(kind)
            yield MaterializeResult(
                asset_key=key,
                metadata={**warn_if_tiny(context, vnp, {kind}), **_stats_metadata(outcome, where),
                          "path": MetadataValue.path(layout.embeddings(kind, shard))},
                check_results=[check for check in shard_check_results(key, layout.embeddings(kind, shard), expected_rows)
                               if AssetCheckKey(key, check.check_name) in context.selected_asset_check_keys],
            )
        if failed:  # the other model's shard is recorded above; this one reruns alone
            raise failed[0]

    return shard_embeddings


def _stats_metadata(stats, where: str) -> dict:
    return {
        "rows": stats.sequences,
        "tokens": stats.tokens,
        "seconds": stats.seconds,
        "tokens_per_s": stats.tokens_per_s,
        "resumed_rows": stats.resumed_from_rows,
        "model_load_seconds": stats.load_seconds,
        "compiled_layers": stats.compiled,
        "device_waited_seconds": stats.waited_seconds,
        "first_pack_seconds": stats.first_pack_seconds,
        "device": where,
        "dtype": stats.dtype,
        "attention_backend": stats.attention_backend,
        "max_tokens": stats.max_tokens,
        "truncated_inputs": stats.truncated,
    }
