from __future__ import annotations

import json
import math

import gymnasium as gym
import numpy as np
import pytest

from casrap.decide.observation import OBSERVATION_FEATURES
import torch
from gymnasium.utils.env_checker import check_env

from casrap.data.prompts import load_prompts
from casrap.decide.analysis import complexity_score
from casrap.envs.replay import PruningReplayEnv, load_replay
from casrap.envs.rewards import RewardConfig, RewardInput, casrap_reward, linear_reward, slo_reward
from casrap.errors import InputError
from casrap.telemetry import FakeTelemetry, LiveTelemetry
from tests.helpers import tiny_env


def test_envs_are_registered_on_import():
    import casrap  # noqa: F401

    assert gym.spec("casrap/Pruning-v0").nondeterministic is True
    assert gym.spec("casrap/PruningReplay-v0") is not None


@pytest.mark.parametrize("reward", ["casrap", "slo"])
def test_check_env_passes_on_live_env_with_fakes(tiny, reward):
    env = tiny_env(tiny, reward=reward)
    check_env(env, skip_render_check=True)


def test_live_step_reports_raw_figures_and_restores_full_model(tiny):
    env = tiny_env(tiny, reward="slo")
    ids = torch.tensor([[3, 14, 15, 92]])
    before = tiny.model(ids).logits.clone()
    obs, info = env.reset(seed=3)
    assert env.observation_space.contains(obs)
    assert 0 <= info["complexity"] <= 1
    for action in range(env.action_space.n):
        env.reset(seed=3)
        _, reward, terminated, truncated, info = env.step(action)
        assert terminated and not truncated
        for key in ("latency_s", "ttft_s", "tokens_per_s", "baseline_latency_s", "ppl", "baseline_ppl", "kl", "speedup", "budget_s", "telemetry"):
            assert key in info
        assert info["ttft_s"] <= info["generation_s"]
        assert env.bank.active == "none"
        assert torch.equal(tiny.model(ids).logits, before)
    env.reset(seed=3)
    _, _, _, _, none_info = env.step(0)
    assert none_info["kl"] == 0.0 and none_info["ppl"] == none_info["baseline_ppl"]
    # the step clock makes layer skipping faster, and the router overhead is counted
    env.reset(seed=3)
    _, _, _, _, skip = env.step(env.action_names.index("layers-25"))
    assert skip["robust_generation_s"] < skip["baseline_latency_s"]
    # latency = TTFT + median decode step per further token, plus the router's overhead
    assert skip["robust_generation_s"] == pytest.approx(skip["ttft_s"] + skip["decode_median_s"] * (env.config.max_new_tokens - 1))
    assert skip["latency_s"] == pytest.approx(skip["robust_generation_s"] + skip["analysis_s"] + skip["switch_s"])
    assert skip["budget_s"] == pytest.approx(skip["predicted_full_s"] * env._budget_ratio)


def test_quality_is_judged_on_the_full_models_answer(tiny):
    env = tiny_env(tiny)
    env.reset(seed=0)
    _, _, _, _, info = env.step(env.action_names.index("layers-25"))
    base = env._baselines[info["prompt_id"]]
    from casrap.measure import teacher_forced_ppl

    with env.bank.using("layers-25"):
        expected = teacher_forced_ppl(tiny.model, env._ids[info["prompt_id"]], base.answer_ids)
    assert info["ppl"] == pytest.approx(expected)


def test_baseline_is_cached_and_remeasured_when_load_changes(tiny):
    env = tiny_env(tiny)
    prompt = env.prompts[0]
    from casrap.telemetry.live import TelemetryReading

    # what matters is the CPU *other* processes use, not the machine total (casrap's own ~100%)
    calm = TelemetryReading(95, 8, 0, 0, 100, other_cpu_util=10)
    first = env.baseline(prompt, calm)
    assert env.baseline(prompt, TelemetryReading(99, 8, 0, 0, 100, other_cpu_util=20)) is first
    busy = env.baseline(prompt, TelemetryReading(99, 8, 0, 0, 100, other_cpu_util=90))
    assert busy is not first and torch.equal(busy.answer_ids, first.answer_ids)


