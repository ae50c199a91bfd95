"""`virnucpro_predictions`: the VirNucPro classifier on a sample's merged features, in the original tool's files."""

from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from vnp_assets.assets.fp16_validation_report import fp16_validation_report
from vnp_assets.assets.merged_embeddings import merged_embeddings
from vnp_assets.checks import FLOW_ON_AFTER_CHECKS
from vnp_assets.metadata import warn_if_tiny
from vnp_assets.partitions import samples_partitions
from vnp_assets.resources import ModelSet, SampleStorage
from vnp_core.models import MODELS


@asset(
    partitions_def=samples_partitions,
    # After the validation report: calls are made only from features whose precision passed its check.
    deps=[merged_embeddings, fp16_validation_report],
    automation_condition=FLOW_ON_AFTER_CHECKS,
    group_name="calls",
    kinds={"pytorch", "parquet"},
)
def virnucpro_predictions(context: AssetExecutionContext, storage: SampleStorage, models: ModelSet) -> MaterializeResult:
    """Per frame P(virus) and P(others); per chunk `Is_Virus` (prediction_results*.txt/csv, and Parquet with coordinates)."""
    from vnp_core.classify import chunk_calls, load_classifier, predict, write_prediction_files
    from vnp_core.index import first_copies, read_index, read_index_provenance
    from vnp_core.store import read_merged

    layout = storage.layout(context.partition_key)
    chunk_length = read_index_provenance(layout.index).chunk_length  # the sample's, not today's setting
    paths = models.paths(chunk_length)
    classifier = load_classifier(paths.classifier, trusted_pickle=paths.trust_classifier_pickle)
    merged = read_merged(layout.merged)
    index = read_index(layout.index)
    # Embedded through the store, every copy of a frame in a sample holds the one stored vector, bit for
    # bit: each is scored once (56% of the frames of 450k reads with 30% copied reads).
    through_store = all(f"{model}.cache_identity" in merged.attrs for model in MODELS)
    frames = predict(classifier, merged.ids, list(merged.vectors.values()), chunk_length=chunk_length,
                     same_as=first_copies(index, merged.ids) if through_store else None)
    chunks = chunk_calls(frames)
    paths = write_prediction_files(frames, chunks, layout.predictions_dir, index=index)
    return MaterializeResult(metadata={
        **warn_if_tiny(context, models, set(models.given())),
        "frames": frames.height,
        "viral_frames": int((frames["prediction"] == "virus").sum()),
        "chunks": chunks.height,
        "viral_chunks": int(chunks["is_virus"].sum()),
        "classifier": MetadataValue.path(classifier.source),
        "classifier_sha256": classifier.weights_sha256,
        "chunk_length": classifier.chunk_length,
        **{name: MetadataValue.path(path) for name, path in paths.items()},
    })
