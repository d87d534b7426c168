from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from casrap.agents import AgentConfig, DoubleDQN, double_dqn_targets
from casrap.agents.baselines import StaticPolicy
from casrap.agents.evaluate import compare_policies
from casrap.agents.training import TrainConfig, load_policy, train
from casrap.envs.replay import PruningReplayEnv, load_replay
from casrap.envs.rewards import RewardConfig
from casrap.errors import CheckpointError


def test_double_dqn_targets_differ_from_vanilla_where_networks_disagree():
    rewards = torch.tensor([[1.0], [0.0]])
    dones = torch.tensor([[0.0], [0.0]])
    online = torch.tensor([[5.0, 1.0], [0.0, 2.0]])  # online prefers a0 in row 0, a1 in row 1
    target = torch.tensor([[0.5, 3.0], [1.0, 4.0]])  # target's own max is a1 in both rows
    double = double_dqn_targets(rewards, dones, 0.9, online, target)
    vanilla = rewards + (1 - dones) * 0.9 * target.max(dim=1, keepdim=True).values
    assert torch.allclose(double, torch.tensor([[1.0 + 0.9 * 0.5], [0.0 + 0.9 * 4.0]]))
    assert double[0] < vanilla[0]  # disagreement: Double DQN does not take the target's max
    assert double[1] == vanilla[1]  # agreement: same target
    done = double_dqn_targets(rewards, torch.ones(2, 1), 0.9, online, target)
    assert torch.equal(done, rewards)


def test_agent_defaults_scale_to_short_runs():
    kw = AgentConfig().sb3_kwargs(200)
    assert kw["target_update_interval"] == 10 and kw["learning_starts"] == 25 and kw["gamma"] == 0.0
    assert kw["buffer_size"] >= 200
    assert AgentConfig().sb3_kwargs(200, prompts_per_episode=4)["gamma"] > 0


