"""Thread-aware execution: spin while the cores are free, shed threads the moment they are not.

Batch-1 decode on a CPU runs fastest with one spinning OpenMP thread per free core
(OpenMP's default wait policy): on an idle 2-core machine two spinning threads decode
~1.7x faster than one thread or two sleeping (``OMP_WAIT_POLICY=PASSIVE``) ones. The same
spinning threads are catastrophic when another process holds a core: a thread that waits
at a barrier for a sibling descheduled by the kernel burns its own core, and a decode step
becomes 10-25x slower. The wait policy is read once, when OpenMP starts; the thread count
can change between any two forward passes (``torch.set_num_threads``, ~0.02 ms).

So casrap leaves the wait policy alone (a value the user exported is kept) and keeps its
thread count equal to the cores other processes leave free, re-checked *during* a
request by a :class:`ThreadGovernor`:

- before each request, threads = available cores (affinity mask, cgroup quota) minus the
  cores other processes keep busy (telemetry), at least one;
- after every few decode steps, a cheap telemetry read (~0.3 ms) can lower or raise it;
- a step-time watchdog: a decode step much slower than this request's running median (or
  the remembered median at that thread count) drops a thread at once;
- threads come back only after the cores have read free for a hold time, which doubles
  each time a restore is followed at once by a slow step (a bursty neighbour) and decays
  after a quiet spell, so an on/off load does not make every burst cost a slow step.

llama.cpp and Ollama default to the physical cores for the same reason; vLLM's CPU backend
sizes torch threads from the affinity mask and cgroup quota.
"""

from __future__ import annotations

import logging
import math
import statistics
import os
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

WAIT_POLICY_ENV = "OMP_WAIT_POLICY"


def openmp_wait_policy() -> str:
    """The OpenMP wait policy this process runs under, for records: the exported value or libgomp's default.

    casrap sets no wait policy of its own: spinning (the default) is fastest whenever the
    thread count matches the free cores, which the :class:`ThreadGovernor` keeps true.
    """
    value = os.environ.get(WAIT_POLICY_ENV, "").strip().lower()
    spin = os.environ.get("GOMP_SPINCOUNT", "").strip()
    label = value or "default"
    return f"{label}/spin{spin}" if spin else label


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
        return f"{what}/avail{self.available}/wait-{openmp_wait_policy()}"


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


@dataclass
class GovernorConfig:
    """How the :class:`ThreadGovernor` follows the load during a request.

    Attributes:
        check_every: decode steps between telemetry reads inside a request.
        slow_factor: a decode step longer than this many times the reference step (this
            request's running median at the current thread count, else the median
            remembered from earlier requests at that count) trips the watchdog.
        min_history: steps at the current thread count before their median is trusted.
        hold_s: after a thread was shed, the cores must read free for this long before it
            comes back.
        hold_max_s: the hold never grows beyond this.
        relapse_s: a watchdog trip this soon after threads came back doubles the hold.
        quiet_s: a spell this long without a trip resets the hold to ``hold_s``.
        compare_fewer: shed a thread when this request's recent median step at the current
            count is slower than the remembered median with one thread fewer (same profile):
            a partial neighbour that telemetry rounds away still costs spinning threads.
    """

    check_every: int = 4
    slow_factor: float = 2.5
    min_history: int = 2
    hold_s: float = 1.0
    hold_max_s: float = 16.0
    relapse_s: float = 3.0
    quiet_s: float = 30.0
    compare_fewer: bool = True


@dataclass
class ThreadChange:
    """One change of the thread count: when (clock seconds), from, to, and why."""

    at: float
    before: int
    after: int
    reason: str  # "start", "telemetry", "watchdog", "slower-than-fewer", "restore"
    step: int = -1  # decode step of the request it happened after (-1: before the request)


