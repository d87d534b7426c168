"""Test helpers: a deterministic clock and a small live env on the tiny model."""

from __future__ import annotations

from typing import Any


class StepClock:
    """Advances by a binary fraction per call, scaled by the active layer count.

    Exact in floating point, so timings (and rewards) repeat bit for bit, and
    profiles that skip layers "run faster" in a predictable way.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.t = 0.0

    def __call__(self) -> float:
        self.t += len(self.model.model.layers) / 16
        return self.t


def tiny_env(lm: Any, profiles=("none", "heads-25", "layers-25", "ffn-25"), reward: str = "casrap", tokens: int = 4, **kwargs: Any):
    from casrap.data.prompts import load_prompts
    from casrap.envs.config import EnvConfig
    from casrap.envs.pruning_env import PruningEnv
    from casrap.envs.rewards import RewardConfig
    from casrap.profiles.factory import build_bank
    from casrap.telemetry import FakeTelemetry

    bank = build_bank(lm.model, list(profiles), base_model="tiny", tokenizer=lm.tokenizer)
    prompts = kwargs.pop("prompts", None) or load_prompts(None, split="train")[:12]
    config = EnvConfig(max_new_tokens=tokens, reward=RewardConfig(kind=reward), **kwargs)
    return PruningEnv(config, bank=bank, tokenizer=lm.tokenizer, telemetry=FakeTelemetry(0), clock=StepClock(lm.model), prompts=prompts)


def assert_full_model_restored(bank: Any, model: Any, ids: Any, before: Any, state: dict[str, Any], rounds: int) -> None:
    """Cycle through every profile ``rounds`` times, switch back to the full model, and
    check its logits on ``ids`` and every tensor of its state dict are bitwise unchanged."""
    import torch

    def logits() -> Any:
        with torch.inference_mode():
            return model(ids, use_cache=False).logits

    for _ in range(rounds):
        for name in bank.names:
            bank.activate(name)
            logits()
    bank.activate("none")
    assert torch.equal(logits(), before)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
