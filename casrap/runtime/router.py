"""The Router: telemetry + prompt features + latency target -> observation -> policy -> profile -> timed generation.

This is the one decision path: :class:`casrap.runtime.AdaptiveLM`, ``casrap serve`` and
``casrap loadtest`` call it, and the observation is built by the same function the
environments use (:func:`casrap.envs.observation.observation_vector`), from the same
prompt analysis (:class:`casrap.envs.analysis.PromptAnalyzer`, raw prompt text, first
``analysis_tokens`` tokens under the full model), so what was trained is what runs.

The latency-target feature is the request's target in seconds over the *predicted
unloaded* full-model latency for its prompt length and token count
(:class:`casrap.measure.latency_model.UnloadedLatencyModel`, measured once per model and
machine and cached), as in training: how loaded the machine is now reaches the policy
through telemetry, never through the denominator. A request's budget is its target minus the time
it already waited in the queue, shrunk by the requests waiting behind it
(``/ (1 + queue_weight * queue_length)``): the observation spec v1 has no queue
feature, so queue length and waiting time enter through the budget.

Every side effect is injected: telemetry (``read()``), clock, policy (``predict``),
the bank (and through it the model).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import torch

from casrap.envs.analysis import PromptAnalyzer, PromptFeatures
from casrap.envs.observation import observation_vector
from casrap.profiles.catalogue import FULL
from casrap.runtime.bundle import RuntimeDefaults
from casrap.runtime.generation import GenerationOutput, generate_timed
from casrap.measure.latency_model import UnloadedLatencyModel
from casrap.runtime.latency import LatencyModel
from casrap.telemetry.live import Telemetry, TelemetryReading

ANALYSIS_CACHE_LIMIT = 4096  # prompts whose features are kept (a server sees unbounded prompts)


class Policy(Protocol):
    def predict(self, observation: Any, deterministic: bool = True) -> tuple[Any, Any]: ...


def build_observation(reading: TelemetryReading, features: PromptFeatures, budget_ratio: float) -> np.ndarray:
    """The policy's input, exactly as the environments build it."""
    return observation_vector(reading, features.tokens, features.ppl, budget_ratio)


@dataclass
class Decision:
    """Which profile runs a request, why, and what deciding cost (seconds)."""

    profile: str
    action: int
    observation: list[float]
    prompt_tokens: int
    prompt_ppl: float
    target_s: float | None
    budget_ratio: float
    estimated_full_s: float
    queue_length: int
    waited_s: float
    telemetry_s: float
    analysis_s: float
    policy_s: float

    @property
    def decision_s(self) -> float:
        """Telemetry + prompt analysis + policy (the switch is timed when it happens)."""
        return self.telemetry_s + self.analysis_s + self.policy_s

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["decision_s"] = self.decision_s
        return data


@dataclass
class Routed:
    decision: Decision
    output: GenerationOutput
    switch_s: float


