"""Reduced-precision embeddings against the fp32 reference: per-sequence comparison and the report.

The callers embed a length-stratified subset twice (production dtype and packing, and the model's
fp32 reference path) and hand both here; this module holds no model code.
Thresholds (../shared/spec/esm2-packed.md): cosine >= `min_cosine_p99` for at least 99% of the
sequences and >= `min_cosine_all` for every one; any NaN/Inf fails.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from vnp_core.atomic import atomic_path
from vnp_core.config import EmbedConfig, ModelPaths, ValidationConfig

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

REPORT_FILE = "validation_report.json"
PER_SEQUENCE_FILE = "validation_per_sequence.parquet"
HISTOGRAM_FILE = "validation_cosine_histogram.png"

P99_FRACTION = 0.99  # the share of sequences that must reach `min_cosine_p99`
LENGTH_BINS = 10  # deciles of length: short and long sequences are both represented
WORST_IDS_SHOWN = 10


def select_validation_subset(lengths: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Row positions (sorted) of a deterministic, length-stratified subset of `size` rows.

    Rows are ranked by length and cut into equal-count bins (quantiles); each bin gives the same
    number of rows (the first bins one more when `size` does not divide), drawn with a seeded
    generator. Every row when there are no more than `size`.
    """
    if size < 1:
        raise ValueError(f"validation subset size must be positive, got {size}")
    lengths = np.asarray(lengths)
    if len(lengths) <= size:
        return np.arange(len(lengths))
    rng = np.random.default_rng(seed)
    bins = np.array_split(np.argsort(lengths, kind="stable"), min(size, LENGTH_BINS))
    draws = np.array_split(np.arange(size), len(bins))
    # Both splits put their larger parts first, and len(lengths) > size, so no bin is overdrawn.
    chosen = [rng.choice(rows, size=len(draw), replace=False) for rows, draw in zip(bins, draws, strict=True)]
    return np.sort(np.concatenate(chosen))


def select_validation_chunks(index: pl.DataFrame, size: int, seed: int) -> np.ndarray:
    """Row positions (sorted) of whole chunks, about `size` rows: `select_validation_subset` over the
    chunks, ranked by their longest protein. Whole chunks, because a chunk's VirNucPro call takes
    the scores of all its frames, and the report compares the calls too."""
    if size < 1:
        raise ValueError(f"validation subset size must be positive, got {size}")
    chunks = (index.with_row_index("row").group_by("record_id", "chunk_index", maintain_order=True)
              .agg("row", pl.col("protein_length").max()))
    frames_per_chunk = len(index) / max(1, len(chunks))
    chosen = select_validation_subset(chunks["protein_length"].to_numpy(), max(1, round(size / frames_per_chunk)), seed)
    return np.sort(chunks["row"].gather(chosen).explode().to_numpy().astype(np.int64))


# What `reference_embeddings` imports: a spare device process can import them ahead.
REFERENCE_MODULES = ("vnp_core.validate", "vnp_core.models", "esm")


def reference_embeddings(models: ModelPaths, sequences: Mapping[str, list[str]], config: EmbedConfig,
                         torch_device: str) -> dict[str, np.ndarray]:
    """Each model's unpacked fp32 reference (`ModelSpec.reference`) of its `sequences[name]`; run in a device process."""
    from vnp_core.models import MODELS

    reference = {}
    for name, spec in MODELS.items():
        start = time.perf_counter()
        reference[name] = spec.reference(models.embedders[name], sequences[name], config, torch_device)
        log.info("%s: fp32 reference of %d sequences (weights loaded and run) in %.1f s", name, len(sequences[name]),
                 time.perf_counter() - start)
    return reference


def compare_embeddings(ids: Sequence[str], production: np.ndarray, reference: np.ndarray) -> pl.DataFrame:
    """Per sequence: `cosine` (float64 arithmetic), `max_abs_diff`, and whether production is non-finite."""
    if production.shape != reference.shape or len(ids) != len(production):
        raise ValueError(f"cannot compare {len(ids)} ids, production {production.shape} and reference {reference.shape}")
    if not np.isfinite(reference).all():
        bad = [ids[i] for i in np.flatnonzero(~np.isfinite(reference).all(axis=1))[:5]]
        raise ValueError(f"the fp32 reference embeddings contain NaN/Inf (e.g. {bad}): the comparison is meaningless")
    production64 = production.astype(np.float64)
    reference64 = reference.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = (production64 * reference64).sum(axis=1) / (
            np.linalg.norm(production64, axis=1) * np.linalg.norm(reference64, axis=1))
    return pl.DataFrame({
        "id": list(ids),
        "cosine": cosine,
        "max_abs_diff": np.abs(production64 - reference64).max(axis=1),
        "production_nonfinite": ~np.isfinite(production).all(axis=1),
    })


