"""Registering a FASTA file as a sample: its name, and its own copy under the storage root.

A registered sample keeps its copy and its checksum in `<storage_root>/samples/<sample>/`, so
later edits to the dropped file never change it. The same file registered again (same name, same
content) is the same sample. A changed file under the same name becomes a new sample
`<name>-<first 8 hex of its sha256>`, so the first sample's outputs are never overwritten.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

from vnp_assets.resources import VnpSettings
from vnp_core.atomic import atomic_path

FASTA_SUFFIXES = (".fa", ".fasta", ".fna")


def sample_name(file_name: str) -> str | None:
    """`my reads.fa.gz` -> `my_reads`; None for a hidden file or one that is not a FASTA by its name."""
    stem, suffix = os.path.splitext(file_name.removesuffix(".gz"))
    if file_name.startswith(".") or suffix.lower() not in FASTA_SUFFIXES or not stem:
        return None
    return re.sub(r"[^A-Za-z0-9._-]", "_", stem)


def register_sample(source: Path, name: str, vnp: VnpSettings, registered: set[str]) -> tuple[str, bool]:
    """The sample that holds `source`'s content, and whether it is new (`registered`: the samples known so far).

    The file is read once, copied and hashed in the same pass.
    """
    staging_dir = Path(vnp.storage_root) / "samples" / ".incoming"
    staging_dir.mkdir(parents=True, exist_ok=True)
    staged, sha256 = _copy_and_hash(source, staging_dir)
    try:
        for sample in (name, f"{name}-{sha256[:8]}"):
            layout = vnp.sample_layout(sample)
            stored = layout.input_sha256.read_text() if sample in registered and layout.input_sha256.exists() else None
            if stored == sha256:
                return sample, False
            if stored is None:
                # Not registered (or left half-registered by a failed attempt): the folder is ours to (re)fill.
                layout.root.mkdir(parents=True, exist_ok=True)
                for gzipped in (False, True):
                    layout.input_copy(gzipped).unlink(missing_ok=True)
                staged.replace(layout.input_copy(gzipped=source.name.endswith(".gz")))
                # The checksum is written last: its presence says the copy is complete.
                with atomic_path(layout.input_sha256) as tmp:
                    tmp.write_text(sha256)
                return sample, True
        raise ValueError(f"{source}: samples {name!r} and {name}-{sha256[:8]!r} both exist with other content")
    finally:
        staged.unlink(missing_ok=True)  # gone already when it became the sample's copy


def _copy_and_hash(source: Path, staging_dir: Path) -> tuple[Path, str]:
    digest = hashlib.sha256()
    with source.open("rb") as src, tempfile.NamedTemporaryFile(dir=staging_dir, delete=False) as dst:
        try:
            while block := src.read(1 << 20):
                digest.update(block)
                dst.write(block)
        except BaseException:
            Path(dst.name).unlink(missing_ok=True)
            raise
    return Path(dst.name), digest.hexdigest()
