"""Runtime test helpers: a bundle for the tiny model, and policies whose choice is known."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from casrap.decide.observation import OBSERVATION_FEATURES
from gymnasium import spaces

TINY_PROFILES = ("none", "layers-25", "ffn-25")


class SpacesEnv(gym.Env):
    """Only the spaces of the pruning envs (an SB3 policy is built from them, untrained)."""

    def __init__(self, actions: int) -> None:
        self.action_space = spaces.Discrete(actions)
        self.observation_space = spaces.Box(0.0, 1.0, shape=(len(OBSERVATION_FEATURES),), dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: Any = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        return np.zeros(len(OBSERVATION_FEATURES), dtype=np.float32), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        return np.zeros(len(OBSERVATION_FEATURES), dtype=np.float32), 0.0, True, False, {}


class BudgetPolicy:
    """Full model when the budget feature is ample, the last (fastest) action when it is tight."""

    def __init__(self, actions: int, threshold: float = 0.25) -> None:  # target feature = ratio / 4: ratio >= 1
        self.actions, self.threshold = actions, threshold
        self.seen: list[np.ndarray] = []

    def predict(self, obs: Any, deterministic: bool = True) -> tuple[int, None]:
        self.seen.append(np.asarray(obs))
        target = float(obs[OBSERVATION_FEATURES.index("latency_target")])
        return (0 if target >= self.threshold else self.actions - 1), None


def tiny_bank(lm: Any, profiles: tuple[str, ...] = TINY_PROFILES) -> Any:
    from casrap.profiles.factory import build_bank

    return build_bank(lm.model, list(profiles), base_model="tiny-random-llama", tokenizer=lm.tokenizer)


def make_tiny_bundle(lm: Any, out: Path, profiles: tuple[str, ...] = TINY_PROFILES) -> tuple[Path, Any]:
    """A bundle of an untrained SB3 Double-DQN policy over ``profiles`` on ``lm``; returns (dir, bank)."""
    from casrap.agents.double_dqn import DoubleDQN
    from casrap.runtime.bundle import write_bundle

    bank = tiny_bank(lm, profiles)
    policy = DoubleDQN("MlpPolicy", SpacesEnv(len(bank.names)), seed=0, device="cpu", learning_starts=0, buffer_size=10)
    zip_path = out.parent / f"{out.name}-policy.zip"
    policy.save(str(zip_path))
    write_bundle(out, zip_path, bank, model_spec="tiny-random-llama", reward={"kind": "slo"}, training={"note": "untrained, for tests"})
    return out, bank


class ConcurrencyProbe:
    """Wraps ``router.run`` to record the most runs ever in flight at once (1 = serialised)."""

    def __init__(self, router: Any) -> None:
        import threading

        self.router, self.original = router, router.run
        self.active = self.peak = 0
        self._guard = threading.Lock()
        router.run = self._run

    def _run(self, *args: Any, **kwargs: Any) -> Any:
        with self._guard:
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            return self.original(*args, **kwargs)
        finally:
            with self._guard:
                self.active -= 1

    def restore(self) -> None:
        self.router.run = self.original
