"""What the decision path does when a request leaves something out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RuntimeDefaults:
    """What the runtime does when a request leaves something out.

    Attributes:
        budget_ratio: latency target as a multiple of the predicted *unloaded*
            full-model latency when a request names no target. The upper end of the
            training range: generous enough that the policy keeps quality when the
            machine is free, inside the range the policy has seen.
        max_new_tokens: new tokens when a request names no limit.
        analysis_tokens: leading prompt tokens scored for the perplexity feature
            (as in training).
        queue_weight: each request waiting behind this one shrinks its budget by
            this share (``budget / (1 + w * waiting)``), so a queue pushes the policy
            towards faster profiles.
        thread_policy: ``"free-cores"`` (threads = cores free of other processes, at
            least 1) or ``"fixed"`` (all available cores): see
            :mod:`casrap.telemetry.threads`.
        full_when_ample: answer with the full model, without asking the policy, when a
            request has no target, or its budget is at least the predicted unloaded
            full-model latency while casrap runs at unloaded speed (slowdown at most
            ``idle_slowdown``): there is nothing to trade quality for.
        idle_slowdown: the measured slowdown up to which casrap counts as unloaded.
        profile_speed: profile -> measured unloaded decode speed relative to the full
            model (from the recording a bundle was trained on); the slowdown feature
            divides each profile's decode step by it. Missing: the bank's ideal speedup.
        probe_stale_s: a slowdown older than this is re-measured by a short probe.
    """

    budget_ratio: float = 3.0
    max_new_tokens: int = 64
    analysis_tokens: int = 64
    queue_weight: float = 0.5
    thread_policy: str = "free-cores"
    full_when_ample: bool = True
    idle_slowdown: float = 1.3
    profile_speed: dict[str, float] = field(default_factory=dict)
    probe_stale_s: float = 30.0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RuntimeDefaults:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)
