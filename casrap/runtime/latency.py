"""Estimate of the full model's latency for a request, learned from the requests served.

The policy sees a latency target as a ratio to the *full model's* latency on this
machine now (that is how it was trained: ``budget / baseline latency``). At run time
the full model is not run beside every request, so the router needs an estimate:
seconds per prompt token (prefill) and per new token (decode), kept as exponential
moving averages of what each profile measured, with a pruned profile's measurement
scaled back to the full model by that profile's speed ratio (the bank's ideal
speedup until the profile has been compared with the full model itself).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LatencyModel:
    """Full-model latency ~= prefill_s * prompt_tokens + decode_s * new_tokens.

    Attributes:
        prefill_s: seconds per prompt token (full model).
        decode_s: seconds per generated token (full model).
        alpha: weight of the newest measurement in the moving averages.
        speed: profile -> how many times faster than the full model (per token).
        observations: measurements folded in so far.
    """

    prefill_s: float = 0.002
    decode_s: float = 0.1
    alpha: float = 0.3
    speed: dict[str, float] = field(default_factory=dict)
    observations: int = 0
    _profile_decode: dict[str, float] = field(default_factory=dict)

    def estimate(self, prompt_tokens: int, new_tokens: int) -> float:
        """Seconds the full model would take for this request now."""
        return self.prefill_s * prompt_tokens + self.decode_s * max(new_tokens, 1)

    def observe(self, profile: str, prompt_tokens: int, new_tokens: int, ttft_s: float, total_s: float) -> None:
        """Fold one measured generation in (time to first token and total, seconds)."""
        if new_tokens <= 0 or total_s <= 0:
            return
        ratio = self.speed.get(profile, 1.0)
        decode = max(total_s - ttft_s, 0.0) / max(new_tokens - 1, 1) if new_tokens > 1 else total_s
        prefill = max(ttft_s - decode, 0.0) / max(prompt_tokens, 1)
        self._profile_decode[profile] = decode
        if profile != "none" and "none" in self._profile_decode and self._profile_decode[profile] > 0:
            ratio = self._profile_decode["none"] / self._profile_decode[profile]
            self.speed[profile] = ratio
        a = self.alpha if self.observations else 1.0
        self.decode_s = (1 - a) * self.decode_s + a * decode * ratio
        self.prefill_s = (1 - a) * self.prefill_s + a * prefill * ratio
        self.observations += 1
