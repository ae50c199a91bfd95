"""`vnp`: the command line. Each command checks its options and files, builds the typed config and calls the library.

It sits above both packages: `vnp run` goes through the Dagster asset graph (imported only there),
the other commands call `vnp_core` directly and never import Dagster.

The door: every command first checks every option, input and output path (`_check_*`), before it
writes anything or registers a sample. Whatever goes wrong, in the checks or in the work, ends the
same way (`VnpGroup.main`): one line `error: ...` on stderr naming the file or option and what to
do, exit code 1, and the traceback only with `--verbose`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal
import stat
import sys
import tempfile
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional, get_args

import typer
from typer import _click as click
from typer.core import TyperGroup
from typer.exceptions import Abort

from vnp_core.config import ESM2_MAX_RESIDUES, AttentionBackend, EmbedConfig, PrepConfig

# An error message is cut to this many characters: one line a terminal can show.
MAX_MESSAGE = 600
# After an error, a process still alive this long (a stuck thread or child at exit) is ended.
EXIT_GRACE_SECONDS = 20.0
# Room a temporary name takes beside an output (`.<name>.<pid>.tmp`, `<name>.partial`).
TEMP_NAME_ROOM = 20
CHUNK_LENGTHS = (300, 500)
DTYPES = ("float32", "float16", "bfloat16")
DEVICE_PATTERN = re.compile(r"cpu|cuda(:\d+)?")
URL_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # s3:, GS:, https:, file: (a relative path's first part)
# `vnp_assets.run_sample.STAGES`, known here without importing it (and Dagster) before the checks.
RUN_STAGES = ("sequence_index", "embeddings", "merged_embeddings", "fp16_validation_report", "virnucpro_predictions")


class DoorError(ValueError):
    """A refused option, input or output, found before anything was written; the message is the line shown."""


class VnpGroup(TyperGroup):
    """The top-level command group: one error path for every command (see the module docstring)."""

    # True inside the installed `vnp` process (not under a test runner): an error then also arms
    # the exit watchdog.
    own_process = False
    verbose = False

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # noqa: ANN001
        VnpGroup.verbose = False
        args = list(sys.argv[1:] if args is None else args)
        try:
            result = super().main(args=args, prog_name=prog_name or "vnp", complete_var=complete_var,
                                  standalone_mode=False, **extra)
            code = result if isinstance(result, int) else 0
        except click.exceptions.NoArgsIsHelpError as error:
            error.show()  # the help text, then exit 1: nothing was asked for
            code = 1
        except click.exceptions.ClickException as error:  # a usage error: unknown option, missing argument, not an integer
            command = error.ctx.command_path if getattr(error, "ctx", None) is not None else "vnp"
            _print_error(f"{command}: {_one_line(error.format_message())} (see `{command} --help`)")
            code = 1
        except Abort:
            _print_error("interrupted: nothing more was done; rerun the same command to resume")
            code = 1
        except (Exception, KeyboardInterrupt) as error:  # noqa: BLE001: the door itself
            if VnpGroup.verbose or _verbose_in(args):
                _print_traceback(error)
            _print_error(describe_error(error))
            code = 1
            if VnpGroup.own_process:
                _arm_exit_watchdog()
        if standalone_mode:
            sys.exit(code)
        return code

    def invoke(self, ctx):  # noqa: ANN001
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as error:  # typer would turn it into a silent exit 130
            raise _Interrupted() from error


class _Interrupted(Exception):
    def __str__(self) -> str:
        return "interrupted (Ctrl-C): rerun the same command to resume; finished outputs are kept"


class VnpTyper(typer.Typer):
    def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003
        VnpGroup.own_process = True
        # A background job of a non-interactive shell starts with SIGINT ignored, and Dagster gives SIGTERM
        # SIGINT's handler: a plain `kill` would then be ignored by vnp and by every process it starts.
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        return super().__call__(*args, **kwargs)


app = VnpTyper(cls=VnpGroup, help="vnp: VirNucPro features with packed FP16 ESM-2 and DNABERT-S on every GPU.",
               no_args_is_help=True, pretty_exceptions_enable=False)
embed_app = typer.Typer(help="Embed sequences with one model into an HDF5 file.", no_args_is_help=True)
models_app = typer.Typer(help="Model utilities.", no_args_is_help=True)
app.add_typer(embed_app, name="embed")
app.add_typer(models_app, name="models")
cache_app = typer.Typer(help="The embedding store: what it holds, and pruning it.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level (vnp run: each step's log as it runs); on an error, also print its traceback.")] = False) -> None:
    VnpGroup.verbose = verbose
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


# ----------------------------------------------------------------------------------------------
# The one error line


def _print_error(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)


def _print_traceback(error: BaseException) -> None:
    # The standard library's printer: it stops at a cycle in the chain, and prints no locals.
    try:
        sys.stderr.write("".join(traceback.format_exception(error)))
    except Exception:  # noqa: BLE001: the line that follows is what matters
        pass


def _verbose_in(args: list[str]) -> bool:
    """`--verbose` given before the command, for an error raised before the callback saw it."""
    for arg in args:
        if arg in ("--verbose", "-v"):
            return True
        if not arg.startswith("-"):
            return False
    return False


def _arm_exit_watchdog() -> None:
    """Exit for sure: a thread or child process that does not stop must not keep the command hanging."""

    def force_exit() -> None:
        sys.stderr.flush()
        os._exit(1)

    timer = threading.Timer(EXIT_GRACE_SECONDS, force_exit)
    timer.daemon = True
    timer.start()


def _one_line(text: str) -> str:
    line = next((line.strip() for line in str(text).splitlines() if line.strip()), "")
    line = "".join(ch if ch.isprintable() else "?" for ch in line)
    line += ")" * max(0, line.count("(") - line.count(")"))  # a cause cut at its first line keeps its parenthesis
    return line if len(line) <= MAX_MESSAGE else line[: MAX_MESSAGE - 3] + "..."


# Dagster's step errors chain the user's error; a shard step's failure comes back as its text, in which
# each cause follows this line.
_CAUSE_LINE = "The above exception was caused by the following exception:"
_QUALIFIED_ERROR = re.compile(r"^((?:[A-Za-z_][\w]*\.)*[A-Za-z_]\w*(?:Error|Exception|Interrupt|Exit)\w*): ")
# Types whose message alone does not say what went wrong: a bug, reported as such.
_UNEXPECTED = (AttributeError, AssertionError, IndexError, KeyError, NameError, TypeError, UnboundLocalError,
               ZeroDivisionError, NotImplementedError, RecursionError)
_ERRNO_HINTS = {
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder: give a file",
    errno.EACCES: "check its permissions or choose another location",
    errno.EPERM: "check its permissions or choose another location",
    errno.ENOSPC: "the disk is full: free some space or choose another location, then rerun",
    errno.EDQUOT: "the disk quota is used up: free some space or choose another location, then rerun",
    errno.EFBIG: "the file would exceed the size allowed here (ulimit -f or the file system's limit): "
                 "choose another location",
    errno.EROFS: "the file system is read-only: choose another location",
    errno.ENAMETOOLONG: "the name is too long for the file system: use a shorter name",
    errno.ELOOP: "too many symbolic links: check the path",
    errno.EEXIST: "it exists already: remove it or choose another path",
}


def describe_error(error: BaseException) -> str:
    """One line for any error: the message of the error that says what went wrong (not a Dagster
    wrapper around it), bounded, with what to do where the message does not say it."""
    error = root_cause(error)
    if isinstance(error, KeyboardInterrupt):
        return str(_Interrupted())
    if isinstance(error, OSError):
        return _one_line(_os_error_text(error))
    text = str(error)
    if _CAUSE_LINE in text or "dagster._core.errors." in text:
        text = _step_failure_text(text)
    line = _one_line(text)
    if isinstance(error, _UNEXPECTED) or not line:
        return _one_line(f"unexpected {type(error).__name__}: {line or 'no message'} "
                         "(rerun with --verbose for the traceback and report it)")
    from vnp_core.fasta import FastaError

    if isinstance(error, FastaError):
        line = _one_line(f"{line}: {_fasta_hint(error)}")
    return line


def root_cause(error: BaseException) -> BaseException:
    """`error` without the Dagster exceptions wrapped around it (a bounded walk: a chain may loop)."""
    seen: set[int] = set()
    while id(error) not in seen and len(seen) < 64:
        seen.add(id(error))
        inner = error.__cause__ or error.__context__
        if inner is None or not type(error).__module__.startswith("dagster"):
            break
        error = inner
    return error


def _step_failure_text(text: str) -> str:
    """From the error text of failed steps (`vnp run`'s shard steps): its first line, and the first error
    in it that is not a Dagster wrapper (the user's error; its own causes come after it)."""
    lines = text.splitlines()
    head = lines[0].strip().rstrip(":")
    shard = re.search(r"^(shard \d+ of \S+): ", text, flags=re.MULTILINE)
    for line in lines[1:]:
        found = _QUALIFIED_ERROR.match(line.strip())
        if found and not found.group(1).startswith("dagster"):
            cause = re.sub(r"^\[Errno -?\d+\]\s*", "", line.strip()[found.end():])
            return f"{head}: {shard.group(1) + ': ' if shard else ''}{cause}"
    return text


def _os_error_text(error: OSError) -> str:
    strerror = error.strerror or ""
    if error.filename is not None:
        where = os.fsdecode(error.filename)
        if error.filename2 is not None:
            where += f" -> {os.fsdecode(error.filename2)}"
        text = f"{where}: {strerror or error}"
    else:
        text = re.sub(r"^\[Errno -?\d+\]\s*", "", str(error)) or strerror or type(error).__name__
    hint = _ERRNO_HINTS.get(error.errno)
    return f"{text}: {hint}" if hint and hint not in text else text


def _fasta_hint(error) -> str:  # noqa: ANN001
    if error.record_id is not None and not error.problem.startswith("truncated or corrupt gzip"):
        return "fix or remove that record (vnp prep --skip-bad-records skips bad records)"
    return "give a FASTA file (plain or gzipped) of sequences"


# ----------------------------------------------------------------------------------------------
# The checks at the door: options, inputs and outputs, before anything is written


def _check_choice(option: str, value, allowed) -> None:  # noqa: ANN001
    if value not in allowed:
        raise DoorError(f"{option} {value!r}: must be one of {', '.join(str(v) for v in allowed)}")


def _check_at_least(option: str, value: int | None, minimum: int, meaning: str = "") -> None:
    if value is not None and value < minimum:
        raise DoorError(f"{option} {value}: must be {minimum} or more{meaning}")


def _check_device(device: str) -> None:
    if not DEVICE_PATTERN.fullmatch(device):
        raise DoorError(f"--device {device!r}: must be cpu, cuda or cuda:N (N: a GPU number)")
    if device == "cpu":
        return
    import torch

    if not torch.cuda.is_available():
        raise DoorError(f"--device {device}: no CUDA GPU is usable on this machine: use --device cpu")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise DoorError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s), "
                        f"numbered from 0: choose one of them")


