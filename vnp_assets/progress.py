"""The device process's progress, in the Dagster run log.

The engine reports progress through a callback. In the device process that callback keeps the
latest report in a small JSON file; the step waits for the device process on a thread and logs
the file's report every `LOG_EVERY_S` seconds (a callback cannot reach `context.log` across processes).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from logging import Logger
from pathlib import Path
from typing import Any

LOG_EVERY_S = 30.0
WRITE_EVERY_S = 1.0


@dataclass
class ProgressFile:
    """The engine's progress callback inside the device process (picklable: it is only a path)."""

    path: Path
    _last_write: float = field(default=0.0, repr=False)

    def __call__(self, progress) -> None:
        finished = progress.sequences_done == progress.sequences_total
        if finished or time.monotonic() - self._last_write >= WRITE_EVERY_S:
            temporary = self.path.with_suffix(".tmp")
            temporary.write_text(json.dumps(asdict(progress)))
            temporary.replace(self.path)
            self._last_write = time.monotonic()

    def describe(self) -> str | None:
        from vnp_core.engine import Progress

        if not self.path.exists():
            return None
        progress = Progress(**json.loads(self.path.read_text()))
        return (f"{progress.sequences_done:,}/{progress.sequences_total:,} sequences, "
                f"{progress.sequences_per_s:,.1f} sequences/s, {progress.tokens_per_s:,.0f} tokens/s")


def run_logging_progress(log: Logger, fn: Callable[..., Any], *args, device: int | None, **kwargs) -> Any:
    """`run_in_device_process(fn, *args, progress=<a ProgressFile>, ...)`, logging its progress while it runs."""
    from vnp_core.gpu import run_in_device_process

    with tempfile.TemporaryDirectory(prefix="vnp-progress-") as tmp, ThreadPoolExecutor(1) as pool:
        progress = ProgressFile(Path(tmp) / "progress.json")
        result = pool.submit(run_in_device_process, fn, *args, device=device, progress=progress, **kwargs)
        while not wait([result], timeout=LOG_EVERY_S).done:
            if (report := progress.describe()) is not None:
                log.info(report)
        return result.result()
