"""The asset graph, per sample: sequence_index -> {dnabert_s, esm2}_embeddings (one step per shard) ->
merged_embeddings -> fp16_validation_report -> virnucpro_predictions."""

from collections.abc import Mapping

from dagster import AssetsDefinition

from vnp_assets.assets.embeddings import build_embedding_assets
from vnp_assets.assets.fp16_validation_report import fp16_validation_report
from vnp_assets.assets.merged_embeddings import merged_embeddings
from vnp_assets.assets.sequence_index import sequence_index
from vnp_assets.assets.virnucpro_predictions import virnucpro_predictions
from vnp_assets.partitions import sample_shard_partitions


def build_assets(num_shards: int, code_versions: Mapping[str, str] | None = None) -> list[AssetsDefinition]:
    """Every asset; the GPU step (every model's embeddings) is partitioned by sample x `num_shards` shards.
    `code_versions`: asset key -> its code version (`vnp_assets.versions`)."""
    assets = [sequence_index, build_embedding_assets(sample_shard_partitions(num_shards)), merged_embeddings,
              fp16_validation_report, virnucpro_predictions]
    if code_versions is None:
        return assets
    return [asset.map_asset_specs(lambda spec: spec.replace_attributes(code_version=code_versions[spec.key.to_user_string()]))
            for asset in assets]