def is_fp8(precision: str) -> bool:
    """Whether `LoadedModel.precision` (a shard's `dtype` attribute) names a model run in FP8."""
    from vnp_core.models.fp8 import PRECISION_PREFIX

    return precision.startswith(PRECISION_PREFIX)


@dataclass
class CallAgreement:
    """The VirNucPro chunk calls from the production vectors against those from the fp32 reference vectors."""

    chunks: int
    agreeing: int
    agreement: float  # agreeing / chunks (0 without chunks)
    min_call_agreement: float
    applies: bool  # part of pass/fail: a model ran in FP8
    passed: bool  # agreement >= min_call_agreement (reported either way)
    disagreeing_chunks: list[str]  # the first few


def compare_calls(classifier, frame_ids: Sequence[str], production: Mapping[str, np.ndarray],
                  reference: Mapping[str, np.ndarray], *, chunk_length: int, config: ValidationConfig,
                  applies: bool) -> CallAgreement:
    """Score `frame_ids` (whole chunks) from each set of vectors, given per model in the classifier's
    feature order, and compare the chunk calls (`classify.chunk_calls`)."""
    from vnp_core.classify import chunk_calls, predict

    calls = [chunk_calls(predict(classifier, frame_ids, list(vectors.values()), chunk_length=chunk_length))
             for vectors in (production, reference)]
    joined = calls[0].join(calls[1], on="chunk_id", suffix="_fp32")
    disagreeing = joined.filter(pl.col("is_virus") != pl.col("is_virus_fp32"))["chunk_id"]
    agreement = 1 - len(disagreeing) / len(joined) if len(joined) else 0.0
    return CallAgreement(chunks=len(joined), agreeing=len(joined) - len(disagreeing), agreement=agreement,
                         min_call_agreement=config.min_call_agreement, applies=applies,
                         passed=len(joined) > 0 and agreement >= config.min_call_agreement,
                         disagreeing_chunks=disagreeing.head(WORST_IDS_SHOWN).to_list())


@dataclass
class ValidationReport:
    """One model's comparison. Cosine statistics cover the finite ones (None when there are none)."""

    n_compared: int
    cosine_min: float | None
    cosine_p1: float | None
    cosine_median: float | None
    cosine_mean: float | None
    max_abs_diff: float | None
    nan_inf_count: int  # sequences whose production embedding has a NaN or Inf
    fraction_at_or_above_p99_threshold: float
    min_cosine_all: float
    min_cosine_p99: float
    passed: bool
    worst_ids: list[str]  # lowest cosine first (NaN/Inf first of all), only those below min_cosine_p99

    @classmethod
    def from_comparison(cls, comparison: pl.DataFrame, config: ValidationConfig, fp8: bool = False) -> ValidationReport:
        """Held to FP8's thresholds when `fp8`, to the half-precision ones otherwise."""
        if fp8:
            config = replace(config, min_cosine_all=config.fp8_min_cosine_all, min_cosine_p99=config.fp8_min_cosine_p99)
        cosine = comparison["cosine"].to_numpy()
        max_abs_diff = comparison["max_abs_diff"].to_numpy()
        finite = cosine[np.isfinite(cosine)]
        nan_inf_count = int(comparison["production_nonfinite"].sum())
        # In numpy NaN compares False: a sequence without a finite cosine never reaches a threshold.
        fraction = float(np.mean(cosine >= config.min_cosine_p99)) if len(cosine) else 0.0
        passed = (len(cosine) > 0 and len(finite) == len(cosine) and nan_inf_count == 0
                  and finite.min() >= config.min_cosine_all and fraction >= P99_FRACTION)
        below = np.flatnonzero(~(cosine >= config.min_cosine_p99))
        worst = below[np.argsort(np.nan_to_num(cosine[below], nan=-np.inf), kind="stable")][:WORST_IDS_SHOWN]
        return cls(
            n_compared=len(cosine),
            cosine_min=_stat(finite, np.min),
            cosine_p1=_stat(finite, lambda values: np.percentile(values, 1)),
            cosine_median=_stat(finite, np.median),
            cosine_mean=_stat(finite, np.mean),
            max_abs_diff=_stat(max_abs_diff[np.isfinite(max_abs_diff)], np.max),
            nan_inf_count=nan_inf_count,
            fraction_at_or_above_p99_threshold=fraction,
            min_cosine_all=config.min_cosine_all,
            min_cosine_p99=config.min_cosine_p99,
            passed=bool(passed),
            worst_ids=comparison["id"].gather(worst).to_list(),
        )


