"""The inference engine: one loop that drives either model over a shard of sequences.

Data path, top to bottom: tokenise -> plan token-budget packs -> for each pack: pinned host batch
-> asynchronous copy -> packed forward (halved and retried on out of memory) -> finite check on the
device -> results read back once the compute has finished -> checkpoint writer thread -> count in ==
count out checked -> atomic rename to the shard.

A device process runs a list of `ShardJob`s (both models over one shard) with `embed_shards`: while
one job computes, the next job's rows are read, tokenised (or their stored token ids read) and its
model loaded on a thread, so the device waits only for the first job's. A job whose every row the
embedding store holds loads no model.

A killed run resumes from its last durable checkpoint. Packs are planned greedily in input order,
so planning again from a checkpoint (always a pack boundary) with the same budget reproduces the
killed run's remaining packs exactly, and with them its vectors bit for bit.
"""

from __future__ import annotations

import copyreg
import hashlib
import importlib
import logging
import multiprocessing
import os
import threading
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from vnp_core import __version__
from vnp_core.config import EmbedConfig
from vnp_core.fasta import FastaError, read_fasta
from vnp_core.models import LoadedModel, ModelDescription, SequenceTokenizer, Tokenized, model_spec
from vnp_core.packing import PackedBatch, plan_packs, split_batch
from vnp_core.store import ShardCheckpoint, describe_ids, read_attrs, read_embeddings, write_embeddings

if TYPE_CHECKING:
    from vnp_core.embedding_cache import ModelIdentity

log = logging.getLogger(__name__)

# Pack budget on a CPU, where there is no free-memory figure to size it from: small packs keep each
# layer's activations in cache (bench/BENCHMARKS.md, "CPU embedding").
CPU_MAX_TOKENS = 4096
# Activation vectors of the model's width alive per token inside one layer (q, k, v, the 4x
# feed-forward and its GELU, residual, norms), with headroom. inference_mode frees each layer's
# activations before the next runs, so the depth does not matter.
ACTIVATIONS_PER_TOKEN = 32
# Share of the free device memory (measured after the weights are loaded) that packs may use.
FREE_MEMORY_SHARE = 0.5
# DNABERT-S still gains up to 256k tokens a pack on an H200 (+17-30% over 64k); ESM-2 3B is flat past
# 64k (bench/results/). Bigger packs would only make checkpoints rarer.
MAX_AUTO_TOKENS = 1 << 18
# LMDB allows one open environment per file and process: the loading thread's lookups and the device
# loop's writes to the embedding store take turns.
_STORE_TURN = threading.Lock()


class NonFiniteEmbeddingError(RuntimeError):
    """A pack produced NaN or Inf; nothing of it is written."""


class TokenizationError(ValueError):
    """A tokenizer rejected a record (the message names it)."""


@dataclass(frozen=True)
class Progress:
    sequences_done: int  # rows of the shard done, resumed rows included
    sequences_total: int
    tokens_done: int  # tokens embedded by this run
    seconds: float  # since this run started
    resumed_from_rows: int

    @property
    def sequences_per_s(self) -> float:
        return (self.sequences_done - self.resumed_from_rows) / max(self.seconds, 1e-9)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_done / max(self.seconds, 1e-9)


