"""Telemetry readings: CPU, memory, GPU, VRAM, battery.

A reading costs well under a few milliseconds: ``psutil.cpu_percent(interval=None)``
reports utilisation since the previous call without sleeping, NVML handles are
opened once. Without a GPU, GPU figures are zeros; without a battery, 100%.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Protocol

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

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


class Telemetry(Protocol):
    def read(self) -> TelemetryReading: ...


class LiveTelemetry:
    """Reads this machine through psutil, NVML (nvidia-ml-py) and torch.cuda."""

    def __init__(self, gpu_index: int = 0) -> None:
        import psutil

        self._psutil = psutil
        psutil.cpu_percent(interval=None)  # prime the counter
        self._mem_total = psutil.virtual_memory().total / 2**30
        self._nvml_handle = None
        self._cuda = False
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._nvml_handle = pynvml.nvmlDeviceGetHandleByIndex(gpu_index)
        except Exception:  # noqa: BLE001 - no driver, no GPU, no library: fall back
            try:
                import torch

                self._cuda = torch.cuda.is_available()
            except ImportError:  # pragma: no cover
                self._cuda = False

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
        battery = 100.0
        try:
            sensor = ps.sensors_battery()
            if sensor is not None:
                battery = float(sensor.percent)
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
        )
