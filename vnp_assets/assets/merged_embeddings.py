"""`merged_embeddings`: both models' shards of a sample in one file, in index order, every id exactly once."""

from dagster import AssetDep, AssetExecutionContext, MaterializeResult, MetadataValue, asset

from vnp_assets.checks import EAGER_AFTER_CHECKS
from vnp_assets.partitions import by_sample, samples_partitions
from vnp_assets.resources import VnpSettings

EMBEDDING_ASSETS = ("esm2_embeddings", "dnabert_s_embeddings")


@asset(
    partitions_def=samples_partitions,
    # Every shard of the sample, of both models.
    deps=[AssetDep(key, partition_mapping=by_sample) for key in EMBEDDING_ASSETS],
    automation_condition=EAGER_AFTER_CHECKS,
    kinds={"hdf5"},
)
def merged_embeddings(context: AssetExecutionContext, vnp: VnpSettings) -> MaterializeResult:
    """`ids`, `dnabert_s` and `esm2` per kept frame: the VirNucPro classifier's input."""
    from vnp_core.index import read_index
    from vnp_core.store import merge_sample

    sample = context.partition_key
    layout = vnp.sample_layout(sample)
    shards = range(vnp.shard_count())
    stats = merge_sample(
        read_index(layout.index)["frame_id"].to_list(),
        esm2_shards=[layout.embeddings("esm2", shard) for shard in shards],
        dnabert_s_shards=[layout.embeddings("dnabert_s", shard) for shard in shards],
        out=layout.merged,
        attrs={"sample": sample, "chunk_length": vnp.chunk_length},
    )
    return MaterializeResult(metadata={
        "sequences": stats.sequences,
        "dnabert_s_dim": stats.dnabert_s_dim,
        "esm2_dim": stats.esm2_dim,
        "path": MetadataValue.path(stats.path),
    })
