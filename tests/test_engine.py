"""The inference engine on the CPU: a deterministic stand-in model, then the tiny ESM-2 and DNABERT-S."""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from vnp_core.attention import BACKENDS as ATTENTION_BACKENDS
from vnp_core.config import ESM2_MAX_RESIDUES, EmbedConfig
from vnp_core.engine import (
    CPU_MAX_TOKENS,
    NonFiniteEmbeddingError,
    ShardJob,
    TokenizationError,
    compile_if_worth_it,
    embed_fasta_to_hdf5,
    embed_sequences,
    embed_shards,
    configure_compiler,
)
from vnp_core.fasta import FastaError
from vnp_core.index import COLUMNS as INDEX_COLUMNS
from vnp_core.models import MODELS, LoadedModel, SequenceTokenizer, model_spec
from vnp_core.packing import make_batch, segment_mean
from vnp_core.store import ShardCheckpoint, checkpoint_path, read_embeddings
from real_genomes import REAL_DATA

LETTERS = "ACDEFGHIKLMNPQRSTVWY"


@dataclass(frozen=True)
class LetterTokenizer(SequenceTokenizer):
    """`[0] + one id per letter`, cut after `max_letters` letters."""

    max_letters: int = 40

    def encode(self, sequence: str, record_id: str) -> tuple[np.ndarray, bool]:
        if unknown := sorted(set(sequence) - set(LETTERS)):
            raise ValueError(f"record {record_id!r}: unknown letter {unknown[0]!r}")
        letters = sequence[: self.max_letters]
        return np.array([0] + [LETTERS.index(c) + 1 for c in letters]), len(sequence) > self.max_letters


class MeanEmbedding(nn.Module):
    """A deterministic stand-in for a model: mean of learned token vectors, and switchable faults."""

    def __init__(self, *, oom_above_tokens: int | None = None, nan_letter: str | None = None,
                 stall_at: int | None = None, stall_marker: Path | None = None):
        super().__init__()
        self.table = nn.Embedding(len(LETTERS) + 1, 8)
        with torch.no_grad():
            self.table.weight.copy_(torch.linspace(-1, 1, self.table.weight.numel()).view_as(self.table.weight).sin())
        self.oom_above_tokens = oom_above_tokens
        self.nan_token = None if nan_letter is None else LETTERS.index(nan_letter) + 1
        self.stall_at, self.stall_marker = stall_at, stall_marker
        self.pack_sizes: list[int] = []

    def embed(self, batch) -> torch.Tensor:
        if self.oom_above_tokens is not None and batch.num_tokens > self.oom_above_tokens:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        if self.stall_at is not None and self.stall_at in batch.seq_index.tolist():
            self.stall_marker.touch()
            time.sleep(600)  # the test kills the process here
        self.pack_sizes.append(batch.num_sequences)
        vectors = segment_mean(self.table(batch.input_ids), batch.cu_seqlens)
        if self.nan_token is not None:
            poisoned = segment_mean((batch.input_ids == self.nan_token).float()[:, None], batch.cu_seqlens)[:, 0] > 0
            vectors[poisoned] = float("nan")
        return vectors


def fake_model(**faults) -> LoadedModel:
    return LoadedModel(kind="esm2", name="mean-embedding", module=MeanEmbedding(**faults), tokenizer=LetterTokenizer(),
                       embed_dim=8, weights_sha256="0" * 64, source="memory", device=torch.device("cpu"),
                       dtype=torch.float32, attention_backend="none", pooling="mean over all tokens")


