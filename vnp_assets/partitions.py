"""Partitions: one key per sample, and sample x shard for the GPU steps.

Dagster allows two dimensions, so the two models are separate assets rather than a third dimension.
The shard count is fixed when definitions load (see `definitions.build_definitions`).
"""

import warnings

from dagster import (
    BetaWarning,
    DynamicPartitionsDefinition,
    MultiPartitionKey,
    MultiPartitionsDefinition,
    MultiToSingleDimensionPartitionMapping,
    StaticPartitionsDefinition,
)

samples_partitions = DynamicPartitionsDefinition(name="samples")

# Maps a sample to all of its shards and a shard to its sample (Dagster marks this mapping beta).
with warnings.catch_warnings():
    warnings.simplefilter("ignore", BetaWarning)
    by_sample = MultiToSingleDimensionPartitionMapping(partition_dimension_name="sample")


def sample_shard_partitions(num_shards: int) -> MultiPartitionsDefinition:
    shards = StaticPartitionsDefinition([str(shard) for shard in range(num_shards)])
    return MultiPartitionsDefinition({"sample": samples_partitions, "shard": shards})


def sample_shard_key(sample: str, shard: int) -> MultiPartitionKey:
    return MultiPartitionKey({"sample": sample, "shard": str(shard)})
