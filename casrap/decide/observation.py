"""Normalisation shared by the live and replay environments and the runtime (one definition).

Observation spec version 3: the machine is described by the load *other*
processes put on it (not casrap's own CPU, which read ~100% whatever the load), and
the latency target is absolute — seconds for the whole answer — shown to the policy as
a multiple of the *predicted unloaded* full-model latency for this prompt length and
token count (:mod:`casrap.decide.latency_model`), so no feature needs the full model
to run on the request being decided. Two features say how fast *casrap* runs now: the
measured slowdown of its own decode steps against the unloaded model
(:mod:`casrap.decide.slowdown`), and the share of the available cores its threads may use
(:mod:`casrap.telemetry.threads`): one busy core costs nothing with one thread and 2-3x
with two spinning ones, which telemetry alone cannot tell apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

OBSERVATION_VERSION = 3
TOKENS_SCALE = 512.0
PPL_SCALE = 100.0
TARGET_SCALE = 4.0  # target / predicted unloaded full latency: 4x and above reads 1
RUN_QUEUE_SCALE = 2.0  # runnable tasks per core: 2 and above reads 1

OBSERVATION_FEATURES = (
    "other_cpu",
    "run_queue",
    "mem_available",
    "mem_pressure",
    "gpu_util",
    "vram_free",
    "battery",
    "on_battery",
    "prompt_tokens",
    "prompt_ppl",
    "latency_target",
    "slowdown",
    "threads",
)


def _get(reading: Any, key: str, default: float = 0.0) -> float:
    if isinstance(reading, Mapping):
        return float(reading.get(key, default))
    return float(getattr(reading, key, default))


def observation_vector(reading: Any, prompt_tokens: int, prompt_ppl: float, target_ratio: float,
                       slowdown: float = 1.0, thread_share: float = 1.0) -> np.ndarray:
    """Thirteen features in [0, 1] from a telemetry reading (object or dict) and the request.

    ``target_ratio`` is the request's latency target over the predicted unloaded
    full-model latency (``inf`` when the request has none: reads 1); ``slowdown`` is
    casrap's measured decode slowdown (1 = unloaded speed); ``thread_share`` the threads
    the request runs with over the cores available to the process.
    """
    from casrap.decide.slowdown import slowdown_feature

    mem_total = _get(reading, "mem_total_gb")
    vram_total = _get(reading, "vram_total_gb")
    mem_available = _get(reading, "mem_available_gb")
    values = [
        _get(reading, "other_cpu_util") / 100.0,
        _get(reading, "run_queue") / RUN_QUEUE_SCALE,
        mem_available / mem_total if mem_total > 0 else min(1.0, mem_available / 64.0),
        _get(reading, "mem_pressure") / 100.0,
        _get(reading, "gpu_util") / 100.0,
        _get(reading, "vram_free_gb") / vram_total if vram_total > 0 else 0.0,
        _get(reading, "battery", 100.0) / 100.0,
        _get(reading, "on_battery"),
        prompt_tokens / TOKENS_SCALE,
        prompt_ppl / PPL_SCALE,
        target_ratio / TARGET_SCALE if np.isfinite(target_ratio) else 1.0,
        slowdown_feature(slowdown),
        thread_share,
    ]
    return np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)