def test_multi_prompt_episodes(tiny):
    env = tiny_env(tiny, reward="linear", prompts_per_episode=3)
    env.reset(seed=0)
    flags = [env.step(0)[2] for _ in range(3)]
    assert flags == [False, False, True]


def test_observation_bounds_and_telemetry():
    reading = LiveTelemetry().read()
    assert 0 <= reading.cpu_util <= 100 and reading.mem_available_gb > 0 and reading.battery <= 100
    fake_a, fake_b = FakeTelemetry(5), FakeTelemetry(5)
    assert fake_a.read() == fake_b.read()


def test_rewards_on_hand_computed_cases():
    fast = RewardInput(latency_s=0.75, baseline_latency_s=1.0, ppl=11.0, baseline_ppl=10.0)
    assert fast.speedup == pytest.approx(0.25) and fast.degradation == pytest.approx(0.1)
    assert casrap_reward(fast) == (pytest.approx(0.7 * 0.25 - 0.3 * 0.1 + 2.0), False)
    mid = RewardInput(0.84, 1.0, 10.0, 10.0)
    assert casrap_reward(mid)[0] == pytest.approx(0.7 * 0.16 + 1.0)
    slow = RewardInput(1.05, 1.0, 10.0, 10.0)
    assert casrap_reward(slow) == (pytest.approx(-10 - 20 * 0.05), False)
    very_slow = RewardInput(1.2, 1.0, 10.0, 10.0)
    assert casrap_reward(very_slow) == (-20.0, True)
    assert linear_reward(fast, alpha=2.0, beta=0.5)[0] == pytest.approx(2 * 0.25 - 0.5 * 0.1)
    over = RewardInput(1.0, 1.0, 12.0, 10.0, budget_s=0.8)
    assert slo_reward(over, lam=2.0)[0] == pytest.approx(-math.log(1.2) - 2.0 * math.log(1.25))
    better = RewardInput(1.0, 1.0, 8.0, 10.0, budget_s=0.8)
    assert slo_reward(better, lam=2.0)[0] == pytest.approx(-2.0 * math.log(1.25))  # lower perplexity earns nothing
    within = RewardInput(0.7, 1.0, 10.0, 10.0, budget_s=0.8)
    assert slo_reward(within)[0] == 0.0


def test_complexity_formula():
    assert complexity_score(100, 25) == pytest.approx(0.6 * 0.5 + 0.4 * 0.5)
    assert complexity_score(1000, 1000) == pytest.approx(1.0)


def test_dataset_parsing_errors_name_line_or_column(tmp_path):
    bad_column = tmp_path / "a.csv"
    bad_column.write_text("text\nhello\n")
    with pytest.raises(InputError, match="no prompt column"):
        load_prompts(bad_column)
    empty_cell = tmp_path / "b.csv"
    empty_cell.write_text("Prompt\nhello\n\"\"\n")
    with pytest.raises(InputError, match=r"b.csv:3"):
        load_prompts(empty_cell)
    bad_json = tmp_path / "c.jsonl"
    bad_json.write_text('{"prompt": "ok"}\n{broken\n')
    with pytest.raises(InputError, match=r"c.jsonl:2"):
        load_prompts(bad_json)
    good = tmp_path / "d.jsonl"
    good.write_text('{"Prompt": "one"}\n{"Prompt": "two"}\n')
    assert [p.text for p in load_prompts(good)] == ["one", "two"]


def test_bundled_prompts_split_and_categories():
    everything = load_prompts(None)
    train, test = load_prompts(None, split="train"), load_prompts(None, split="test")
    assert len(everything) >= 500 and len({p.text for p in everything}) == len(everything)
    assert len(train) + len(test) == len(everything)
    assert not {p.id for p in train} & {p.id for p in test}
    assert len({p.category for p in everything}) >= 6
    assert load_prompts(None, split="train") == train  # fixed seed