@dataclass(frozen=True)
class EmbedStats:
    sequences: int  # rows of the shard
    tokens: int  # tokens embedded by this run (fewer than the shard's when resumed)
    seconds: float
    tokens_per_s: float
    sequences_per_s: float  # sequences embedded by this run, per second
    truncated: int
    device: str
    dtype: str  # `LoadedModel.precision`
    attention_backend: str
    max_tokens: int
    resumed_from_rows: int  # rows taken from a checkpoint or an already complete shard
    compiled: bool = False  # the model's layers ran compiled by torch.compile
    # Where a shard's fixed cost goes: loading the model and tokens (on a thread); how long the
    # device waited for them (0 when they overlapped the previous job); and the first finished pack
    # (its compilation included), counted from the start of the job's device loop.
    load_seconds: float = 0.0
    waited_seconds: float = 0.0
    first_pack_seconds: float = 0.0
    # compiled: Inductor graphs at the first pack (from its cache, compiled anew) and seconds in torch.compile
    compile_at_first_pack: tuple[int, int, float] | None = None
    rows_from_cache: int = 0  # rows whose vectors came from the embedding store (or repeat another row)

    def summary(self) -> str:
        if self.resumed_from_rows == self.sequences:
            return f"all {self.sequences:,} sequences were already embedded: nothing to do"
        if self.rows_from_cache == self.sequences:
            return f"all {self.sequences:,} sequences came from the embedding store: nothing to embed"
        text = (
            f"embedded {self.sequences - self.resumed_from_rows - self.rows_from_cache:,} sequences ({self.tokens:,} tokens) in "
            f"{self.seconds:.1f} s: {self.sequences_per_s:,.1f} sequences/s, {self.tokens_per_s:,.0f} tokens/s "
            f"on {self.device} ({self.dtype}, {self.attention_backend}{', compiled' if self.compiled else ''}, "
            f"packs of <= {self.max_tokens:,} tokens)"
        )
        if self.resumed_from_rows:
            text += f"; resumed after {self.resumed_from_rows:,} checkpointed rows"
        if self.load_seconds:
            text += f"; model and tokens loaded in {self.load_seconds:.1f} s"
        if self.waited_seconds:
            text += f"; the device waited {self.waited_seconds:.1f} s for them"
        if self.first_pack_seconds:
            text += f"; first pack done after {self.first_pack_seconds:.1f} s"
        if self.compile_at_first_pack:
            text += " (Inductor graphs: {} from the compile cache, {} compiled anew; {:.1f} s in torch.compile)".format(
                *self.compile_at_first_pack)
        if self.truncated:
            text += f"; {self.truncated:,} inputs truncated"
        if self.rows_from_cache:
            text += f"; {self.rows_from_cache:,} of {self.sequences:,} rows from the embedding store"
        return text


@dataclass(frozen=True)
class ShardJob:
    """One model over one shard, as a device process is asked to run it (`embed_shards`)."""

    model: str  # a `vnp_core.models.MODELS` name
    model_path: Path
    rows: Callable[[], tuple[list[str], list[str]]]  # picklable; (ids, sequences), read where the job runs
    out: Path
    config: EmbedConfig
    attrs: dict = field(default_factory=dict)  # written into the shard beside the model's own
    # Picklable; the rows' token ids made earlier (the index's), or None when this tokenizer did not make them.
    tokens: Callable[[SequenceTokenizer], Tokenized | None] | None = None
    # The embedding store (`vnp_core.embedding_cache`) the job reads its known vectors from and adds its new
    # ones to; None embeds every row.
    cache_dir: Path | None = None


class StoredRows(NamedTuple):
    """What the embedding store holds of a shard's rows (`look_up`)."""

    identity: ModelIdentity
    keys: list[bytes]  # each row's store key
    found: np.ndarray  # (N,) bool
    vectors: np.ndarray  # (N, dim) float32: the stored vectors where found, zeros elsewhere


@dataclass
class _PreparedJob:
    model: ModelDescription  # a `LoadedModel`, unless the embedding store holds every row
    ids: list[str]
    tokenized: Tokenized
    load_seconds: float
    stored: StoredRows | None = None  # looked up when the job has an embedding store


def embed_shards(jobs: Sequence[ShardJob],
                 progress: Callable[[str, Progress], None] | None = None) -> list[EmbedStats | Exception]:
    """Each job in turn on this process's device; `progress(model name, report)` as they go.

    One thread loads the jobs' rows, models and tokens in job order, so each job after the first is
    loaded while the one before it computes. In job order rather than all at once: on an H200 host,
    DNABERT-S took 9-11 s to load beside the 3B ESM-2 and 3 s alone, and the device waits for it.
    Compilation happens in this thread, at a job's first pack: torch.compile traces by patching
    module calls process-wide, so it must never run while another thread runs a model. A failed job
    does not stop the others: its exception is returned in its place, so the caller keeps every
    finished shard.
    """
    outcomes: list[EmbedStats | Exception] = []
    with ThreadPoolExecutor(1, thread_name_prefix="vnp-load") as loader:
        loading = deque(loader.submit(load_job, job) for job in jobs)
        if any(job.config.compile_layers and torch.device(job.config.device).type == "cuda" for job in jobs):
            _import_compiler()  # while the first job loads: it may compile
        for job in jobs:
            waiting = time.perf_counter()
            try:
                ready = loading.popleft().result()
                waited = time.perf_counter() - waiting
                # Wrapped here, never on the loading thread: `layer.compile` imports the compiler, which
                # the main thread may be importing too (a partially initialised torch._inductor).
                if isinstance(ready.model, LoadedModel):
                    ready.model = compile_if_worth_it(ready.model, job.config, len(ready.tokenized.tokens))
                report = None if progress is None else partial(progress, job.model)
                if job.cache_dir is None:
                    stats = embed_tokenized(ready.model, ready.ids, ready.tokenized, job.out, job.config,
                                            attrs=job.attrs, progress=report)
                else:
                    stats = embed_with_cache(ready.model, ready.ids, ready.tokenized, job.out, job.config,
                                             job.cache_dir, attrs=job.attrs, progress=report, stored=ready.stored)
                outcomes.append(replace(stats, load_seconds=ready.load_seconds, waited_seconds=waited))
                log.info("%s: %s written after %.1f s on the device", job.model, job.out.name, stats.seconds)
            except Exception as error:  # noqa: BLE001 - one failed job must not lose the others
                error.add_note(f"while embedding {job.out} with {job.model}, in the device process:\n{traceback.format_exc()}")
                outcomes.append(error)
            ready = None  # frees this job's model and tokens before the next job runs
    return outcomes


