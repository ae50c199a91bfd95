"""The asset graph, per sample: sequence_index -> {dnabert_s, esm2}_embeddings (one step per shard) ->
merged_embeddings -> fp16_validation_report -> virnucpro_predictions."""

from dagster import AssetsDefinition

from vnp_assets.assets.embeddings import build_embedding_assets
from vnp_assets.assets.fp16_validation_report import fp16_validation_report
from vnp_assets.assets.merged_embeddings import merged_embeddings
from vnp_assets.assets.sequence_index import sequence_index
from vnp_assets.assets.virnucpro_predictions import virnucpro_predictions
from vnp_assets.partitions import sample_shard_partitions


def build_assets(num_shards: int) -> list[AssetsDefinition]:
    """Every asset; the GPU step (both models' embeddings) is partitioned by sample x `num_shards` shards."""
    return [sequence_index, build_embedding_assets(sample_shard_partitions(num_shards)), merged_embeddings,
            fp16_validation_report, virnucpro_predictions]
