"""Blocking checks of an embedding shard, run by the step that wrote it, and the automation that respects them."""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetKey,
    AutomationCondition,
    PartitionsDefinition,
    PreviewWarning,
)

# A new sample flows on by itself: an asset's partition that is still missing runs once its inputs
# are updated and their blocking checks passed (a failed check in an earlier run leaves the
# materialization recorded, so "inputs updated" alone would go on). A manual rerun of an asset does
# not set off everything below it, as eager() would; a new code version (`vnp_assets.versions`: a
# model file replaced) refreshes the assets it changed, top down.
FLOW_ON_AFTER_CHECKS = (
    ((AutomationCondition.missing() & AutomationCondition.any_deps_updated().since_last_handled())
     # A new version runs once its inputs' new versions have run (they change on the same tick).
     | (AutomationCondition.code_version_changed().since_last_handled()
        & ~AutomationCondition.any_deps_match(AutomationCondition.code_version_changed())))
    & ~AutomationCondition.any_deps_missing()
    & ~AutomationCondition.any_deps_in_progress()
    & ~AutomationCondition.in_progress()
    # Not `all_deps_blocking_checks_passed()`: it maps the shards that passed to the sample, so one
    # passed shard would let the merge go on past a failed one. Any shard whose blocking check has
    # not passed maps to its sample and holds it back.
    & ~AutomationCondition.any_deps_match(AutomationCondition.any_checks_match(
        ~(AutomationCondition.check_passed() | AutomationCondition.will_be_requested()), blocking_only=True))
).with_label("new partitions and new code versions, after upstream checks pass")


def partitioned_check(name: str, asset: AssetKey | str, partitions_def: PartitionsDefinition,
                      description: str) -> AssetCheckSpec:
    """A blocking check with a result per partition of its asset (a preview feature of dagster 1.13)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PreviewWarning)
        return AssetCheckSpec(name, asset=asset, blocking=True, partitions_def=partitions_def, description=description)


def shard_check_specs(asset_key: AssetKey, partitions_def: PartitionsDefinition) -> list[AssetCheckSpec]:
    return [
        partitioned_check("embeddings_finite", asset_key, partitions_def, "No NaN or Inf in any vector."),
        partitioned_check("rows_match_index", asset_key, partitions_def,
                          "One row per kept frame of this shard in the sequence index."),
        partitioned_check("ids_unique", asset_key, partitions_def, "No id appears twice."),
    ]


def shard_check_results(asset_key: AssetKey, path: Path, expected_rows: int) -> list[AssetCheckResult]:
    """Reads the written shard back: what is checked is the file downstream steps will read."""
    from vnp_core.store import describe_ids, nonfinite_rows, read_ids

    ids = read_ids(path)
    nonfinite = [ids[row] for row in nonfinite_rows(path)]
    duplicated = [record_id for record_id, count in Counter(ids).items() if count > 1]
    return [
        AssetCheckResult(asset_key=asset_key, check_name="embeddings_finite", passed=not nonfinite,
                         metadata={"nonfinite_rows": len(nonfinite), "examples": describe_ids(nonfinite)}),
        AssetCheckResult(asset_key=asset_key, check_name="rows_match_index", passed=len(ids) == expected_rows,
                         metadata={"rows": len(ids), "index_rows": expected_rows}),
        AssetCheckResult(asset_key=asset_key, check_name="ids_unique", passed=not duplicated,
                         metadata={"duplicated_ids": len(duplicated), "examples": describe_ids(duplicated)}),
    ]