def _stat(finite_values: np.ndarray, statistic) -> float | None:
    return float(statistic(finite_values)) if len(finite_values) else None


def build_report(per_model: dict[str, pl.DataFrame], config: ValidationConfig, context: dict,
                 precision: Mapping[str, str] | None = None, calls: CallAgreement | None = None) -> dict:
    """The JSON-serialisable report: pass/fail, `context` as given (device, dtype, back end...), per
    model (each held to the thresholds of its `precision`), and the chunk calls' agreement if given."""
    precision = precision or {}
    models = {name: ValidationReport.from_comparison(comparison, config, is_fp8(precision.get(name, "")))
              for name, comparison in per_model.items()}
    passed = bool(models) and all(report.passed for report in models.values())
    return {
        "passed": passed and (calls is None or not calls.applies or calls.passed),
        "context": context,
        "models": {name: asdict(report) for name, report in models.items()},
        **({"calls": asdict(calls)} if calls is not None else {}),
    }


def what_failed(report: dict) -> str:
    """The report's failed criteria in one line, e.g. "esm2: lowest cosine 0.9812 (>= 0.99 needed)"."""
    failed = []
    for name, model in report["models"].items():
        if model["nan_inf_count"]:
            failed.append(f"{name}: {model['nan_inf_count']} vectors with NaN/Inf")
        if model["cosine_min"] is not None and model["cosine_min"] < model["min_cosine_all"]:
            failed.append(f"{name}: lowest cosine {model['cosine_min']:.4f} (>= {model['min_cosine_all']} needed)")
        if model["fraction_at_or_above_p99_threshold"] < P99_FRACTION:
            failed.append(f"{name}: {model['fraction_at_or_above_p99_threshold']:.1%} of cosines >= {model['min_cosine_p99']} "
                          f"({P99_FRACTION:.0%} needed)")
    if (calls := report.get("calls")) and calls["applies"] and not calls["passed"]:
        failed.append(f"chunk calls: {calls['agreement']:.1%} as from fp32 ({calls['min_call_agreement']:.1%} needed)")
    return "; ".join(failed) or ("nothing was compared" if not report["passed"] else "")


