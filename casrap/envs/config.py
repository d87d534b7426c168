"""Configuration of the live environment (CLI flags map onto these fields)."""

from __future__ import annotations

from dataclasses import dataclass, field

from casrap.decide.observation import OBSERVATION_FEATURES  # noqa: F401  (re-exported)
from casrap.envs.rewards import RewardConfig
from casrap.profiles.catalogue import default_catalogue


@dataclass
class EnvConfig:
    """Settings of ``casrap/Pruning-v0``.

    Attributes:
        model: model spec for the loader (embedded default).
        device: auto | cpu | cuda.
        profiles: action catalogue as specs (``ffn-8``), shipped plan names
            (``ga-rates-40``) or plan JSON files; None = CASRAP v2.2 plus the plans
            shipped for ``model`` (:func:`casrap.profiles.shipped.default_catalogue`).
        structural: slice (True) or mask (False); None reads STRUCTURAL_PRUNING.
        prompts: prompt source (None = bundled set).
        split: which split of the prompts to draw from.
        max_new_tokens: tokens generated per step (EOS ignored, so latency compares).
        prompts_per_episode: 1 makes each episode a contextual-bandit decision.
        reward: reward kind and weights.
        rebaseline_cpu_delta: re-measure a cached baseline latency when CPU
            utilisation moved by more than this many points since it was taken.
        analysis_tokens: leading prompt tokens scored for the perplexity feature.
        count_router_overhead: add prompt analysis and switch time to the pruned
            latency (honest accounting; the full-model baseline pays neither).
    """

    model: str = "smollm2-135m"
    device: str = "auto"
    profiles: list[str] | None = None
    structural: bool | None = None
    prompts: str | None = None
    split: str = "train"
    max_new_tokens: int = 50
    prompts_per_episode: int = 1
    reward: RewardConfig = field(default_factory=RewardConfig)
    rebaseline_cpu_delta: float = 25.0
    analysis_tokens: int = 64
    count_router_overhead: bool = True

    def __post_init__(self) -> None:
        if self.profiles is None:
            self.profiles = default_catalogue(self.model)