# What `embed_shards` of index shards imports as it runs, and torch.compile's machinery, which it
# imports before a job that may compile computes (`_import_compiler`): a spare device process
# (`vnp_core.gpu.start_spare_device_process`) can import them ahead.
EMBED_SHARDS_MODULES = ("vnp_core.engine", "vnp_core.index", "vnp_core.models")
COMPILER_MODULES = ("torch._dynamo", "torch._inductor")


def _import_compiler() -> None:
    """Import torch.compile's machinery (3.4-4.5 s of Python on an H200 host) before any job computes;
    at once if a spare device process imported it ahead.

    Imported later, on the loading thread, it overlapped the first job's device loop, whose launches
    then waited for the GIL: DNABERT-S ran at 595-669k tokens/s beside it against 766-803k without it.
    """
    for module in COMPILER_MODULES:
        importlib.import_module(module)


def load_job(job: ShardJob) -> _PreparedJob:
    """A job's rows, its tokens and its model on the device, unless the embedding store holds every row.

    The weights load on a thread while the rows are read and tokenised: the first job's load is
    time the device waits, and both halves take seconds (DNABERT-S's BPE over a shard, the 3B
    ESM-2's 6 GB). With an embedding store, that thread only describes the model (the weights'
    checksum, no tensor read); the store is looked up once the tokens are there, and the weights load
    after it, only when it lacks a row.
    """
    start = time.perf_counter()
    spec, path = model_spec(job.model), Path(job.model_path)
    with ThreadPoolExecutor(1, thread_name_prefix="vnp-weights") as weights:
        loading = weights.submit(spec.load if job.cache_dir is None else spec.describe, path, job.config)
        ids, sequences = job.rows()
        _check_ids(ids, sequences, job.out)
        tokenizer = spec.tokenizer(job.model_path, job.config)
        tokenized = job.tokens(tokenizer) if job.tokens is not None else None
        stored = tokenized is not None
        if stored and len(tokenized) != len(ids):
            raise ValueError(f"{job.out}: {len(tokenized)} stored token sequences for {len(ids)} rows")
        if not stored:
            tokenized = tokenize(tokenizer, ids, sequences, job.config.num_workers)
        tokens_seconds = time.perf_counter() - start
        model = loading.result()
    in_store = None if job.cache_dir is None else look_up(model, tokenizer, tokenized, job.cache_dir)
    if in_store is not None and not in_store.found.all():
        model = spec.load(path, job.config)
    load_seconds = time.perf_counter() - start
    what = "model and rows" if isinstance(model, LoadedModel) else "rows (all in the embedding store: no model loaded)"
    log.info("%s: %s rows and their tokens (%s) in %.1f s, %s ready in %.1f s", job.model, f"{len(ids):,}",
             "stored ones" if stored else "tokenised here", tokens_seconds, what, load_seconds)
    return _PreparedJob(model, ids, tokenized, load_seconds, in_store)


def use_kernel_cache(cache_dir: Path | None) -> None:
    """This process's compiled GPU kernels kept in `cache_dir` (None: torch's and Triton's defaults):
    Inductor's graphs and every Triton kernel, vnp's own too (`row_kernels`, `varlen_attention`),
    compiled or not, so a host that has run a model before compiles none of them again.

    torch and Triton take the folder from these two variables, read each time they compile or look a
    kernel up, never at import; torch's compile workers, started at the first compile, inherit them.
    """
    if cache_dir is not None:
        cache_dir = Path(cache_dir).resolve()
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
        os.environ["TRITON_CACHE_DIR"] = str(cache_dir / "triton")


