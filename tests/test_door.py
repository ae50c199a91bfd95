"""The door: every bad input, option, file and environment of the command line, one case each.

Each refusal must end with exit code 1 and exactly one line on stderr, `error: ...`, naming the thing
(the distinctive text each case expects), with no traceback; and leave nothing behind (the listing
of the whole test folder, sizes and modification times included, is the same after as before: no
output, no temporary file, no registered sample, no home folder). No file the product reads may run
code: the planted pickles would create a marker file, which must never appear.

Tests run as root here, where permission bits stop nothing: an unwritable location is a path under
/sys (EACCES) or /proc (no files can be made there), a full disk is simulated in-process (ENOSPC)
or, for a real process, by a file-size limit (EFBIG).
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import pickle
import random
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from vnp_assets import cli
from vnp_assets.cli import app

REPO = Path(__file__).resolve().parents[1]
VNP = REPO / ".venv" / "bin" / "vnp"
runner = CliRunner()

NUCLEOTIDES = ">r1 first read\nATGAAACCCGGGTTTAAACCCGGGATGCCC\n>r2\nGCTGCTGCTGCTGCTGCTGCTGCTGCTGCT\n"
PROTEINS = ">p1\nMKPGLNPGMP\n>p2\nAAAAAAAAAA\n"


class Evil:
    """Unpickling this runs `touch <marker>`: no file the product reads may do that."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ----------------------------------------------------------------------------------------------