def _device_list(devices: str) -> list[int]:
    ids = [entry.strip() for entry in devices.split(",")]
    if not devices.strip() or not all(entry.isdigit() for entry in ids):
        raise DoorError(f"--devices {devices!r}: expected physical GPU ids separated by commas, e.g. 2,3 "
                        "(leave the option out to use every GPU)")
    return [int(entry) for entry in ids]


def _check_gpus(gpu_ids: list[int] | None, fp8: bool) -> None:
    """`--devices` names GPUs of this host; with `--fp8`, each GPU the run may use has FP8 tensor cores."""
    if gpu_ids is None and not fp8:
        return
    from vnp_core.gpu import discover_devices

    try:
        usable = discover_devices(gpu_ids)
    except ValueError as error:
        raise DoorError(f"--devices {','.join(map(str, gpu_ids))}: {_one_line(str(error))}: "
                        "leave the option out to use every GPU there is") from error
    if fp8 and usable:
        import torch

        from vnp_core.models.fp8 import check_fp8_device

        every = discover_devices()  # physical ids in CUDA's order: a GPU's index here is its place in it
        for device in usable:
            try:
                check_fp8_device(torch.device("cuda", every.index(device)), "leave --fp8 out, or pick FP8 GPUs with --devices")
            except ValueError as error:
                raise DoorError(f"--fp8 on GPU {device}: {error}") from error


