"""`fp16_validation_report`: a sample's production embeddings against the fp32 reference of each model."""

import base64
import time

from dagster import (
    AssetCheckResult,
    AssetDep,
    AssetExecutionContext,
    MaterializeResult,
    MetadataValue,
    asset,
)

from vnp_assets.checks import FLOW_ON_AFTER_CHECKS, partitioned_check
from vnp_assets.metadata import histogram_thumbnail
from vnp_assets.partitions import by_sample, samples_partitions
from vnp_assets.resources import GpuPool, ModelSet, SampleProcessing, SampleStorage
from vnp_assets.run_liveness import tag_run_with_this_process
from vnp_core.models import MODELS


@asset(
    partitions_def=samples_partitions,
    # The shards, as the merge reads them: the two run side by side, and the calls wait for both.
    deps=[AssetDep(f"{model}_embeddings", partition_mapping=by_sample) for model in MODELS],
    pool="gpu",  # the fp32 reference of a real ESM-2 needs a GPU as much as production does
    check_specs=[partitioned_check("cosine_thresholds", "fp16_validation_report", samples_partitions,
                                   "Every model's embeddings agree with its fp32 reference within the thresholds of its "
                                   "precision; with FP8, the chunk calls agree too.")],
    automation_condition=FLOW_ON_AFTER_CHECKS,
    group_name="validation",
    kinds={"json", "parquet"},
)
def fp16_validation_report(context: AssetExecutionContext, storage: SampleStorage, processing: SampleProcessing,
                           models: ModelSet, gpus: GpuPool) -> MaterializeResult:
    """Whole chunks, length-stratified, recomputed in fp32, unpacked: cosine similarity per sequence,
    the chunks' VirNucPro calls from both sets of vectors, histogram, pass/fail."""
    from vnp_core.classify import load_classifier
    from vnp_core.index import read_index, read_index_provenance
    from vnp_core.store import read_attrs, read_rows
    from vnp_core.validate import (
        build_report,
        compare_calls,
        compare_embeddings,
        is_fp8,
        reference_embeddings,
        report_markdown,
        select_validation_chunks,
        what_failed,
        write_report,
    )

    tag_run_with_this_process(context.instance, context.run.run_id)  # it holds a gpu slot now
    sample = context.partition_key
    layout = storage.layout(sample)
    start = time.perf_counter()
    index = read_index(layout.index)
    validation = processing.validation_config()
    subset = index[select_validation_chunks(index, validation.sample_size, validation.seed)]
    frame_ids = subset["frame_id"].to_list()
    shards = {model: [layout.embeddings(model, shard) for shard in range(processing.num_shards)] for model in MODELS}
    production = {model: read_rows(paths, frame_ids) for model, paths in shards.items()}
    read_seconds = time.perf_counter() - start
    chunk_length = read_index_provenance(layout.index).chunk_length
    paths = models.paths(chunk_length)
    sequences = {name: subset[spec.index_column].to_list() for name, spec in MODELS.items()}
    reference, where = gpus.run_on_gpu(reference_embeddings, paths, sequences, models.embed_config(gpus.torch_device),
                                       gpus.torch_device, log=context.log)
    context.log.info(f"{len(subset):,} rows read from the index and the shards in {read_seconds:.1f} s; "
                     f"their fp32 reference computed in {time.perf_counter() - start - read_seconds:.1f} s")
    per_model = {model: compare_embeddings(frame_ids, production[model], reference[model]) for model in MODELS}
    made_with = {model: read_attrs(paths[0]) for model, paths in shards.items()}
    run_context = {"sample": sample, "reference_device": where,
                   **{f"{model}.{key}": made_with[model][key] for model in MODELS for key in ("dtype", "attention_backend")}}
    precision = {model: made_with[model]["dtype"] for model in MODELS}
    fp8 = any(map(is_fp8, precision.values()))
    try:
        classifier = load_classifier(paths.classifier, trusted_pickle=paths.trust_classifier_pickle)
        calls = compare_calls(classifier, frame_ids, production, reference, chunk_length=chunk_length,
                              config=validation, applies=fp8)
    except ValueError as error:  # a classifier that does not fit: FP8's check needs it, fp16's only reports calls
        if fp8:
            raise
        context.log.warning(f"the chunk calls were not compared: {error}")
        calls = None
    report = build_report(per_model, validation, run_context, precision, calls)
    files = write_report(report, per_model, layout.report_dir)
    histogram = base64.b64encode(files["histogram"].read_bytes()).decode()
    cosines = {f"{model}_{statistic}": MetadataValue.float(value)
               for model, summary in report["models"].items()
               for statistic, value in summary.items() if statistic.startswith("cosine_") and value is not None}
    return MaterializeResult(
        metadata={
            "summary": MetadataValue.md(report_markdown(report)),
            # Shown inline in the UI (Markdown under 1,000 characters is; the full plot is behind a click).
            "cosine_histogram": histogram_thumbnail({model: frame["cosine"].to_numpy() for model, frame in per_model.items()}),
            "histogram": MetadataValue.md(f"![cosine histogram](data:image/png;base64,{histogram})"),
            **cosines,
            "compared": len(subset),
            **({"call_agreement": MetadataValue.float(calls.agreement)} if calls else {}),
            **{f"{name}_file": MetadataValue.path(path) for name, path in files.items()},
        },
        check_results=[AssetCheckResult(check_name="cosine_thresholds", passed=report["passed"], metadata={
            **cosines, **({"call_agreement": calls.agreement} if calls else {}), "missed": what_failed(report) or "nothing"})],
    )
