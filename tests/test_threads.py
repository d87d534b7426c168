"""Thread-aware execution: the thread rule, the wait policy helper, named load levels."""

from __future__ import annotations

import os

import pytest

from casrap.errors import InputError
from casrap.telemetry.load import LoadLevels, parse_load_levels
from casrap.telemetry.threads import GovernorConfig, ThreadGovernor, ThreadPolicy, available_cores, openmp_wait_policy


@pytest.mark.parametrize(
    ("other_cpu", "run_queue", "threads"),
    [(0.0, 0.0, 2), (10.0, 0.0, 2), (24.0, 0.0, 2), (46.0, 0.0, 1), (100.0, 0.0, 1), (0.0, 0.5, 1), (0.0, 1.5, 1)],
)
def test_threads_are_the_cores_other_processes_leave_free(other_cpu, run_queue, threads):
    policy = ThreadPolicy(machine_cores=2, available=2)
    assert policy.choose({"other_cpu_util": other_cpu, "run_queue": run_queue}) == threads


def test_thread_rule_scales_with_the_machine_and_respects_the_process_share():
    big = ThreadPolicy(machine_cores=16, available=16)
    assert big.choose({"other_cpu_util": 25.0}) == 12  # four of sixteen cores busy elsewhere
    pinned = ThreadPolicy(machine_cores=16, available=4)  # affinity mask / quota: four cores for us
    assert pinned.choose({"other_cpu_util": 0.0}) == 4
    assert pinned.choose({"other_cpu_util": 100.0}) == 1  # never fewer than one
    assert ThreadPolicy(mode="fixed", machine_cores=16, available=4).choose({"other_cpu_util": 90.0}) == 4
    assert ThreadPolicy(mode="fixed", fixed=1, available=4).choose({}) == 1
    with pytest.raises(ValueError, match="free-cores"):
        ThreadPolicy(mode="all")


def test_policy_key_names_the_execution():
    key = ThreadPolicy(available=2).key()
    assert key.startswith("free-cores/avail2/wait-")
    assert ThreadPolicy(mode="fixed", available=2).key().startswith("fixed2/")
    assert 1 <= available_cores() <= (os.cpu_count() or 1)


def test_casrap_sets_no_wait_policy_and_records_the_one_in_force(monkeypatch):
    import casrap.cli  # noqa: F401  (the entry point must not force a wait policy)

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    assert openmp_wait_policy() == "default"
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setenv("GOMP_SPINCOUNT", "20000")
    assert openmp_wait_policy() == "passive/spin20000"
    assert ThreadPolicy(available=2).key().endswith("wait-passive/spin20000")


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Load:
    """Fake telemetry: other processes keep ``busy`` of the machine's 2 cores busy."""

    def __init__(self) -> None:
        self.busy = 0.0
        self.reads = 0

    def read(self) -> dict[str, float]:
        self.reads += 1
        return {"other_cpu_util": 50.0 * self.busy, "run_queue": 0.0}


def _governor(**config: float) -> tuple[ThreadGovernor, _Load, _Clock, list[int]]:
    load, clock, applied = _Load(), _Clock(), []
    governor = ThreadGovernor(ThreadPolicy(machine_cores=2, available=2), telemetry=load, clock=clock,
                              apply=lambda n: applied.append(n) or 0.0, config=GovernorConfig(**config))
    return governor, load, clock, applied


def _decode(governor: ThreadGovernor, clock: _Clock, step_s: float, steps: int) -> None:
    for _ in range(steps):
        clock.now += step_s
        governor.step(step_s)


def test_watchdog_sheds_a_thread_on_the_first_slow_step_and_telemetry_brings_it_back_after_the_hold():
    governor, load, clock, applied = _governor(check_every=4, hold_s=1.0)
    assert governor.start(load.read()) == 2 and applied == [2]
    _decode(governor, clock, 0.04, 6)  # idle: two spinning threads
    assert governor.threads == 2
    load.busy = 1.0  # another process takes a core mid-request: the next step is many times slower
    _decode(governor, clock, 0.9, 1)
    assert governor.threads == 1 and applied[-1] == 1  # within one step, before the next forward
    assert governor.changes[-1].reason == "watchdog"
    _decode(governor, clock, 0.06, 40)  # one thread on the free core: no further change while the load lasts
    assert governor.threads == 1
    load.busy = 0.0  # the core is free again
    _decode(governor, clock, 0.06, 4)  # next telemetry read: free, and the hold (1 s) has passed
    assert governor.threads == 2 and governor.changes[-1].reason == "restore"


