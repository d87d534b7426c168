"""Thread-aware execution: how many intra-op threads torch may use right now, and no spinning.

Batch-1 decode is bandwidth-bound: on an idle 2-core machine one thread decodes as fast
as two. When another process holds a core, PyTorch's OpenMP threads spin-wait for it and
two threads decode 2-3x *slower* than one. So before each request the decision path sets
torch's intra-op threads to the cores that are free now — the cores this process may use
(affinity mask, cgroup CPU quota) minus the cores other processes keep busy (telemetry),
at least one — and casrap's command line runs OpenMP with a passive wait policy
(``OMP_WAIT_POLICY=PASSIVE``: a waiting thread sleeps instead of spinning), which must be
set before torch is imported. Library users call :func:`passive_wait_policy` first thing,
or export the variable themselves.

llama.cpp and Ollama default to the physical cores for the same reason; vLLM's CPU backend
sizes torch threads from the affinity mask and cgroup quota.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

WAIT_POLICY_ENV = "OMP_WAIT_POLICY"


def passive_wait_policy() -> bool:
    """Ask OpenMP to sleep rather than spin while waiting; True when it can still take effect.

    OpenMP reads the variable once, when torch loads its runtime: after ``import torch``
    this sets the variable for child processes only and returns False (logged). A value
    the user exported is kept.
    """
    os.environ.setdefault(WAIT_POLICY_ENV, "PASSIVE")
    if "torch" in sys.modules:
        log.info("torch is already imported: %s=%s applies to child processes only", WAIT_POLICY_ENV,
                 os.environ[WAIT_POLICY_ENV])
        return False
    return True


def _cgroup_quota_cores() -> float | None:
    """CPU quota of this process's cgroup in cores (v2 ``cpu.max`` or v1 cfs files); None without one."""
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="ascii") as handle:
            quota, period = handle.read().split()[:2]
        if quota != "max":
            return float(quota) / float(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", encoding="ascii") as handle:
            quota_us = float(handle.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us", encoding="ascii") as handle:
            period_us = float(handle.read())
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    except (OSError, ValueError):
        return None


def available_cores() -> int:
    """Cores this process may run on: the affinity mask, capped by a cgroup CPU quota (at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_quota_cores()
    if quota is not None:
        cores = min(cores, max(int(math.floor(quota)), 1))
    return max(cores, 1)


def _get(reading: Any, key: str) -> float:
    if isinstance(reading, dict):
        return float(reading.get(key, 0.0))
    return float(getattr(reading, key, 0.0))


@dataclass
class ThreadPolicy:
    """How many intra-op threads a request gets.

    Attributes:
        mode: ``"free-cores"`` (default): available cores minus the cores other processes
            keep busy, at least 1; ``"fixed"``: always ``fixed`` threads (timing studies,
            or a user who knows better).
        fixed: the thread count for ``"fixed"`` (None: all available cores).
        busy_threshold: a core counts as taken when other processes use at least this
            share of one (rounding at 0.5: a `pip install` at 30% of a core does not cost
            a thread, a process burning a core does).
        machine_cores: cores of the whole machine (telemetry's CPU share is of all of
            them); None reads ``os.cpu_count()``.
        available: cores this process may use; None reads :func:`available_cores`.
    """

    mode: str = "free-cores"
    fixed: int | None = None
    busy_threshold: float = 0.5
    machine_cores: int | None = None
    available: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in {"free-cores", "fixed"}:
            raise ValueError(f"thread policy mode must be 'free-cores' or 'fixed', not {self.mode!r}")
        self.available = self.available or available_cores()
        self.machine_cores = self.machine_cores or os.cpu_count() or self.available

    def busy_cores(self, reading: Any) -> float:
        """Cores other processes keep busy: CPU share of the machine, or runnable tasks, whichever is more."""
        cores = float(self.machine_cores or 1)
        return max(_get(reading, "other_cpu_util") / 100.0 * cores, _get(reading, "run_queue") * cores)

    def choose(self, reading: Any) -> int:
        """Threads for the next request given a telemetry reading (object or dict)."""
        available = int(self.available or 1)
        if self.mode == "fixed":
            return max(1, min(self.fixed or available, available))
        free = available - self.busy_cores(reading)
        return max(1, min(available, int(math.floor(free + (1.0 - self.busy_threshold)))))

    def key(self) -> str:
        """Identifies the execution a latency was measured under (for caches and recordings)."""
        what = f"fixed{self.fixed or self.available}" if self.mode == "fixed" else "free-cores"
        return f"{what}/avail{self.available}/wait-{os.environ.get(WAIT_POLICY_ENV, 'default').lower()}"


def apply_threads(threads: int) -> float:
    """Set torch's intra-op threads; returns the seconds the call took (0 when unchanged).

    ``torch.set_num_threads`` also resizes the MKL/oneDNN pools: the first forward after a
    change pays for that too, inside the generation it belongs to.
    """
    import torch

    if torch.get_num_threads() == threads:
        return 0.0
    start = time.perf_counter()
    torch.set_num_threads(int(threads))
    return time.perf_counter() - start


def thread_policy_key() -> str:
    """The default policy's key on this machine (what a latency cache should be keyed by)."""
    return ThreadPolicy().key()
