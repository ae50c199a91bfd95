"""`merged_embeddings`: both models' shards of a sample in one file, in index order, every id exactly once."""

from dagster import AssetDep, AssetExecutionContext, MaterializeResult, MetadataValue, asset

from vnp_assets.checks import FLOW_ON_AFTER_CHECKS
from vnp_assets.partitions import by_sample, samples_partitions
from vnp_assets.resources import SampleProcessing, SampleStorage
from vnp_core.models import MODELS


@asset(
    partitions_def=samples_partitions,
    # Every shard of the sample, of every model.
    deps=[AssetDep(f"{model}_embeddings", partition_mapping=by_sample) for model in MODELS],
    automation_condition=FLOW_ON_AFTER_CHECKS,
    group_name="embeddings",
    kinds={"hdf5"},
)
def merged_embeddings(context: AssetExecutionContext, storage: SampleStorage,
                      processing: SampleProcessing) -> MaterializeResult:
    """`ids` and each model's vectors per kept frame: the VirNucPro classifier's input."""
    from vnp_core.index import read_index, read_index_provenance
    from vnp_core.store import merge_sample, read_attrs

    sample = context.partition_key
    layout = storage.layout(sample)
    shards = range(processing.num_shards)
    stats = merge_sample(
        read_index(layout.index)["frame_id"].to_list(),
        {model: [layout.embeddings(model, shard) for shard in shards] for model in MODELS},
        out=layout.merged,
        attrs={"sample": sample, "chunk_length": read_index_provenance(layout.index).chunk_length},
    )
    from_store = {model: int(read_attrs(layout.merged)[f"{model}.rows_from_cache"]) for model in MODELS}
    return MaterializeResult(metadata={
        "sequences": stats.sequences,
        **{f"{model}_dim": dim for model, dim in stats.dims.items()},
        # Per model: rows served by the embedding store (or repeating another row) and the rest, embedded.
        **{f"{model}_rows_from_store": rows for model, rows in from_store.items()},
        **{f"{model}_rows_embedded": stats.sequences - rows for model, rows in from_store.items()},
        **{f"{model}_store_hit_rate": rows / max(1, stats.sequences) for model, rows in from_store.items()},
        "path": MetadataValue.path(stats.path),
    })
