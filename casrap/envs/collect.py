"""``casrap collect``: measure prompts x load levels x profiles on the real model.

The records feed ``casrap/PruningReplay-v0``, so agents train and are compared
quickly and reproducibly on what the machine actually did.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator
from typing import Any

import torch

from casrap.data.prompts import Prompt
from casrap.envs.pruning_env import PruningEnv
from casrap.telemetry.load import BackgroundLoad


def collect(
    env: PruningEnv,
    prompts: list[tuple[Prompt, str]],
    load_levels: list[float],
    background: BackgroundLoad | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield one record per (load level, prompt, profile); ``prompts`` pairs carry the split."""
    total = len(load_levels) * len(prompts) * len(env.action_names)
    done = 0
    for level in load_levels:
        if background is not None:
            background.set_intensity(level)
        for prompt, split in prompts:
            for action in range(len(env.action_names)):
                env.reset(options={"prompt": prompt})
                _, _, _, _, info = env.step(action)
                done += 1
                if progress:
                    progress(done, total)
                yield {**info, "load": level, "split": split}


def replay_header(env: PruningEnv, model: str) -> dict[str, Any]:
    return {
        "model": model,
        "profiles": env.action_names,
        "max_new_tokens": env.config.max_new_tokens,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": torch.get_num_threads()},
        "descriptions": {n: env.bank.profile(n).plan.description for n in env.action_names},
    }
