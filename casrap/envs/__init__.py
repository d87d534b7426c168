"""Gymnasium environments, registered on ``import casrap``.

- ``casrap/Pruning-v0``: live; loads the embedded model by default
  (``nondeterministic=True``: telemetry and timings are live).
- ``casrap/PruningReplay-v0``: serves recorded measurements; no model needed.
"""

from __future__ import annotations

from gymnasium.envs.registration import register, registry

if "casrap/Pruning-v0" not in registry:
    register(id="casrap/Pruning-v0", entry_point="casrap.envs.pruning_env:PruningEnv", nondeterministic=True)
if "casrap/PruningReplay-v0" not in registry:
    register(id="casrap/PruningReplay-v0", entry_point="casrap.envs.replay:PruningReplayEnv")