def configure_compiler(cache_dir: Path | None) -> None:
    """This process's torch.compile settings: its output kept in `cache_dir` (`use_kernel_cache`),
    under keys that are the same in every process (a Ray actor's too), and each model traced once."""
    use_kernel_cache(cache_dir)
    # Inductor's cache key pickles each parameter's memory format. A memory format's own reduction names no
    # module, so pickle names the first module in sys.modules that reaches it: another one in a Ray actor
    # (its `__mp_main__`) than in our device process, so each actor missed the cache and compiled anew.
    copyreg.pickle(torch.memory_format, lambda memory_format: (_memory_format, (str(memory_format),)))
    # The layers' Python floats (LayerNorm's eps, the attention scale) as constants from the start. Left
    # symbolic, Dynamo traces each model, finds them, and traces it again with them as constants: the
    # same graph, 0.2-1.5 s more tracing on a 2-core CPU (on an H200 host the first pack did not
    # measurably change: bench/BENCHMARKS.md).
    torch._dynamo.config.specialize_float = True


def _memory_format(name: str) -> torch.memory_format:
    """`torch.contiguous_format` for "torch.contiguous_format": a memory format, unpickled by its name."""
    return getattr(torch, name.removeprefix("torch."))


def compile_if_worth_it(model: LoadedModel, config: EmbedConfig, num_tokens: int) -> LoadedModel:
    """The model ready for a device loop over `num_tokens` tokens: on a GPU its kernels cached in
    `config.compile_cache_dir`, and its layers wrapped by torch.compile when that repays its cost
    (`config.compile_min_tokens`, else the model's own break-even); tracing waits for the first pack."""
    if model.device.type != "cuda":
        return model
    use_kernel_cache(config.compile_cache_dir)  # vnp's own Triton kernels run compiled or not
    threshold = model_spec(model.kind).compile_min_tokens if config.compile_min_tokens is None else config.compile_min_tokens
    if not config.compile_layers or model.compiled or threshold is None or num_tokens < threshold:
        return model
    configure_compiler(config.compile_cache_dir)
    model.module.compile_layers()
    return replace(model, compiled=True)


def embed_fasta_to_hdf5(model_name: str, input: Path, model_path: Path, out: Path, config: EmbedConfig, *,
                        show_progress: bool = False) -> EmbedStats:
    """`vnp embed`: every record of a FASTA file embedded by one model into an HDF5 shard."""
    spec = model_spec(model_name)
    records = read_fasta(input, alphabet=spec.alphabet).records
    model = spec.load(Path(model_path), config)
    ids, sequences = [r.id for r in records], [r.sequence for r in records]
    try:
        _check_ids(ids, sequences, Path(out))
        tokenized = tokenize(model.tokenizer, ids, sequences, config.num_workers)
        model = compile_if_worth_it(model, config, len(tokenized.tokens))
        if not show_progress:
            return embed_tokenized(model, ids, tokenized, out, config)
        with _progress_bar(len(ids)) as report:
            return embed_tokenized(model, ids, tokenized, out, config, progress=report)
    except TokenizationError as error:
        raise FastaError(input, str(error)) from error


@contextmanager
def _progress_bar(total: int) -> Iterator[Callable[[Progress], None]]:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.progress import Progress as RichProgress

    columns = (TextColumn("embedding"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rates]}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with RichProgress(*columns) as bar:
        task = bar.add_task("embedding", total=total, rates="")

        def report(progress: Progress) -> None:
            rates = f"{progress.sequences_per_s:,.1f} seq/s {progress.tokens_per_s:,.0f} tok/s"
            bar.update(task, completed=progress.sequences_done, rates=rates)

        yield report


# ----------------------------------------------------------------------------------------------
# One shard


