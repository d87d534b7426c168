"""How slow casrap itself runs right now, relative to the unloaded model: an observation feature.

Telemetry says how busy the machine is; it cannot say what that does to *this* process's
decode speed under the thread count it runs with (one busy core costs nothing with one
thread and 2-3x with two spinning threads). So the decision path keeps a measured
slowdown: each generation's median decode step over the step the same profile takes on an
idle machine, smoothed (exponential moving average). When the last measurement is stale (no
request for a while), a short probe (a few full-model decode steps on a fixed input) measures
it afresh; the probe's cost is part of the decision overhead. The recorder takes the same
probe at the start of every (prompt, load) context, so the feature a replay-trained policy
learnt from means what the live one reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

SLOWDOWN_SCALE = 4.0  # the feature is log2(slowdown) / 4: 1x reads 0, 16x and above read 1


@dataclass
class SlowdownTracker:
    """A smoothed ratio of measured to unloaded decode-step time.

    Attributes:
        unloaded_step_s: the full model's median decode step on an idle machine (seconds).
        speed: profile -> unloaded decode speed relative to the full model (measured in a
            recording where known, else the bank's ideal speedup); unknown profiles read 1.
        alpha: weight of the newest measurement.
        stale_after_s: a value older than this is refreshed by a probe before it is used.
        value: the current slowdown (1.0 = as fast as unloaded).
        updated_at: clock time of the last measurement (None: never measured).
    """

    unloaded_step_s: float
    speed: dict[str, float] = field(default_factory=dict)
    alpha: float = 0.5
    stale_after_s: float = 30.0
    value: float = 1.0
    updated_at: float | None = None

    def expected_step_s(self, profile: str) -> float:
        return self.unloaded_step_s / max(self.speed.get(profile, 1.0), 1e-6)

    def observe(self, profile: str, decode_step_s: float, now: float, reset: bool = False) -> float:
        """Fold in one measured median decode step of ``profile``; ``reset`` replaces the average (a probe)."""
        if decode_step_s <= 0 or not math.isfinite(decode_step_s) or self.unloaded_step_s <= 0:
            return self.value
        ratio = decode_step_s / self.expected_step_s(profile)
        if reset or self.updated_at is None:
            self.value = ratio
        else:
            self.value = (1.0 - self.alpha) * self.value + self.alpha * ratio
        self.updated_at = now
        return self.value

    def is_stale(self, now: float) -> bool:
        return self.updated_at is None or now - self.updated_at > self.stale_after_s


def slowdown_feature(slowdown: float) -> float:
    """The observation's value in [0, 1] for a slowdown ratio."""
    if not math.isfinite(slowdown) or slowdown <= 1.0:
        return 0.0
    return min(math.log2(slowdown) / SLOWDOWN_SCALE, 1.0)