def proteins(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    sequences = ["".join(rng.choices(LETTERS, k=rng.randint(3, 60))) for _ in range(n)]
    return [f"protein_{i}" for i in range(n)], sequences


def config(**overrides) -> EmbedConfig:
    return EmbedConfig(**{"num_workers": 0, "max_tokens": 60, "checkpoint_rows": 4, **overrides})


def test_every_sequence_once_in_input_order(tmp_path):
    ids, sequences = proteins(30)
    model = fake_model()
    reports = []
    stats = embed_sequences(model, ids, sequences, tmp_path / "shard.h5", config(), attrs={"chunk_length": 300},
                            progress=reports.append)

    shard = read_embeddings(tmp_path / "shard.h5")
    assert shard.ids == ids
    assert len(model.module.pack_sizes) > 5  # many packs
    for i, sequence in enumerate(sequences):
        with torch.inference_mode():
            alone = model.module.embed(make_batch([model.tokenizer.encode(sequence, ids[i])[0]], [0]))
        np.testing.assert_allclose(shard.embeddings[i], alone[0].numpy(), rtol=1e-6, atol=1e-7)
    assert stats.sequences == 30 and stats.resumed_from_rows == 0
    assert stats.truncated == shard.attrs["truncated"] == sum(len(s) > 40 for s in sequences)
    assert stats.tokens == sum(min(len(s), 40) + 1 for s in sequences)
    assert shard.attrs["chunk_length"] == 300 and shard.attrs["max_tokens"] == 60
    assert [r.sequences_done for r in reports] == sorted(r.sequences_done for r in reports)
    assert reports[-1].sequences_done == reports[-1].sequences_total == 30
    assert [p.name for p in tmp_path.iterdir()] == ["shard.h5"]


def test_duplicate_ids_are_refused(tmp_path):
    with pytest.raises(ValueError, match="1 id.* more than once: 'a'"):
        embed_sequences(fake_model(), ["a", "b", "a"], ["ACD", "EFG", "HIK"], tmp_path / "shard.h5", config())


def test_worker_processes_give_the_same_shard(tmp_path):
    ids, sequences = proteins(40)
    embed_sequences(fake_model(), ids, sequences, tmp_path / "inline.h5", config(num_workers=0))
    embed_sequences(fake_model(), ids, sequences, tmp_path / "workers.h5", config(num_workers=2))
    inline, workers = read_embeddings(tmp_path / "inline.h5"), read_embeddings(tmp_path / "workers.h5")
    assert workers.ids == inline.ids == ids
    np.testing.assert_array_equal(workers.embeddings, inline.embeddings)
    assert workers.attrs["truncated"] == inline.attrs["truncated"] > 0


def test_tokenizer_error_in_a_worker_names_the_record(tmp_path):
    ids, sequences = proteins(10)
    sequences[7] = "ACDJ"
    with pytest.raises(TokenizationError, match="record 'protein_7': unknown letter 'J'"):
        embed_sequences(fake_model(), ids, sequences, tmp_path / "shard.h5", config(num_workers=1))
    assert list(tmp_path.iterdir()) == []


def test_nan_in_a_pack_names_the_sequences_and_writes_no_shard(tmp_path):
    ids, sequences = proteins(30)
    sequences = [s.replace("W", "A") for s in sequences]
    sequences[20] += "W"
    with pytest.raises(NonFiniteEmbeddingError, match="NaN/Inf embeddings for 1 of the .*: 'protein_20'$"):
        embed_sequences(fake_model(nan_letter="W"), ids, sequences, tmp_path / "shard.h5", config())
    assert not (tmp_path / "shard.h5").exists()
    # The packs before the poisoned one were checkpointed, and only finite rows were.
    with h5py.File(checkpoint_path(tmp_path / "shard.h5"), "r") as partial:
        assert 0 < partial.attrs["rows_done"] <= 20
        assert np.isfinite(partial["embeddings"][:]).all()


def test_out_of_memory_packs_are_split_and_retried(tmp_path):
    ids, sequences = proteins(30)
    embed_sequences(fake_model(), ids, sequences, tmp_path / "whole.h5", config(max_tokens=10_000))
    squeezed = fake_model(oom_above_tokens=70)
    embed_sequences(squeezed, ids, sequences, tmp_path / "split.h5", config(max_tokens=10_000))

    whole, split = read_embeddings(tmp_path / "whole.h5"), read_embeddings(tmp_path / "split.h5")
    assert split.ids == whole.ids == ids
    np.testing.assert_allclose(split.embeddings, whole.embeddings, rtol=1e-6, atol=1e-7)
    assert sum(squeezed.module.pack_sizes) == 30 and len(squeezed.module.pack_sizes) > 1


def test_a_sequence_too_large_on_its_own_is_named(tmp_path):
    ids, sequences = ["short", "long", "tiny"], ["ACDEF", "GHIKLMNPQRSTVWY" * 2, "ACD"]
    with pytest.raises(torch.OutOfMemoryError, match=r"'long' \(31 tokens\) does not fit"):
        embed_sequences(fake_model(oom_above_tokens=30), ids, sequences, tmp_path / "shard.h5", config())
    assert not (tmp_path / "shard.h5").exists()


def _embed_until_stalled(ids, sequences, out: Path, marker: Path, stall_at: int) -> None:
    embed_sequences(fake_model(stall_at=stall_at, stall_marker=marker), ids, sequences, out, config())


def test_run_killed_mid_way_resumes_to_the_same_shard(tmp_path):
    ids, sequences = proteins(40)
    embed_sequences(fake_model(), ids, sequences, tmp_path / "uninterrupted.h5", config())

    out, marker = tmp_path / "shard.h5", tmp_path / "stalled"
    child = multiprocessing.get_context("spawn").Process(target=_embed_until_stalled,
                                                         args=(ids, sequences, out, marker, 30))
    child.start()
    deadline = time.monotonic() + 120
    while not marker.exists() and child.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the child never reached the stalling pack"
    time.sleep(0.5)  # lets the writer thread finish the checkpoint of the packs before it
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert child.exitcode == -signal.SIGKILL
    assert not out.exists() and checkpoint_path(out).exists()

    stats = embed_sequences(fake_model(), ids, sequences, out, config())
    assert 0 < stats.resumed_from_rows <= 30
    resumed, uninterrupted = read_embeddings(out), read_embeddings(tmp_path / "uninterrupted.h5")
    assert resumed.ids == uninterrupted.ids == ids
    np.testing.assert_array_equal(resumed.embeddings, uninterrupted.embeddings)


def test_a_checkpoint_holding_every_row_is_finished_without_embedding(tmp_path):
    """Killed after its last checkpoint and before the shard was written: the rerun only writes it."""
    from vnp_core.engine import input_fingerprint, tokenize

    ids, sequences = proteins(12)
    embed_sequences(fake_model(), ids, sequences, tmp_path / "whole.h5", config())
    whole = read_embeddings(tmp_path / "whole.h5")
    model, out = fake_model(), tmp_path / "shard.h5"
    fingerprint = input_fingerprint(model, ids, tokenize(model.tokenizer, ids, sequences, 0))
    checkpoint = ShardCheckpoint.open(out, fingerprint, embed_dim=whole.embeddings.shape[1])
    checkpoint.append(ids, whole.embeddings)
    checkpoint.flush_durable()
    checkpoint.close()

    stats = embed_sequences(model, ids, sequences, out, config())
    assert model.module.pack_sizes == [] and stats.resumed_from_rows == 12
    np.testing.assert_array_equal(read_embeddings(out).embeddings, whole.embeddings)


def test_complete_shard_is_not_recomputed(tmp_path):
    ids, sequences = proteins(12)
    embed_sequences(fake_model(), ids, sequences, tmp_path / "shard.h5", config())
    idle = fake_model()
    stats = embed_sequences(idle, ids, sequences, tmp_path / "shard.h5", config())
    assert idle.module.pack_sizes == []
    assert stats.resumed_from_rows == stats.sequences == 12
    assert "nothing to do" in stats.summary()


def test_checkpoint_or_shard_of_other_input_is_recomputed(tmp_path, caplog):
    ids, sequences = proteins(12)
    out = tmp_path / "shard.h5"
    stale = ShardCheckpoint.open(out, "fingerprint of another input", embed_dim=8)
    stale.append(ids[:4], np.full((4, 8), 7.0, dtype=np.float32))
    stale.flush_durable()
    stale.close()

    with caplog.at_level(logging.WARNING):
        stats = embed_sequences(fake_model(), ids, sequences, out, config())
    assert stats.resumed_from_rows == 0 and "starting over" in caplog.text
    assert not np.any(read_embeddings(out).embeddings == 7.0)

    sequences[3] = "ACDEF"
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        stats = embed_sequences(fake_model(), ids, sequences, out, config())
    assert stats.resumed_from_rows == 0 and "recomputing" in caplog.text


def test_unreadable_shard_is_recomputed(tmp_path, caplog):
    ids, sequences = proteins(12)
    out = tmp_path / "shard.h5"
    embed_sequences(fake_model(), ids, sequences, out, config())
    expected = read_embeddings(out).embeddings
    out.write_bytes(b"not an HDF5 file")
    with caplog.at_level(logging.WARNING):
        stats = embed_sequences(fake_model(), ids, sequences, out, config())
    assert stats.resumed_from_rows == 0 and "cannot be read" in caplog.text
    np.testing.assert_array_equal(read_embeddings(out).embeddings, expected)


def test_tiny_esm2_packed_in_many_packs_matches_one_pack(tmp_path):
    from vnp_core.tiny_models import write_tiny_esm2

    checkpoint = write_tiny_esm2(tmp_path / "esm2_tiny.pt")
    model = model_spec("esm2").load(checkpoint, EmbedConfig())
    ids, sequences = proteins(24)
    many = embed_sequences(model, ids, sequences, tmp_path / "many.h5", config(max_tokens=64))
    one = embed_sequences(model, ids, sequences, tmp_path / "one.h5", config(max_tokens=100_000))
    assert (many.max_tokens, one.max_tokens) == (64, 100_000)
    small_packs, big_pack = read_embeddings(tmp_path / "many.h5"), read_embeddings(tmp_path / "one.h5")
    assert small_packs.ids == big_pack.ids == ids
    np.testing.assert_allclose(small_packs.embeddings, big_pack.embeddings, rtol=1e-5, atol=1e-6)
    assert small_packs.attrs["model_name"] == "esm2_tiny" and small_packs.attrs["dtype"] == "float32"


def test_embed_fasta_with_tiny_dnabert_s_on_a_real_genome(tmp_path):
    from vnp_core.tiny_models import write_tiny_dnabert_s

    genome = "".join(line.strip() for line in (REAL_DATA / "phiX174.fasta").read_text().splitlines()[1:])
    chunks = [genome[start : start + 300] for start in range(0, len(genome), 300)]
    fasta = tmp_path / "phiX174_chunks.fa"
    fasta.write_text("".join(f">phiX_{i}\n{chunk}\n" for i, chunk in enumerate(chunks)))

    stats = embed_fasta_to_hdf5("dnabert_s", fasta, write_tiny_dnabert_s(tmp_path / "dnabert_s_tiny"),
                                tmp_path / "shard.h5", EmbedConfig(num_workers=0))
    shard = read_embeddings(tmp_path / "shard.h5")
    assert shard.ids == [f"phiX_{i}" for i in range(len(chunks))]
    assert shard.embeddings.shape == (len(chunks), 64) and np.isfinite(shard.embeddings).all()
    assert stats.max_tokens == shard.attrs["max_tokens"] == CPU_MAX_TOKENS
    assert shard.attrs["kind"] == "dnabert_s"


def test_embed_fasta_rejects_a_bad_protein_naming_file_and_record(tmp_path):
    from vnp_core.tiny_models import write_tiny_esm2

    checkpoint = write_tiny_esm2(tmp_path / "esm2_tiny.pt")
    fasta = tmp_path / "proteins.faa"
    fasta.write_text(">good\nMKV\n>soft_masked\nMKvL\n")
    with pytest.raises(FastaError, match=r"proteins\.faa.*'soft_masked'.*'v'"):
        embed_fasta_to_hdf5("esm2", fasta, checkpoint, tmp_path / "shard.h5", EmbedConfig(num_workers=0))
    assert not (tmp_path / "shard.h5").exists()


@dataclass
class RecordedRows:
    """A job's row reader that notes when it was called."""

    ids: list[str]
    sequences: list[str]
    calls: list[float]

    def __call__(self) -> tuple[list[str], list[str]]:
        self.calls.append(time.perf_counter())
        return self.ids, self.sequences


def test_embed_shards_runs_each_job_and_prepares_the_next_while_one_computes(tmp_path):
    from vnp_core.tiny_models import write_tiny_dnabert_s, write_tiny_esm2

    esm2, dnabert_s = write_tiny_esm2(tmp_path / "esm2_tiny.pt"), write_tiny_dnabert_s(tmp_path / "dnabert_s_tiny")
    genome = "".join(line.strip() for line in (REAL_DATA / "phiX174.fasta").read_text().splitlines()[1:])
    chunk_ids = [f"phiX_{start}" for start in range(0, len(genome), 20)]
    chunks = [genome[start : start + 150] for start in range(0, len(genome), 20)]
    protein_ids, protein_sequences = proteins(40)
    dnabert_rows, esm2_rows = RecordedRows(chunk_ids, chunks, []), RecordedRows(protein_ids, protein_sequences, [])
    small_packs = EmbedConfig(max_tokens=64)  # one sequence a pack: DNABERT-S computes for a while
    jobs = [ShardJob("dnabert_s", dnabert_s, dnabert_rows, tmp_path / "dnabert_s.h5", small_packs, {"shard": 0}),
            ShardJob("esm2", esm2, esm2_rows, tmp_path / "esm2.h5", small_packs, {"shard": 0})]
    reports: list[tuple[str, int, float]] = []

    outcomes = embed_shards(jobs, lambda kind, progress: reports.append((kind, progress.sequences_done, time.perf_counter())))

    assert [stats.sequences for stats in outcomes] == [len(chunks), len(protein_ids)]
    assert all(stats.load_seconds > 0 for stats in outcomes)
    for job, ids, sequences in ((jobs[0], chunk_ids, chunks), (jobs[1], protein_ids, protein_sequences)):
        alone = tmp_path / f"{job.model}_alone.h5"
        embed_sequences(model_spec(job.model).load(job.model_path, small_packs), ids, sequences, alone, small_packs)
        written = read_embeddings(job.out)
        assert written.ids == ids and written.attrs["shard"] == 0
        np.testing.assert_array_equal(written.embeddings, read_embeddings(alone).embeddings)
    # ESM-2's rows were read (and its model loaded) while DNABERT-S was still computing.
    dnabert_s_finished = max(at for kind, _, at in reports if kind == "dnabert_s")
    assert esm2_rows.calls[0] < dnabert_s_finished < min(at for kind, _, at in reports if kind == "esm2")


def test_embed_shards_returns_a_failed_job_in_its_place_and_runs_the_others(tmp_path):
    from vnp_core.tiny_models import write_tiny_esm2

    checkpoint = write_tiny_esm2(tmp_path / "esm2_tiny.pt")
    ids, sequences = proteins(10)
    bad = RecordedRows(["p0", "p1"], ["MKV", "MKJV"], [])
    good = RecordedRows(ids, sequences, [])
    outcomes = embed_shards([ShardJob("esm2", checkpoint, bad, tmp_path / "bad.h5", config()),
                             ShardJob("esm2", checkpoint, good, tmp_path / "good.h5", config())])
    assert isinstance(outcomes[0], TokenizationError) and "'p1'" in str(outcomes[0])
    assert any("bad.h5" in note for note in outcomes[0].__notes__)
    assert not (tmp_path / "bad.h5").exists()
    assert outcomes[1].sequences == 10 and read_embeddings(tmp_path / "good.h5").ids == ids


@dataclass
class StoredTokens:
    """A job's stored-token reader: hands out `tokenized` to the tokenizer whose digest it holds."""

    digest: str
    tokenized: object
    asked: list[str]

    def __call__(self, tokenizer: SequenceTokenizer):
        self.asked.append(tokenizer.digest)
        return self.tokenized if tokenizer.digest == self.digest else None


def test_embed_shards_embeds_stored_tokens_made_by_the_models_tokenizer(tmp_path):
    from vnp_core.tiny_models import write_tiny_dnabert_s

    dnabert_s = write_tiny_dnabert_s(tmp_path / "dnabert_s_tiny")
    genome = "".join(line.strip() for line in (REAL_DATA / "phiX174.fasta").read_text().splitlines()[1:])
    ids = [f"phiX_{start}" for start in range(0, 3000, 100)]
    chunks = [genome[start : start + 150] for start in range(0, 3000, 100)]
    tokenizer = model_spec("dnabert_s").tokenizer(dnabert_s, config())
    # Stored tokens of other sequences: the vectors show which tokens were embedded.
    shifted = tokenizer.encode_many(chunks[1:] + chunks[:1], ids)
    rows = RecordedRows(ids, chunks, [])
    stored = StoredTokens(tokenizer.digest, shifted, [])
    stale = StoredTokens("another tokenizer", shifted, [])
    outcomes = embed_shards([ShardJob("dnabert_s", dnabert_s, rows, tmp_path / "stored.h5", config(), tokens=stored),
                             ShardJob("dnabert_s", dnabert_s, rows, tmp_path / "stale.h5", config(), tokens=stale)])
    assert [outcome.sequences for outcome in outcomes] == [30, 30] and stored.asked == stale.asked == [tokenizer.digest]
    model = model_spec("dnabert_s").load(dnabert_s, config())
    embed_sequences(model, ids, chunks[1:] + chunks[:1], tmp_path / "shifted.h5", config())
    embed_sequences(model, ids, chunks, tmp_path / "tokenised.h5", config())
    np.testing.assert_array_equal(read_embeddings(tmp_path / "stored.h5").embeddings,
                                  read_embeddings(tmp_path / "shifted.h5").embeddings)
    # Tokens of another tokenizer are not used: the rows are tokenised again.
    np.testing.assert_array_equal(read_embeddings(tmp_path / "stale.h5").embeddings,
                                  read_embeddings(tmp_path / "tokenised.h5").embeddings)


# ----------------------------------------------------------------------------------------------
# Compiling: the engine decides, per shard, whether compiling the layers repays its cost


class CompileRecorder(nn.Module):
    """A module that notes `compile_layers` calls instead of compiling."""

    def __init__(self):
        super().__init__()
        self.compile_calls = 0

    def compile_layers(self) -> None:
        self.compile_calls += 1


def recording_model(device: str, kind: str = "esm2", compiled: bool = False) -> LoadedModel:
    return LoadedModel(kind=kind, name="recorder", module=CompileRecorder(), tokenizer=LetterTokenizer(), embed_dim=8,
                       weights_sha256="0" * 64, source="memory", device=torch.device(device), dtype=torch.float16,
                       attention_backend="none", pooling="none", compiled=compiled)


def test_compile_never_on_a_cpu():
    model = recording_model("cpu")
    for config in (EmbedConfig(), EmbedConfig(compile_min_tokens=0)):
        assert compile_if_worth_it(model, config, 10**12) is model
    assert model.module.compile_calls == 0 and not model.compiled


def test_compile_from_the_models_own_break_even(kind="esm2"):
    threshold = model_spec(kind).compile_min_tokens
    assert threshold > 0
    below = recording_model("cuda", kind)
    assert compile_if_worth_it(below, EmbedConfig(), threshold - 1) is below
    assert below.module.compile_calls == 0

    at = recording_model("cuda", kind)
    compiled = compile_if_worth_it(at, EmbedConfig(), threshold)
    assert compiled.compiled and compiled.module is at.module and at.module.compile_calls == 1
    assert not at.compiled  # the model given is left as it was
    # Compiled once only, and never when compiling is switched off.
    assert compile_if_worth_it(compiled, EmbedConfig(), 10 * threshold) is compiled and at.module.compile_calls == 1
    off = recording_model("cuda", kind)
    assert compile_if_worth_it(off, EmbedConfig(compile_layers=False, compile_min_tokens=0), 10 * threshold) is off
    assert off.module.compile_calls == 0


def test_dnabert_s_compiles_only_when_asked():
    never = recording_model("cuda", "dnabert_s")
    assert model_spec("dnabert_s").compile_min_tokens is None
    assert compile_if_worth_it(never, EmbedConfig(), 10**12) is never and never.module.compile_calls == 0
    asked = recording_model("cuda", "dnabert_s")
    assert compile_if_worth_it(asked, EmbedConfig(compile_min_tokens=0), 1).compiled


def test_a_gpu_model_keeps_its_kernels_in_the_compile_cache_compiled_or_not(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    model = recording_model("cuda", "dnabert_s")
    assert compile_if_worth_it(model, EmbedConfig(compile_cache_dir=tmp_path / "kernels"), 10) is model
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "kernels" / "triton")  # vnp's Triton kernels


def test_compile_threshold_from_the_config_overrides_the_models():
    every = recording_model("cuda")
    assert compile_if_worth_it(every, EmbedConfig(compile_min_tokens=0), 1).compiled  # 0: every shard
    assert every.module.compile_calls == 1
    low = recording_model("cuda")
    assert compile_if_worth_it(low, EmbedConfig(compile_min_tokens=100), 100).compiled
    high = recording_model("cuda")
    big_enough_for_the_model = model_spec("esm2").compile_min_tokens
    assert not compile_if_worth_it(high, EmbedConfig(compile_min_tokens=10 * big_enough_for_the_model),
                                   big_enough_for_the_model).compiled


def tiny_models(tmp_path: Path) -> dict[str, Path]:
    from vnp_core.tiny_models import write_tiny_dnabert_s, write_tiny_esm2

    return {"esm2": write_tiny_esm2(tmp_path / "esm2_tiny.pt"), "dnabert_s": write_tiny_dnabert_s(tmp_path / "dnabert_s")}


def test_loaders_never_compile(tmp_path):
    for name, path in tiny_models(tmp_path).items():
        assert not model_spec(name).load(path, EmbedConfig(compile_min_tokens=0)).compiled


# ----------------------------------------------------------------------------------------------
# The model registry


def test_registry_order_and_entries():
    assert list(MODELS) == ["dnabert_s", "esm2"]  # the device's order and the classifier's feature order
    for name, spec in MODELS.items():
        assert spec.name == name and model_spec(name) is spec
        assert spec.index_column in INDEX_COLUMNS and f"{name}_tokens" in INDEX_COLUMNS
        assert spec.alphabet and len(set(spec.alphabet)) == len(spec.alphabet)
        assert spec.pooling and (spec.compile_min_tokens is None or spec.compile_min_tokens > 0)
    assert (MODELS["dnabert_s"].index_column, MODELS["esm2"].index_column) == ("nucleotide", "protein")
    with pytest.raises(ValueError, match="unknown model 'esm3': expected one of dnabert_s, esm2"):
        model_spec("esm3")


def test_every_spec_loads_tokenizes_and_references_its_tiny_model(tmp_path):
    paths = tiny_models(tmp_path)
    sequences = {"esm2": ["MKV", "ACDEFGHIKLMNPQRSTVWY"], "dnabert_s": ["ACGTACGTAA", "GGGCCCATATAT"]}
    for name, spec in MODELS.items():
        assert set("".join(sequences[name])) <= set(spec.alphabet)
        loaded = spec.load(paths[name], config())
        assert (loaded.kind, loaded.pooling) == (name, spec.pooling)
        tokenizer = spec.tokenizer(paths[name], config())
        assert tokenizer.digest == loaded.tokenizer.digest
        ids = [f"{name}_{i}" for i in range(2)]
        embed_sequences(loaded, ids, sequences[name], tmp_path / f"{name}.h5", config())
        reference = spec.reference(paths[name], sequences[name], config(), "cpu")
        assert reference.shape == (2, loaded.embed_dim) and reference.dtype == np.float32
        np.testing.assert_allclose(read_embeddings(tmp_path / f"{name}.h5").embeddings, reference, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# EmbedConfig refuses what no run could use


@pytest.mark.parametrize(("change", "message"), [
    ({"max_protein_length": 0}, "max_protein_length must be at least 1"),
    ({"attention_backend": "flash"}, "attention back end must be one of .*got 'flash'"),
    ({"num_workers": -1}, "num_workers must be 0 or more"),
    ({"checkpoint_rows": 0}, "checkpoint_rows 1 or more"),
    ({"compile_min_tokens": -1}, "compile_min_tokens must be 0 or more"),
    ({"dtype": "float64"}, "dtype must be"),
    ({"max_tokens": 0}, "max_tokens must be positive"),
])
def test_embed_config_refuses_bad_values(change, message):
    with pytest.raises(ValueError, match=message):
        EmbedConfig(**change)


def test_embed_config_accepts_every_attention_back_end():
    for name in ("auto", *ATTENTION_BACKENDS):
        assert EmbedConfig(attention_backend=name).attention_backend == name
    assert EmbedConfig().max_protein_length == ESM2_MAX_RESIDUES == 1022


# A compile in a process of its own (torch keeps compiled graphs in memory too); prints torch's cache counters.
# "ray-like" puts a module that reaches torch ahead of torch's own in sys.modules, as a Ray worker's
# `__mp_main__` is: pickle names a memory format by the first such module, and Inductor's key pickles them.
COMPILE_ONCE = """
import sys, types
from pathlib import Path
if sys.argv[2] == "ray-like":
    sys.modules["a_module_ahead"] = ahead = types.ModuleType("a_module_ahead")
import torch
from torch._dynamo.utils import counters
from vnp_core.engine import configure_compiler
if sys.argv[2] == "ray-like":
    ahead.torch = torch
configure_compiler(Path(sys.argv[1]))
layer = torch.nn.Linear(8, 8)  # its parameters are the graph's static inputs, with their memory format
torch.compile(lambda x: torch.nn.functional.gelu(layer(x)) * 2, fullgraph=True)(torch.randn(4, 8))
print(counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"])
"""


def test_a_compile_is_kept_in_the_compile_cache_for_the_next_process_however_it_imported(tmp_path):
    def compile_once(process: str) -> tuple[int, int]:
        done = subprocess.run([sys.executable, "-c", COMPILE_ONCE, str(tmp_path / "compile_cache"), process],
                              capture_output=True, text=True, timeout=300, check=True,
                              env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": ""})
        hits, misses = done.stdout.split()[-2:]
        return int(hits), int(misses)

    assert compile_once("plain") == (0, 1)
    assert any((tmp_path / "compile_cache" / "fxgraph").iterdir())
    assert compile_once("plain") == (1, 0)  # another process, the same folder: loaded, not compiled
    assert compile_once("ray-like") == (1, 0)  # a Ray actor's imports: the same key


def test_a_memory_format_pickled_by_name_unpickles_as_itself():
    import pickle

    configure_compiler(None)
    for memory_format in (torch.contiguous_format, torch.channels_last, torch.preserve_format):
        pickled = pickle.dumps(memory_format)
        assert b"vnp_core.engine" in pickled and pickle.loads(pickled) is memory_format


def test_the_compile_cache_setting_leaves_torch_default_alone_when_unset(tmp_path, monkeypatch):
    from torch._inductor.runtime.cache_dir_utils import cache_dir, triton_cache_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    default = cache_dir()
    configure_compiler(None)
    assert cache_dir() == default
    configure_compiler(tmp_path / "compiled")
    assert cache_dir() == str(tmp_path / "compiled")
    assert triton_cache_dir(0) == str(tmp_path / "compiled" / "triton")


# Both models' layers compiled as the engine compiles them (`aot_eager`: the same tracing, no C compiler),
# in a process of its own (Dynamo's settings are the process's); prints how often AOTAutograd was
# entered: once per traced graph, twice where Dynamo traced a model again.
TRACE_ONCE = """
import sys
import torch
from torch._dynamo.utils import counters
from vnp_core.engine import configure_compiler
from vnp_core.models.dnabert_s import DnabertSConfig, PackedDnabertS
from vnp_core.models.esm2 import ESM2Config, PackedESM2
from vnp_core.packing import PackedBatch

if sys.argv[1] == "configured":
    configure_compiler(None)
lengths = [9, 14, 6]
batch = PackedBatch(torch.randint(4, 24, (sum(lengths),)), torch.tensor([0, 9, 23, 29], dtype=torch.int32),
                    torch.cat([torch.arange(n) for n in lengths]), max(lengths), torch.arange(3))
dnabert_s = PackedDnabertS(DnabertSConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=64, vocab_size=32), "sdpa_padded").eval()
esm2 = PackedESM2.from_config(ESM2Config(num_layers=2, embed_dim=32, attention_heads=4), "cpu", torch.float32, "sdpa_padded")
for model in (dnabert_s, esm2):
    model.compile_layers(backend="aot_eager")
    with torch.inference_mode():
        model(batch)
print(counters["aot_autograd"]["total"])
"""


def test_the_compiler_traces_each_model_once():
    # Left symbolic, the layers' Python floats (eps, the attention scale) make Dynamo trace each model a
    # second time (0.2-1.5 s on a 2-core CPU).
    def graphs_traced(setup: str) -> int:
        done = subprocess.run([sys.executable, "-c", TRACE_ONCE, setup], capture_output=True, text=True, timeout=300,
                              check=True, cwd=Path(__file__).resolve().parents[1])
        return int(done.stdout.split()[-1])

    assert graphs_traced("configured") == 2
    assert graphs_traced("torch's defaults") == 4  # what the setting saves


class CompilingMeanEmbedding(MeanEmbedding):
    """Looks its first pack's graph up in Inductor's cache, as a compiled model does: `hits` found, `misses` compiled."""

    def __init__(self, hits: int, misses: int):
        super().__init__()
        self.lookups = {"fxgraph_cache_hit": hits, "fxgraph_cache_miss": misses}

    def embed(self, batch) -> torch.Tensor:
        from torch._dynamo.utils import compilation_time_metrics, counters

        for counter, count in self.lookups.items():
            counters["inductor"][counter] += count
        if self.lookups:  # traced once
            compilation_time_metrics.setdefault("_compile.compile_inner", []).append(1.5)
        self.lookups = {}
        return super().embed(batch)


def test_a_compiled_models_first_pack_reports_its_graphs_from_the_compile_cache(tmp_path):
    from dataclasses import replace

    ids, sequences = proteins(12)
    for job, (hits, misses) in enumerate([(0, 2), (3, 0)]):  # a cold cache, then a warm one, in one process
        model = replace(fake_model(), module=CompilingMeanEmbedding(hits, misses), compiled=True)
        stats = embed_sequences(model, ids, sequences, tmp_path / f"shard{job}.h5", config())
        assert stats.compile_at_first_pack == (hits, misses, pytest.approx(1.5))  # a difference of two sums, so 1.5 and not a tie that rounds either way
        assert f"(Inductor graphs: {hits} from the compile cache, {misses} compiled anew; 1.5 s in torch.compile)" in stats.summary()
    uncompiled = embed_sequences(fake_model(), ids, sequences, tmp_path / "shard2.h5", config())
    assert uncompiled.compile_at_first_pack is None and "Inductor" not in uncompiled.summary()