def embed_sequences(model: LoadedModel, ids: Sequence[str], sequences: Sequence[str], out_path: Path,
                    config: EmbedConfig, *, attrs: dict | None = None,
                    progress: Callable[[Progress], None] | None = None) -> EmbedStats:
    """Embed `sequences` into the HDF5 shard `out_path`: `ids` in input order, float32 vectors.

    Resumes from the checkpoint a killed run of the same input left beside `out_path`, and returns
    at once when `out_path` is already the complete shard of this input.
    """
    _check_ids(ids, sequences, Path(out_path))
    tokenized = tokenize(model.tokenizer, ids, sequences, config.num_workers)
    return embed_tokenized(model, ids, tokenized, out_path, config, attrs=attrs, progress=progress)


def embed_tokenized(model: LoadedModel, ids: Sequence[str], tokenized: Tokenized, out_path: Path,
                    config: EmbedConfig, *, attrs: dict | None = None,
                    progress: Callable[[Progress], None] | None = None) -> EmbedStats:
    """`embed_sequences` of sequences tokenised already (by `tokenize`)."""
    start = time.perf_counter()
    out_path = Path(out_path)
    fingerprint = input_fingerprint(model, ids, tokenized)
    if (done := _complete_shard(out_path, fingerprint)) is not None:
        log.info("%s is already complete: skipped", out_path)
        return _already_complete(done, len(ids), start, progress)

    checkpoint = ShardCheckpoint.open(out_path, fingerprint, model.embed_dim)
    try:
        resumed = checkpoint.rows_done
        if resumed:
            log.info("%s: resuming after %d checkpointed rows", out_path, resumed)
        # A resumed run reuses the killed run's budget: the same packs give bitwise the same vectors.
        max_tokens = config.max_tokens or checkpoint.attrs.get("max_tokens") or auto_max_tokens(model)
        shard_attrs = {**_shard_attrs(model, tokenized, max_tokens), **(attrs or {})}
        checkpoint.update_attrs(shard_attrs)
        packs = [[resumed + i for i in pack] for pack in plan_packs(tokenized.lengths[resumed:], max_tokens)]
        rows, tokens, first_pack_seconds, compile_work = resumed, 0, 0.0, None
        compile_before = _compile_work() if model.compiled else None
        with _CheckpointWriter(checkpoint, ids, config.checkpoint_rows) as writer:
            for vectors, pack_tokens in _embed_packs(model, tokenized, packs, ids):
                if not first_pack_seconds:
                    first_pack_seconds = time.perf_counter() - start
                    compile_work = compile_before and tuple(now - then for now, then in zip(_compile_work(), compile_before))
                writer.add(vectors)
                rows, tokens = rows + len(vectors), tokens + pack_tokens
                if progress is not None:
                    progress(Progress(rows, len(ids), tokens, time.perf_counter() - start, resumed))
        checkpoint.finalize(out_path, ids, shard_attrs)
    finally:
        checkpoint.close()

    seconds = time.perf_counter() - start
    return EmbedStats(
        sequences=len(ids), tokens=tokens, seconds=seconds, tokens_per_s=tokens / seconds,
        sequences_per_s=(len(ids) - resumed) / seconds, truncated=tokenized.truncated, device=str(model.device),
        dtype=model.precision, attention_backend=model.attention_backend, max_tokens=max_tokens,
        resumed_from_rows=resumed, first_pack_seconds=first_pack_seconds, compiled=model.compiled, compile_at_first_pack=compile_work,
    )


def _compile_work() -> tuple[int, int, float]:
    """This process's lookups in Inductor's compiled-graph cache so far (hits, misses), and its seconds in
    torch.compile. A step whose first pack misses on a host that has compiled before has a compile cache
    that does not reach it; one that hits and still spends seconds there loads or checks its kernels."""
    from torch._dynamo.utils import compilation_time_metrics, counters

    seconds = sum(compilation_time_metrics.get("_compile.compile_inner", ()))
    return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"], seconds