def _stat(path: Path, what: str):  # noqa: ANN202
    """`os.stat` of `path`, or None when there is nothing there; other faults as one sentence."""
    if not path.is_absolute() and path.parts and URL_SCHEME.fullmatch(path.parts[0]):  # Path("s3://b/k") is s3:/b/k
        raise DoorError(f"{what} {path.parts[0]}//{'/'.join(path.parts[1:])}: a URL: vnp reads and writes files: "
                        "give a path (copy the file here, or mount the bucket with a FUSE file system)")
    try:
        return path.stat()
    except FileNotFoundError:
        return None
    except NotADirectoryError as error:
        raise DoorError(f"{what} {path}: {_file_ancestor(path)} is a file, not a folder: check the path") from error
    except OSError as error:
        raise DoorError(f"{what} {path}: {_os_error_text(error)}") from error


def _file_ancestor(path: Path) -> Path:
    for parent in reversed(path.parents):
        if parent.is_file():
            return parent
    return path.parent


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _check_input_file(path: Path, what: str) -> Path:
    """An existing, readable regular file (a device, pipe or folder could never be read as one)."""
    found = _stat(path, what)
    if found is None:
        raise DoorError(f"{what} {path}: no such file: check the path")
    if not stat.S_ISREG(found.st_mode):
        raise DoorError(f"{what} {path}: is {_kind(found.st_mode)}, not a file: give the {what} file")
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        raise DoorError(f"{what} {path}: cannot be read ({error.strerror}): check its permissions") from error
    return path


