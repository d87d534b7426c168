"""Peak memory while a piece of work runs: the process's resident set on CPU (sampled),
the allocator's high-water mark on CUDA.

Why sampled RSS on CPU: PyTorch's CPU allocations are invisible to ``tracemalloc`` and
``ru_maxrss`` only ever grows over the process's life, so it cannot tell one profile's
peak from the previous one's. A background thread reading RSS every few milliseconds
sees the peak of each run (to within what it allocates and frees between samples).
"""

from __future__ import annotations

import threading
from types import TracebackType
from typing import Any

import torch


class PeakMemory:
    """``with PeakMemory(device) as peak: ...``; then ``peak.mb`` (None if unmeasurable)."""

    def __init__(self, device: Any = "cpu", interval_s: float = 0.002) -> None:
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.peak_bytes: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def mb(self) -> float | None:
        return None if self.peak_bytes is None else self.peak_bytes / 2**20

    def _sample(self, process: Any) -> None:
        while not self._stop.is_set():
            rss = process.memory_info().rss
            self.peak_bytes = max(self.peak_bytes or 0, rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakMemory:  # noqa: PYI034 - typing.Self needs Python 3.11
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        try:
            import psutil
        except ImportError:  # psutil is a dependency (telemetry); be safe anyway
            return self
        process = psutil.Process()
        self.peak_bytes = process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, args=(process,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
