"""`esm2_embeddings` and `dnabert_s_embeddings`: one shard of a sample, one model, one leased GPU.

The step leases a GPU among every run on the host (a flock under `gpu_lock_dir`), then runs the
model in a fresh process bound to that physical GPU. On a host without GPUs it runs on the CPU.
"""

import polars as pl
from dagster import (
    AssetDep,
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    MaterializeResult,
    MetadataValue,
    MultiPartitionsDefinition,
    asset,
)

from vnp_assets.assets.sequence_index import sequence_index
from vnp_assets.checks import EAGER_AFTER_CHECKS, shard_check_results, shard_check_specs
from vnp_assets.metadata import warn_if_tiny
from vnp_assets.partitions import by_sample
from vnp_assets.progress import run_logging_progress
from vnp_assets.resources import VnpSettings
# What the device process runs; it lives in vnp_core so that process imports no Dagster.
from vnp_core.engine import embed_shard

# Which index column each model embeds.
MODEL_INPUT = {"esm2": "protein", "dnabert_s": "nucleotide"}


def build_embedding_asset(kind: str, partitions_def: MultiPartitionsDefinition) -> AssetsDefinition:
    key = AssetKey(f"{kind}_embeddings")

    @asset(
        key=key,
        partitions_def=partitions_def,
        deps=[AssetDep(sequence_index, partition_mapping=by_sample)],
        pool="gpu",
        check_specs=shard_check_specs(key),
        automation_condition=EAGER_AFTER_CHECKS,
        kinds={"pytorch", "hdf5"},
        description=f"{kind} embeddings of one shard of a sample's kept frames (HDF5), on one leased GPU.",
    )
    def embeddings(context: AssetExecutionContext, vnp: VnpSettings) -> MaterializeResult:
        from vnp_core.index import read_index

        sample, shard = context.partition_key.keys_by_dimension["sample"], int(context.partition_key.keys_by_dimension["shard"])
        layout = vnp.sample_layout(sample)
        rows = read_index(layout.index).filter(pl.col("shard") == shard)
        out = layout.embeddings(kind, shard)
        out.parent.mkdir(parents=True, exist_ok=True)
        with vnp.gpu_lease() as device:
            where = "cpu" if device is None else f"GPU {device}"
            context.log.info(f"{kind} shard {shard} of {sample}: {rows.height:,} sequences on {where}")
            config = vnp.vnp_config("cpu" if device is None else "cuda")
            stats = run_logging_progress(
                context.log, embed_shard, kind, getattr(config.models, kind), rows["frame_id"].to_list(),
                rows[MODEL_INPUT[kind]].to_list(), out, getattr(config, kind),
                {"sample": sample, "chunk_length": vnp.chunk_length}, device=device)
        context.log.info(stats.summary())
        return MaterializeResult(
            metadata={
                **warn_if_tiny(context, vnp, {kind}),
                "rows": stats.sequences,
                "tokens": stats.tokens,
                "seconds": stats.seconds,
                "tokens_per_s": stats.tokens_per_s,
                "resumed_rows": stats.resumed_from_rows,
                "model_load_seconds": stats.load_seconds,
                "first_pack_seconds": stats.first_pack_seconds,
                "device": where,
                "dtype": stats.dtype,
                "attention_backend": stats.attention_backend,
                "max_tokens": stats.max_tokens,
                "truncated_inputs": stats.truncated,
                "path": MetadataValue.path(out),
            },
            check_results=shard_check_results(out, expected_rows=rows.height),
        )

    return embeddings