def test_recorded_replay_env_serves_the_recorders_figures_and_router_observations(tiny, tmp_path):
    from casrap.decide.latency_model import LatencyFit, UnloadedLatencyModel
    from casrap.decide.router import Router
    from casrap.envs.record import RecordConfig, record_replay

    env = tiny_env(tiny, reward="slo")
    env.router.unloaded = UnloadedLatencyModel(LatencyFit(0.01, 0.0, 0.001, 0.0))
    prompts = env.prompts[:3] + load_prompts(None, split="test")[:2]
    config = RecordConfig(loads=("0",), max_new_tokens=4, timing_tokens=4, settle_s=0.0)
    path = record_replay(env.router, prompts, env.action_names, config, tmp_path / "work", tmp_path / "r.jsonl", "tiny")
    records = [json.loads(line) for line in path.read_text().splitlines()[1:]]
    assert len(records) == 5 * env.action_space.n
    table = load_replay(path)
    assert table.header["observation"]["version"] == 3 and table.latency.shape == (5, env.action_space.n)
    replay = PruningReplayEnv(path, split="train", reward=RewardConfig(kind="slo"))
    assert replay.n_contexts == 3
    check_env(replay, skip_render_check=True)
    obs, _ = replay.reset(options={"context": 0, "budget_ratio": 0.9})
    first = next(r for r in records if f"{r['prompt_id']}@{r['load']}" == replay.table.context_ids[0])
    expected = Router.observe(first["telemetry"], first["input_tokens"], first["prompt_ppl"], 0.9, first["slowdown"],
                              first["thread_share"])
    np.testing.assert_array_equal(obs, expected)  # built by the Router from the recorded context, target included
    _, reward, terminated, _, info = replay.step(2)
    record = next(r for r in records if r["prompt_key"] == first["prompt_key"] and r["profile"] == env.action_names[2])
    assert info["latency_s"] == pytest.approx(record["latency_s"])
    assert info["ppl"] == pytest.approx(record["ppl"])
    assert terminated


def test_replay_recorded_for_another_observation_spec_is_refused(tmp_path):
    path = tmp_path / "old.jsonl"
    header = {"format": "casrap-replay/2", "profiles": ["none"], "observation": {"version": 2, "features": ["x"]}}
    path.write_text(json.dumps(header) + "\n")
    with pytest.raises(InputError, match="observation spec v2, this casrap builds v3"):
        load_replay(path)


def test_bundled_replay_file_loads():
    table = load_replay("bundled")
    assert table.latency.shape[1] == len(table.profiles) >= 5
    assert {"train", "test"} <= set(table.splits.tolist())
    # the shipped recording: train and test prompts apart, four load levels, every latency measured
    prompts = {split: {k for k, s in zip(table.prompt_keys, table.splits) if s == split} for split in ("train", "test")}
    assert len(prompts["test"]) >= 10 and len(prompts["train"]) >= 10 and not prompts["train"] & prompts["test"]
    assert set(table.loads.tolist()) == {"0", "1", "2", "bursty"}
    assert table.predicted_full is not None and table.measured is not None and table.measured.all()
    assert table.header["thread_policy"].startswith("free-cores") and table.base_obs.shape[1] == len(OBSERVATION_FEATURES)
    assert {"machine", "versions", "how_measured", "unloaded_fit", "profile_speed", "durations_s"} <= set(table.header)


def test_malformed_replay_files(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"format": "casrap-replay/2", "profiles": ["none"]}) + "\n{oops\n")
    with pytest.raises(InputError, match="bad.jsonl:2"):
        load_replay(path)
    path.write_text('{"format": "other"}\n')
    with pytest.raises(InputError, match="not a casrap replay"):
        load_replay(path)


def test_background_load_starts_and_stops():
    from casrap.telemetry import BackgroundLoad, LoadSchedule

    schedule = LoadSchedule(levels=[0.0, 1.0], episodes_per_level=2)
    assert [schedule.intensity(e) for e in range(5)] == [0.0, 0.0, 1.0, 1.0, 0.0]
    with BackgroundLoad(workers=1, schedule=schedule) as load:
        assert load.on_episode(2) == 1.0 and load.intensity == 1.0
        assert all(p.is_alive() for p in load._procs)
        procs = list(load._procs)
    assert not any(p.is_alive() for p in procs)