def embed_with_cache(model: ModelDescription, ids: Sequence[str], tokenized: Tokenized, out_path: Path,
                     config: EmbedConfig, cache_dir: Path, *, attrs: dict | None = None,
                     progress: Callable[[Progress], None] | None = None, stored: StoredRows | None = None) -> EmbedStats:
    """`embed_tokenized`, embedding only the sequences the store at `cache_dir` lacks, each distinct one once.

    The rows to embed go through `embed_tokenized` into a shard of their own beside `out_path`, with
    its checkpoints. The store learns their vectors only once that shard is complete, so a killed
    run's rerun finds the same rows missing, plans the same packs and resumes bit for bit.
    `stored` is what `look_up` found of the rows (None: looked up here); `model` may be only a
    description when the store holds every row, as nothing is then embedded.
    """
    from vnp_core.embedding_cache import EmbeddingCache

    start, out_path = time.perf_counter(), Path(out_path)
    fingerprint = input_fingerprint(model, ids, tokenized)
    if (done := _complete_shard(out_path, fingerprint)) is not None:
        return _already_complete(done, len(ids), start, progress)
    identity, keys, found, vectors = stored or look_up(model, model.tokenizer, tokenized, cache_dir)
    missing = np.flatnonzero(~found)
    first_row = {}  # each missing sequence's first row: the one embedded
    for row in missing.tolist():
        first_row.setdefault(keys[row], row)
    to_embed = np.fromiter(first_row.values(), dtype=np.int64, count=len(first_row))
    stats = EmbedStats(sequences=0, tokens=0, seconds=0.0, tokens_per_s=0.0, sequences_per_s=0.0, truncated=0,
                       device=str(model.device), dtype=model.precision, max_tokens=0, resumed_from_rows=0,
                       attention_backend=model.attention_backend)
    if len(to_embed):
        new_rows = out_path.with_name(f"{out_path.stem}.new{out_path.suffix}")
        stats = embed_tokenized(model, [ids[row] for row in to_embed], tokenized.select(to_embed), new_rows, config,
                                attrs=attrs, progress=progress)
        new = read_embeddings(new_rows).embeddings
        position = {keys[row]: i for i, row in enumerate(to_embed.tolist())}
        vectors[missing] = new[[position[keys[row]] for row in missing.tolist()]]
    with _STORE_TURN, EmbeddingCache.open(cache_dir) as cache:
        if len(to_embed):
            cache.put(identity, [keys[row] for row in to_embed], new)
        cache.record_use(identity, hits=int(found.sum()), misses=len(to_embed))
    shard_attrs = {**_shard_attrs(model, tokenized, stats.max_tokens), **(attrs or {}), "fingerprint": fingerprint,
                   "rows_from_cache": len(ids) - len(to_embed), "cache_identity": identity.key}
    write_embeddings(out_path, ids, vectors, shard_attrs)
    if len(to_embed):
        new_rows.unlink()
    seconds = time.perf_counter() - start
    embedded = len(to_embed) - stats.resumed_from_rows
    return replace(stats, sequences=len(ids), seconds=seconds, truncated=tokenized.truncated,
                   sequences_per_s=embedded / seconds, rows_from_cache=len(ids) - len(to_embed))


def look_up(model: ModelDescription, tokenizer: SequenceTokenizer, tokenized: Tokenized, cache_dir: Path) -> StoredRows:
    """The rows of `tokenized` as the embedding store at `cache_dir` holds them for `model`."""
    from vnp_core.embedding_cache import EmbeddingCache, sequence_keys

    identity, keys = model_identity(model, tokenizer), sequence_keys(tokenized.tokens, tokenized.offsets)
    with _STORE_TURN, EmbeddingCache.open(cache_dir) as cache:
        return StoredRows(identity, keys, *cache.lookup(identity, keys))


def model_identity(model: ModelDescription, tokenizer: SequenceTokenizer) -> ModelIdentity:
    """What decides a model's vectors, as the embedding store keys them (its token ids are the row keys)."""
    from vnp_core.embedding_cache import ModelIdentity

    return ModelIdentity(kind=model.kind, weights_sha256=model.weights_sha256, dtype=model.precision,
                         max_length=None, pooling=model.pooling, dim=model.embed_dim,
                         code_version=f"vnp {__version__}, {model.attention_backend}, "
                                      f"tokenizer {hashlib.sha256(tokenizer.digest.encode()).hexdigest()[:12]}")


def _already_complete(done: dict, rows: int, start: float, progress: Callable[[Progress], None] | None) -> EmbedStats:
    if progress is not None:
        progress(Progress(rows, rows, 0, time.perf_counter() - start, rows))
    return EmbedStats(
        sequences=rows, tokens=0, seconds=0.0, tokens_per_s=0.0, sequences_per_s=0.0,
        truncated=done["truncated"], device=done["device"], dtype=done["dtype"],
        attention_backend=done["attention_backend"], max_tokens=done["max_tokens"], resumed_from_rows=rows,
    )