class Router:
    """Decides and runs one request at a time on a :class:`ProfileBank` (callers hold the lock).

    ``casrap/Pruning-v0`` holds one with no policy (the agent acting on the env is the
    policy): it analyses prompts with :attr:`analyzer`, builds observations with
    :func:`build_observation` and times the chosen profile's generation with
    :meth:`run`, so training measures exactly the path that serves.
    """

    def __init__(
        self,
        bank: Any,
        tokenizer: Any,
        policy: Policy | None,
        defaults: RuntimeDefaults | None = None,
        telemetry: Telemetry | None = None,
        clock: Callable[[], float] = time.perf_counter,
        latency: LatencyModel | None = None,
        unloaded: UnloadedLatencyModel | None = None,
    ) -> None:
        self.bank = bank
        self.tokenizer = tokenizer
        self.policy = policy
        self.defaults = defaults or RuntimeDefaults()
        if telemetry is None:
            from casrap.telemetry.live import LiveTelemetry

            telemetry = LiveTelemetry()
        self.telemetry = telemetry
        self.clock = clock
        self.latency = latency or LatencyModel(speed={n: bank.ideal_speedup(n) for n in bank.names})
        self._unloaded = unloaded
        self.analyzer = PromptAnalyzer(bank.model, tokenizer, max_tokens=self.defaults.analysis_tokens, clock=clock)
        self.actions = list(bank.names)

    @property
    def unloaded(self) -> UnloadedLatencyModel:
        """The full model's unloaded latency model (cached per model and machine; measured on first use)."""
        if self._unloaded is None:
            from casrap.measure.latency_model import load_or_fit_latency_model

            self._unloaded = load_or_fit_latency_model(self.bank, self.tokenizer, telemetry=self.telemetry)
        return self._unloaded

    def estimate_unloaded(self, prompt_tokens: int, max_new_tokens: int) -> float:
        """Predicted seconds for the full model on an idle machine (no model run)."""
        return self.unloaded.predict(prompt_tokens, max_new_tokens)

    def budget_ratio(self, target_s: float | None, estimated_full_s: float, queue_length: int, waited_s: float) -> float:
        """The target feature's ratio: remaining target over the predicted unloaded full-model latency."""
        if target_s is None:
            return self.defaults.budget_ratio
        remaining = max(target_s - waited_s, 0.0) / (1.0 + self.defaults.queue_weight * max(queue_length, 0))
        return remaining / estimated_full_s if estimated_full_s > 0 else float("inf")

    def decide(
        self,
        text: str,
        prompt_tokens: int,
        max_new_tokens: int,
        target_s: float | None = None,
        queue_length: int = 0,
        waited_s: float = 0.0,
    ) -> Decision:
        """Observe, ask the policy; the full model must be active (prompt analysis runs it)."""
        if self.policy is None:
            raise RuntimeError("this router has no policy (an environment's router): the agent decides")
        clock = self.clock
        t0 = clock()
        reading = self.telemetry.read()
        t1 = clock()
        if len(self.analyzer._cache) > ANALYSIS_CACHE_LIMIT:
            self.analyzer._cache.clear()
        self.bank.activate(FULL)
        features = self.analyzer.analyze(text)
        t2 = clock()
        estimate = self.estimate_unloaded(prompt_tokens, max_new_tokens)
        ratio = self.budget_ratio(target_s, estimate, queue_length, waited_s)
        obs = build_observation(reading, features, ratio)
        action = int(np.asarray(self.policy.predict(obs, deterministic=True)[0]).reshape(-1)[0])
        t3 = clock()
        if not 0 <= action < len(self.actions):
            raise RuntimeError(f"policy returned action {action} outside 0..{len(self.actions) - 1}")
        # a cached analysis costs nothing now; report what this request paid
        analysis_s = t2 - t1
        return Decision(
            profile=self.actions[action], action=action, observation=[float(x) for x in obs], prompt_tokens=prompt_tokens,
            prompt_ppl=features.ppl, target_s=target_s, budget_ratio=ratio, estimated_full_s=estimate,
            queue_length=queue_length, waited_s=waited_s, telemetry_s=t1 - t0, analysis_s=analysis_s, policy_s=t3 - t2,
        )

    def run(
        self,
        decision: Decision,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        on_text: Callable[[str], None] | None = None,
        ignore_eos: bool = False,
        **sampling: Any,
    ) -> Routed:
        """Switch to the decided profile, generate, restore the full model, learn the latency."""
        start = self.clock()
        self.bank.activate(decision.profile)
        switch_s = self.clock() - start
        try:
            output = generate_timed(self.bank.model, self.tokenizer, input_ids, max_new_tokens, clock=self.clock,
                                    on_text=on_text, ignore_eos=ignore_eos, **sampling)
        finally:
            self.bank.activate(FULL)
        self.latency.observe(decision.profile, int(input_ids.shape[-1]), len(output.token_ids), output.ttft_s, output.generation_s)
        return Routed(decision, output, switch_s)

    def fixed_decision(self, profile: str, input_ids: torch.Tensor, max_new_tokens: int, queue_length: int = 0,
                       waited_s: float = 0.0) -> Decision:
        """A decision that names ``profile`` without asking the policy (static baselines)."""
        tokens = int(input_ids.shape[-1])
        estimate = self._unloaded.predict(tokens, max_new_tokens) if self._unloaded is not None else float("nan")
        return Decision(profile, self.actions.index(profile), [], tokens, float("nan"), None, float("nan"),
                        estimate, queue_length, waited_s, 0.0, 0.0, 0.0)
