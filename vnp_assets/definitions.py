"""The code location. The environment is read here and nowhere else:

- `DAGSTER_HOME` (Dagster's own; default `./vnp_home`): samples go to `$DAGSTER_HOME/storage`, the
  inbox is `$DAGSTER_HOME/inbox`.
- `VNP_SETTINGS` (optional): a YAML file of `VnpSettings` fields that override those defaults, e.g.
  on a GPU host `{esm2_model: /models/esm2_t36_3B_UR50D.pt, dnabert_s_model: /models/DNABERT-S,
  classifier: /models/500_model.pth, devices: [2, 3]}`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import yaml
from dagster import AssetSelection, AutomationConditionSensorDefinition, DefaultSensorStatus, Definitions

from vnp_assets.assets import build_assets
from vnp_assets.resources import VnpSettings
from vnp_assets.sensors import fasta_inbox_sensor

# Evaluates the assets' `AutomationCondition.eager()`, so a sample flows on by itself after its index.
automation_sensor = AutomationConditionSensorDefinition(
    "vnp_automation", target=AssetSelection.all(), default_status=DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30)


def settings_from_environment(environ: Mapping[str, str] = os.environ) -> VnpSettings:
    home = Path(environ.get("DAGSTER_HOME", "vnp_home")).resolve()
    overrides = yaml.safe_load(Path(environ["VNP_SETTINGS"]).read_text()) if "VNP_SETTINGS" in environ else {}
    return VnpSettings(**{"storage_root": str(home / "storage"), "inbox_dir": str(home / "inbox"), **overrides})


def build_definitions(settings: VnpSettings) -> Definitions:
    settings = settings.with_fixed_shard_count()  # the shard count shapes the partitions
    return Definitions(
        assets=build_assets(settings.num_shards),
        sensors=[fasta_inbox_sensor, automation_sensor],
        resources={"vnp": settings},
    )


defs = build_definitions(settings_from_environment())
