"""Double DQN on Stable-Baselines3: a ``DQN`` subclass that overrides ``train`` only.

Vanilla DQN's target is ``r + γ max_a Q_target(s', a)``; Double DQN lets the online
network pick the next action and the target network evaluate it,
``r + γ Q_target(s', argmax_a Q_online(s', a))`` (van Hasselt et al., 2016), which
removes the max operator's overestimation bias.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch as th
import torch.nn.functional as F
from stable_baselines3 import DQN


def double_dqn_targets(
    rewards: th.Tensor, dones: th.Tensor, discounts: th.Tensor | float, next_q_online: th.Tensor, next_q_target: th.Tensor
) -> th.Tensor:
    """TD targets with the online argmax evaluated by the target network."""
    next_actions = next_q_online.argmax(dim=1, keepdim=True)
    next_values = th.gather(next_q_target, dim=1, index=next_actions)
    return rewards + (1 - dones) * discounts * next_values


class DoubleDQN(DQN):
    """SB3 ``DQN`` with Double-DQN targets; everything else is SB3's."""

    def train(self, gradient_steps: int, batch_size: int = 100) -> None:
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        losses = []
        for _ in range(gradient_steps):
            replay_data = self.replay_buffer.sample(batch_size, env=self._vec_normalize_env)  # type: ignore[union-attr]
            discounts = replay_data.discounts if replay_data.discounts is not None else self.gamma
            with th.no_grad():
                target_q_values = double_dqn_targets(
                    replay_data.rewards, replay_data.dones, discounts,
                    self.q_net(replay_data.next_observations), self.q_net_target(replay_data.next_observations),
                )
            current_q_values = th.gather(self.q_net(replay_data.observations), dim=1, index=replay_data.actions.long())
            loss = F.smooth_l1_loss(current_q_values, target_q_values)
            losses.append(loss.item())
            self.policy.optimizer.zero_grad()
            loss.backward()
            th.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
            self.policy.optimizer.step()
        self._n_updates += gradient_steps
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/loss", np.mean(losses))


@dataclass
class AgentConfig:
    """Double-DQN hyper-parameters scaled to short runs.

    SB3's defaults (target update every 10,000 steps, 100 learning starts, a 1e6
    buffer) never update the target network in a 200-episode run; these follow the
    planned number of steps instead. ``gamma`` is 0 for one-prompt episodes (a
    contextual bandit: bootstrapping from a next state equal to the state inflates Q).
    """

    learning_rate: float = 1e-3
    buffer_size: int | None = None  # default: max(1000, total steps)
    learning_starts: int | None = None  # default: min(25, total // 8)
    batch_size: int = 32
    target_update_interval: int | None = None  # default: max(1, total // 20)
    exploration_fraction: float = 0.5
    exploration_initial_eps: float = 1.0
    exploration_final_eps: float = 0.05
    gamma: float | None = None  # default: 0 for one-prompt episodes, else 0.9
    train_freq: int = 1
    gradient_steps: int = 1
    net_arch: tuple[int, ...] = (64, 64)

    def sb3_kwargs(self, total_steps: int, prompts_per_episode: int = 1) -> dict[str, Any]:
        return {
            "learning_rate": self.learning_rate,
            "buffer_size": self.buffer_size or max(1000, total_steps),
            "learning_starts": self.learning_starts if self.learning_starts is not None else min(25, max(1, total_steps // 8)),
            "batch_size": self.batch_size,
            "target_update_interval": self.target_update_interval or max(1, total_steps // 20),
            "exploration_fraction": self.exploration_fraction,
            "exploration_initial_eps": self.exploration_initial_eps,
            "exploration_final_eps": self.exploration_final_eps,
            "gamma": self.gamma if self.gamma is not None else (0.0 if prompts_per_episode == 1 else 0.9),
            "train_freq": self.train_freq,
            "gradient_steps": self.gradient_steps,
            "policy_kwargs": {"net_arch": list(self.net_arch)},
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
