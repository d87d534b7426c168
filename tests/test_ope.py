"""Off-policy evaluation: SNIPS and DR on synthetic bandits with known values, logged propensities, the replay check."""

from __future__ import annotations

import json

import numpy as np
import pytest

from casrap.agents.ope import (
    LoggedDecisions, doubly_robust, epsilon_greedy_probabilities, epsilon_greedy_propensity,
    group_bootstrap, snips, softmax_probabilities, softmax_propensity,
)
from casrap.errors import InputError

# Two contexts, three actions; mean rewards per (context, action). The behaviour policy is
# epsilon-greedy around action 0 everywhere; the target takes 0 in context 0 (the
# behaviour's favourite) and 2 in context 1 (rarely logged), so its value differs from
# what the log shows on average.
MEANS = np.array([[0.9, 0.5, 0.3], [0.9, 0.6, 0.1]])
TARGET = np.array([0, 2])
EPS, K = 0.5, 3
TRUE_VALUE = 0.5 * MEANS[0, 0] + 0.5 * MEANS[1, 2]  # 0.5


def _bandit_log(n: int, seed: int = 0) -> tuple[LoggedDecisions, np.ndarray, float]:
    """A logged epsilon-greedy dataset, the target's actions, and a tolerance derived from n.

    Tolerance: both estimators' per-decision terms differ from the value by at most
    ``1 + w`` (rewards and reward models in [0, 1]), so their standard error is at most
    ``sqrt(E[(1 + w)^2] / n)`` with ``E[w] = 1`` and ``E[w^2] = E_x[1 / mu(pi(x) | x)]``;
    four of those is the tolerance.
    """
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 2, n)
    greedy = np.zeros(n, dtype=int)
    explore = rng.random(n) < EPS
    actions = np.where(explore, rng.integers(0, K, n), greedy)
    rewards = (rng.random(n) < MEANS[x, actions]).astype(float)
    propensities = epsilon_greedy_propensity(actions, greedy, EPS, K)
    logs = LoggedDecisions(x[:, None].astype(float), actions, rewards, propensities, np.arange(n) // 5, K)
    target_propensity = epsilon_greedy_probabilities(np.zeros(2, dtype=int), EPS, K)[[0, 1], TARGET]
    second_moment = float(np.mean(1.0 / target_propensity))
    return logs, TARGET[x], 4 * np.sqrt((1 + 2 + second_moment) / n)


def _with_propensities(logs: LoggedDecisions, propensities: np.ndarray) -> LoggedDecisions:
    return LoggedDecisions(logs.observations, logs.actions, logs.rewards, propensities, logs.groups, logs.n_actions)


@pytest.mark.parametrize("n", [4000, 20000])
def test_both_estimators_recover_a_known_value_within_a_tolerance_from_n(n):
    logs, target, tol = _bandit_log(n)
    naive = float(logs.rewards.mean())
    assert abs(naive - TRUE_VALUE) > tol  # the log's own mean is not the answer
    for estimate in (snips(logs, target), doubly_robust(logs, target)):
        assert abs(estimate.value - TRUE_VALUE) < tol, estimate
        lo, hi = estimate.ci95
        assert lo <= TRUE_VALUE <= hi and hi - lo < 2 * tol
        assert 0 < estimate.effective_sample_size < n and estimate.max_weight == pytest.approx(1 / (EPS / K))


def test_wrong_propensities_break_snips_and_dr_with_a_wrong_reward_model():
    logs, target, tol = _bandit_log(20000)
    uniform = _with_propensities(logs, np.full(len(logs), 1 / K))  # exploration logged as if every action were uniform
    constant = np.full((len(logs), K), 0.5)  # a reward model that knows nothing
    assert abs(snips(uniform, target).value - TRUE_VALUE) > 2 * tol
    assert abs(doubly_robust(uniform, target, reward_model=constant).value - TRUE_VALUE) > 2 * tol
    # double robustness: right propensities rescue a wrong model, a right model rescues wrong propensities
    assert abs(doubly_robust(logs, target, reward_model=constant).value - TRUE_VALUE) < tol
    assert abs(doubly_robust(uniform, target).value - TRUE_VALUE) < tol


def test_estimators_refuse_impossible_propensities_and_shapes():
    logs, target, _ = _bandit_log(100)
    for bad in (0.0, 1.5, np.nan):
        with pytest.raises(InputError, match="propensit"):
            _with_propensities(logs, np.full(len(logs), bad))
    with pytest.raises(InputError, match="target probabilities"):
        snips(logs, np.full((len(logs), K), 0.5))
    with pytest.raises(InputError, match="lack a logged propensity"):
        LoggedDecisions.from_records([{"action": 0, "reward": 1.0, "observation": [0.0]}], K)


def test_epsilon_greedy_propensity_matches_sb3_exploration():
    """The formula is what SB3's DQN does: explore with probability eps, uniformly over *all* actions."""
    from runtime_helpers import SpacesEnv

    from casrap.agents.double_dqn import DoubleDQN

    model = DoubleDQN("MlpPolicy", SpacesEnv(4), seed=3, device="cpu", buffer_size=10)
    model.exploration_rate = 0.3
    obs = np.zeros(model.observation_space.shape, dtype=np.float32)
    greedy = int(model.predict(obs, deterministic=True)[0])
    draws = 2000
    counts = np.bincount([int(model.predict(obs, deterministic=False)[0]) for _ in range(draws)], minlength=4) / draws
    expected = epsilon_greedy_probabilities(greedy, 0.3, 4)[0]
    assert expected.sum() == pytest.approx(1.0) and expected[greedy] == pytest.approx(1 - 0.3 + 0.3 / 4)
    assert np.all(np.abs(counts - expected) < 4 * np.sqrt(expected * (1 - expected) / draws))
    assert epsilon_greedy_propensity(greedy, greedy, 0.3, 4) == pytest.approx(0.775)
    assert epsilon_greedy_propensity((greedy + 1) % 4, greedy, 0.3, 4) == pytest.approx(0.075)


def test_softmax_propensities_are_stable_probabilities():
    q = np.array([[1000.0, 999.0, 0.0], [0.0, 0.0, 0.0]])
    probs = softmax_probabilities(q, temperature=1.0)
    assert np.allclose(probs.sum(axis=1), 1.0) and np.all(np.isfinite(probs))
    assert probs[0, 0] == pytest.approx(1 / (1 + np.exp(-1.0)))
    assert softmax_propensity(q[1], 2) == pytest.approx(1 / 3)
    assert softmax_probabilities(q[:1], temperature=0.01)[0, 0] > 0.999  # cold: greedy
    with pytest.raises(InputError):
        softmax_probabilities(q, temperature=0.0)


def test_group_bootstrap_resamples_prompts():
    rng = np.random.default_rng(0)
    effect = rng.normal(0, 1, 8)
    values = np.repeat(effect, 40) + rng.normal(0, 0.01, 320)
    lo, hi = group_bootstrap(values, np.ones(320), np.repeat(np.arange(8), 40))
    assert lo < values.mean() < hi
    assert (hi - lo) / 2 > 3 * 1.96 * values.std(ddof=1) / np.sqrt(320)  # eight prompts, not 320 decisions


def _train(tmp_path, **agent):
    from casrap.agents import AgentConfig
    from casrap.agents.training import TrainConfig, train
    from casrap.envs.replay import PruningReplayEnv
    from casrap.envs.rewards import RewardConfig

    env = PruningReplayEnv("bundled", reward=RewardConfig(kind="slo"))
    config = TrainConfig(episodes=40, checkpoint=tmp_path / "p.zip", reports_root=tmp_path / "reports", save_every=0,
                         agent=AgentConfig(learning_starts=10, **agent))
    result = train(env, config)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return env, result, records


def test_training_logs_the_propensity_of_every_action(tmp_path):
    from casrap.agents.evaluate import score_from_logs
    from casrap.agents.training import load_policy

    env, result, records = _train(tmp_path, exploration_initial_eps=0.0, exploration_final_eps=0.0)
    k = env.action_space.n
    assert len(records) == 40
    for r in records:
        assert len(r["observation"]) == env.observation_space.shape[0]
        if r["timestep"] <= 10:  # SB3's warm-up samples uniformly
            assert r["behaviour_epsilon"] == 1.0 and r["propensity"] == pytest.approx(1 / k)
        else:  # no exploration: the action is the greedy one on the observation it was chosen on
            assert r["action"] == r["greedy_action"] and r["propensity"] == 1.0
    scored = score_from_logs(records, load_policy(result.checkpoint, env), k)  # a policy scored from its own training log
    assert scored["n"] == 40 and np.isfinite(scored["snips"]["value"]) and np.isfinite(scored["dr"]["value"])


def test_off_policy_check_on_replay_lands_near_the_replay_value():
    from casrap.agents.baselines import StaticPolicy
    from casrap.agents.evaluate import compare_policies, off_policy_check
    from casrap.envs.replay import PruningReplayEnv
    from casrap.envs.rewards import RewardConfig

    env = PruningReplayEnv("bundled", split="test", reward=RewardConfig(kind="slo"))
    target = StaticPolicy(1)
    comparison = compare_policies(env, target, budgets_per_context=3, seed=0)
    check = off_policy_check(env, target, comparison, budgets_per_context=3, seed=0, epsilon=0.5)
    assert check["replay_value"] == comparison.scores[0].mean_reward
    assert check["n"] == comparison.n and check["behaviour"]["greedy"] == comparison.best_static.removeprefix("static:")
    for name in ("snips", "dr"):
        lo, hi = check[name]["ci95"]
        assert lo < hi and check[name]["error"] == pytest.approx(check[name]["value"] - check["replay_value"])
        assert check[name]["covers_replay_value"], check[name]


def test_test_command_json_has_an_ope_section(tmp_path):
    from test_cli import run

    run(["train", "--replay", "bundled", "--reward", "slo", "--episodes", "30", "--checkpoint", "ck/p.zip", "--quiet"], tmp_path)
    out = json.loads(run(["test", "--replay", "bundled", "--checkpoint", "ck/p.zip", "--bandit-steps", "0",
                          "--budgets-per-context", "3", "--json"], tmp_path).stdout)
    ope = out["ope"]
    assert ope["replay_value"] == next(s["mean_reward"] for s in out["scores"] if s["name"] == "policy")
    assert ope["behaviour"]["kind"] == "epsilon-greedy" and ope["behaviour"]["epsilon"] == 0.2
    for name in ("snips", "dr"):
        assert set(ope[name]) >= {"value", "ci95", "n", "n_prompts", "effective_sample_size", "error", "covers_replay_value"}
