"""The device process's progress, in the Dagster run log.

The engine reports progress through a callback, per model. In the device process that callback
keeps each model's latest report in a small JSON file; the step waits for the device process on a
thread and logs the reports that changed every `LOG_EVERY_S` seconds (a callback cannot reach
`context.log` across processes).
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
class ProgressFiles:
    """The engine's `progress(kind, report)` inside the device process (picklable: it is only a folder)."""

    folder: Path
    _last_write: dict[str, float] = field(default_factory=dict, repr=False)
    _logged: dict[str, str] = field(default_factory=dict, repr=False)

    def __call__(self, kind: str, progress) -> None:
        finished = progress.sequences_done == progress.sequences_total
        if finished or time.monotonic() - self._last_write.get(kind, 0.0) >= WRITE_EVERY_S:
            path = self.folder / f"{kind}.json"
            temporary = path.with_suffix(".tmp")
            temporary.write_text(json.dumps(asdict(progress)))
            temporary.replace(path)
            self._last_write[kind] = time.monotonic()

    def new_reports(self) -> list[str]:
        """One line per model whose report changed since the last call."""
        from vnp_core.engine import Progress

        lines = []
        for path in sorted(self.folder.glob("*.json")):
            progress = Progress(**json.loads(path.read_text()))
            line = (f"{path.stem}: {progress.sequences_done:,}/{progress.sequences_total:,} sequences, "
                    f"{progress.sequences_per_s:,.1f} sequences/s, {progress.tokens_per_s:,.0f} tokens/s")
            if self._logged.get(path.stem) != line:
                lines.append(line)
                self._logged[path.stem] = line
        return lines


def run_logging_progress(log: Logger, fn: Callable[..., Any], *args, device: int | None,
                         cpu_threads: int | None = None, **kwargs) -> Any:
    """`run_in_device_process(fn, *args, progress=<ProgressFiles>, ...)`, logging its progress while it runs."""
    from vnp_core.gpu import run_in_device_process

    with tempfile.TemporaryDirectory(prefix="vnp-progress-") as tmp, ThreadPoolExecutor(1) as pool:
        progress = ProgressFiles(Path(tmp))
        result = pool.submit(run_in_device_process, fn, *args, device=device, cpu_threads=cpu_threads,
                             progress=progress, **kwargs)
        while not wait([result], timeout=LOG_EVERY_S).done:
            for line in progress.new_reports():
                log.info(line)
        return result.result()