class ThreadGovernor:
    """Keeps torch's thread count equal to the free cores, before and during every request.

    ``start(reading)`` runs before a request (the Router's ``prepare``); ``step(step_s)``
    after every decode step of it (generation calls it between forward passes, where a
    thread change is safe and takes effect on the next pass). Telemetry, the clock and the
    thread setter are injected, so tests drive it with fakes.

    The remembered per-thread-count step median makes the watchdog work from a request's
    first decode step; it is the median of recent requests' medians at that count, so a
    single slow request does not teach it that slow is normal.
    """

    def __init__(self, policy: ThreadPolicy, telemetry: Any = None, clock: Any = time.perf_counter,
                 apply: Any = None, config: GovernorConfig | None = None) -> None:
        self.policy = policy
        self.telemetry = telemetry
        self.clock = clock
        self.apply = apply or apply_threads
        self.config = config or GovernorConfig()
        self.threads = 0  # 0: not set yet
        self.hold_s = self.config.hold_s
        self.shed_at: float | None = None
        self.restored_at: float | None = None
        self.tripped_at: float | None = None
        self.changes: list[ThreadChange] = []  # this request's changes (reset by start)
        self.remembered: dict[tuple[str, int], list[float]] = {}  # (key, threads) -> recent requests' median steps
        self.key = ""  # what the steps belong to (the profile): medians are only compared within one
        self._steps: list[float] = []  # this request's steps at the current count
        self._step_index = 0
        self._skip_next = False
        self.last_set_s = 0.0

    # -- decisions -------------------------------------------------------------------
    def _may_raise(self, now: float) -> bool:
        if self.tripped_at is not None and now - self.tripped_at > self.config.quiet_s:
            self.hold_s = self.config.hold_s
        return self.shed_at is None or now - self.shed_at >= self.hold_s

    def _set(self, threads: int, reason: str, now: float) -> None:
        threads = max(1, min(int(threads), int(self.policy.available or 1)))
        if threads == self.threads:
            return
        self._remember()
        before, self.threads = self.threads, threads
        self.last_set_s += float(self.apply(threads) or 0.0)
        if before:  # the very first setting is not a change
            self.changes.append(ThreadChange(now, before, threads, reason, self._step_index - 1 if reason != "start" else -1))
        if before and threads < before:
            self.shed_at = now
        elif before and threads > before:
            self.restored_at = now
        self._steps = []
        self._skip_next = True  # the first pass after a change pays for resizing the pools

    def _target(self, reading: Any, now: float) -> int:
        """Threads the reading allows, never raised while the hold after a shed lasts."""
        target = self.policy.choose(reading)
        if self.threads and target > self.threads and not self._may_raise(now):
            return self.threads
        return target

    def start(self, reading: Any, key: str = "") -> int:
        """Before a request: set the thread count from a telemetry reading; returns it.

        ``key`` names what will run (the profile): step medians are remembered per key.
        """
        now = self.clock()
        self._remember()
        self.key = key
        self.changes, self._steps, self._step_index, self.last_set_s = [], [], 0, 0.0
        self._skip_next = False
        target = self._target(reading, now)
        if target == self.threads:  # torch's count is per OS thread: make sure the one about to run has it
            self.last_set_s += float(self.apply(target) or 0.0)
        self._set(target, "start" if not self.threads or target <= self.threads else "restore", now)
        return self.threads

    def for_work(self, key: str) -> None:
        """Name what the coming decode steps belong to (the profile, a batch size), after :meth:`start`.

        Steps of other work are not compared: the history so far is remembered under its key.
        """
        if key != self.key:
            self._remember()
            self._steps = []
            self.key = key

    def reference_s(self) -> float | None:
        """The step a healthy decode step at the current thread count takes (None: not known yet)."""
        if len(self._steps) >= self.config.min_history:
            return float(statistics.median(self._steps[-8:]))
        past = self.remembered.get((self.key, self.threads))
        return float(statistics.median(past)) if past else None

    def _slower_than_fewer(self) -> bool:
        """This request's recent steps are slower than the same work measured with one thread fewer."""
        if not self.config.compare_fewer or self.threads <= 1 or len(self._steps) < 2 * self.config.min_history:
            return False
        fewer = self.remembered.get((self.key, self.threads - 1))
        return bool(fewer) and statistics.median(self._steps[-4:]) > statistics.median(fewer)

    def step(self, step_s: float) -> None:
        """After one decode step (seconds it took): watchdog first, then a periodic telemetry read."""
        now = self.clock()
        self._step_index += 1
        if self.policy.mode == "fixed":  # a fixed thread count is a measurement setting: never governed
            return
        if self._skip_next:
            self._skip_next = False
        else:
            reference = self.reference_s()
            if reference is not None and self.threads > 1 and step_s > self.config.slow_factor * reference:
                if self.restored_at is not None and now - self.restored_at <= self.config.relapse_s:
                    self.hold_s = min(self.hold_s * 2.0, self.config.hold_max_s)
                self.tripped_at = now
                self._set(self.threads - 1, "watchdog", now)
                self._read(now, lower_only=True)
                return
            self._steps.append(step_s)
            if self._slower_than_fewer():
                self.tripped_at = now
                self._set(self.threads - 1, "slower-than-fewer", now)
                return
        if self.telemetry is not None and self._step_index % max(self.config.check_every, 1) == 0:
            self._read(now)

    def _read(self, now: float, lower_only: bool = False) -> None:
        if self.telemetry is None:
            return
        target = self._target(self.telemetry.read(), now)
        if target < self.threads:
            self._set(target, "telemetry", now)
        elif target > self.threads and not lower_only:
            self._set(target, "restore", now)

    def _remember(self) -> None:
        """Keep the median step of the run at the current count (the last 8 requests' worth)."""
        if self.threads and len(self._steps) >= self.config.min_history:
            past = self.remembered.setdefault((self.key, self.threads), [])
            past.append(float(statistics.median(self._steps)))
            del past[:-8]

    def finish(self) -> list[ThreadChange]:
        """After a request: remember its steps, return its thread changes."""
        self._remember()
        self._steps = []
        return list(self.changes)
