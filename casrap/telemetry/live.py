"""Telemetry readings: the load *other* processes put on the machine, memory, GPU, battery.

What the policy needs is how contended the machine is for the request about to run,
not how busy casrap itself was: ``psutil.cpu_percent(interval=None)`` reports the
utilisation since the previous call, and the previous call came right before
casrap's own generation, so it read ~100% with and without a background load. A
reading therefore separates the machine's busy time into this process's share and
everyone else's (``other_cpu_util``), and adds the instantaneous run queue without
this process's running threads (``run_queue``), memory pressure (Linux PSI), GPU
utilisation and memory from NVML, battery level and power source.

A reading never blocks: CPU shares are deltas of cumulative counters since the
previous reading (a few hundred microseconds). Without a GPU, GPU figures are zeros;
without a battery, 100% on mains power.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TelemetryReading:
    cpu_util: float  # percent, 0-100
    mem_available_gb: float
    gpu_util: float  # percent, 0-100
    vram_free_gb: float
    battery: float  # percent, 100 without a battery
    mem_total_gb: float = 0.0
    vram_total_gb: float = 0.0
    other_cpu_util: float = 0.0  # percent of all cores used by processes other than this one
    run_queue: float = 0.0  # runnable tasks per core, this process's running threads excluded
    mem_pressure: float = 0.0  # Linux PSI "some" avg10, percent of time stalled on memory
    on_battery: float = 0.0  # 1 when running on battery power

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


class Telemetry(Protocol):
    def read(self) -> TelemetryReading: ...


def nvml_handle(pynvml: Any, gpu_index: int | None = None, device: Any = None) -> Any:
    """The NVML handle of the GPU casrap runs on.

    ``gpu_index`` is an NVML (physical) index, used as given. Otherwise the CUDA device
    (``device``, default ``cuda:0``) is mapped to its physical GPU: NVML numbers GPUs
    without regard to ``CUDA_VISIBLE_DEVICES``, so ``cuda:0`` under
    ``CUDA_VISIBLE_DEVICES=3`` is NVML's GPU 3 (a UUID entry is looked up by UUID).
    """
    import os

    if gpu_index is not None:
        return pynvml.nvmlDeviceGetHandleByIndex(int(gpu_index))
    cuda_index = 0
    if device is not None:
        text = str(device)
        if text.startswith("cuda"):
            cuda_index = int(text.split(":", 1)[1]) if ":" in text else 0
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if not visible or "CUDA_VISIBLE_DEVICES" not in os.environ:
        return pynvml.nvmlDeviceGetHandleByIndex(cuda_index)
    if cuda_index >= len(visible):
        raise ValueError(f"cuda:{cuda_index} is not among CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']}")
    entry = visible[cuda_index]
    if entry.isdigit():
        return pynvml.nvmlDeviceGetHandleByIndex(int(entry))
    return pynvml.nvmlDeviceGetHandleByUUID(entry)


class LiveTelemetry:
    """Reads this machine through psutil, NVML (nvidia-ml-py) and torch.cuda.

    GPU figures are those of the GPU the model runs on: ``device`` (a CUDA device, e.g.
    the model's) or an explicit NVML ``gpu_index``; by default the first visible GPU.
    """

    def __init__(self, gpu_index: int | None = None, device: Any = None) -> None:
        import psutil

        self._psutil = psutil
        psutil.cpu_percent(interval=None)  # prime the counter
        self._mem_total = psutil.virtual_memory().total / 2**30
        self._cores = psutil.cpu_count() or 1
        self._self = psutil.Process()
        self._last = self._cpu_counters()
        self._nvml_handle = None
        self._cuda = False
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._nvml_handle = nvml_handle(pynvml, gpu_index, device)
        except Exception:  # noqa: BLE001 - no driver, no GPU, no library: fall back
            try:
                import torch

                self._cuda = torch.cuda.is_available()
            except ImportError:  # pragma: no cover
                self._cuda = False

    def _cpu_counters(self) -> tuple[float, float, float]:
        """(wall clock, machine busy CPU seconds, this process's CPU seconds)."""
        import time

        times = self._psutil.cpu_times()
        busy = sum(getattr(times, k, 0.0) for k in ("user", "nice", "system", "irq", "softirq", "steal"))
        own = self._self.cpu_times()
        return time.monotonic(), float(busy), float(own.user + own.system)

    def _other_cpu(self) -> float:
        """Percent of all cores busy with other processes since the previous reading."""
        now = self._cpu_counters()
        wall, busy, own = (a - b for a, b in zip(now, self._last))
        if wall < 0.02:  # too short a window to mean anything: keep the previous window
            return self._last_other if hasattr(self, "_last_other") else 0.0
        self._last = now
        share = max(0.0, busy - own) / (wall * self._cores)
        self._last_other = float(min(100.0, 100.0 * share))
        return self._last_other

    def _run_queue(self) -> float:
        """Runnable tasks per core now, without this process's running threads (Linux; else 1-min load)."""
        try:
            with open("/proc/stat", encoding="ascii") as handle:
                running = next(int(line.split()[1]) for line in handle if line.startswith("procs_running"))
            own = sum(1 for t in self._self.threads() if self._thread_running(t.id))
            return max(0.0, running - max(own, 1)) / self._cores
        except (OSError, StopIteration, ValueError, self._psutil.Error):
            try:
                return float(self._psutil.getloadavg()[0]) / self._cores
            except (AttributeError, OSError):
                return 0.0

    @staticmethod
    def _thread_running(tid: int) -> bool:
        try:
            with open(f"/proc/self/task/{tid}/stat", encoding="ascii") as handle:
                return handle.read().rsplit(")", 1)[1].split()[0] == "R"
        except (OSError, IndexError):
            return False

    @staticmethod
    def _mem_pressure() -> float:
        try:
            with open("/proc/pressure/memory", encoding="ascii") as handle:
                first = handle.readline().split()
            return float(dict(f.split("=") for f in first[1:])["avg10"])
        except (OSError, KeyError, ValueError, IndexError):
            return 0.0

    def read(self) -> TelemetryReading:
        ps = self._psutil
        memory = ps.virtual_memory()
        gpu_util = vram_free = vram_total = 0.0
        if self._nvml_handle is not None:
            util = self._nvml.nvmlDeviceGetUtilizationRates(self._nvml_handle)
            info = self._nvml.nvmlDeviceGetMemoryInfo(self._nvml_handle)
            gpu_util, vram_free, vram_total = float(util.gpu), info.free / 2**30, info.total / 2**30
        elif self._cuda:
            import torch

            free, total = torch.cuda.mem_get_info()
            vram_free, vram_total = free / 2**30, total / 2**30
        battery, on_battery = 100.0, 0.0
        try:
            sensor = ps.sensors_battery()
            if sensor is not None:
                battery = float(sensor.percent)
                on_battery = 0.0 if sensor.power_plugged in (True, None) else 1.0
        except (AttributeError, OSError, NotImplementedError):
            pass
        return TelemetryReading(
            cpu_util=float(ps.cpu_percent(interval=None)),
            mem_available_gb=memory.available / 2**30,
            gpu_util=gpu_util,
            vram_free_gb=vram_free,
            battery=battery,
            mem_total_gb=self._mem_total,
            vram_total_gb=vram_total,
            other_cpu_util=self._other_cpu(),
            run_queue=self._run_queue(),
            mem_pressure=self._mem_pressure(),
            on_battery=on_battery,
        )


class FakeTelemetry:
    """Seeded random readings for tests and offline demos (deterministic per seed)."""

    def __init__(self, seed: int = 0, gpu: bool = False) -> None:
        self._seed = seed
        self._gpu = gpu
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)

    def read(self) -> TelemetryReading:
        r = self._rng
        return TelemetryReading(
            cpu_util=float(r.uniform(0, 100)),
            mem_available_gb=float(r.uniform(2, 24)),
            gpu_util=float(r.uniform(0, 100)) if self._gpu else 0.0,
            vram_free_gb=float(r.uniform(1, 80)) if self._gpu else 0.0,
            battery=float(r.uniform(20, 100)),
            mem_total_gb=24.0,
            vram_total_gb=80.0 if self._gpu else 0.0,
            other_cpu_util=float(r.uniform(0, 100)),
            run_queue=float(r.uniform(0, 2)),
            mem_pressure=float(r.uniform(0, 5)),
            on_battery=float(r.integers(0, 2)),
        )