def _shard_attrs(model: ModelDescription, tokenized: Tokenized, max_tokens: int) -> dict:
    """What a reader needs to know how the vectors were made (../shared/spec/outputs.md)."""
    return {
        "kind": model.kind, "model_name": model.name, "weights_sha256": model.weights_sha256,
        "dtype": model.precision, "attention_backend": model.attention_backend, "pooling": model.pooling,
        "vnp_version": __version__, "truncated": tokenized.truncated, "device": str(model.device),
        "max_tokens": max_tokens,
    }


def _check_ids(ids: Sequence[str], sequences: Sequence[str], out_path: Path) -> None:
    if len(ids) != len(sequences):
        raise ValueError(f"{out_path}: {len(ids)} ids for {len(sequences)} sequences")
    if duplicated := [record_id for record_id, count in Counter(ids).items() if count > 1]:
        raise ValueError(f"{out_path}: {len(duplicated)} id(s) given more than once: {describe_ids(duplicated)}")


def _complete_shard(out_path: Path, fingerprint: str) -> dict | None:
    """The attributes of `out_path` when it is the finished shard of this very input and model."""
    if not out_path.exists():
        return None
    try:
        attrs = read_attrs(out_path)
    except (OSError, ValueError) as error:  # a disk that failed under a finished file, a file HDF5 cannot open: recompute
        log.warning("%s cannot be read (%s): recomputing it", out_path, error)
        return None
    if attrs.get("fingerprint") == fingerprint:
        return attrs
    log.warning("%s holds embeddings of another input or model: recomputing it", out_path)
    return None


def input_fingerprint(model: ModelDescription, ids: Sequence[str], tokenized: Tokenized) -> str:
    """What a shard's vectors depend on: token ids (so tokenizer settings count), ids, weights, dtype, back end."""
    digest = hashlib.sha256()
    for part in (model.weights_sha256, model.precision, model.attention_backend, __version__):
        digest.update(f"{part}\0".encode())
    digest.update("\0".join(ids).encode())
    digest.update(tokenized.lengths.tobytes())
    digest.update(tokenized.tokens.tobytes())
    return digest.hexdigest()