def test_telemetry_alone_drops_threads_within_one_check_interval():
    governor, load, clock, applied = _governor(check_every=4, slow_factor=1e9)  # watchdog off
    governor.start(load.read())
    _decode(governor, clock, 0.04, 2)
    load.busy = 1.0
    _decode(governor, clock, 0.04, 2)  # the 4th step reads telemetry
    assert governor.threads == 1 and governor.changes[-1].reason == "telemetry"


def test_threads_stay_shed_during_the_hold_and_a_relapse_doubles_it():
    governor, load, clock, applied = _governor(check_every=1, hold_s=1.0, relapse_s=3.0)
    governor.start(load.read())
    _decode(governor, clock, 0.04, 4)
    _decode(governor, clock, 0.9, 1)  # burst: shed
    assert governor.threads == 1
    _decode(governor, clock, 0.06, 5)  # 0.3 s later the cores read free, but the hold is 1 s
    assert governor.threads == 1
    _decode(governor, clock, 0.06, 15)
    assert governor.threads == 2 and governor.hold_s == 1.0
    _decode(governor, clock, 0.04, 3)
    _decode(governor, clock, 0.9, 1)  # the load came back right after the restore: a bursty neighbour
    assert governor.threads == 1 and governor.hold_s == 2.0
    _decode(governor, clock, 0.06, 20)  # 1.2 s: still held
    assert governor.threads == 1
    _decode(governor, clock, 0.06, 20)
    assert governor.threads == 2


def test_the_first_step_after_a_change_is_not_judged_and_the_remembered_median_guards_the_next_request():
    governor, load, clock, applied = _governor(check_every=100)
    governor.start(load.read())
    _decode(governor, clock, 0.04, 8)
    governor.finish()
    governor.start(load.read())  # a new request: its first decode step is judged by the remembered median
    _decode(governor, clock, 0.5, 1)
    assert governor.threads == 1
    _decode(governor, clock, 0.2, 1)  # first step after the change: pools resizing, not a trip (and 1 is the floor)
    assert [c.reason for c in governor.changes] == ["watchdog"]


def test_a_count_slower_than_one_thread_fewer_on_the_same_work_is_shed():
    governor, load, clock, applied = _governor(check_every=100)
    load.busy = 1.0
    governor.start(load.read())
    governor.for_work("none")
    _decode(governor, clock, 0.06, 8)  # one thread while a neighbour runs: 60 ms
    governor.finish()
    load.busy = 0.3  # a partial neighbour: telemetry rounds it away, two spinning threads suffer
    governor.hold_s = 0.0
    assert governor.start(load.read()) == 2
    governor.for_work("layers-50")
    _decode(governor, clock, 0.08, 6)  # other work: its medians are not compared with the full model's
    assert governor.threads == 2
    governor.finish()
    governor.start(load.read())
    governor.for_work("none")
    _decode(governor, clock, 0.08, 5)  # the full model at 80 ms with two threads, 60 ms with one
    assert governor.threads == 1 and governor.changes[-1].reason == "slower-than-fewer"


def test_one_thread_is_the_floor_and_a_fixed_policy_is_never_governed():
    governor, load, clock, applied = _governor()
    load.busy = 2.0
    assert governor.start(load.read()) == 1
    _decode(governor, clock, 5.0, 3)
    assert governor.threads == 1
    fixed = ThreadGovernor(ThreadPolicy(mode="fixed", fixed=2, available=2), telemetry=load, clock=clock,
                           apply=lambda n: 0.0)
    assert fixed.start({"other_cpu_util": 100.0}) == 2
    _decode(fixed, clock, 0.04, 4)
    _decode(fixed, clock, 5.0, 8)
    assert fixed.threads == 2 and fixed.changes == [] or [c.reason for c in fixed.changes] == ["start"]


def test_load_levels_parse_and_switch():
    assert parse_load_levels("0, 2,bursty,2") == ["0", "2", "bursty"]
    with pytest.raises(InputError, match="subset of 0, 1, 2, bursty"):
        parse_load_levels("3")
    with LoadLevels() as levels:
        levels.set("1")
        assert [v.value for v in levels.load._levels] == [1.0, 0.0]
        levels.set("bursty", seed=3)
        assert levels.load._burst_thread is not None and levels.load._burst_thread.is_alive()
        levels.set("0")
        assert levels.load._burst_thread is None
        assert [v.value for v in levels.load._levels] == [0.0, 0.0]