# Fixtures and the one assertion every refusal makes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny models, written once by the command itself."""
    out = tmp_path_factory.mktemp("door") / "tiny"
    result = runner.invoke(app, ["models", "make-tiny", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with good inputs, the current directory and DAGSTER_HOME for the test."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    (tmp_path / "reads.fa").write_text(NUCLEOTIDES)
    (tmp_path / "proteins.faa").write_text(PROTEINS)
    return tmp_path


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under `root` (hidden ones too), with the size and modification time of each file."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            found[os.path.relpath(os.path.join(folder, name), root)] = ("dir",)
        for name in files:
            path = os.path.join(folder, name)
            info = os.lstat(path)
            found[os.path.relpath(path, root)] = ("file", info.st_size, info.st_mtime_ns)
    return found


def refused(args: list, expect: str, watch: Path | None = None, **invoke) -> str:
    """`vnp args` ends with exit 1 and one line `error: ...` holding `expect`, and changes nothing under `watch`."""
    before = snapshot(watch) if watch is not None else None
    result = runner.invoke(app, [str(arg) for arg in args], **invoke)
    lines = result.stderr.splitlines()
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert expect in lines[0], lines[0]
    if watch is not None:
        assert snapshot(watch) == before, "the refused command left something behind"
    return lines[0]


def write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


# ----------------------------------------------------------------------------------------------
# vnp prep: bad FASTA inputs


BAD_FASTA = [
    ("empty", b"", "empty file"),
    ("binary", bytes(range(256)) * 4, "binary data"),
    ("fastq", b"@r1\nACGT\n+\nIIII\n", "looks like FASTQ"),
    ("letters", b">r1\nACGTJACGT\n", "record 'r1': invalid letter 'J' at column 5"),
    ("duplicate", b">r1\nACGT\n>r1\nACGA\n", "record 'r1': duplicate id (first seen on line 1)"),
    ("empty_record", b">r1\n>r2\nACGT\n", "record 'r1': record has no sequence"),
    ("no_id", b">\nACGT\n", "header has no id"),
    ("non_utf8_header", b">r\xff\xfe1\nACGT\n", "header is not UTF-8 text"),
    ("non_ascii_sequence", b">r1\nAC\xc3\xa9GT\n", "invalid letter byte 0xc3 (not ASCII) at column 3"),
    ("text", b"hello world\n", "not a FASTA file"),
]


@pytest.mark.parametrize(("name", "content", "expect"), BAD_FASTA, ids=[case[0] for case in BAD_FASTA])
def test_prep_refuses_bad_fasta(work: Path, name: str, content: bytes, expect: str) -> None:
    bad = write(work / f"{name}.fa", content)
    line = refused(["prep", bad, "--out-dir", work / "out"], expect, work)
    assert str(bad) in line


def test_prep_refuses_broken_and_truncated_gzip(work: Path) -> None:
    broken = write(work / "broken.fa.gz", b"\x1f\x8b" + b"\x00not gzip at all" * 8)
    refused(["prep", broken, "--out-dir", work / "out"], "truncated or corrupt gzip data", work)
    whole = gzip.compress("".join(f">r{i}\n{'ACGT' * 50}\n" for i in range(2000)).encode())
    truncated = write(work / "truncated.fa.gz", whole[: len(whole) // 2])
    refused(["prep", truncated, "--out-dir", work / "out"], "truncated or corrupt gzip data", work)


def test_prep_refuses_missing_directory_and_device_inputs(work: Path) -> None:
    refused(["prep", work / "missing.fa", "--out-dir", work / "out"], "missing.fa: no such file", work)
    (work / "folder.fa").mkdir()
    refused(["prep", work / "folder.fa", "--out-dir", work / "out"], "folder.fa: is a folder, not a file", work)
    refused(["prep", "/dev/zero", "--out-dir", work / "out"], "/dev/zero: is a device", work)
    os.mkfifo(work / "pipe.fa")  # reading it would wait for a writer forever
    refused(["prep", work / "pipe.fa", "--out-dir", work / "out"], "pipe.fa: is a pipe, not a file", work)
    (work / "loop.fa").symlink_to(work / "loop.fa")
    refused(["prep", work / "loop.fa", "--out-dir", work / "out"], "Too many levels of symbolic links", work)


def test_prep_refuses_bad_options(work: Path) -> None:
    reads = work / "reads.fa"
    refused(["prep", reads, "--out-dir", work / "out", "--chunk-length", "400"], "--chunk-length 400: must be one of 300, 500", work)
    refused(["prep", reads, "--out-dir", work / "out", "--chunk-length", "abc"], "Invalid value for '--chunk-length'", work)
    refused(["prep", reads], "Missing option '--out-dir'", work)
    refused(["prep", reads, "--out-dir", work / "out", "--bogus"], "No such option: --bogus", work)


def test_prep_refuses_outputs_it_cannot_write(work: Path) -> None:
    reads = work / "reads.fa"
    refused(["prep", reads, "--out-dir", reads], "reads.fa: is a file, not a folder", work)
    refused(["prep", reads, "--out-dir", reads / "out"], "reads.fa is a file, not a folder", work)
    refused(["prep", reads, "--out-dir", "/sys/vnp-door-test"], "cannot write in /sys", work)
    refused(["prep", reads, "--out-dir", "/proc/vnp-door-test"], "cannot write in /proc", work)
    (work / "out").mkdir()
    (work / "out" / "reads_identified_protein.faa").mkdir()  # where an output file would go
    refused(["prep", reads, "--out-dir", work / "out"], "reads_identified_protein.faa is a folder", work)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in a read-only folder: /sys and /proc stand for it")
def test_prep_refuses_a_read_only_folder(work: Path) -> None:
    locked = work / "locked"
    locked.mkdir(mode=0o500)
    try:
        refused(["prep", work / "reads.fa", "--out-dir", locked], "cannot write in", work)
    finally:
        locked.chmod(0o700)


def test_prep_refuses_names_too_long_for_the_file_system(work: Path) -> None:
    # 250 characters fit a file name; the outputs add `_identified_nucleotide.fa` and do not.
    long_input = write(work / ("r" * 247 + ".fa"), NUCLEOTIDES)
    refused(["prep", long_input, "--out-dir", work / "out"], "would be too long for the file system: rename the input", work)
    refused(["prep", work / "reads.fa", "--out-dir", work / ("d" * 300)], "too long for the file system", work)


def test_prep_on_a_full_disk_leaves_nothing(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vnp_core import prep

    def full_disk(*args, **kwargs):
        yield ">r1_chunk_1\n"
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(prep, "_fasta_texts", full_disk)
    line = refused(["prep", work / "reads.fa", "--out-dir", work / "out"], "No space left on device", work)
    assert "could not write" in line and "the disk is full" in line


def test_interrupt_is_one_line(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vnp_core import prep

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "prepare_fasta", interrupted)
    refused(["prep", work / "reads.fa", "--out-dir", work / "out"], "interrupted (Ctrl-C)", work)


def test_verbose_adds_the_traceback(work: Path) -> None:
    result = runner.invoke(app, ["--verbose", "prep", str(work / "missing.fa"), "--out-dir", str(work / "out")])
    assert result.exit_code == 1
    assert "Traceback" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("error: input ") and "missing.fa: no such file" in result.stderr


# ----------------------------------------------------------------------------------------------
# vnp embed: models, devices, options, outputs


@pytest.fixture
def evil_models(work: Path, tiny: Path) -> dict[str, Path]:
    """Model files whose pickles would run code, and broken model folders."""
    marker = work / "MARKER"
    models = work / "models"
    models.mkdir()
    paths = {"marker": marker}
    # A fair-esm checkpoint (torch zip archive) whose config object runs code when unpickled.
    paths["evil_zip"] = models / "esm2_evil.pt"
    torch.save({"model": {}, "cfg": {"model": Evil(marker)}}, paths["evil_zip"])
    # The same as a plain pickle (torch's legacy, non-zip format).
    paths["evil_pickle"] = write(models / "esm2_evil_legacy.pt", pickle.dumps({"model": Evil(marker)}, protocol=2))
    # A pickled whole-module classifier of the original's kind, planted with code.
    paths["evil_classifier"] = models / "500_model.pth"
    torch.save(Evil(marker), paths["evil_classifier"])
    paths["garbage_pt"] = write(models / "garbage.pt", b"GARBAGE" + random.Random(0).randbytes(4089))
    # A pickle (PROTO first) that breaks the unpickler itself: REDUCE on an empty stack (an IndexError inside).
    paths["garbled_pickle"] = write(models / "garbled.pt", b"\x80\x02R.")
    # A Hugging Face ESM-2 folder without its config.json.
    paths["esm2_no_config"] = models / "esm2_hf"
    paths["esm2_no_config"].mkdir()
    write(paths["esm2_no_config"] / "model.safetensors", b"")
    # DNABERT-S folders: no config.json, a truncated safetensors, a garbage tokenizer.json.
    for name in ("no_config", "truncated", "bad_tokenizer"):
        shutil.copytree(tiny / "dnabert_s_tiny", models / name)
        paths[name] = models / name
    (paths["no_config"] / "config.json").unlink()
    weights = (paths["truncated"] / "model.safetensors").read_bytes()
    write(paths["truncated"] / "model.safetensors", weights[: len(weights) // 2])
    write(paths["bad_tokenizer"] / "tokenizer.json", "{not json")
    return paths


def test_embed_never_runs_code_from_a_checkpoint(work: Path, evil_models: dict[str, Path]) -> None:
    proteins = work / "proteins.faa"
    refused(["embed", "esm2", proteins, "--model", evil_models["evil_zip"], "--out", work / "e.h5"],
            "refused: loading it would run code", work)
    refused(["embed", "esm2", proteins, "--model", evil_models["evil_pickle"], "--out", work / "e.h5"],
            "esm2_evil_legacy.pt", work)
    assert not evil_models["marker"].exists()


def test_embed_refuses_broken_models(work: Path, evil_models: dict[str, Path], tiny: Path) -> None:
    proteins, reads, out = work / "proteins.faa", work / "reads.fa", work / "e.h5"
    refused(["embed", "esm2", proteins, "--model", work / "nowhere.pt", "--out", out], "nowhere.pt: no such file or folder", work)
    refused(["embed", "esm2", proteins, "--model", evil_models["garbage_pt"], "--out", out], "garbage.pt: not a readable torch checkpoint", work)
    refused(["embed", "esm2", proteins, "--model", evil_models["garbled_pickle"], "--out", out],
            "garbled.pt: not a readable torch checkpoint (pop from empty list)", work)
    refused(["embed", "esm2", proteins, "--model", evil_models["esm2_no_config"], "--out", out], "no config.json in this folder", work)
    refused(["embed", "dnabert-s", reads, "--model", evil_models["no_config"], "--out", out], "no config.json in this folder", work)
    refused(["embed", "dnabert-s", reads, "--model", evil_models["truncated"], "--out", out], "not a readable safetensors file", work)
    refused(["embed", "dnabert-s", reads, "--model", evil_models["bad_tokenizer"], "--out", out], "not a readable tokenizer.json", work)
    refused(["embed", "dnabert-s", reads, "--model", tiny / "esm2_tiny.pt", "--out", out], "give the DNABERT-S folder", work)


@pytest.mark.parametrize(("option", "value", "expect"), [
    ("--device", "cuda", "--device cuda: no CUDA GPU is usable on this machine: use --device cpu"),
    ("--device", "cuda:3", "--device cuda:3: no CUDA GPU"),
    ("--device", "tpu", "--device 'tpu': must be cpu, cuda or cuda:N"),
    ("--dtype", "float64", "--dtype 'float64': must be one of float32, float16, bfloat16"),
    ("--max-tokens", "0", "--max-tokens 0: must be 1 or more"),
    ("--max-protein-length", "0", "--max-protein-length 0: must be 1 or more"),
    ("--workers", "-1", "--workers -1: must be 0 or more"),
    ("--attention", "fastest", "--attention 'fastest': must be one of"),
])
def test_embed_refuses_bad_options(work: Path, tiny: Path, option: str, value: str, expect: str) -> None:
    if option == "--device" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    refused(["embed", "esm2", work / "proteins.faa", "--model", tiny / "esm2_tiny.pt", "--out", work / "e.h5",
             option, value], expect, work)


def test_embed_refuses_bad_inputs_and_outputs(work: Path, tiny: Path) -> None:
    model = ["--model", tiny / "esm2_tiny.pt"]
    proteins = work / "proteins.faa"
    bad_protein = write(work / "bad.faa", ">p1\nMKP#LN\n")
    refused(["embed", "esm2", bad_protein, *model, "--out", work / "e.h5"], "record 'p1': invalid letter '#'", work)
    refused(["embed", "esm2", proteins, *model, "--out", proteins], "is the input file itself", work)
    (work / "folder.h5").mkdir()
    refused(["embed", "esm2", proteins, *model, "--out", work / "folder.h5"], "folder.h5: is a folder", work)
    refused(["embed", "esm2", proteins, *model, "--out", work / "missing" / "e.h5"], "the folder", work)
    refused(["embed", "esm2", proteins, *model, "--out", proteins / "e.h5"], "proteins.faa is a file, not a folder", work)
    refused(["embed", "esm2", proteins, *model, "--out", "/sys/e.h5"], "cannot write in /sys", work)
    before = os.stat("/dev/full")
    refused(["embed", "esm2", proteins, *model, "--out", "/dev/full"], "/dev/full: is a device", work)
    after = os.stat("/dev/full")
    assert (before.st_ino, before.st_rdev) == (after.st_ino, after.st_rdev)  # never replaced by a file


def test_embed_on_a_full_disk_keeps_no_output(work: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_fsync = os.fsync

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    out = work / "e.h5"
    line = refused(["embed", "esm2", work / "proteins.faa", "--model", tiny / "esm2_tiny.pt", "--out", out,
                    "--no-compile"], "No space left on device")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert str(out) in line and not out.exists()
    # The checkpoint stays beside it, for the rerun to resume from; no temporary file stays.
    assert sorted(p.name for p in work.iterdir() if p.name.startswith((".", "e.h5"))) in ([], ["e.h5.partial"])


# ----------------------------------------------------------------------------------------------
# vnp export-pt


def _merged(path: Path, ids=("a", "b"), **extra_attrs) -> Path:
    with h5py.File(path, "w") as f:
        f.create_dataset("ids", data=np.asarray(ids, dtype=object), dtype=h5py.string_dtype("utf-8"))
        f.create_dataset("dnabert_s", data=np.ones((len(ids), 3), np.float32))
        f.create_dataset("esm2", data=np.ones((len(ids), 2), np.float32))
        f.attrs["models"] = ["dnabert_s", "esm2"]
        f.attrs.update(extra_attrs)
    return path


def test_export_pt_refuses_files_that_are_not_merged_embeddings(work: Path) -> None:
    out = work / "features.pt"
    refused(["export-pt", work / "reads.fa", "--out", out], "reads.fa: not a readable HDF5 file", work)
    shard = work / "shard.h5"
    with h5py.File(shard, "w") as f:
        f.create_dataset("ids", data=np.asarray(["a"], dtype=object), dtype=h5py.string_dtype("utf-8"))
        f.create_dataset("embeddings", data=np.ones((1, 4), np.float32))
    refused(["export-pt", shard, "--out", out], "shard.h5: not a vnp merged embeddings file", work)
    wrong_rows = _merged(work / "wrong.h5")
    with h5py.File(wrong_rows, "a") as f:
        del f["esm2"]
        f.create_dataset("esm2", data=np.ones((5, 2), np.float32))
    refused(["export-pt", wrong_rows, "--out", out], "'esm2' is not one float vector per id", work)
    refused(["export-pt", work / "missing.h5", "--out", out], "missing.h5: no such file", work)
    refused(["export-pt", work, "--out", out], "is a folder, not a file", work)


def test_export_pt_reads_pickled_bytes_in_hdf5_as_data(work: Path) -> None:
    marker = work / "MARKER"
    planted = np.void(pickle.dumps(Evil(marker)))
    # As the list of models: refused, never unpickled.
    evil = _merged(work / "evil.h5")
    with h5py.File(evil, "a") as f:
        f.attrs["models"] = planted
    refused(["export-pt", evil, "--out", work / "features.pt"], "no 'models' attribute", work)
    # As an extra attribute and an opaque dataset of a good file: exported, the bytes stay bytes.
    good = _merged(work / "good.h5", note=planted)
    with h5py.File(good, "a") as f:
        f.create_dataset("payload", data=planted)
    result = runner.invoke(app, ["export-pt", str(good), "--out", str(work / "features.pt")])
    assert result.exit_code == 0, result.output
    assert torch.load(work / "features.pt", weights_only=True)["ids"] == ["a", "b"]
    assert not marker.exists()


def test_export_pt_refuses_outputs_it_cannot_write(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    merged = _merged(work / "merged.h5")
    refused(["export-pt", merged, "--out", merged], "is the input file itself", work)
    refused(["export-pt", merged, "--out", work / "reads.fa" / "features.pt"], "reads.fa is a file, not a folder", work)
    refused(["export-pt", merged, "--out", work / "no" / "features.pt"], "does not exist: create it first", work)
    refused(["export-pt", merged, "--out", "/dev/full"], "/dev/full: is a device", work)
    os.mkfifo(work / "pipe.pt")  # a rename over it would replace the pipe with a file
    refused(["export-pt", merged, "--out", work / "pipe.pt"], "pipe.pt: is a pipe", work)
    refused(["export-pt", merged, "--out", "/proc/features.pt"], "cannot write in /proc", work)
    refused(["export-pt", merged, "--out", work / ("f" * 250 + ".pt")], "too long for the file system", work)

    def full_disk(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    line = refused(["export-pt", merged, "--out", work / "features.pt"], "No space left on device", work)
    assert "features.pt" in line


# ----------------------------------------------------------------------------------------------
# vnp models make-tiny


def test_make_tiny_refuses_places_it_cannot_use(work: Path) -> None:
    refused(["models", "make-tiny", "--out", work / "reads.fa"], "reads.fa: is a file, not a folder", work)
    refused(["models", "make-tiny", "--out", work / "reads.fa" / "tiny"], "reads.fa is a file, not a folder", work)
    refused(["models", "make-tiny", "--out", "/sys/tiny"], "cannot write in /sys", work)
    (work / "taken").mkdir()
    write(work / "taken" / "notes.txt", "mine")
    refused(["models", "make-tiny", "--out", work / "taken"], "not a complete tiny-model folder", work)
    refused(["models", "make-tiny"], "Missing option '--out'", work)


@pytest.mark.parametrize(("args", "expect"), [
    (["prep", "reads.fa", "--out-dir", "gs://bucket/out"], "--out-dir gs://bucket/out: a URL"),
    (["embed", "esm2", "https://example.org/p.faa", "--model", "m.pt", "--out", "e.h5"], "input https://example.org/p.faa: a URL"),
    (["cache", "stats", "--store", "s3://bucket/store"], "--store s3://bucket/store: a URL"),
    (["cache", "stats", "--home", "GS://bucket/home"], "--home GS://bucket/home: a URL"),  # schemes have no case
])
def test_a_url_where_a_path_is_wanted_is_refused_as_a_url(work: Path, args: list[str], expect: str) -> None:
    refused([work / arg if arg == "reads.fa" else arg for arg in args], expect, work)


# ----------------------------------------------------------------------------------------------
# vnp run: refused before the sample is registered or anything is written


@pytest.mark.parametrize(("options", "expect"), [
    (["--shards", "0"], "--shards 0: must be 1 or more"),
    (["--devices", ""], "--devices '': expected physical GPU ids"),
    (["--devices", "a,b"], "--devices 'a,b': expected physical GPU ids"),
    (["--devices", "0"], "--devices 0: GPU(s) [0] requested"),
    (["--dtype", "float64"], "--dtype 'float64': must be one of"),
    (["--chunk-length", "400"], "--chunk-length 400: must be one of 300, 500"),
    (["--until", "everything"], "--until 'everything': must be one of sequence_index"),
    (["--esm2-model", "nowhere.pt"], "--esm2-model nowhere.pt: no such file or folder"),
    (["--home", "reads.fa"], "--home reads.fa: is a file, not a folder"),
    (["--home", "/sys/vnp_home"], "cannot write in /sys"),
    (["--home", "s3://bucket/vnp"], "--home s3://bucket/vnp: a URL: vnp reads and writes files: give a path"),
])
def test_run_refuses_bad_options_before_any_side_effect(work: Path, options: list[str], expect: str) -> None:
    if options[0] == "--devices" and options[1] == "0" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    refused(["run", work / "reads.fa", "--home", work / "home", *options], expect, work)
    assert not (work / "home").exists()


def test_run_refuses_bad_files_before_any_side_effect(work: Path, evil_models: dict[str, Path], tiny: Path) -> None:
    reads, home = work / "reads.fa", ["--home", work / "home"]
    refused(["run", work / "missing.fa", *home], "missing.fa: no such file", work)
    refused(["run", "https://example.org/reads.fa", *home], "input https://example.org/reads.fa: a URL", work)
    refused(["run", write(work / "reads.txt", NUCLEOTIDES), *home], "must be named *.fa, *.fasta or *.fna", work)
    refused(["run", write(work / ".fa", NUCLEOTIDES), *home], "must be named", work)
    refused(["run", write(work / "fq.fa", b"@r1\nACGT\n+\nIIII\n"), *home],
            "looks like FASTQ", work)
    refused(["run", reads, *home, "--dnabert-s-model", evil_models["no_config"]], "--dnabert-s-model", work)
    refused(["run", reads, *home, "--dnabert-s-model", evil_models["truncated"]], "not a readable safetensors file", work)
    refused(["run", reads, *home, "--classifier", evil_models["evil_classifier"]], "--trust-classifier-pickle", work)
    refused(["run", reads, *home, "--esm2-model", evil_models["evil_zip"]], "--esm2-model", work)
    refused(["run", reads, *home, "--esm2-model", evil_models["garbage_pt"]], "not a torch checkpoint", work)
    refused(["run", reads, *home, "--esm2-model", evil_models["garbled_pickle"]],
            "garbled.pt: not a readable torch checkpoint (pop from empty list)", work)
    refused(["run", reads, *home, "--esm2-model", evil_models["evil_pickle"]], "refused: loading it would run code", work)
    refused(["run", reads, *home, "--classifier", tiny / "classifier_300" / "300_model.state_dict.pt"],
            "trained on 300-bp chunks, but --chunk-length is 500", work)
    assert not evil_models["marker"].exists()
    assert not (work / "home").exists()


def test_run_prints_the_cause_inside_dagster_errors(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dagster._core.errors import DagsterExecutionStepExecutionError

    import vnp_assets.run_sample

    def failing_step(*args, **kwargs):
        try:
            raise ValueError("/models/x.pt: not a readable torch checkpoint")
        except ValueError as cause:
            error = DagsterExecutionStepExecutionError("Error occurred while executing op", user_exception=cause,
                                                       original_exc_info=sys.exc_info(), step_key="s",
                                                       op_name="s", op_def_name="s")
            error.__context__ = error  # a chain that loops: the printer must still end
            raise error from cause

    monkeypatch.setattr(vnp_assets.run_sample, "run_sample", failing_step)
    refused(["run", work / "reads.fa", "--home", work / "home"], "error: /models/x.pt: not a readable torch checkpoint")


def test_step_failure_text_gives_its_cause() -> None:
    text = ("embedding steps failed (rerun `vnp run`: finished shards are kept):\n"
            "shard 1 of s: dagster._core.errors.DagsterExecutionStepExecutionError: Error occurred while executing op:\n"
            "\nStack Trace:\n  File x\n"
            "The above exception was caused by the following exception:\n"
            "vnp_core.models.checkpoint.CheckpointError: /m/model.safetensors: not a readable safetensors file\n"
            "\nStack Trace:\n  File y\n"
            "The above exception was caused by the following exception:\n"
            "safetensors_rust.SafetensorError: Error while deserializing header\n")
    line = cli.describe_error(RuntimeError(text))
    assert line == ("embedding steps failed (rerun `vnp run`: finished shards are kept): "
                    "shard 1 of s: /m/model.safetensors: not a readable safetensors file")
    # Dagster's own form: the user's error in the wrapper's message, its raw cause after it.
    text = ("embedding steps failed (rerun `vnp run`: finished shards are kept):\n"
            "shard 0 of s: dagster._core.errors.DagsterExecutionStepExecutionError: Error occurred while executing op \"x\"::\n"
            "\nOSError: [Errno 28] could not write /h/shard-0.h5.partial: No space left on device\n"
            "\nStack Trace:\n  File x\n"
            "The above exception was caused by the following exception:\nOSError: [Errno 28] No space left on device\n")
    assert cli.describe_error(RuntimeError(text)).endswith(
        "shard 0 of s: could not write /h/shard-0.h5.partial: No space left on device")


def test_the_cli_knows_the_run_stages() -> None:
    from vnp_assets.run_sample import STAGES

    assert cli.RUN_STAGES == STAGES


def test_sample_names_are_safe() -> None:
    from vnp_assets.samples import MAX_SAMPLE_NAME, sample_name

    for file_name in ("a?b.fa", "x;rm -rf $(touch y)`z`.fa", "a/../b.fa", "é è.fa", "r" * 250 + ".fa.gz", "-.fa"):
        name = sample_name(file_name)
        assert name is not None and re.fullmatch(r"[A-Za-z0-9._-]+", name) and len(name) <= MAX_SAMPLE_NAME
        assert name not in (".", "..") and not name.startswith(".")
    assert sample_name("r" * 250 + ".fa") != sample_name("r" * 249 + "s.fa")  # long names stay distinct
    assert sample_name(".fa") is None and sample_name("..fa") is None


# ----------------------------------------------------------------------------------------------
# Real processes: the installed command, its exit, and a step that fails inside `vnp run`


def _vnp(args: list, cwd: Path, timeout: float, **popen) -> subprocess.CompletedProcess:
    env = {**popen.pop("env", os.environ), "DAGSTER_HOME": str(cwd / "dagster_home")}
    return subprocess.run([str(VNP), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, **popen)


def test_the_installed_command_prints_one_line(work: Path) -> None:
    done = _vnp(["prep", "missing.fa", "--out-dir", "out"], work, timeout=60)
    assert done.returncode == 1 and done.stderr == "error: input missing.fa: no such file: check the path\n"
    done = _vnp([], work, timeout=60)
    assert done.returncode == 1 and "Usage" in done.stdout + done.stderr


def test_the_code_location_names_a_broken_settings_file(work: Path) -> None:
    """VNP_SETTINGS is read by the code location (`dagster dev`), not by `vnp run`, which takes options."""
    from vnp_assets.definitions import settings_from_environment
    from vnp_assets.platform import SettingsError

    write(work / "settings.yaml", "[: not yaml")
    with pytest.raises(SettingsError) as refused:
        settings_from_environment({"VNP_SETTINGS": str(work / "settings.yaml"), "DAGSTER_HOME": str(work / "home")})
    assert str(refused.value).startswith("VNP_SETTINGS=") and "not a readable YAML file" in str(refused.value)
    assert not (work / "home").exists()


def test_run_with_a_failing_step_exits_with_its_cause(work: Path) -> None:
    """A real Dagster step failure in `vnp run` (the disk refuses the prep files: a file-size limit,
    EFBIG) ends the process with one line within the timeout; the input's odd, long name becomes a
    safe sample name and nothing is written outside the home."""
    # Stop-free in every frame, so the nucleotide file is six times the input; 2000 reads of 500 bp.
    name = "reads ?;$(touch pwned)&" + "x" * 200 + ".fa"
    write(work / name, "".join(f">r{i}\n{'GCT' * 166}GC\n" for i in range(2000)))
    before = set(os.listdir(work))
    limit = 3 << 20
    start = time.monotonic()
    done = _vnp(["run", name, "--home", "home", "--until", "sequence_index"], work, timeout=240,
                preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    seconds = time.monotonic() - start
    lines = done.stderr.splitlines()
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    error_lines = [line for line in lines if line.startswith("error: ")]
    assert error_lines == [lines[-1]] and "File too large" in lines[-1] and "_identified_nucleotide.fa" in lines[-1], lines[-5:]
    assert seconds < 240
    samples = os.listdir(work / "home" / "storage" / "samples")
    sample = [entry for entry in samples if not entry.startswith(".")]
    assert len(sample) == 1 and re.fullmatch(r"reads_____touch_pwned__x+-[0-9a-f]{8}", sample[0]) and len(sample[0]) <= 100
    assert set(os.listdir(work)) - before == {"home"}  # no ./vnp_home, no `pwned`
    assert json.dumps(sorted(os.listdir(work / "home"))).count("..") == 0
