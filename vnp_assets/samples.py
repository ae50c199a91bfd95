"""Registering a FASTA file as a sample: its name, and its own copy under the storage root.

A registered sample keeps its copy and its checksum in `<storage_root>/samples/<sample>/`, so
later edits to the dropped file never change it. The same file registered again (same name, same
content) is the same sample. A changed file under the same name becomes a new sample
`<name>-<first 8 hex of its sha256>`, so the first sample's outputs are never overwritten.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
import tempfile
import time
from pathlib import Path

from vnp_assets.resources import SampleStorage

FASTA_SUFFIXES = (".fa", ".fasta", ".fna")
# A staged copy this old is a leftover of a killed registration (a copy in progress rewrites its file).
STAGING_MAX_AGE_S = 3600.0


class RejectedDrop(ValueError):
    """A file that cannot become a sample (not a regular file, unreadable, a name the storage refuses...):
    the message names it and says why. Storage trouble that is not the file's own (a full disk) is
    an `OSError` instead: the same file may be taken once the storage works again."""


# Longer names keep their first characters and a hash of the whole: the sample's files (`<name>-<sha8>`,
# `<name>_identified_protein.faa`, their temporary names) must fit the file system's 255 bytes.
MAX_SAMPLE_NAME = 100


def sample_name(file_name: str) -> str | None:
    """`my reads.fa.gz` -> `my_reads`; None for a hidden file or one that is not a FASTA by its name.

    Only `[A-Za-z0-9._-]` (every other character becomes `_`), never `.` or `..` (a name never starts
    with a dot), at most `MAX_SAMPLE_NAME` characters (a longer one: its first 91 and `-<sha256[:8]>`
    of the whole file name, so two long names stay two samples).
    """
    stem, suffix = os.path.splitext(file_name.removesuffix(".gz"))
    if file_name.startswith(".") or suffix.lower() not in FASTA_SUFFIXES or not stem:
        return None
    name = re.sub(r"[^A-Za-z0-9._-]", "_", stem)
    if len(name) > MAX_SAMPLE_NAME:
        digest = hashlib.sha256(os.fsencode(file_name)).hexdigest()[:8]
        name = f"{name[:MAX_SAMPLE_NAME - 9]}-{digest}"
    return name


def register_sample(source: Path, name: str, storage: SampleStorage, registered: set[str], *,
                    follow_symlinks: bool = True) -> tuple[str, bool]:
    """The sample that holds `source`'s content, and whether it is new (`registered`: the samples known so far).

    The file is read once, copied and hashed in the same pass. Only a regular file is read, opened
    without blocking (a FIFO never hangs the caller); `follow_symlinks=False` refuses a symbolic
    link (the inbox's policy, see `vnp_assets.sensors`). `RejectedDrop` says why a file cannot be a sample.
    """
    storage.staging_dir.mkdir(parents=True, exist_ok=True)
    staged, sha256 = _copy_and_hash(source, storage.staging_dir, follow_symlinks=follow_symlinks)
    try:
        for sample in (name, f"{name}-{sha256[:8]}"):
            layout = storage.layout(sample)
            stored = layout.input_sha256.read_text() if sample in registered and layout.input_sha256.exists() else None
            if stored == sha256:
                return sample, False
            if stored is None:
                # Not registered (or left half-registered by a failed attempt): the folder is ours to (re)fill.
                try:
                    layout.root.mkdir(parents=True, exist_ok=True)
                    for gzipped in (False, True):
                        layout.input_copy(gzipped).unlink(missing_ok=True)
                    staged.replace(layout.input_copy(gzipped=source.name.endswith(".gz")))
                    # The checksum is written last: its presence says the copy is complete. Renamed into
                    # place but not fsynced: a crash that loses it leaves a half-registered sample, which
                    # the next attempt refills, and two fsyncs a file made a tick over 3,000 drops 20 s.
                    unsynced = layout.input_sha256.with_name(f".{layout.input_sha256.name}.tmp")
                    unsynced.write_text(sha256)
                    unsynced.replace(layout.input_sha256)
                except OSError as error:
                    if error.errno == errno.ENAMETOOLONG:  # the file's name, not the storage, is at fault
                        raise RejectedDrop(f"{source}: its sample name {sample!r} is too long for the storage "
                                           f"under {storage.samples_dir}: rename the file shorter") from error
                    raise
                return sample, True
        raise RejectedDrop(f"{source}: samples {name!r} and {name}-{sha256[:8]!r} both exist with other content: "
                           f"rename the file")
    finally:
        staged.unlink(missing_ok=True)  # gone already when it became the sample's copy


def indexed_before(source: Path, name: str, storage: SampleStorage) -> bool:
    """Whether `source`'s exact content is already a sample whose index was built from it, so it was
    read whole and checked once: a rerun (another classifier, say) need not read its records again."""
    with open_regular_file(source) as handle:
        sha256 = hashlib.file_digest(handle, "sha256").hexdigest()
    for layout in (storage.layout(name), storage.layout(f"{name}-{sha256[:8]}")):
        try:
            if layout.input_sha256.read_text() == sha256 and layout.index.is_file():
                return True
        except OSError:  # not registered under that name (or unreadable: check the file, then)
            continue
    return False


def _copy_and_hash(source: Path, staging_dir: Path, *, follow_symlinks: bool = True) -> tuple[Path, str]:
    digest = hashlib.sha256()
    with open_regular_file(source, follow_symlinks=follow_symlinks) as src, \
            tempfile.NamedTemporaryFile(dir=staging_dir, delete=False) as dst:
        try:
            while True:
                try:
                    block = src.read(1 << 20)
                except OSError as error:  # EIO, EISDIR...: the file's fault, not the storage's
                    raise RejectedDrop(f"{source}: could not be read ({error.strerror or error})") from error
                if not block:
                    break
                digest.update(block)
                dst.write(block)
        except BaseException:
            Path(dst.name).unlink(missing_ok=True)
            raise
    return Path(dst.name), digest.hexdigest()


def open_regular_file(path: Path, *, follow_symlinks: bool = True):
    """`path` opened for binary reading, if it is a regular file; `RejectedDrop` says why not.

    Opened non-blocking, so a FIFO (or a device) never blocks the caller: its type is read from the
    open descriptor, and anything but a regular file is refused before a byte is read.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as error:
        raise RejectedDrop(f"{path}: {_open_failure(path, error, follow_symlinks)}") from error
    try:
        kind = os.fstat(fd).st_mode
        if not stat.S_ISREG(kind):
            raise RejectedDrop(f"{path}: {describe_file_type(kind)}, not a regular file: only regular files are taken")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def describe_file_type(mode: int) -> str:
    for test, kind in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a regular file"


def _open_failure(path: Path, error: OSError, follow_symlinks: bool) -> str:
    if error.errno == errno.ELOOP and not follow_symlinks:
        return "a symbolic link: only files dropped into the inbox itself are taken (copy the file in, not a link)"
    if error.errno in (errno.EACCES, errno.EPERM):
        return "cannot be read (permission denied): make it readable by the user that runs vnp"
    if error.errno == errno.ENOENT:
        return "no such file (a broken symbolic link, or it was removed)"
    if error.errno == errno.ENAMETOOLONG:
        return "its name is too long for the file system"
    return f"could not be opened ({error.strerror or error})"


def clean_staging(storage: SampleStorage, older_than_s: float = STAGING_MAX_AGE_S) -> list[str]:
    """Remove staged copies older than `older_than_s` (left by a registration that was killed); their names.

    A copy in progress keeps writing its file, so its modification time stays recent.
    """
    removed = []
    cutoff = time.time() - older_than_s
    try:
        entries = list(os.scandir(storage.staging_dir))
    except OSError:  # none yet (or unreadable: registration will say so)
        return removed
    for entry in entries:
        try:
            if entry.stat(follow_symlinks=False).st_mtime < cutoff and not entry.is_dir(follow_symlinks=False):
                os.unlink(entry.path)  # (a folder was never made by registration: left alone)
                removed.append(entry.name)
        except OSError:
            pass  # removed meanwhile (a concurrent cleaner), or not ours to remove: a leftover never blocks
    return removed