def _check_names(path: Path, option: str, room: int = 0) -> None:
    """Every part of `path` short enough for the file system (`room`: what a temporary name adds to the last)."""
    for part in path.parts:
        limit = 255
        if len(os.fsencode(part)) + (room if part == path.name else 0) > limit:
            shown = part if len(part) <= 40 else part[:37] + "..."
            raise DoorError(f"{option}: the name {shown!r} ({len(part)} characters) is too long for the file system "
                            f"(at most {limit - room}): use a shorter name")
    if len(os.fsencode(str(path.absolute()))) + room > 4000:
        raise DoorError(f"{option} {path}: the path is too long for the file system: use a shorter one")


def _check_writable_dir(directory: Path, option: str, target: Path) -> None:
    """`directory` exists and a file can be made in it (tried with an unnamed temporary file, which
    leaves nothing; as root, permission bits allow everything, so only trying tells)."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        reason = error.strerror or str(error)
        hint = _ERRNO_HINTS.get(error.errno) if error.errno not in (errno.ENOENT, errno.ENOTDIR) else None
        raise DoorError(f"{option} {target}: cannot write in {directory} ({reason}): "
                        f"{hint or 'choose a writable location'}") from error


def _check_output_file(path: Path, option: str, *, inputs: tuple[Path, ...] = (), room: int = TEMP_NAME_ROOM) -> None:
    """A file the command may write: in an existing writable folder, not a folder or device itself, not an input."""
    if path.name in ("", ".", ".."):
        raise DoorError(f"{option} {path}: not a file name: give the path of the file to write")
    _check_names(path, option, room)
    parent = path.parent
    found_parent = _stat(parent, option)
    if found_parent is None:
        raise DoorError(f"{option} {path}: the folder {parent} does not exist: create it first")
    if not stat.S_ISDIR(found_parent.st_mode):
        raise DoorError(f"{option} {path}: {parent} is a file, not a folder: check the path")
    found = _stat(path, option)
    if found is not None:
        if not stat.S_ISREG(found.st_mode):
            raise DoorError(f"{option} {path}: is {_kind(found.st_mode)}: give the path of a file to write")
        for input_path in inputs:
            if os.path.samefile(path, input_path):
                raise DoorError(f"{option} {path}: is the input file itself: choose another output path")
    _check_writable_dir(parent, option, path)


def _check_output_dir(path: Path, option: str) -> None:
    """A folder the command writes in: an existing writable one, or one it can create (its nearest
    existing parent a writable folder)."""
    _check_names(path, option)
    found = _stat(path, option)
    if found is not None:
        if not stat.S_ISDIR(found.st_mode):
            raise DoorError(f"{option} {path}: is {'a file' if stat.S_ISREG(found.st_mode) else _kind(found.st_mode)}, "
                            "not a folder: give a folder")
        _check_writable_dir(path, option, path)
        return
    existing = next(parent for parent in path.absolute().parents if parent.exists() or parent == Path("/"))
    if not existing.is_dir():
        raise DoorError(f"{option} {path}: {existing} is a file, not a folder: check the path")
    _check_writable_dir(existing, option, path)


def _check_model_dir(path: Path, option: str, required: tuple[str, ...], weights: tuple[str, ...]) -> None:
    """A model folder with its `required` files and one of its `weights` files (or a sharded index of them)."""
    whole = f"give the model's whole folder ({', '.join(required)} and {' or '.join(weights)})"
    for name in required:
        found = _stat(path / name, option)
        if found is None or not stat.S_ISREG(found.st_mode):
            raise DoorError(f"{option} {path}: no {name} in this folder: {whole}")
        _check_input_file(path / name, option)
    if not any((path / name).is_file() or (path / f"{name}.index.json").is_file() for name in weights):
        raise DoorError(f"{option} {path}: no weights file in this folder: {whole}")
    for name in weights:
        if (path / name).is_file() and name.endswith(".safetensors"):
            _check_safetensors(path / name, option)


def _check_safetensors(path: Path, option: str) -> None:
    """Its header read and checked against the file's size: a truncated download fails here, at once."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as error:  # noqa: BLE001: the Rust library raises its own types
        raise DoorError(f"{option} {path}: not a readable safetensors file ({_one_line(str(error))}): "
                        "download or copy it again") from error


