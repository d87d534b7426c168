"""Normalisation shared by the live and replay environments (one definition)."""

from __future__ import annotations

import numpy as np

TOKENS_SCALE = 512.0
PPL_SCALE = 100.0
BUDGET_SCALE = 2.0


def observation_vector(
    cpu_util: float,
    mem_available_gb: float,
    mem_total_gb: float,
    gpu_util: float,
    vram_free_gb: float,
    vram_total_gb: float,
    battery: float,
    prompt_tokens: int,
    prompt_ppl: float,
    budget_ratio: float,
) -> np.ndarray:
    """Eight features in [0, 1] (see PruningEnv's docstring for each)."""
    values = [
        cpu_util / 100.0,
        mem_available_gb / mem_total_gb if mem_total_gb > 0 else min(1.0, mem_available_gb / 64.0),
        gpu_util / 100.0,
        vram_free_gb / vram_total_gb if vram_total_gb > 0 else 0.0,
        battery / 100.0,
        prompt_tokens / TOKENS_SCALE,
        prompt_ppl / PPL_SCALE,
        budget_ratio / BUDGET_SCALE,
    ]
    return np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)