def report_markdown(report: dict) -> str:
    """A short Markdown summary for the Dagster UI."""
    lines = [f"**{'PASSED' if report['passed'] else 'FAILED'}**: {_what_was_compared(report['context'])}", ""]
    lines += [f"- {key}: {value}" for key, value in report["context"].items()]
    lines += ["", "| model | n | min | p1 | median | mean | max abs diff | NaN/Inf | >= p99 threshold | result |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, model in report["models"].items():
        cosines = [_fmt(model[key]) for key in ("cosine_min", "cosine_p1", "cosine_median", "cosine_mean")]
        lines.append(f"| {name} | {model['n_compared']} | {' | '.join(cosines)} | {_fmt(model['max_abs_diff'], '.3g')} "
                     f"| {model['nan_inf_count']} | {model['fraction_at_or_above_p99_threshold']:.2%} "
                     f"| {'pass' if model['passed'] else 'FAIL'} |")
    thresholds = {(model["min_cosine_all"], model["min_cosine_p99"]): name for name, model in report["models"].items()}
    lines.append("")
    for (min_all, min_p99), name in thresholds.items():
        which = f" ({name})" if len(thresholds) > 1 else ""
        lines.append(f"Thresholds{which}: every cosine >= {min_all}, at least {P99_FRACTION:.0%} >= {min_p99}; no NaN/Inf.")
    if calls := report.get("calls"):
        lines.append(f"VirNucPro calls: {calls['agreeing']} of {calls['chunks']} chunks ({calls['agreement']:.2%}) called "
                     f"as from the fp32 vectors; " + (f"FP8 needs >= {calls['min_call_agreement']:.1%}: "
                     f"{'pass' if calls['passed'] else 'FAIL'}." if calls["applies"] else "reported only (no model in FP8)."))
    lines += [f"- worst {name}: {', '.join(model['worst_ids'])}"
              for name, model in report["models"].items() if model["worst_ids"]]
    if report.get("calls", {}).get("disagreeing_chunks"):
        lines.append(f"- chunks called otherwise: {', '.join(report['calls']['disagreeing_chunks'])}")
    return "\n".join(lines) + "\n"


def _what_was_compared(context: dict) -> str:
    """Honest on the CPU, where production already runs in fp32: then only the packing is under test."""
    dtypes = sorted({value for key, value in context.items() if key.endswith(".dtype")})
    if dtypes == ["float32"]:
        return "packed fp32 production vs the unpacked fp32 reference (no reduced precision to validate)"
    return f"packed {'/'.join(dtypes) or 'production'} embeddings vs the unpacked fp32 reference"


def _fmt(value: float | None, spec: str = ".6f") -> str:
    return "n/a" if value is None else format(value, spec)


def write_report(report: dict, per_model: dict[str, pl.DataFrame], out_dir: Path) -> dict[str, Path]:
    """`validation_report.json`, the per-sequence Parquet (with a `model` column) and the cosine histogram."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"report": out_dir / REPORT_FILE, "per_sequence": out_dir / PER_SEQUENCE_FILE,
             "histogram": out_dir / HISTOGRAM_FILE}
    with atomic_path(paths["report"]) as tmp:
        tmp.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    with atomic_path(paths["per_sequence"]) as tmp:
        pl.concat([comparison.with_columns(model=pl.lit(name)) for name, comparison in per_model.items()]
                  ).select("model", pl.exclude("model")).write_parquet(tmp)
    with atomic_path(paths["histogram"]) as tmp:
        _cosine_histogram(report, per_model).savefig(tmp, format="png", dpi=120)
    return paths


def _cosine_histogram(report: dict, per_model: dict[str, pl.DataFrame]) -> Figure:
    """Histogram of 1 - cosine on a log axis, where 0.999 and 0.9999 are a decade apart."""
    floor = 1e-9  # identical vectors (1 - cosine <= 0) are drawn in the first bin
    edges = np.logspace(np.log10(floor), 0, 10 * 9 + 1)  # ten bins a decade
    from matplotlib.figure import Figure  # here only: the reference's device process needs no plotting

    figure = Figure(figsize=(7, 4), layout="constrained")
    axes = figure.subplots()
    for name, comparison in per_model.items():
        cosine = comparison["cosine"].to_numpy()
        distance = np.clip(1.0 - cosine[np.isfinite(cosine)], floor, 1.0)
        axes.hist(distance, bins=edges, histtype="step", linewidth=1.5, label=f"{name} (n={len(cosine)})")
    thresholds: dict[tuple[float, float], list[str]] = {}  # FP8's differ from fp16's
    for name, model in report["models"].items():
        thresholds.setdefault((model["min_cosine_p99"], model["min_cosine_all"]), []).append(name)
    models = list(report["models"])
    for (min_p99, min_all), names in thresholds.items():
        # One set: grey and black; several: each in its (first) model's histogram colour.
        which, p99_colour, all_colour = ((f"{', '.join(names)}: ", *[f"C{models.index(names[0])}"] * 2)
                                         if len(thresholds) > 1 else ("", "0.4", "black"))
        axes.axvline(1 - min_p99, color=p99_colour, linestyle="--", label=f"{which}cosine {min_p99} ({P99_FRACTION:.0%} must be left of it)")
        axes.axvline(1 - min_all, color=all_colour, linestyle=":", label=f"{which}cosine {min_all} (all must be left of it)")
    axes.set_xscale("log")
    axes.set_xlabel("1 - cosine similarity (production vs fp32 reference)")
    axes.set_ylabel("sequences")
    axes.set_title(f"Embedding agreement: {'PASSED' if report['passed'] else 'FAILED'}")
    axes.legend(fontsize="small")
    return figure