def _check_torch_pickles(path: Path, option: str) -> None:
    """`path`'s (or a model folder's) torch checkpoints unpickled now, refusing tensors only: one that would
    run code, or is no checkpoint, is refused before `vnp run` starts. A zip archive is memory-mapped, its
    tensors not read; a legacy (non-zip) pickle cannot be, and is read whole, once more than the step will."""
    import argparse
    import zipfile

    from vnp_core.models.checkpoint import CheckpointError, load_pickled_tensors

    files = [path] if path.is_file() else [path / "pytorch_model.bin"]
    for file in files:
        if not file.is_file():
            continue
        if not zipfile.is_zipfile(file):
            with open(file, "rb") as handle:
                if handle.read(1) != b"\x80":  # a pickle's first opcode
                    raise DoorError(f"{option} {file}: not a torch checkpoint (neither a torch zip archive nor a "
                                    "pickle): give a fair-esm .pt or a Hugging Face model folder")
        try:
            load_pickled_tensors(file, allowed=[argparse.Namespace], mmap=zipfile.is_zipfile(file))
        except CheckpointError as error:
            raise DoorError(f"{option} {_one_line(str(error))}") from error


def _check_esm2_model(path: Path, option: str) -> Path:
    """A fair-esm .pt, a Hugging Face ESM-2 folder, or a fair-esm model name in the local torch hub cache;
    returned as an absolute path (a name resolved in the cache)."""
    found = _stat(path, option)
    if found is None:
        from vnp_core.models.esm2_checkpoint import resolve_checkpoint

        try:
            path = resolve_checkpoint(path)
        except FileNotFoundError as error:
            raise DoorError(f"{option} {path}: no such file or folder: give a fair-esm .pt file, a Hugging Face "
                            f"ESM-2 folder or the name of a model in the torch hub cache") from error
        return path.resolve()
    if stat.S_ISDIR(found.st_mode):
        _check_model_dir(path, option, ("config.json",), ("model.safetensors", "pytorch_model.bin"))
    else:
        _check_input_file(path, option)
    return path.resolve()


def _check_dnabert_s_model(path: Path, option: str) -> Path:
    found = _stat(path, option)
    if found is None:
        raise DoorError(f"{option} {path}: no such folder: give a local Hugging Face DNABERT-S folder")
    if not stat.S_ISDIR(found.st_mode):
        raise DoorError(f"{option} {path}: is a file: give the DNABERT-S folder (config.json, tokenizer.json, weights)")
    from vnp_core.models.dnabert_s_checkpoint import WEIGHT_FILES

    _check_model_dir(path, option, ("config.json", "tokenizer.json"), WEIGHT_FILES)
    return path.resolve()


def _check_classifier(path: Path, chunk_length: int, trusted_pickle: bool) -> Path:
    """Loaded now (a few hundred kB, read without running code) unless it is a trusted pickle, so that a
    file the run would refuse in its last step is refused before the first."""
    _check_input_file(path, "--classifier")
    if not trusted_pickle:
        from vnp_core.classify import load_classifier

        try:
            loaded = load_classifier(path)
        except ValueError as error:
            raise DoorError(f"--classifier {_one_line(str(error))}") from error
        if loaded.chunk_length != chunk_length:
            raise DoorError(f"--classifier {path}: trained on {loaded.chunk_length}-bp chunks, but --chunk-length is "
                            f"{chunk_length}: use --chunk-length {loaded.chunk_length} or the {chunk_length}-bp classifier")
    return path.resolve()


@contextmanager
def _removed_on_error(path: Path) -> Iterator[None]:
    """The folders the command creates on the way to `path` are removed again (those left empty) if it fails."""
    created = [folder for folder in (path.absolute(), *path.absolute().parents) if not folder.exists()]
    try:
        yield
    except BaseException:
        for folder in created:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def _check_fasta(path: Path) -> None:
    """Every record read and checked (ids, letters, duplicates): a bad file fails before any work starts."""
    from vnp_core.fasta import read_fasta

    read_fasta(path)


# ----------------------------------------------------------------------------------------------
# The commands


