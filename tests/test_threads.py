"""Thread-aware execution: the thread rule, the wait policy helper, named load levels."""

from __future__ import annotations

import os

import pytest

from casrap.errors import InputError
from casrap.telemetry.load import LoadLevels, parse_load_levels
from casrap.telemetry.threads import ThreadPolicy, available_cores, passive_wait_policy


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


def test_passive_wait_policy_keeps_a_user_value_and_says_when_too_late(monkeypatch):
    import torch  # noqa: F401  (already loaded in a test process: the helper must say it is too late)

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert passive_wait_policy() is False
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    passive_wait_policy()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


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
