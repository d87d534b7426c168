"""Compare a policy with every static action, a random policy and the hindsight oracle.

All policies face the same contexts (prompt x load) and the same latency budgets
(drawn with a fixed seed), scored from the same measurements, so differences come
from the decisions alone. The oracle picks, per context and budget, the action with
the best measured reward: an upper bound no deployable policy reaches.

Confidence intervals of the paired gain are bootstrapped over *prompts*, not decisions:
the decisions of one prompt (its load levels and budgets) are not independent, so
resampling them one by one would make a handful of prompts look like hundreds.
``gain_ci95`` is a ``[lo, hi]`` pair (2.5th and 97.5th percentiles of 2,000 resamples),
overall and per load level; the per-decision normal half-width is kept as
``reward_ci95`` for each policy's mean reward only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from casrap.agents.baselines import RandomPolicy, StaticPolicy
from casrap.agents.ope import LoggedDecisions, epsilon_greedy_propensity, evaluate_offline
from casrap.envs.replay import PruningReplayEnv
from casrap.measure.quality import group_bootstrap_ci as bootstrap_ci  # the grouped bootstrap, one implementation


class Policy(Protocol):
    def predict(self, observation: Any, deterministic: bool = True) -> tuple[Any, Any]: ...


@dataclass
class PolicyScore:
    name: str
    mean_reward: float
    reward_ci95: float
    mean_speedup: float
    mean_degradation: float
    mean_kl: float
    budget_met: float | None
    actions: dict[str, int] = field(default_factory=dict)
    rewards: list[float] = field(default_factory=list, repr=False)  # per decision, same order for every policy


@dataclass
class Comparison:
    n: int
    reward: str
    scores: list[PolicyScore]
    best_static: str
    captured_share: float | None  # (policy - best static) / (oracle - best static)
    gain_over_best_static: float | None = None  # paired mean of policy - best static, per decision
    gain_ci95: list[float] | None = None  # [lo, hi], bootstrap over prompts
    n_prompts: int = 0
    by_load: dict[str, dict[str, Any]] = field(default_factory=dict)  # the same figures within each load level

    def to_dict(self) -> dict[str, Any]:
        scores = [{k: v for k, v in asdict(s).items() if k != "rewards"} for s in self.scores]
        return {"n": self.n, "n_prompts": self.n_prompts, "reward": self.reward, "best_static": self.best_static,
                "captured_share": self.captured_share, "gain_over_best_static": self.gain_over_best_static,
                "gain_ci95": self.gain_ci95, "gain_ci95_kind": "[lo, hi], bootstrap over prompts", "by_load": self.by_load,
                "scores": scores}

    def markdown(self) -> str:
        lines = [f"Comparison on {self.n} held-out decisions, reward `{self.reward}` (mean ± 95% CI):", "",
                 "| policy | mean reward | speedup | ppl increase | KL | budget met | most used |", "|---|---:|---:|---:|---:|---:|---|"]
        for s in self.scores:
            top = ", ".join(f"{k}:{v}" for k, v in sorted(s.actions.items(), key=lambda kv: -kv[1])[:3])
            met = f"{100 * s.budget_met:.0f}%" if s.budget_met is not None else "-"
            lines.append(f"| {s.name} | {s.mean_reward:.4f} ± {s.reward_ci95:.4f} | {100 * s.mean_speedup:.1f}% | "
                         f"{100 * s.mean_degradation:.1f}% | {s.mean_kl:.3f} | {met} | {top} |")
        if self.gain_over_best_static is not None and self.gain_ci95 is not None:
            lo, hi = self.gain_ci95
            lines += ["", f"Best static action: `{self.best_static}`. Policy minus it, paired over the same decisions: "
                          f"{self.gain_over_best_static:+.4f}, 95% CI [{lo:+.4f}, {hi:+.4f}] (bootstrap over {self.n_prompts} prompts)."]
        if self.captured_share is not None:
            lines += [f"The policy captures {100 * self.captured_share:.0f}% of the oracle's gain over the best static action."]
        for load, row in self.by_load.items():
            lo, hi = row["gain_ci95"]
            share = f", captures {100 * row['captured_share']:.0f}% of the oracle's gain" if row["captured_share"] is not None else ""
            lines.append(f"- load {load}: best static `{row['best_static']}`, gain {row['gain_over_best_static']:+.4f} "
                         f"[{lo:+.4f}, {hi:+.4f}] over {row['n_prompts']} prompts{share}")
        return "\n".join(lines)


def _ci95(values: np.ndarray) -> float:
    """Half-width of the normal 95% interval of the mean (nan for fewer than two values)."""
    return float(1.96 * values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")


def _paired(policy: PolicyScore, statics: list[PolicyScore], oracle: PolicyScore, keep: np.ndarray,
            prompts: np.ndarray, seed: int) -> dict[str, Any]:
    """Gain of the policy over the best static action among the decisions in ``keep``."""
    mean = {s.name: float(np.asarray(s.rewards)[keep].mean()) for s in [policy, oracle, *statics]}
    best = max(statics, key=lambda s: mean[s.name])
    diff = np.asarray(policy.rewards)[keep] - np.asarray(best.rewards)[keep]
    gap = mean[oracle.name] - mean[best.name]
    return {"n": int(keep.sum()), "n_prompts": int(len(np.unique(prompts[keep]))), "best_static": best.name,
            "gain_over_best_static": float(diff.mean()), "gain_ci95": bootstrap_ci(diff, prompts[keep], seed=seed),
            "captured_share": (mean[policy.name] - mean[best.name]) / gap if gap > 0 else None}


def _score(name: str, env: PruningReplayEnv, decisions: list[tuple[int, float]], choose: Any) -> PolicyScore:
    rewards, speedups, degradations, kls, met = [], [], [], [], []
    counts: dict[str, int] = {}
    for context, budget in decisions:
        obs, _ = env.reset(options={"context": context, "budget_ratio": budget})
        action = int(choose(obs, env))
        reward, _, x = env.outcome(action)
        rewards.append(reward)
        speedups.append(x.speedup)
        degradations.append(max(0.0, x.degradation))
        kls.append(float(env.table.kl[context, action]))
        if np.isfinite(x.budget_s):
            met.append(x.latency_s <= x.budget_s)
        label = env.action_names[action]
        counts[label] = counts.get(label, 0) + 1
    r = np.array(rewards)
    return PolicyScore(name, float(r.mean()), _ci95(r), float(np.mean(speedups)), float(np.mean(degradations)),
                       float(np.mean(kls)), float(np.mean(met)) if met else None, counts, [float(v) for v in r])


def draw_decisions(env: PruningReplayEnv, budgets_per_context: int = 5, seed: int = 0) -> list[tuple[int, float]]:
    """Every (context, budget ratio) pair a comparison scores: fixed by ``seed``, shared by all policies."""
    rng = np.random.default_rng(seed)
    lo, hi = env.reward_config.budget_range
    draws = budgets_per_context if env.reward_config.kind == "slo" else 1
    return [(c, float(rng.uniform(lo, hi))) for c in range(env.n_contexts) for _ in range(draws)]


def compare_policies(
    env: PruningReplayEnv,
    policy: Policy | None,
    budgets_per_context: int = 5,
    seed: int = 0,
    policy_name: str = "policy",
    baselines: dict[str, Policy] | None = None,
) -> Comparison:
    """Score ``policy``, any learned ``baselines`` (e.g. LinUCB), every static action, random and the oracle."""
    decisions = draw_decisions(env, budgets_per_context, seed)
    env.reset(seed=seed)
    scores = []
    if policy is not None:
        scores.append(_score(policy_name, env, decisions, lambda obs, e: policy.predict(obs, deterministic=True)[0]))
    for name, other in (baselines or {}).items():
        scores.append(_score(name, env, decisions, lambda obs, e, p=other: p.predict(obs, deterministic=True)[0]))
    statics = []
    for a, name in enumerate(env.action_names):
        static = StaticPolicy(a)
        statics.append(_score(f"static:{name}", env, decisions, lambda obs, e, p=static: p.predict(obs)[0]))
    scores += statics
    rand = RandomPolicy(len(env.action_names), seed)
    scores.append(_score("random", env, decisions, lambda obs, e: rand.predict(obs)[0]))

    def oracle(obs: Any, e: PruningReplayEnv) -> int:
        return int(np.argmax([e.outcome(a)[0] for a in range(len(e.action_names))]))

    oracle_score = _score("oracle (hindsight)", env, decisions, oracle)
    scores.append(oracle_score)
    best = max(statics, key=lambda s: s.mean_reward)
    ids = [env.table.context_ids[c] for c, _ in decisions]
    prompts = np.array([i.rsplit("@", 1)[0] for i in ids])
    loads = np.array([i.rsplit("@", 1)[-1] for i in ids])
    comparison = Comparison(len(decisions), env.reward_config.kind, scores, best.name, None, n_prompts=len(np.unique(prompts)))
    if policy is not None:
        overall = _paired(scores[0], statics, oracle_score, np.ones(len(decisions), dtype=bool), prompts, seed)
        comparison.gain_over_best_static = overall["gain_over_best_static"]
        comparison.gain_ci95 = overall["gain_ci95"]
        comparison.captured_share = overall["captured_share"]
        if len(np.unique(loads)) > 1:
            comparison.by_load = {load: _paired(scores[0], statics, oracle_score, loads == load, prompts, seed)
                                  for load in sorted(np.unique(loads), key=lambda v: (not str(v).isdigit(), str(v)))}
    return comparison


def off_policy_check(env: PruningReplayEnv, policy: Policy, comparison: Comparison, budgets_per_context: int = 5,
                     seed: int = 0, epsilon: float = 0.2, policy_name: str = "policy") -> dict[str, Any]:
    """Score ``policy`` from a behaviour log with SNIPS and DR, beside its replay value.

    Replay has no live log, so one is simulated over the decisions the comparison
    scored (same contexts, same budgets): an epsilon-greedy behaviour policy whose
    greedy action is the best static action (what a cautious deployment serves while it
    explores) acts with a fixed seed, and each decision keeps its observation, action,
    recorded reward and propensity. The estimators see that log only; the replay value
    (the policy's mean reward read from the recording on the same decisions) is the
    truth they should land near, so ``error`` and ``covers_replay_value`` say how far
    to trust them on live logs.
    """
    decisions = draw_decisions(env, budgets_per_context, seed)
    n_actions = len(env.action_names)
    greedy = env.action_names.index(comparison.best_static.removeprefix("static:"))
    rng = np.random.default_rng([seed, 1])
    observations, taken, rewards, targets, groups = [], [], [], [], []
    for context, budget in decisions:
        obs, _ = env.reset(options={"context": context, "budget_ratio": budget})
        action = int(rng.integers(n_actions)) if rng.random() < epsilon else greedy
        observations.append(np.asarray(obs, dtype=float))
        taken.append(action)
        rewards.append(env.outcome(action)[0])
        targets.append(int(policy.predict(obs, deterministic=True)[0]))
        groups.append(env.table.context_ids[context].rsplit("@", 1)[0])
    propensities = epsilon_greedy_propensity(np.array(taken), np.full(len(taken), greedy), epsilon, n_actions)
    logs = LoggedDecisions(np.array(observations), taken, rewards, propensities, groups, n_actions)
    estimates = evaluate_offline(logs, np.array(targets), seed=seed)
    truth = next(s.mean_reward for s in comparison.scores if s.name == policy_name)
    for estimate in estimates.values():
        lo, hi = estimate["ci95"]
        estimate["error"] = estimate["value"] - truth
        estimate["covers_replay_value"] = bool(lo <= truth <= hi)
    return {"behaviour": {"kind": "epsilon-greedy", "greedy": env.action_names[greedy], "epsilon": epsilon, "seed": seed},
            "n": len(logs), "n_prompts": int(len(np.unique(logs.groups))), "replay_value": truth,
            "target_agrees_with_logged_action": float(np.mean(np.array(taken) == np.array(targets))), **estimates}


def score_from_logs(records: list[dict[str, Any]], policy: Policy, n_actions: int, seed: int = 0) -> dict[str, Any]:
    """SNIPS and DR estimates of ``policy``'s mean reward from live training records (``metrics.jsonl``)."""
    logs = LoggedDecisions.from_records(records, n_actions)
    targets = np.array([int(policy.predict(obs.astype(np.float32), deterministic=True)[0]) for obs in logs.observations])
    return {"n": len(logs), "n_prompts": int(len(np.unique(logs.groups))), **evaluate_offline(logs, targets, seed=seed)}