@app.command()
def prep(
    input: Annotated[Path, typer.Argument(help="FASTA or gzipped FASTA of reads or contigs.")],
    out_dir: Annotated[Path, typer.Option("--out-dir", help="Where the three VirNucPro files are written.")],
    chunk_length: Annotated[int, typer.Option("--chunk-length", help="300 or 500: must match the classifier.")] = 500,
    skip_bad_records: Annotated[bool, typer.Option("--skip-bad-records", help="Skip (and count) malformed records instead of failing.")] = False,
) -> None:
    """Chunk, six-frame translate and keep stop-free frames, exactly as VirNucPro does."""
    from vnp_core.prep import fasta_stem, output_names, prepare_fasta

    _check_choice("--chunk-length", chunk_length, CHUNK_LENGTHS)
    _check_input_file(input, "input")
    _check_output_dir(out_dir, "--out-dir")
    stem = fasta_stem(input)
    for name in output_names(stem, chunk_length):
        if len(os.fsencode(name)) + TEMP_NAME_ROOM > 255:
            spare = len(os.fsencode(stem)) - (len(os.fsencode(name)) + TEMP_NAME_ROOM - 255)
            raise DoorError(f"input {input}: the name of its output {name[:30]}...{name[-25:]} would be too long for "
                            f"the file system: rename the input (at most {max(spare, 1)} characters before its extension)")
        target = _stat(out_dir / name, "--out-dir")
        if target is not None and not stat.S_ISREG(target.st_mode):
            raise DoorError(f"--out-dir {out_dir}: {out_dir / name} is {_kind(target.st_mode)}: "
                            "remove it or choose another folder")
    with _removed_on_error(out_dir):
        result = prepare_fasta(input, out_dir, PrepConfig(chunk_length=chunk_length, skip_bad_records=skip_bad_records))
    typer.echo(result.summary())


_DEVICE = typer.Option("--device", help="cpu, cuda or cuda:N.")
_DTYPE = typer.Option("--dtype", help="float32, float16 or bfloat16.")
_MAX_TOKENS = typer.Option("--max-tokens", help="Token budget of one pack (default: sized from free device memory).")
_BACKEND = typer.Option("--attention", help=f"One of {', '.join(get_args(AttentionBackend))}.")
_COMPILE = typer.Option("--compile/--no-compile", help="torch.compile each layer on CUDA (faster; first pack pays the compile).")
_FP8 = typer.Option("--fp8", help="ESM-2's linear layers in FP8 e4m3 (Ada/Hopper GPUs; with --dtype float16 or bfloat16). "
                                   "Off by default: validated on random weights only.")
_WORKERS = typer.Option("--workers", help="CPU processes that tokenise before the device loop (0: none).")


def _embed(model_name: str, input: Path, model: Path, out: Path, *, device: str, dtype: str, max_tokens: int | None,
           attention: str, workers: int, compile_layers: bool, max_protein_length: int = ESM2_MAX_RESIDUES,
           fp8: bool = False) -> None:
    _check_device(device)
    _check_choice("--dtype", dtype, DTYPES)
    if fp8 and dtype == "float32":
        raise DoorError("--fp8 keeps activations in float16 or bfloat16: add --dtype float16")
    _check_at_least("--max-tokens", max_tokens, 1, " (tokens in one pack)")
    _check_at_least("--max-protein-length", max_protein_length, 1, " (residues kept per protein)")
    _check_at_least("--workers", workers, 0)
    _check_choice("--attention", attention, get_args(AttentionBackend))
    _check_input_file(input, "input")
    model = (_check_esm2_model if model_name == "esm2" else _check_dnabert_s_model)(model, "--model")
    _check_output_file(out, "--out", inputs=(input,))
    # The engine reads and checks the whole FASTA, then loads the model, before it writes anything.
    from vnp_core.engine import embed_fasta_to_hdf5

    # `--compile` compiles whatever the input's size: the user asked for it.
    config = EmbedConfig(device=device, dtype=dtype, fp8=fp8, max_tokens=max_tokens, max_protein_length=max_protein_length,
                         attention_backend=attention, num_workers=workers, compile_layers=compile_layers,
                         compile_min_tokens=0)
    stats = embed_fasta_to_hdf5(model_name, input, model, out, config, show_progress=True)
    typer.echo(stats.summary())


