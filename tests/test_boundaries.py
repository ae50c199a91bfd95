"""The library never reaches the Dagster layer: `vnp_core` imports no Dagster and no `vnp_assets`."""

from __future__ import annotations

import json
import subprocess
import sys


def test_importing_every_core_module_loads_no_dagster_and_no_asset_layer() -> None:
    # A fresh interpreter: this test session has imported Dagster already.
    program = (
        "import importlib, json, pkgutil, sys, vnp_core\n"
        "for module in pkgutil.walk_packages(vnp_core.__path__, 'vnp_core.'):\n"
        "    importlib.import_module(module.name)\n"
        "print(json.dumps(sorted(name for name in sys.modules if name.split('.')[0] in ('dagster', 'vnp_assets'))))\n"
    )
    found = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(found.stdout.splitlines()[-1]) == []
