"""A real background CPU load, so telemetry and latency vary as on a shared device.

Worker processes burn CPU with a duty cycle equal to the current intensity (0-1 per
worker) in 50 ms slices. The intensity follows a schedule across episodes and is
changed through shared memory; ``stop()`` (or leaving the context) terminates the
workers cleanly.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from dataclasses import dataclass, field
from typing import Any


def _burn(level: Any, stop: Any) -> None:  # pragma: no cover - runs in a child process
    slice_s = 0.05
    while not stop.is_set():
        busy = max(0.0, min(1.0, level.value)) * slice_s
        end = time.perf_counter() + busy
        x = 0.0
        while time.perf_counter() < end:
            x += 1.0
        time.sleep(max(slice_s - busy, 0.0) + 1e-4)


@dataclass
class LoadSchedule:
    """Intensity per episode: cycle through ``levels``, ``episodes_per_level`` each."""

    levels: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])
    episodes_per_level: int = 10

    def intensity(self, episode: int) -> float:
        return self.levels[(episode // max(self.episodes_per_level, 1)) % len(self.levels)]


class BackgroundLoad:
    def __init__(self, workers: int = 1, schedule: LoadSchedule | None = None, intensity: float = 0.0) -> None:
        self.workers = workers
        self.schedule = schedule or LoadSchedule()
        ctx = mp.get_context("spawn")
        self._level = ctx.Value("d", float(intensity))
        self._stop = ctx.Event()
        self._ctx = ctx
        self._procs: list[Any] = []

    def start(self) -> BackgroundLoad:
        for _ in range(self.workers):
            proc = self._ctx.Process(target=_burn, args=(self._level, self._stop), daemon=True)
            proc.start()
            self._procs.append(proc)
        return self

    def set_intensity(self, value: float) -> None:
        self._level.value = float(value)

    def on_episode(self, episode: int) -> float:
        level = self.schedule.intensity(episode)
        self.set_intensity(level)
        return level

    @property
    def intensity(self) -> float:
        return float(self._level.value)

    def stop(self) -> None:
        self._stop.set()
        for proc in self._procs:
            proc.join(timeout=2)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=2)
            if proc.is_alive():  # pragma: no cover - a worker ignoring SIGTERM
                proc.kill()
                proc.join()
        self._procs.clear()

    def __enter__(self) -> BackgroundLoad:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