@embed_app.command("esm2")
def embed_esm2(
    input: Annotated[Path, typer.Argument(help="Protein FASTA (e.g. *_identified_protein.faa).")],
    model: Annotated[Path, typer.Option("--model", help="fair-esm .pt checkpoint, or a Hugging Face facebook/esm2_* directory.")],
    out: Annotated[Path, typer.Option("--out", help="Output HDF5 file.")],
    device: Annotated[str, _DEVICE] = "cpu",
    dtype: Annotated[str, _DTYPE] = "float32",
    max_tokens: Annotated[Optional[int], _MAX_TOKENS] = None,
    max_protein_length: Annotated[int, typer.Option("--max-protein-length", help="Longer proteins keep their first N residues.")] = ESM2_MAX_RESIDUES,
    attention: Annotated[str, _BACKEND] = "auto",
    workers: Annotated[int, _WORKERS] = 0,
    compile_layers: Annotated[bool, _COMPILE] = True,
    fp8: Annotated[bool, _FP8] = False,
) -> None:
    """Mean-pooled last-layer ESM-2 embeddings (residues only) of every protein."""
    _embed("esm2", input, model, out, device=device, dtype=dtype, max_tokens=max_tokens,
           max_protein_length=max_protein_length, attention=attention, workers=workers, compile_layers=compile_layers,
           fp8=fp8)


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
           attention=attention, workers=workers, compile_layers=compile_layers)


@models_app.command("make-tiny")
def make_tiny(out: Annotated[Path, typer.Option("--out", help="Directory for the tiny models.")]) -> None:
    """Write tiny random models in the real checkpoint formats (placeholders with no biological meaning)."""
    _check_output_dir(out, "--out")
    from vnp_core.tiny_models import write_tiny_models

    with _removed_on_error(out):
        paths = write_tiny_models(out)
    for name, path in paths.items():
        typer.echo(f"{name}: {path}")
    typer.echo("These tiny models are random placeholders: their outputs have no biological meaning.")


@app.command("export-pt")
def export_pt(
    merged: Annotated[Path, typer.Argument(help="A sample's merged embeddings HDF5.")],
    out: Annotated[Path, typer.Option("--out", help="Output .pt in the original tool's layout.")],
) -> None:
    """Write merged features as the original `{"ids": [...], "data": FloatTensor[N, 3328]}` .pt file."""
    _check_input_file(merged, "input")
    _check_output_file(out, "--out", inputs=(merged,))
    from vnp_core.store import export_merged_to_pt

    export_merged_to_pt(merged, out)
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
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="float16, bfloat16 or float32 (default: float16 on GPU or with --fp8, float32 on CPU).")] = None,
    fp8: Annotated[bool, _FP8] = False,
    devices: Annotated[Optional[str], typer.Option("--devices", help="Physical GPU ids to use, e.g. 2,3 (default: every GPU).")] = None,
    until: Annotated[str, typer.Option("--until", help="Stop after this stage: sequence_index, embeddings, merged_embeddings, fp16_validation_report or virnucpro_predictions.")] = "virnucpro_predictions",
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="Serve known sequences from the embedding store under the home, and add new ones to it.")] = True,
    executor: Annotated[str, typer.Option("--executor", help="local (this host's GPUs) or ray (one GPU of a Ray cluster per step).")] = "local",
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", help="With --executor ray: ray://HOST:10001, or HOST:6379 on a node of the cluster.")] = None,
) -> None:
    """Materialize one sample through the Dagster asset graph on a local persistent instance.

    The sample is named after the file: characters outside A-Z a-z 0-9 . _ - become _, and a name
    longer than 100 characters keeps its first 91 and a hash of the whole (see `vnp_assets.samples`).
    """
    # Every option, file and model is checked before the sample is registered or anything is written.
    _check_choice("--chunk-length", chunk_length, CHUNK_LENGTHS)
    _check_at_least("--shards", shards, 1, " (leave the option out for one per GPU)")
    if dtype is not None:
        _check_choice("--dtype", dtype, DTYPES)
    if fp8 and dtype == "float32":
        raise DoorError("--fp8 keeps activations in float16 or bfloat16: leave --dtype out or give one of those")
    gpu_ids = None if devices is None else _device_list(devices)
    _check_choice("--until", until, RUN_STAGES)
    _check_choice("--executor", executor, ("local", "ray"))
    if (executor == "ray") != (ray_address is not None):
        raise DoorError("--executor ray and --ray-address HOST:PORT go together: give both, or neither for this host's GPUs")
    from vnp_assets.samples import sample_name

    _check_input_file(input, "input")
    if sample_name(input.name) is None:
        raise DoorError(f"input {input}: a sample's FASTA file must be named *.fa, *.fasta or *.fna (optionally .gz) "
                        "and not start with '.': rename it")
    models = {
        "esm2_model": None if esm2_model is None else _check_esm2_model(esm2_model, "--esm2-model"),
        "dnabert_s_model": None if dnabert_s_model is None else _check_dnabert_s_model(dnabert_s_model, "--dnabert-s-model"),
        "classifier": None if classifier is None else _check_classifier(classifier, chunk_length, trust_classifier_pickle),
    }
    for option, key in (("--esm2-model", "esm2_model"), ("--dnabert-s-model", "dnabert_s_model")):
        if models[key] is not None:
            _check_torch_pickles(models[key], option)
    _check_gpus(gpu_ids, fp8 and executor == "local")
    _check_output_dir(home, "--home")
    from vnp_assets.platform import home_storage
    from vnp_assets.samples import indexed_before

    # A 450k-read file takes seconds to check; a rerun of a sample indexed from this content skips it.
    if not indexed_before(input, sample_name(input.name), home_storage(home)):
        _check_fasta(input)
    from vnp_assets.run_sample import run_sample

    sample_run = run_sample(input, home=home, until=until, chunk_length=chunk_length, num_shards=shards,
                            **{key: None if path is None else str(path) for key, path in models.items()},
                            trust_classifier_pickle=trust_classifier_pickle, dtype=dtype, fp8=fp8 or None, devices=gpu_ids,
                            embedding_cache=cache, executor=executor, ray_address=ray_address,
                            # Dagster's step log, progress and failures with their stack traces: with --verbose.
                            console_log_level="INFO" if VnpGroup.verbose else "CRITICAL")
    typer.echo(sample_run.summary())


