"""Files that appear whole or not at all: written under a temporary name beside the final path, then renamed.

A killed run or a full disk leaves the previous file (or none) under the final name, never half of one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path`, renamed over `path` once the block succeeds.

    On failure the temporary file is removed: `path` keeps its previous state, never half a file.
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        publish(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.errno is not None:
            raise write_error(path, error) from error
        raise


def temporary_path(path: Path) -> Path:
    """Hidden, beside `path` (so the rename stays on one file system), and private to this process."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def publish(tmp: Path, path: Path) -> None:
    """fsync `tmp`, rename it to `path`, then fsync the directory so that the rename survives a crash too."""
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_error(path: Path, error: OSError) -> OSError:
    """The same error (ENOSPC stays ENOSPC) with the file the user asked for in its message."""
    reason = error.strerror or next(iter(str(error).splitlines()), type(error).__name__)
    return OSError(error.errno, f"could not write {path}: {reason}")
