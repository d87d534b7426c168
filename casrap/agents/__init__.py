"""Agents: Double DQN on SB3 and the baselines it is compared with."""

from casrap.agents.baselines import RandomPolicy, StaticPolicy
from casrap.agents.double_dqn import AgentConfig, DoubleDQN, double_dqn_targets

__all__ = ["RandomPolicy", "StaticPolicy", "AgentConfig", "DoubleDQN", "double_dqn_targets"]
