"""`dnabert_s_embeddings` and `esm2_embeddings`: one shard of a sample, on one leased GPU.

Both assets (one per `vnp_core.models.MODELS` entry) come from one step per shard (a multi-asset):
the step leases a GPU among every run on the host (`GpuPool`), then runs every model in one process bound to that
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
from vnp_assets.checks import FLOW_ON_AFTER_CHECKS, shard_check_results, shard_check_specs
from vnp_assets.metadata import warn_if_tiny
from vnp_assets.partitions import by_sample
from vnp_assets.resources import GpuPool, ModelSet, SampleProcessing, SampleStorage
from vnp_assets.run_liveness import tag_run_with_this_process
# What the device process runs lives in vnp_core, so that process imports no Dagster.
from vnp_core.engine import ShardJob, embed_shards
from vnp_core.index import ShardRows
from vnp_core.models import MODELS


def embedding_key(model: str) -> AssetKey:
    return AssetKey(f"{model}_embeddings")


def build_embedding_assets(partitions_def: MultiPartitionsDefinition) -> AssetsDefinition:
    specs = [
        AssetSpec(
            embedding_key(model),
            deps=[AssetDep(sequence_index, partition_mapping=by_sample)],
            automation_condition=FLOW_ON_AFTER_CHECKS,
            group_name="embeddings",
            kinds={"pytorch", "hdf5"},
            description=f"{model} embeddings of one shard of a sample's kept frames (HDF5), made on one leased GPU.",
        )
        for model in MODELS
    ]

    @multi_asset(
        name="shard_embeddings",
        specs=specs,
        partitions_def=partitions_def,
        can_subset=True,
        pool="gpu",
        check_specs=[spec for model in MODELS for spec in shard_check_specs(embedding_key(model), partitions_def)],
    )
    def shard_embeddings(context: AssetExecutionContext, storage: SampleStorage, processing: SampleProcessing,
                         models: ModelSet, gpus: GpuPool) -> Iterator[MaterializeResult]:
        tag_run_with_this_process(context.instance, context.run.run_id)  # it holds a gpu slot now
        keys = context.partition_key.keys_by_dimension
        sample, shard = keys["sample"], int(keys["shard"])
        selected = [model for model in MODELS if embedding_key(model) in context.selected_asset_keys]
        layout = storage.layout(sample)
        rows = {model: ShardRows(layout.index, shard, MODELS[model].index_column) for model in selected}
        expected_rows = rows[selected[0]].count()
        context.log.info(f"shard {shard} of {sample}: {expected_rows:,} sequences, {' then '.join(selected)}")
        paths = models.paths(processing.chunk_length)
        config = models.embed_config(gpus.torch_device)
        jobs = []
        for model in selected:
            layout.embeddings(model, shard).parent.mkdir(parents=True, exist_ok=True)
            jobs.append(ShardJob(model, paths.embedders[model], rows[model], layout.embeddings(model, shard), config,
                                 {"sample": sample, "chunk_length": processing.chunk_length}, tokens=rows[model].tokens,
                                 cache_dir=storage.cache_dir))
        outcomes, where = gpus.run_on_gpu(embed_shards, jobs, log=context.log, with_progress=True,
                                          label=f"shard {shard} of {sample}")

        failed = []
        for model, outcome in zip(selected, outcomes, strict=True):
            if isinstance(outcome, Exception):
                context.log.error(f"{model} shard {shard} of {sample} failed: {outcome}")
                failed.append(outcome)
                continue
            context.log.info(f"{model}: {outcome.summary()}")
            key = embedding_key(model)
            yield MaterializeResult(
                asset_key=key,
                metadata={**warn_if_tiny(context, models, {model}), **_stats_metadata(outcome, where),
                          "path": MetadataValue.path(layout.embeddings(model, shard))},
                check_results=[check for check in shard_check_results(key, layout.embeddings(model, shard), expected_rows)
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
        "rows_from_store": stats.rows_from_cache,
        "rows_embedded": stats.sequences - stats.rows_from_cache - stats.resumed_from_rows,
        "store_hit_rate": stats.rows_from_cache / max(1, stats.sequences),
        "model_load_seconds": stats.load_seconds,
        "compiled_layers": stats.compiled,
        "device_waited_seconds": stats.waited_seconds,
        "first_pack_seconds": stats.first_pack_seconds,
        **dict(zip(("compiled_graphs_from_cache", "compiled_graphs_anew", "compile_seconds_at_first_pack"),
                   stats.compile_at_first_pack or ())),
        "device": where,
        "dtype": stats.dtype,
        "attention_backend": stats.attention_backend,
        "max_tokens": stats.max_tokens,
        "truncated_inputs": stats.truncated,
    }
