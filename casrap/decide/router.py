"""The Router: telemetry + prompt features + latency target -> observation -> policy -> profile -> timed generation.

This is the one decision path: :class:`casrap.runtime.AdaptiveLM`, ``casrap serve``,
``casrap loadtest``, the live environment and the recorder call it, and the observation
is built by one function (:func:`casrap.decide.observation.observation_vector`), from the
same prompt analysis (:class:`casrap.decide.analysis.PromptAnalyzer`, raw prompt text,
first ``analysis_tokens`` tokens under the full model), so what was trained is what runs.
:meth:`Router.observe` is the one place an observation vector is assembled: the live
environment, the replay environment (from a recording's stored context) and the runtime
all call it.

A profile's plan picks its generator (:mod:`casrap.decide.generators`: dense, compressed
KV, prompt lookup), all taking the same request options. What a generator refuses (prompt
lookup: logprobs) is masked before the policy's choice takes effect: :meth:`Router.allowed`
says which actions a request's options permit, and a disallowed choice is replaced by the
allowed action with the highest Q-value when the policy exposes them (a Stable-Baselines3
DQN), else by the nearest allowed profile at least as fast (by the bank's speeds), else by
the fastest allowed one; ``Decision.masked_from`` keeps what the policy picked.

Before every request (policy-chosen or fixed) the Router reads telemetry and sets torch's
intra-op threads to the cores other processes leave free, and during the request its
:class:`~casrap.telemetry.threads.ThreadGovernor` re-reads telemetry every few decode steps
and sheds a thread the moment a step runs much slower than it should
(:mod:`casrap.telemetry.threads`); what that costs is part of the decision overhead. It keeps a measured slowdown of casrap's
own decode steps against the unloaded model (:mod:`casrap.decide.slowdown`), refreshed by a
short probe when stale, and shows it to the policy with the thread share.

The latency-target feature is the request's target in seconds over the *predicted
unloaded* full-model latency for its prompt length and token count
(:class:`casrap.decide.latency_model.UnloadedLatencyModel`, measured once per model and
machine and cached). A request's budget is its target minus the time it already waited in
the queue, shrunk by the requests waiting behind it (``/ (1 + queue_weight * queue_length)``).

With no target, or a budget at least the unloaded full-model estimate while casrap runs at
unloaded speed, the full model answers without asking the policy (``RuntimeDefaults.
full_when_ample``): there is nothing to trade quality for, and a policy need not have
learnt the edges of its training range. Such a decision skips what only the policy needs:
no prompt analysis, no policy call, and with no target not even a slowdown probe.

Every side effect is injected: telemetry (``read()``), clock, policy (``predict``), the
thread policy, the bank (and through it the model).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from casrap.decide.analysis import PromptAnalyzer, PromptFeatures
from casrap.decide.observation import observation_vector
from casrap.profiles.catalogue import FULL
from casrap.decide.defaults import RuntimeDefaults
from casrap.decide.generation import GenerationOutput, generate_timed
from casrap.decide.generators import Generator, generator_for
from casrap.decide.latency_model import UnloadedLatencyModel
from casrap.decide.slowdown import SlowdownTracker
from casrap.errors import InputError
from casrap.telemetry.live import Telemetry, TelemetryReading
from casrap.telemetry.threads import GovernorConfig, ThreadChange, ThreadGovernor, ThreadPolicy

ANALYSIS_CACHE_LIMIT = 4096  # prompts whose features are kept (a server sees unbounded prompts)


class Policy(Protocol):
    def predict(self, observation: Any, deterministic: bool = True) -> tuple[Any, Any]: ...


PROBE_TEXT = "The quick brown fox jumps over the lazy dog."
PROBE_TOKENS = 4  # new tokens per probe: three timed decode steps


@dataclass
class Execution:
    """How a request runs: threads chosen from a telemetry reading, and casrap's measured slowdown then."""

    reading: TelemetryReading
    threads: int
    thread_share: float
    threads_s: float  # setting the thread count (0 when unchanged)
    slowdown: float
    probe_s: float  # a probe run because the slowdown was stale (0 otherwise)
    telemetry_s: float


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
    threads: int = 0
    threads_s: float = 0.0
    slowdown: float = 1.0
    probe_s: float = 0.0
    rule: str = ""  # "no-target" / "ample-budget" when the full model answered without the policy
    masked_from: str = ""  # the policy's choice when the request's options excluded it (``profile`` replaced it)

    @property
    def decision_s(self) -> float:
        """Telemetry + thread change + slowdown probe + prompt analysis + policy (the switch is timed when it happens)."""
        return self.telemetry_s + self.threads_s + self.probe_s + self.analysis_s + self.policy_s

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["decision_s"] = self.decision_s
        return data


