"""Metadata a person reads in the Dagster UI: tables as Markdown, the tiny-model warning."""

from __future__ import annotations

import polars as pl
from dagster import AssetExecutionContext, MetadataValue

from vnp_assets.resources import ModelSet


def markdown_table(table: pl.DataFrame) -> MetadataValue:
    with pl.Config(tbl_formatting="MARKDOWN", tbl_hide_column_data_types=True, tbl_hide_dataframe_shape=True,
                   tbl_rows=-1, tbl_cols=-1, fmt_str_lengths=200):
        return MetadataValue.md(str(table))


def warn_if_tiny(context: AssetExecutionContext, models: ModelSet, used: set[str]) -> dict[str, MetadataValue]:
    """Logs, and returns as metadata, which of the `used` models are tiny placeholders (nothing when none)."""
    from vnp_core.tiny_models import TINY_MODELS_NOTICE

    tiny = sorted(used.intersection(models.tiny_models_used()))
    if not tiny:
        return {}
    warning = f"{', '.join(tiny)}: {TINY_MODELS_NOTICE}"
    context.log.warning(warning)
    return {"placeholder_models": MetadataValue.text(warning)}
