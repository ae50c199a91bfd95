"""vnp core library: VirNucPro preprocessing, packed ESM-2 / DNABERT-S inference, storage, validation.

Plain library: nothing here imports dagster (the Dagster layer is `vnp_assets`).
"""

__version__ = "0.1.0"
