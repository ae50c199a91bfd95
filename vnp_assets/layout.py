"""Where one sample's files live under the storage root: `<storage_root>/samples/<sample>/...`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SampleLayout:
    root: Path

    def input_copy(self, gzipped: bool) -> Path:
        """The sample's own copy of the dropped FASTA, named after the sample (so are VirNucPro's prep files)."""
        return self.root / f"{self.root.name}.fasta{'.gz' if gzipped else ''}"

    @property
    def input_fasta(self) -> Path:
        gzipped = self.input_copy(gzipped=True)
        return gzipped if gzipped.exists() else self.input_copy(gzipped=False)

    @property
    def input_sha256(self) -> Path:
        return self.root / "input.sha256"

    @property
    def prep_dir(self) -> Path:
        return self.root / "prep"

    @property
    def index(self) -> Path:
        return self.root / "index.parquet"

    @property
    def embeddings_dir(self) -> Path:
        return self.root / "embeddings"

    def embeddings(self, model: str, shard: int) -> Path:
        return self.embeddings_dir / model / f"shard-{shard}.h5"

    @property
    def merged(self) -> Path:
        return self.embeddings_dir / "merged.h5"

    @property
    def report_dir(self) -> Path:
        return self.root / "fp16_validation"

    @property
    def predictions_dir(self) -> Path:
        return self.root / "predictions"
