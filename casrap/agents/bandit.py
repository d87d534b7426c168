"""LinUCB: the classic contextual-bandit baseline the Double-DQN policy is compared with.

One decision per prompt is a contextual bandit, not a sequential problem: with one-step
episodes (γ = 0) Double DQN regresses ``Q(s, a) = E[r | s, a]`` with a small MLP. LinUCB
(Li et al., 2010) fits the same quantity with one ridge regression per action on the
observation (plus a bias), explores by an upper confidence bound while learning, and
acts greedily on the fitted means at evaluation — the fair, simple yardstick.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class LinUCBPolicy:
    """Per-action ridge regression of reward on ``[1, observation]``.

    Attributes:
        n_actions: number of actions.
        dim: observation length.
        alpha: width of the confidence bonus while learning (0 = greedy).
        ridge: prior precision (regularisation) of every action's regression.
    """

    n_actions: int
    dim: int
    alpha: float = 1.0
    ridge: float = 1.0
    _a: np.ndarray = field(init=False, repr=False)
    _b: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        d = self.dim + 1
        self._a = np.stack([np.eye(d) * self.ridge for _ in range(self.n_actions)])
        self._b = np.zeros((self.n_actions, d))

    @staticmethod
    def _features(observation: Any) -> np.ndarray:
        return np.concatenate([[1.0], np.asarray(observation, dtype=np.float64).ravel()])

    def estimates(self, observation: Any) -> tuple[np.ndarray, np.ndarray]:
        """Predicted mean reward and its confidence width, per action."""
        x = self._features(observation)
        inverse = np.linalg.inv(self._a)
        theta = np.einsum("aij,aj->ai", inverse, self._b)
        width = np.sqrt(np.einsum("i,aij,j->a", x, inverse, x))
        return theta @ x, width

    def choose(self, observation: Any, explore: bool) -> int:
        mean, width = self.estimates(observation)
        return int(np.argmax(mean + (self.alpha * width if explore else 0.0)))

    def update(self, observation: Any, action: int, reward: float) -> None:
        x = self._features(observation)
        self._a[action] += np.outer(x, x)
        self._b[action] += reward * x

    def predict(self, observation: Any, deterministic: bool = True) -> tuple[int, None]:
        """SB3-style: greedy on the fitted means when deterministic, UCB otherwise."""
        return self.choose(observation, explore=not deterministic), None


def train_linucb(env: Any, steps: int, seed: int = 0, alpha: float = 1.0, ridge: float = 1.0) -> LinUCBPolicy:
    """Learn online on ``env`` (one-step episodes) for ``steps`` decisions."""
    policy = LinUCBPolicy(int(env.action_space.n), int(np.prod(env.observation_space.shape)), alpha, ridge)
    obs, _ = env.reset(seed=seed)
    for _ in range(steps):
        action = policy.choose(obs, explore=True)
        _, reward, _, _, _ = env.step(action)
        policy.update(obs, action, float(reward))
        obs, _ = env.reset()
    return policy
