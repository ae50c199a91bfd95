"""`sequence_index`: VirNucPro prep of a sample's FASTA, and the Parquet index the GPU steps read."""

from dagster import AssetExecutionContext, Failure, MaterializeResult, MetadataValue, asset

from vnp_assets.metadata import markdown_table, warn_if_tiny
from vnp_assets.partitions import samples_partitions
from vnp_assets.resources import ModelSet, SampleProcessing, SampleStorage


@asset(partitions_def=samples_partitions, group_name="prep", kinds={"parquet"})
def sequence_index(context: AssetExecutionContext, storage: SampleStorage, processing: SampleProcessing,
                   models: ModelSet) -> MaterializeResult:
    """Chunks, six-frame translates and keeps stop-free frames (the three VirNucPro files), then indexes the kept frames."""
    from vnp_core.index import build_index, index_summary, write_index
    from vnp_core.models.dnabert_s import DnabertSTokenizer
    from vnp_core.prep import prepare_fasta

    layout = storage.layout(context.partition_key)
    if not layout.input_sha256.exists():
        # A partition added by hand in the UI has no file: samples come from the inbox or `vnp run`.
        raise Failure(f"sample {context.partition_key!r} has no FASTA: drop the file into {storage.inbox_dir} "
                      "(or use `vnp run FILE`); a partition added by hand does not bring one", allow_retries=False)
    prep_config = processing.prep_config()
    prep = prepare_fasta(layout.input_fasta, layout.prep_dir, prep_config)
    dnabert_s_tokenizer = DnabertSTokenizer(models.paths(prep_config.chunk_length).embedders["dnabert_s"] / "tokenizer.json")
    index = build_index(prep.frames, num_shards=prep_config.num_shards, dnabert_tokenizer=dnabert_s_tokenizer)
    write_index(index, layout.index, dnabert_tokenizer=dnabert_s_tokenizer, chunk_length=prep_config.chunk_length)
    summary = index_summary(index)
    for bad in prep.skipped_records:
        context.log.warning(f"{layout.input_fasta} line {bad.line}: skipped record {bad.id!r}: {bad.problem}")
    return MaterializeResult(metadata={
        **warn_if_tiny(context, models, {"dnabert_s"}),
        "records": prep.records,
        "skipped_records": len(prep.skipped_records),
        "chunks": prep.chunks,
        "chunks_without_kept_frame": prep.chunks_without_kept_frame,
        "kept_frames": prep.kept_frames,
        "esm2_tokens": summary["esm2_tokens"],
        "dnabert_s_tokens": summary["dnabert_s_tokens"],
        "shards": markdown_table(summary["shards"]),
        "protein_lengths": markdown_table(summary["lengths"]),
        "index": MetadataValue.path(layout.index),
        "prep_files": MetadataValue.md("\n".join(
            f"- `{path}`" for path in (prep.chunked_fasta, prep.nucleotide_fasta, prep.protein_fasta))),
    })
