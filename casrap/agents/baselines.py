"""Policies the learned one must beat: each static action, random, hindsight oracle."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class StaticPolicy:
    action: int

    def predict(self, observation: Any, deterministic: bool = True) -> tuple[int, None]:
        return self.action, None


class RandomPolicy:
    def __init__(self, n_actions: int, seed: int = 0) -> None:
        self.n = n_actions
        self.rng = np.random.default_rng(seed)

    def predict(self, observation: Any, deterministic: bool = True) -> tuple[int, None]:
        return int(self.rng.integers(self.n)), None
