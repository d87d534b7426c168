"""Layer skipping chosen by block influence (ShortGPT), not only from the end.

Skipped layers are left out of the profile's layer list and the remaining attention
shells are renumbered (``layer_idx``), so the KV cache has no holes: a cache built
under a profile is consistent for that profile's whole request.
"""

from __future__ import annotations

import math

import torch


def plan_skip_layers(block_influence: torch.Tensor, fraction: float, protect_ends: bool = True) -> list[int]:
    """The ``floor(fraction * L)`` layers with the lowest block influence.

    The first and last layers are protected by default: on every model we measured
    they have the highest influence anyway, and removing the first breaks the
    embedding-to-residual hand-off.
    """
    n = block_influence.numel()
    count = min(math.floor(fraction * n + 1e-9), n - 1)
    candidates = list(range(1, n - 1)) if protect_ends and n > 2 else list(range(n))
    ranked = sorted(candidates, key=lambda i: float(block_influence[i]))
    return sorted(ranked[:count])


def skip_last_layers(n_layers: int, count: int) -> list[int]:
    """Baseline: drop the last ``count`` layers before the final one."""
    count = min(count, n_layers - 1)
    return list(range(n_layers - 1 - count, n_layers - 1))
