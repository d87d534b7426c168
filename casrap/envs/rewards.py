"""Reward functions, selectable by name.

- ``casrap``: the original CASRAP v2.2 shaping. speedup = (t_base - t)/t_base,
  degradation = (ppl - ppl_base)/ppl_base. A slowdown gives -10 - 20|speedup|; a
  slowdown over 10% gives -20 and ends the episode; otherwise
  0.7 speedup - 0.3 max(0, degradation), +2 at >= 20% speedup, +1 at >= 15%.
- ``linear``: alpha * speedup - beta * degradation.
- ``slo``: -max(0, log(ppl / ppl_base)) - lambda * max(0, log(latency / target)),
  with a latency budget drawn per episode and shown in the observation, so the best
  action depends on the prompt, the budget and the machine's state. Quality loss is
  the increase in cross-entropy (nats per token) of the full model's answer, not the
  relative perplexity change: perplexity ratios are heavy-tailed (a profile that
  breaks the model scores x700), and one such outlier would dominate the squared-ish
  Q-regression and hide every difference between the usable profiles. On the bundled
  replay data this choice decides whether a budget-aware policy can beat the best
  static action at all (see the documentation's Results, "Reinforcement learning").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from casrap.errors import InputError

REWARDS = ("casrap", "linear", "slo")


@dataclass
class RewardConfig:
    """Weights of the three reward functions."""

    kind: str = "casrap"
    alpha: float = 1.0  # linear: weight of speedup
    beta: float = 1.0  # linear: weight of degradation
    slo_lambda: float = 10.0  # slo: weight of the relative budget overrun (10 puts it on the scale of quality loss)
    budget_range: tuple[float, float] = (0.5, 3.0)  # slo: latency target as a multiple of the predicted unloaded full-model latency


@dataclass(frozen=True)
class RewardInput:
    latency_s: float
    baseline_latency_s: float
    ppl: float
    baseline_ppl: float
    budget_s: float = float("inf")

    @property
    def speedup(self) -> float:
        return (self.baseline_latency_s - self.latency_s) / self.baseline_latency_s

    @property
    def degradation(self) -> float:
        return (self.ppl - self.baseline_ppl) / self.baseline_ppl

    @property
    def cross_entropy_increase(self) -> float:
        """log(ppl / ppl_base): extra nats per token of the reference answer."""
        return math.log(self.ppl / self.baseline_ppl)


def casrap_reward(x: RewardInput) -> tuple[float, bool]:
    s, d = x.speedup, x.degradation
    if s < -0.10:
        return -20.0, True
    if s < 0:
        return -10.0 - 20.0 * abs(s), False
    reward = 0.7 * s - 0.3 * max(0.0, d)
    if s >= 0.20:
        reward += 2.0
    elif s >= 0.15:
        reward += 1.0
    return reward, False


def linear_reward(x: RewardInput, alpha: float = 1.0, beta: float = 1.0) -> tuple[float, bool]:
    return alpha * x.speedup - beta * x.degradation, False


def slo_reward(x: RewardInput, lam: float = 2.0) -> tuple[float, bool]:
    """Quality loss in nats per token plus ``lam`` times the *log* overrun of the target.

    ``log(latency / target)`` equals the relative overrun for small misses, and keeps
    large ones on a usable scale: on a 2-core machine with two busy background
    processes a decode step can take 50x longer, and a relative overrun of 40 made one
    loaded request outweigh hundreds of ordinary ones in the Q-regression.
    """
    overrun = math.log(x.latency_s / x.budget_s) if x.latency_s > x.budget_s else 0.0
    return -max(0.0, x.cross_entropy_increase) - lam * overrun, False


def compute_reward(x: RewardInput, config: RewardConfig) -> tuple[float, bool]:
    """(reward, terminate_early) for the configured reward kind."""
    if config.kind == "casrap":
        return casrap_reward(x)
    if config.kind == "linear":
        return linear_reward(x, config.alpha, config.beta)
    if config.kind == "slo":
        return slo_reward(x, config.slo_lambda)
    raise ValueError(f"unknown reward {config.kind!r}; choose one of {', '.join(REWARDS)}")


def reward_config(reward: str | RewardConfig | None, slo_lambda: float | None = None) -> RewardConfig:
    """A :class:`RewardConfig` from a kind name (``"slo"``) or a config, with an optional slo weight."""
    if reward is None:
        cfg = RewardConfig()
    elif isinstance(reward, RewardConfig):
        cfg = reward
    elif reward in REWARDS:
        cfg = RewardConfig(kind=reward)
    else:
        raise InputError(f"unknown reward {reward!r}; choose one of {', '.join(REWARDS)}")
    return replace(cfg, slo_lambda=slo_lambda) if slo_lambda is not None else cfg
