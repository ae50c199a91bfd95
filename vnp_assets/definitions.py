"""The code location. The environment is read here and nowhere else:

- `DAGSTER_HOME` (Dagster's own; default `./vnp_home`): samples go to `$DAGSTER_HOME/storage`, the
  inbox is `$DAGSTER_HOME/inbox`.
- `VNP_SETTINGS` (optional): a YAML file of settings (the fields of the resources in
  `vnp_assets.resources`) that override those defaults, e.g. on a GPU host `{esm2_model:
  /models/esm2_t36_3B_UR50D.pt, dnabert_s_model: /models/DNABERT-S, classifier: /models/500_model.pth,
  devices: [2, 3]}`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from dagster import Definitions

from vnp_assets.platform import SettingsError, build_definitions, resources_from_settings


def settings_from_environment(environ: Mapping[str, str] = os.environ) -> tuple[dict[str, Any], Path]:
    home = Path(environ.get("DAGSTER_HOME", "vnp_home")).resolve()
    if "VNP_SETTINGS" not in environ:
        return {}, home
    path = Path(environ["VNP_SETTINGS"])
    try:
        settings = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise SettingsError(f"VNP_SETTINGS={path}: not a readable YAML file ({' '.join(str(error).split())})") from error
    if not isinstance(settings, dict):
        raise SettingsError(f"VNP_SETTINGS={path}: expected a mapping of settings, found {type(settings).__name__}")
    return settings, home


def _load() -> Definitions:
    settings, home = settings_from_environment()
    return build_definitions(resources_from_settings(settings, home))


defs = _load()
