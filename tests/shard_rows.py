"""A shard's rows as the engine asks for them (`ShardJob.rows`): picklable, for device processes and Ray workers."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rows:
    ids: tuple[str, ...]
    sequences: tuple[str, ...]

    def __call__(self) -> tuple[list[str], list[str]]:
        return list(self.ids), list(self.sequences)