def auto_max_tokens(model: LoadedModel) -> int:
    """A pack budget from the device's free memory; an overestimate is caught by the out-of-memory split."""
    if model.device.type != "cuda":
        return CPU_MAX_TOKENS
    free_bytes, _ = torch.cuda.mem_get_info(model.device)
    bytes_per_token = ACTIVATIONS_PER_TOKEN * model.embed_dim * model.dtype.itemsize
    return int(min(MAX_AUTO_TOKENS, max(1, free_bytes * FREE_MEMORY_SHARE // bytes_per_token)))


# ----------------------------------------------------------------------------------------------
# Tokenising


def tokenize(tokenizer: SequenceTokenizer, ids: Sequence[str], sequences: Sequence[str], num_workers: int) -> Tokenized:
    """Token ids of every sequence, in input order, from `num_workers` processes (0: this one)."""
    try:
        if num_workers == 0:
            return tokenizer.encode_many(sequences, ids)
        # A few contiguous slices per worker balance the load; map() hands them back in order.
        bounds = np.linspace(0, len(ids), 4 * num_workers + 1).astype(int).tolist()
        slices = list(zip(bounds[:-1], bounds[1:]))
        # Spawned, not forked: a fork of a process that holds CUDA state or threads is unsafe.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(num_workers, mp_context=context) as pool:
            parts = list(pool.map(tokenizer.encode_many, [sequences[a:b] for a, b in slices], [ids[a:b] for a, b in slices]))
    except ValueError as error:
        raise TokenizationError(str(error)) from error
    return Tokenized(np.concatenate([p.tokens for p in parts]), np.concatenate([p.lengths for p in parts]),
                     sum(p.truncated for p in parts))


# ----------------------------------------------------------------------------------------------
# The device loop


@dataclass
class _LaunchedPack:
    seq_index: list[int]  # positions in the input of the pack's sequences
    num_tokens: int
    vectors: torch.Tensor  # (B, D) on the host; filled once `done` has fired
    finite: torch.Tensor  # (B,) bool on the host, likewise
    done: torch.cuda.Event | None  # None on a CPU, where the compute is synchronous


def _embed_packs(model: LoadedModel, tokenized: Tokenized, packs: Sequence[Sequence[int]],
                 ids: Sequence[str]) -> Iterator[tuple[np.ndarray, int]]:
    """(vectors, tokens) of each pack, in order.

    Pack k+1 is queued on the device before pack k is read back, so the device never waits for the
    host to collect results or build the next batch.
    """
    pending: _LaunchedPack | None = None
    for pack in packs:
        launched = _launch(model, tokenized.batch(pack), ids)
        if pending is not None:
            yield _collect(pending, ids)
        pending = launched
    if pending is not None:
        yield _collect(pending, ids)


@torch.inference_mode()
def _launch(model: LoadedModel, batch: PackedBatch, ids: Sequence[str]) -> _LaunchedPack:
    on_cuda = model.device.type == "cuda"
    if on_cuda:
        batch = batch.pin_memory()  # a copy from pinned memory is asynchronous
    vectors = _embed_splitting_on_oom(model, batch, ids)
    # The finite flags travel with the vectors, so checking them costs no extra synchronisation.
    finite = torch.isfinite(vectors).all(dim=1)
    vectors, finite = vectors.to("cpu", non_blocking=True), finite.to("cpu", non_blocking=True)
    done = None
    if on_cuda:
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(model.device))
    return _LaunchedPack(batch.seq_index.tolist(), batch.num_tokens, vectors, finite, done)


def _embed_splitting_on_oom(model: LoadedModel, batch: PackedBatch, ids: Sequence[str]) -> torch.Tensor:
    """(B, D) vectors of a host pack; a pack that does not fit in device memory is embedded in halves."""
    try:
        return model.module.embed(batch.to(model.device, non_blocking=True))
    except torch.OutOfMemoryError as error:
        if batch.num_sequences == 1:
            record_id = ids[int(batch.seq_index[0])]
            raise torch.OutOfMemoryError(f"sequence {record_id!r} ({batch.num_tokens} tokens) does not fit in "
                                         f"{model.device} memory on its own") from error
    # Retried outside the except block: its traceback would keep the failed attempt's tensors alive.
    log.info("out of memory on a pack of %d tokens: retrying it in two halves", batch.num_tokens)
    torch.cuda.empty_cache()
    first, second = split_batch(batch)
    return torch.cat([_embed_splitting_on_oom(model, first, ids), _embed_splitting_on_oom(model, second, ids)])


def _collect(pack: _LaunchedPack, ids: Sequence[str]) -> tuple[np.ndarray, int]:
    """The pack's vectors once the device has produced them; NaN/Inf is an error, never written."""
    if pack.done is not None:
        pack.done.synchronize()
    if not bool(pack.finite.all()):
        bad = [ids[pack.seq_index[i]] for i in torch.nonzero(~pack.finite).flatten().tolist()]
        raise NonFiniteEmbeddingError(f"NaN/Inf embeddings for {len(bad)} of the {len(pack.seq_index)} sequences "
                                      f"of a pack: {describe_ids(bad)}")
    return pack.vectors.numpy(), pack.num_tokens


class _CheckpointWriter:
    """Appends finished packs to the checkpoint on a thread, overlapping the writes with compute.

    Writes are coarse, one per `every_rows` rows at a pack boundary, because h5py holds the GIL
    while it writes. At most one write is in flight: waiting for it bounds host memory and raises
    a write error (a full disk) at the next checkpoint rather than at the end.
    """

    def __init__(self, checkpoint: ShardCheckpoint, ids: Sequence[str], every_rows: int):
        self._checkpoint = checkpoint
        self._ids = ids
        self._every_rows = every_rows
        self._next_row = checkpoint.rows_done
        self._buffer: list[np.ndarray] = []
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="vnp-checkpoint")
        self._in_flight: Future | None = None

    def add(self, vectors: np.ndarray) -> None:
        """The next pack's rows, in input order."""
        self._buffer.append(vectors)
        if sum(len(v) for v in self._buffer) >= self._every_rows:
            self._commit()

    def _commit(self) -> None:
        rows = np.concatenate(self._buffer)
        ids = self._ids[self._next_row : self._next_row + len(rows)]
        self._wait()
        self._in_flight = self._thread.submit(self._write_durable, ids, rows)
        self._next_row += len(rows)
        self._buffer = []

    def _write_durable(self, ids: Sequence[str], rows: np.ndarray) -> None:
        self._checkpoint.append(ids, rows)
        self._checkpoint.flush_durable()

    def _wait(self) -> None:
        if self._in_flight is not None:
            self._in_flight.result()

    def __enter__(self) -> _CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None and self._buffer:
                self._commit()
            self._wait()
        finally:
            self._thread.shutdown()
