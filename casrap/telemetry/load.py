"""A real background CPU load, so telemetry and latency vary as on a shared device.

Worker processes burn CPU with a duty cycle equal to the current intensity (0-1 per
worker) in 50 ms slices. The intensity follows a schedule across episodes and is
changed through shared memory; ``stop()`` (or leaving the context) terminates the
workers cleanly.

Named load levels (:func:`parse_load_levels`, :func:`background_for_level`) are what the
recorder and the load test sweep over: ``"0"``, ``"1"``, ``"2"`` background processes each
burning a core, and ``"bursty"``: two processes that switch on and off independently on a
seeded schedule (exponential on/off durations), so the load changes *during* a request.
"""

from __future__ import annotations

import multiprocessing as mp
import random
import threading
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


@dataclass(frozen=True)
class BurstSchedule:
    """Each worker switches between busy and idle; durations are exponential with these means (seconds)."""

    seed: int = 0
    mean_on_s: float = 1.5
    mean_off_s: float = 1.5


class BackgroundLoad:
    def __init__(self, workers: int = 1, schedule: LoadSchedule | None = None, intensity: float = 0.0,
                 bursts: BurstSchedule | None = None) -> None:
        self.workers = workers
        self.schedule = schedule or LoadSchedule()
        ctx = mp.get_context("spawn")
        self._levels = [ctx.Value("d", float(intensity)) for _ in range(max(workers, 1))]
        self._level = self._levels[0]
        self._stop = ctx.Event()
        self._ctx = ctx
        self._procs: list[Any] = []
        self.bursts = bursts
        self._burst_thread: threading.Thread | None = None
        self._burst_stop = threading.Event()

    def start(self) -> BackgroundLoad:
        for i in range(self.workers):
            proc = self._ctx.Process(target=_burn, args=(self._levels[i], self._stop), daemon=True)
            proc.start()
            self._procs.append(proc)
        if self.bursts is not None and self.workers:
            self._burst_thread = threading.Thread(target=self._toggle, name="casrap-bursts", daemon=True)
            self._burst_thread.start()
        return self

    def _toggle(self) -> None:
        """Flip each worker on/off at its own seeded exponential times (the bursty level)."""
        assert self.bursts is not None
        rng = random.Random(self.bursts.seed)
        now = time.monotonic()
        state = [rng.random() < 0.5 for _ in range(self.workers)]
        due = [now + rng.expovariate(1.0 / (self.bursts.mean_on_s if on else self.bursts.mean_off_s)) for on in state]
        for level, on in zip(self._levels, state):
            level.value = 1.0 if on else 0.0
        while not self._burst_stop.is_set():
            i = min(range(self.workers), key=due.__getitem__)
            if self._burst_stop.wait(max(due[i] - time.monotonic(), 0.0)):
                break
            state[i] = not state[i]
            self._levels[i].value = 1.0 if state[i] else 0.0
            mean = self.bursts.mean_on_s if state[i] else self.bursts.mean_off_s
            due[i] = time.monotonic() + rng.expovariate(1.0 / mean)

    def set_intensity(self, value: float) -> None:
        for level in self._levels:
            level.value = float(value)

    def on_episode(self, episode: int) -> float:
        level = self.schedule.intensity(episode)
        self.set_intensity(level)
        return level

    @property
    def intensity(self) -> float:
        return float(self._level.value)

    def stop(self) -> None:
        self._burst_stop.set()
        if self._burst_thread is not None:
            self._burst_thread.join(timeout=2)
            self._burst_thread = None
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


LOAD_LEVELS = ("0", "1", "2", "bursty")


def parse_load_levels(text: str) -> list[str]:
    """``"0,1,2,bursty"`` -> the named levels, in order, each once; one-line error otherwise."""
    from casrap.errors import InputError

    levels = [part.strip().lower() for part in text.split(",") if part.strip()]
    bad = [lv for lv in levels if lv not in LOAD_LEVELS]
    if bad or not levels:
        raise InputError(f"load levels must be a comma-separated subset of {', '.join(LOAD_LEVELS)} (got {text!r})")
    return list(dict.fromkeys(levels))


def background_for_level(level: str, seed: int = 0) -> BackgroundLoad:
    """An *unstarted* background load for a named level (use it as a context manager)."""
    if level == "bursty":
        return BackgroundLoad(workers=2, bursts=BurstSchedule(seed=seed))
    workers = int(level)
    return BackgroundLoad(workers=workers, intensity=1.0 if workers else 0.0)


def level_busy_cores(level: str) -> float:
    """Expected busy background cores for a named level (bursty: half of two)."""
    return 1.0 if level == "bursty" else float(int(level))


class LoadLevels:
    """Two long-lived background workers switched between the named levels without restarting them.

    Starting worker processes costs about a second and disturbs the caches; a sweep that
    changes level every few prompts (the recorder, the load test) keeps two workers and sets
    their duty: ``"0"`` both idle, ``"1"`` one busy, ``"2"`` both busy, ``"bursty"`` each
    switching on and off on its own seeded exponential schedule.
    """

    def __init__(self, workers: int = 2) -> None:
        self.load = BackgroundLoad(workers=workers, intensity=0.0)
        self.level = "0"

    def __enter__(self) -> LoadLevels:
        self.load.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.load.stop()

    def set(self, level: str, seed: int = 0) -> None:
        """Switch to ``level`` now (the caller lets it settle before timing)."""
        load = self.load
        load._burst_stop.set()
        if load._burst_thread is not None:
            load._burst_thread.join(timeout=2)
            load._burst_thread = None
        load._burst_stop = threading.Event()
        if level == "bursty":
            load.bursts = BurstSchedule(seed=seed)
            load._burst_thread = threading.Thread(target=load._toggle, name="casrap-bursts", daemon=True)
            load._burst_thread.start()
        else:
            busy = int(level)
            for i, value in enumerate(load._levels):
                value.value = 1.0 if i < busy else 0.0
        self.level = level