def test_training_records_every_episode_and_resumes(tmp_path):
    env = PruningReplayEnv("bundled", reward=RewardConfig(kind="slo"))
    ck = tmp_path / "p.zip"
    cfg = TrainConfig(episodes=30, checkpoint=ck, reports_root=tmp_path / "reports", save_every=10)
    result = train(env, cfg)
    assert result.episodes_done == 30 and ck.is_file()
    lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["episode"] for l in lines] == list(range(1, 31))
    cfg.episodes, cfg.resume = 45, True
    again = train(env, cfg)
    assert again.run_dir == result.run_dir and again.episodes_done == 45
    episodes = [json.loads(l)["episode"] for l in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert episodes == list(range(1, 46))


def test_interrupted_training_keeps_checkpoint_and_metrics(tmp_path):
    env = PruningReplayEnv("bundled", reward=RewardConfig(kind="slo"))
    ck = tmp_path / "p.zip"

    def stop_at_12(record):
        if record["episode"] == 12:
            raise KeyboardInterrupt

    result = train(env, TrainConfig(episodes=50, checkpoint=ck, reports_root=tmp_path), on_episode=stop_at_12)
    assert result.interrupted and result.episodes_done == 12 and ck.is_file()
    state = json.loads(ck.with_suffix(".state.json").read_text())
    assert state["episodes_done"] == 12


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_policy(tmp_path / "missing.zip")
    (tmp_path / "corrupt.zip").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_policy(tmp_path / "corrupt.zip")
    env = PruningReplayEnv("bundled")
    model = DoubleDQN("MlpPolicy", env, seed=0)
    model.save(tmp_path / "ok.zip")
    assert load_policy(tmp_path / "ok.zip", env).action_space.n == env.action_space.n
    from gymnasium import spaces

    env.action_space = spaces.Discrete(env.action_space.n + 1)
    with pytest.raises(CheckpointError, match="actions"):
        load_policy(tmp_path / "ok.zip", env)


def test_comparison_includes_statics_random_and_oracle():
    env = PruningReplayEnv("bundled", split="test", reward=RewardConfig(kind="slo"))
    comparison = compare_policies(env, None, budgets_per_context=2, seed=1)
    names = [s.name for s in comparison.scores]
    assert names[-1] == "oracle (hindsight)" and "random" in names
    assert sum(n.startswith("static:") for n in names) == env.action_space.n
    oracle = comparison.scores[-1].mean_reward
    assert all(s.mean_reward <= oracle + 1e-12 for s in comparison.scores)
    assert comparison.n == 2 * env.n_contexts


def test_paired_gain_over_best_static_is_zero_for_that_static_action():
    env = PruningReplayEnv("bundled", split="test", reward=RewardConfig(kind="slo"))
    probe = compare_policies(env, None, budgets_per_context=2, seed=1)
    best_index = env.action_names.index(probe.best_static.removeprefix("static:"))
    comparison = compare_policies(env, StaticPolicy(best_index), budgets_per_context=2, seed=1)
    assert comparison.gain_over_best_static == pytest.approx(0.0)
    assert comparison.captured_share == pytest.approx(0.0)
    other = next(i for i, name in enumerate(env.action_names) if f"static:{name}" != probe.best_static)
    worse = compare_policies(env, StaticPolicy(other), budgets_per_context=2, seed=1)
    assert worse.gain_over_best_static < 0
    assert "rewards" not in worse.to_dict()["scores"][0]


def test_linucb_learns_a_context_dependent_choice():
    """Two actions, reward depends on the first feature: LinUCB must pick differently per context."""
    import gymnasium as gym

    from casrap.agents.bandit import LinUCBPolicy, train_linucb

    class TwoArms(gym.Env):
        observation_space = gym.spaces.Box(0.0, 1.0, (2,), dtype=np.float32)
        action_space = gym.spaces.Discrete(2)

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            self.obs = self.np_random.uniform(0, 1, 2).astype(np.float32)
            return self.obs, {}

        def step(self, action):
            good = int(self.obs[0] > 0.5)
            return self.obs, float(action == good) + self.np_random.normal(0, 0.1), True, False, {}

    policy = train_linucb(TwoArms(), steps=400, seed=0)
    assert policy.predict(np.array([0.9, 0.5]))[0] == 1 and policy.predict(np.array([0.1, 0.5]))[0] == 0
    fresh = LinUCBPolicy(2, 2)
    mean, width = fresh.estimates(np.zeros(2))
    assert np.allclose(mean, 0) and (width > 0).all()


def test_gain_ci_resamples_prompts_not_decisions():
    from casrap.agents.evaluate import bootstrap_ci

    rng = np.random.default_rng(0)
    prompt_effect = rng.normal(0, 1, 10)
    values = np.repeat(prompt_effect, 50) + rng.normal(0, 0.01, 500)  # 10 prompts x 50 near-identical decisions
    groups = np.repeat(np.arange(10), 50)
    lo, hi = bootstrap_ci(values, groups)
    naive = 1.96 * values.std(ddof=1) / np.sqrt(len(values))
    assert lo < values.mean() < hi
    assert (hi - lo) / 2 > 3 * naive  # ten prompts are not five hundred independent decisions


def test_test_command_reports_prompt_bootstrap_and_linucb(tmp_path):
    from test_cli import run

    run(["train", "--replay", "bundled", "--reward", "slo", "--episodes", "60", "--checkpoint", "ck/p.zip", "--quiet"], tmp_path)
    out = json.loads(run(["test", "--replay", "bundled", "--checkpoint", "ck/p.zip", "--bandit-steps", "200", "--json"], tmp_path).stdout)
    lo, hi = out["gain_ci95"]
    assert lo <= out["gain_over_best_static"] <= hi and out["n_prompts"] >= 5
    assert "linucb" in {s["name"] for s in out["scores"]}
    assert set(out["by_load"]) and all(len(row["gain_ci95"]) == 2 for row in out["by_load"].values())
