"""`vnp`: the command line. Each command builds the typed config and calls the library.

`vnp run` goes through the Dagster asset graph; it imports `vnp_assets` lazily so that the rest of
this library (and every other command) works without importing Dagster.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from vnp_core.config import EmbedConfig, PrepConfig

app = typer.Typer(help="vnp: VirNucPro features with packed FP16 ESM-2 and DNABERT-S on every GPU.", no_args_is_help=True)
embed_app = typer.Typer(help="Embed sequences with one model into an HDF5 file.", no_args_is_help=True)
models_app = typer.Typer(help="Model utilities.", no_args_is_help=True)
app.add_typer(embed_app, name="embed")
app.add_typer(models_app, name="models")


def _fail(error: Exception) -> None:
    typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=1)


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level.")] = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@app.command()
def prep(
    input: Annotated[Path, typer.Argument(help="FASTA or gzipped FASTA of reads or contigs.")],
    out_dir: Annotated[Path, typer.Option("--out-dir", help="Where the three VirNucPro files are written.")],
    chunk_length: Annotated[int, typer.Option("--chunk-length", help="300 or 500: must match the classifier.")] = 500,
    skip_bad_records: Annotated[bool, typer.Option("--skip-bad-records", help="Skip (and count) malformed records instead of failing.")] = False,
) -> None:
    """Chunk, six-frame translate and keep stop-free frames, exactly as VirNucPro does."""
    from vnp_core.fasta import FastaError
    from vnp_core.prep import prepare_fasta

    try:
        result = prepare_fasta(input, out_dir, PrepConfig(chunk_length=chunk_length, skip_bad_records=skip_bad_records))
    except (FastaError, ValueError) as error:
        _fail(error)
    typer.echo(result.summary())


def _embed(kind: str, input: Path, model: Path, out: Path, **options) -> None:
    """`options`: the `EmbedConfig` fields the command sets; a bad value (e.g. --dtype) is a clean error."""
    from vnp_core.engine import embed_fasta_to_hdf5
    from vnp_core.fasta import FastaError

    try:
        config = EmbedConfig(**options)
        stats = embed_fasta_to_hdf5(kind, input, model, out, config, show_progress=True)
    except (FastaError, ValueError, FileNotFoundError) as error:
        _fail(error)
    typer.echo(stats.summary())


_DEVICE = typer.Option("--device", help="cpu, cuda or cuda:N.")
_DTYPE = typer.Option("--dtype", help="float32, float16 or bfloat16.")
_MAX_TOKENS = typer.Option("--max-tokens", help="Token budget of one pack (default: sized from free device memory).")
_BACKEND = typer.Option("--attention", help="auto, flash_attn, torch_varlen, sdpa_padded, sdpa_reference or flex.")
_COMPILE = typer.Option("--compile/--no-compile", help="torch.compile each layer on CUDA (faster; first pack pays the compile).")
_WORKERS = typer.Option("--workers", help="CPU processes that tokenise before the device loop (0: none).")


@embed_app.command("esm2")
def embed_esm2(
    input: Annotated[Path, typer.Argument(help="Protein FASTA (e.g. *_identified_protein.faa).")],
    model: Annotated[Path, typer.Option("--model", help="fair-esm .pt checkpoint, or a Hugging Face facebook/esm2_* directory.")],
    out: Annotated[Path, typer.Option("--out", help="Output HDF5 file.")],
    device: Annotated[str, _DEVICE] = "cpu",
    dtype: Annotated[str, _DTYPE] = "float32",
    max_tokens: Annotated[Optional[int], _MAX_TOKENS] = None,
    max_protein_length: Annotated[int, typer.Option("--max-protein-length", help="Longer proteins keep their first N residues.")] = 1022,
    attention: Annotated[str, _BACKEND] = "auto",
    workers: Annotated[int, _WORKERS] = 0,
    compile_layers: Annotated[bool, _COMPILE] = True,
) -> None:
    """Mean-pooled last-layer ESM-2 embeddings (residues only) of every protein."""
    _embed("esm2", input, model, out, device=device, dtype=dtype, max_tokens=max_tokens,
           max_protein_length=max_protein_length, attention_backend=attention, num_workers=workers,
           compile_layers=compile_layers)


@embed_app.command("dnabert-s")
def embed_dnabert_s(
    input: Annotated[Path, typer.Argument(help="Nucleotide FASTA (e.g. *_identified_nucleotide.fa).")],
    model: Annotated[Path, typer.Option("--model", help="Local Hugging Face DNABERT-S directory.")],
    out: Annotated[Path, typer.Option("--out", help="Output HDF5 file.")],
    device: Annotated[str, _DEVICE] = "cpu",
    dtype: Annotated[str, _DTYPE] = "float32",
    max_tokens: Annotated[Optional[int], _MAX_TOKENS] = None,
    attention: Annotated[str, _BACKEND] = "auto",
    workers: Annotated[int, _WORKERS] = 0,
    compile_layers: Annotated[bool, _COMPILE] = True,
) -> None:
    """Mean-pooled DNABERT-S embeddings (all tokens, [CLS] and [SEP] included) of every sequence."""
    _embed("dnabert_s", input, model, out, device=device, dtype=dtype, max_tokens=max_tokens,
           attention_backend=attention, num_workers=workers, compile_layers=compile_layers)


@models_app.command("make-tiny")
def make_tiny(out: Annotated[Path, typer.Option("--out", help="Directory for the tiny models.")]) -> None:
    """Write tiny random models in the real checkpoint formats (placeholders with no biological meaning)."""
    from vnp_core.tiny_models import write_tiny_models

    for name, path in write_tiny_models(out).items():
        typer.echo(f"{name}: {path}")
    typer.echo("These tiny models are random placeholders: their outputs have no biological meaning.")


@app.command("export-pt")
def export_pt(
    merged: Annotated[Path, typer.Argument(help="A sample's merged embeddings HDF5.")],
    out: Annotated[Path, typer.Option("--out", help="Output .pt in the original tool's layout.")],
) -> None:
    """Write merged features as the original `{"ids": [...], "data": FloatTensor[N, 3328]}` .pt file."""
    from vnp_core.store import export_merged_to_pt

    try:
        export_merged_to_pt(merged, out)
    except (ValueError, OSError) as error:  # h5py reports a missing or non-HDF5 file as OSError
        _fail(error)
    typer.echo(str(out))


@app.command()
def run(
    input: Annotated[Path, typer.Argument(help="FASTA or gzipped FASTA of one sample.")],
    chunk_length: Annotated[int, typer.Option("--chunk-length", help="300 or 500.")] = 500,
    shards: Annotated[Optional[int], typer.Option("--shards", help="Shards per model (default: the host's GPU count, at least 1).")] = None,
    home: Annotated[Path, typer.Option("--home", help="DAGSTER_HOME and storage root of the local instance.")] = Path("vnp_home"),
    esm2_model: Annotated[Optional[Path], typer.Option("--esm2-model", help="fair-esm .pt or HF directory (default: tiny model).")] = None,
    dnabert_s_model: Annotated[Optional[Path], typer.Option("--dnabert-s-model", help="DNABERT-S directory (default: tiny model).")] = None,
    classifier: Annotated[Optional[Path], typer.Option("--classifier", help="VirNucPro classifier weights (default: tiny model).")] = None,
    trust_classifier_pickle: Annotated[bool, typer.Option("--trust-classifier-pickle", help="Allow a pickled whole-module classifier (runs code from the file).")] = False,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="float16, bfloat16 or float32 (default: float16 on GPU, float32 on CPU).")] = None,
    devices: Annotated[Optional[str], typer.Option("--devices", help="Physical GPU ids to use, e.g. 2,3 (default: every GPU).")] = None,
    until: Annotated[str, typer.Option("--until", help="Stop after this stage: sequence_index, embeddings, merged_embeddings, fp16_validation_report or virnucpro_predictions.")] = "virnucpro_predictions",
) -> None:
    """Materialize one sample through the Dagster asset graph on a local persistent instance."""
    # Dagster only here: the rest of vnp_core never imports it.
    from vnp_assets.run_sample import run_sample

    try:
        gpu_ids = None if devices is None else [int(d) for d in devices.split(",") if d.strip()]
        sample_run = run_sample(input, chunk_length=chunk_length, shards=shards, home=home, esm2_model=esm2_model,
                                dnabert_s_model=dnabert_s_model, classifier=classifier,
                                trust_classifier_pickle=trust_classifier_pickle, dtype=dtype, devices=gpu_ids,
                                until=until)
    except (ValueError, FileNotFoundError) as error:
        _fail(error)
    typer.echo(sample_run.summary())


if __name__ == "__main__":
    app()