_HOME = typer.Option("--home", help="The home whose embedding store this is (as given to vnp run).")
_STORE = typer.Option("--store", help="The store's folder, where it is not the home's (a node-local `embedding_cache_dir`).")


@cache_app.command("stats")
def cache_stats(
    home: Annotated[Path, _HOME] = Path("vnp_home"),
    store_dir: Annotated[Optional[Path], _STORE] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Per model identity: entries, bytes, hits and misses so far, and when it was last used."""
    with _embedding_store(home, store_dir) as (where, store):
        identities = [{"identity": s.identity.key, "model": s.identity.description, "entries": s.entries,
                       "bytes": s.size_bytes, "hits": s.hits, "misses": s.misses,
                       "hit_rate": round(s.hit_rate, 4), "last_used": s.last_used} for s in store.stats()]
    if as_json:
        typer.echo(json.dumps({"store": str(where), "identities": identities}))
        return
    typer.echo(f"embedding store {where}: {len(identities)} model identit{'y' if len(identities) == 1 else 'ies'}")
    for row in identities:
        typer.echo(f"{row['identity']}  {row['model']}: {row['entries']:,} entries, {row['bytes']:,} bytes, "
                   f"{row['hits']:,} hits, {row['misses']:,} misses ({row['hit_rate']:.1%})")


@cache_app.command("prune")
def cache_prune(
    home: Annotated[Path, _HOME] = Path("vnp_home"),
    store_dir: Annotated[Optional[Path], _STORE] = None,
    identity: Annotated[Optional[str], typer.Option("--identity", help="Drop this model identity (a key from `vnp cache stats`).")] = None,
    older_than_days: Annotated[Optional[float], typer.Option("--older-than-days", help="Drop identities unused for this many days.")] = None,
) -> None:
    """Drop whole model identities from the embedding store, by key or by age."""
    if identity is None and older_than_days is None:
        raise DoorError("vnp cache prune: say what to drop: --identity KEY (see vnp cache stats) or --older-than-days N")
    _check_at_least("--older-than-days", older_than_days, 0)
    with _embedding_store(home, store_dir) as (where, store):
        known = {s.identity.key for s in store.stats()}
        if identity is not None and identity not in known:
            raise DoorError(f"--identity {identity}: no such model identity in {where}: see vnp cache stats")
        dropped = store.prune(identity, None if older_than_days is None else older_than_days * 86400)
    typer.echo(f"dropped {len(dropped)} model identit{'y' if len(dropped) == 1 else 'ies'}: {', '.join(dropped) or 'none'}")


@contextmanager
def _embedding_store(home: Path, store_dir: Path | None) -> Iterator:
    """(its folder, the store) of `--store`, or else of the home."""
    from vnp_core.embedding_cache import EmbeddingCache

    where = store_dir or home / "storage" / "embedding_cache"
    _stat(store_dir or home, "--store" if store_dir else "--home")  # a URL is refused as such
    if not (where / "data.mdb").is_file():
        if store_dir:
            raise DoorError(f"--store {store_dir}: no embedding store there: give the folder of embedding_cache_dir")
        raise DoorError(f"--home {home}: no embedding store there ({where}): run vnp run with this home first")
    with EmbeddingCache.open(where) as store:
        yield where, store


if __name__ == "__main__":
    app()