@dataclass
class Routed:
    decision: Decision
    output: GenerationOutput
    switch_s: float
    thread_changes: list[ThreadChange] = field(default_factory=list)  # the governor's changes during the request


class Router:
    """Decides and runs one request at a time on a :class:`ProfileBank` (callers hold the lock).

    ``casrap/Pruning-v0`` holds one with no policy (the agent acting on the env is the
    policy): it analyses prompts with :attr:`analyzer`, builds observations with
    :meth:`observe` and times the chosen profile's generation with
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
        unloaded: UnloadedLatencyModel | None = None,
        threads: ThreadPolicy | None = None,
        probe: bool = True,
        governor: GovernorConfig | None = None,
    ) -> None:
        self.bank = bank
        self.tokenizer = tokenizer
        self.policy = policy
        self.defaults = defaults or RuntimeDefaults()
        if telemetry is None:
            from casrap.telemetry.live import LiveTelemetry

            telemetry = LiveTelemetry()
        self.clock = clock
        # the governor owns the thread policy and the telemetry source: `threads` and `telemetry` are views of it
        self.governor = ThreadGovernor(threads or ThreadPolicy(mode=self.defaults.thread_policy), telemetry=telemetry,
                                       clock=clock, config=governor)
        self.probe_enabled = probe
        self._unloaded = unloaded
        self._slowdown: SlowdownTracker | None = None
        self._probe_ids: torch.Tensor | None = None
        self.analyzer = PromptAnalyzer(bank.model, tokenizer, max_tokens=self.defaults.analysis_tokens, clock=clock)
        self.actions = list(bank.names)

    @property
    def threads(self) -> ThreadPolicy:
        """How many threads a request gets (the governor's policy)."""
        return self.governor.policy

    @threads.setter
    def threads(self, policy: ThreadPolicy) -> None:
        self.governor.policy = policy

    @property
    def telemetry(self) -> Telemetry:
        """Where readings come from (before a request, and during it through the governor)."""
        return self.governor.telemetry

    @telemetry.setter
    def telemetry(self, source: Telemetry) -> None:
        self.governor.telemetry = source

    @property
    def unloaded(self) -> UnloadedLatencyModel:
        """The full model's unloaded latency model (cached per model and machine; measured on first use)."""
        if self._unloaded is None:
            from casrap.decide.latency_model import load_or_fit_latency_model

            self._unloaded = load_or_fit_latency_model(self.bank, self.tokenizer, telemetry=self.telemetry)
        return self._unloaded

    @unloaded.setter
    def unloaded(self, model: UnloadedLatencyModel | None) -> None:
        """Use an already measured latency model (or None: measure on next use)."""
        self._unloaded = model

    @staticmethod
    def observe(reading: Any, prompt_tokens: int, prompt_ppl: float, budget_ratio: float, slowdown: float = 1.0,
                thread_share: float = 1.0) -> np.ndarray:
        """The policy's input: the one place an observation is built (runtime, live and replay environments).

        ``reading`` is a telemetry reading (object or recorded dict), ``prompt_tokens`` the
        templated prompt's length, ``prompt_ppl`` the analysis' perplexity, ``budget_ratio``
        the target over the predicted unloaded full-model latency (``inf``: none),
        ``slowdown`` and ``thread_share`` the context's execution (:class:`Execution`).
        """
        return observation_vector(reading, prompt_tokens, prompt_ppl, budget_ratio, slowdown=slowdown,
                                  thread_share=thread_share)

    def generator(self, profile: str) -> Generator:
        """The generator ``profile``'s plan runs with."""
        return generator_for(self.bank.profile(profile).plan)

    def allowed(self, options: dict[str, Any] | None = None) -> list[bool]:
        """Per action, whether its generator honours every option the request asks for."""
        if not options:
            return [True] * len(self.actions)
        return [not self.generator(name).unsupported(options) for name in self.actions]

    def replace_disallowed(self, action: int, allowed: list[bool], obs: np.ndarray) -> int:
        """The action that runs when the policy picked a disallowed one.

        The allowed action with the highest Q-value when the policy exposes them; else the
        nearest allowed profile at least as fast as the choice (speeds: ``profile_speed``,
        else the bank's ideal speedups); else the fastest allowed one.
        """
        candidates = [i for i, ok in enumerate(allowed) if ok]
        q = _q_values(self.policy, obs)
        if q is not None and len(q) == len(allowed):
            return max(candidates, key=lambda i: float(q[i]))
        speed = [float(self.defaults.profile_speed.get(n) or self.bank.ideal_speedup(n)) for n in self.actions]
        faster = [i for i in candidates if speed[i] >= speed[action]]
        if faster:
            return min(faster, key=lambda i: speed[i] - speed[action])
        return max(candidates, key=lambda i: speed[i])

    @property
    def slowdown(self) -> SlowdownTracker:
        """casrap's measured decode slowdown (created from the unloaded latency model on first use)."""
        if self._slowdown is None:
            speed = {n: float(self.defaults.profile_speed.get(n) or self.bank.ideal_speedup(n)) for n in self.bank.names}
            self._slowdown = SlowdownTracker(self.unloaded.fit.decode(8), speed, stale_after_s=self.defaults.probe_stale_s)
        return self._slowdown

    def forget_slowdown(self) -> None:
        """Drop the measured slowdown: the next request probes afresh."""
        if self._slowdown is not None:
            self._slowdown.updated_at = None
            self._slowdown.value = 1.0

    def probe(self) -> float:
        """Time a few full-model decode steps on a fixed input and reset the slowdown to what they measured."""
        if self._probe_ids is None:
            self._probe_ids = self.tokenizer(PROBE_TEXT, return_tensors="pt").input_ids[:, :8]
        tracker = self.slowdown
        tracker.unloaded_step_s = self.unloaded.fit.decode(int(self._probe_ids.shape[-1]))
        self.bank.activate(FULL)
        out = generate_timed(self.bank.model, self.tokenizer, self._probe_ids, PROBE_TOKENS, clock=self.clock, ignore_eos=True)
        return tracker.observe(FULL, out.decode_median_s, self.clock(), reset=True)

    def prepare(self, force_probe: bool = False, probe: bool = True) -> Execution:
        """Read telemetry, set the thread count from it, refresh a stale slowdown: before every request.

        ``probe=False`` skips refreshing a stale slowdown (a decision that does not read it).
        """
        clock = self.clock
        t0 = clock()
        reading = self.telemetry.read()
        t1 = clock()
        threads = self.governor.start(reading)
        threads_s = self.governor.last_set_s
        probe_s = 0.0
        if self.probe_enabled and (force_probe or (probe and self.slowdown.is_stale(clock()))):
            t2 = clock()
            self.probe()
            probe_s = clock() - t2
        measured = self.probe_enabled and (self._slowdown is not None or probe or force_probe)
        slowdown = self.slowdown.value if measured else 1.0
        share = threads / max(int(self.threads.available or 1), 1)
        return Execution(reading, threads, share, threads_s, slowdown, probe_s, t1 - t0)

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
        options: dict[str, Any] | None = None,
    ) -> Decision:
        """Observe, ask the policy; the full model must be active (prompt analysis runs it).

        ``options`` are the request's generation options: an action whose generator cannot
        honour them is never returned (:meth:`replace_disallowed`).
        """
        if self.policy is None:
            raise RuntimeError("this router has no policy (an environment's router): the agent decides")
        clock = self.clock
        execution = self.prepare(probe=target_s is not None)
        t1 = clock()
        known = target_s is not None or self._unloaded is not None  # no target: never measure the latency model for it
        estimate = self.estimate_unloaded(prompt_tokens, max_new_tokens) if known else float("nan")
        ratio = self.budget_ratio(target_s, estimate, queue_length, waited_s)
        rule = self.full_model_rule(target_s, ratio, execution)
        if rule:  # the full model answers by rule: the prompt analysis and the policy are not needed
            t2 = t1
            features, obs = PromptFeatures(prompt_tokens, float("nan"), float("nan"), 0.0), np.zeros(0)
            action = self.actions.index(FULL)
        else:
            self.analyzer.bound_cache(ANALYSIS_CACHE_LIMIT)
            self.bank.activate(FULL)
            features = self.analyzer.analyze(text)
            t2 = clock()
            # the token feature counts the whole templated prompt the model will read (its own text gives the perplexity)
            obs = self.observe(execution.reading, prompt_tokens, features.ppl, ratio, execution.slowdown,
                               execution.thread_share)
            action = int(np.asarray(self.policy.predict(obs, deterministic=True)[0]).reshape(-1)[0])
        if not 0 <= action < len(self.actions):
            raise RuntimeError(f"policy returned action {action} outside 0..{len(self.actions) - 1}")
        allowed, masked_from = self.allowed(options), ""
        if not allowed[action]:
            masked_from, action = self.actions[action], self.replace_disallowed(action, allowed, obs)
        t3 = clock()
        return Decision(
            profile=self.actions[action], action=action, observation=[float(x) for x in obs], prompt_tokens=prompt_tokens,
            prompt_ppl=features.ppl, target_s=target_s, budget_ratio=ratio, estimated_full_s=estimate,
            queue_length=queue_length, waited_s=waited_s, telemetry_s=execution.telemetry_s, analysis_s=t2 - t1,
            policy_s=t3 - t2, threads=execution.threads, threads_s=execution.threads_s, slowdown=execution.slowdown,
            probe_s=execution.probe_s, rule=rule, masked_from=masked_from,
        )

    def full_model_rule(self, target_s: float | None, ratio: float, execution: Execution) -> str:
        """Why the full model answers without the policy ("" when the policy decides)."""
        if not self.defaults.full_when_ample or FULL not in self.actions:
            return ""
        if target_s is None:
            return "no-target"
        if ratio >= 1.0 and execution.slowdown <= self.defaults.idle_slowdown:
            return "ample-budget"
        return ""

    def run(
        self,
        decision: Decision,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        on_text: Callable[[str], None] | None = None,
        ignore_eos: bool = False,
        **sampling: Any,
    ) -> Routed:
        """Switch to the decided profile, generate with its plan's generator, restore the full model, learn the latency.

        ``sampling`` holds the request options every generator takes (cancel, on_step,
        stop, seed, logprobs, sampling, penalties); one the profile's generator refuses is a
        one-line error before anything runs (a policy's decision never carries one: see
        :meth:`allowed`).
        """
        generator = self.generator(decision.profile)
        refused = generator.unsupported(sampling)
        if refused:
            raise InputError(f"profile {decision.profile} ({generator.kind} generation) does not support {', '.join(refused)}")
        start = self.clock()
        self.bank.activate(decision.profile)
        switch_s = self.clock() - start
        self.governor.for_work(decision.profile)
        try:
            output = generator(self.bank.model, self.tokenizer, input_ids, max_new_tokens, clock=self.clock, on_text=on_text,
                               ignore_eos=ignore_eos, on_decode_step=self.governor.step, **sampling)
        finally:
            self.bank.activate(FULL)
            changes = self.governor.finish()
        if len(output.decode_steps_s) >= 3 and self._unloaded is not None:
            tracker = self.slowdown
            tracker.unloaded_step_s = self.unloaded.fit.decode(int(input_ids.shape[-1]))
            tracker.observe(decision.profile, output.decode_median_s, self.clock())
        return Routed(decision, output, switch_s, changes)

    def fixed_decision(self, profile: str, input_ids: torch.Tensor, max_new_tokens: int, queue_length: int = 0,
                       waited_s: float = 0.0, execution: Execution | None = None) -> Decision:
        """A decision that names ``profile`` without asking the policy (static baselines, the env, the recorder).

        It runs under the same thread-aware execution as a policy's decision (telemetry read
        and threads set now, unless ``execution`` was prepared already), so a static profile
        is compared with the policy on equal terms.
        """
        execution = execution or self.prepare()
        tokens = int(input_ids.shape[-1])
        estimate = self._unloaded.predict(tokens, max_new_tokens) if self._unloaded is not None else float("nan")
        return Decision(profile, self.actions.index(profile), [], tokens, float("nan"), None, float("nan"),
                        estimate, queue_length, waited_s, execution.telemetry_s, 0.0, 0.0, threads=execution.threads,
                        threads_s=execution.threads_s, slowdown=execution.slowdown, probe_s=execution.probe_s)


def _q_values(policy: Any, obs: np.ndarray) -> np.ndarray | None:
    """The policy's Q-values for ``obs`` when it exposes them (a Stable-Baselines3 DQN), else None."""
    q_net, inner = getattr(policy, "q_net", None), getattr(policy, "policy", None)
    if q_net is None or inner is None or not hasattr(inner, "obs_to_tensor") or obs.size == 0:
        return None
    with torch.no_grad():
        tensor, _ = inner.obs_to_tensor(obs)
        return q_net(tensor).reshape(-1).cpu().numpy()
