"""vnp's Dagster layer: partitions, assets, checks and sensors over `vnp_core` (which never imports Dagster)."""
