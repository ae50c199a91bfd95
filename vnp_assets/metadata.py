"""Metadata a person reads in the Dagster UI: tables as Markdown, the tiny-model warning."""

from __future__ import annotations

import base64
import io

import numpy as np
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


def histogram_thumbnail(cosines: dict[str, np.ndarray], width: int = 240, height: int = 48) -> MetadataValue:
    """A 1-bit PNG of 1 - cosine on a log axis from 1e-9 to 1 (bars: sequences per bin, all models), small
    enough for Dagster to show its Markdown inline; the labelled plot is the report's histogram file."""
    from PIL import Image

    distances = np.concatenate([np.clip(1.0 - c[np.isfinite(c)], 1e-9, 1.0) for c in cosines.values()])
    counts, _ = np.histogram(np.log10(distances), bins=width // 4, range=(-9.0, 0.0))
    bars = np.ceil(height * counts / max(1, counts.max())).astype(int)
    columns = np.repeat(bars, 4)  # 4 pixels a bin
    image = np.arange(height)[::-1, None] < columns[None, :]
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", optimize=True)
    encoded = base64.b64encode(buffer.getvalue()).decode()
    return MetadataValue.md(f"![1 - cosine, log scale 1e-9 to 1](data:image/png;base64,{encoded})")
