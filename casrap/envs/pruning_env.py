"""``casrap/Pruning-v0``: choose a pruning profile for each prompt, on the live model."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from casrap.data.prompts import Prompt, load_prompts
from casrap.decide.analysis import PromptAnalyzer, PromptFeatures
from casrap.envs.config import OBSERVATION_FEATURES, EnvConfig
from casrap.envs.rewards import RewardInput, compute_reward, reward_config
from casrap.errors import InputError
from casrap.measure.quality import score_profiles
from casrap.measure.timing import check_prompt_fits
from casrap.profiles.bank import ProfileBank
from casrap.profiles.catalogue import FULL
from casrap.decide.defaults import RuntimeDefaults
from casrap.decide.router import Execution, Router
from casrap.telemetry.live import LiveTelemetry, Telemetry, TelemetryReading

log = logging.getLogger(__name__)


@dataclass
class Baseline:
    """The full model's answer to a prompt and its cost, cached per prompt."""

    answer_ids: torch.Tensor
    latency_s: float
    ttft_s: float
    tf_ppl: float
    cpu_util: float


def config_with(config: EnvConfig, settings: dict[str, Any]) -> EnvConfig:
    """``config`` with flat keyword overrides (``gym.make`` passes kwargs this way)."""
    names = {f.name for f in fields(EnvConfig)}
    unknown = sorted(set(settings) - names - {"slo_lambda"})
    if unknown:
        raise TypeError(f"casrap/Pruning-v0 got unexpected keyword(s) {unknown}; accepted: {sorted(names | {'slo_lambda'})}")
    settings = dict(settings)
    if "reward" in settings or "slo_lambda" in settings:
        settings["reward"] = reward_config(settings.get("reward", config.reward), settings.pop("slo_lambda", None))
    return replace(config, **settings)


class PruningEnv(gym.Env):
    """Pick how much of the model to run for one prompt.

    ## Description
    Each episode draws a prompt (one per episode by default, a contextual bandit). The
    agent sees the machine's state and the prompt's complexity and picks a profile
    from a :class:`ProfileBank`; the env generates ``max_new_tokens`` with it, times
    the request, scores the output against the full model, and restores the full model.

    ## Action Space
    ``Discrete(n)`` over the bank's profiles in order; action 0 is ``none`` (full
    model). The default catalogue (:func:`casrap.profiles.catalogue.default_catalogue`) is
    the original CASRAP design's set (its v2.2: none, heads 5/10/15%, layers 5/10%, FFN
    5/8%) plus the plans shipped for the model; specs and plan files (search, healing) can
    be added.

    ## Observation Space
    ``Box(0, 1, (13,), float32)`` (observation spec v3, :mod:`casrap.decide.observation`;
    built by :meth:`casrap.decide.router.Router.observe`, as the runtime builds it):

    | idx | feature | normalisation |
    |-----|---------|---------------|
    | 0 | CPU used by other processes | percent of all cores / 100 |
    | 1 | run queue | runnable tasks per core, ours excluded, / 2 |
    | 2 | available memory | available / total |
    | 3 | memory pressure | Linux PSI some avg10 / 100 |
    | 4 | GPU utilisation | percent / 100 (0 without GPU) |
    | 5 | free VRAM | free / total (0 without GPU) |
    | 6 | battery | percent / 100 (1 without battery) |
    | 7 | on battery | 1 on battery power |
    | 8 | prompt tokens | tokens / 512, clipped |
    | 9 | prompt perplexity | ppl / 100, clipped (full model, first 64 tokens) |
    | 10 | latency target | target / predicted unloaded full-model latency / 4 (``slo``; 1 otherwise) |
    | 11 | slowdown | casrap's measured decode slowdown against the unloaded model (:mod:`casrap.decide.slowdown`) |
    | 12 | threads | the request's threads / the cores available to the process |

    ## Rewards
    ``casrap`` (v2.2 shaping), ``linear`` or ``slo``; see :mod:`casrap.envs.rewards`.
    Quality is the teacher-forced perplexity of the *full model's* answer under the
    chosen profile, relative to the full model's own (plus KL in ``info``); never the
    profile's perplexity on its own output. Latency is the time to first token plus
    the *median* decode step for every further token (one scheduler hiccup does not
    decide a reward), plus prompt analysis and profile switch time
    (``count_router_overhead``). The ``slo`` target is absolute: a multiple (drawn per
    episode) of the unloaded full model's predicted latency for this prompt
    (:mod:`casrap.decide.latency_model`, measured once per model and machine).

    ## Episode End
    After ``prompts_per_episode`` prompts; with the ``casrap`` reward, also at once
    on a slowdown above 10%.

    ``reset(options={"prompt": Prompt(...)})`` fixes the episode's prompt (used by
    evaluation).

    ## Arguments
    Any :class:`EnvConfig` field as a flat keyword, as with every Gymnasium env:
    ``gym.make("casrap/Pruning-v0", max_new_tokens=8, profiles=["none", "layers-10"],
    reward="slo")`` (``reward`` may be a kind name or a :class:`RewardConfig`;
    ``slo_lambda`` sets its weight), or a whole ``config``; and injected side effects: ``bank`` and
    ``tokenizer`` (else the model in ``config.model`` is loaded with the configured
    catalogue), ``telemetry`` (default live), ``clock`` (default ``perf_counter``),
    ``prompts`` (a list of :class:`Prompt`).
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        config: EnvConfig | None = None,
        bank: ProfileBank | None = None,
        tokenizer: Any = None,
        telemetry: Telemetry | None = None,
        clock: Callable[[], float] = time.perf_counter,
        prompts: list[Prompt] | None = None,
        **settings: Any,
    ) -> None:
        super().__init__()
        self.config = config_with(config or EnvConfig(), settings)
        if bank is None:
            from casrap.models import load_model
            from casrap.profiles.resolve import bank_for

            lm = load_model(self.config.model, device=self.config.device)
            # importance and layout resolved as the command line resolves them (one place)
            bank = bank_for(lm.model, lm.tokenizer, list(self.config.profiles), base_model=self.config.model,
                            structural=self.config.structural)
            tokenizer = lm.tokenizer
        if tokenizer is None:
            raise ValueError("a tokenizer is required when a bank is injected")
        self.bank = bank
        self.model = bank.model
        self.tokenizer = tokenizer
        self.telemetry = telemetry or LiveTelemetry()
        self.clock = clock
        self.prompts = prompts if prompts is not None else load_prompts(self.config.prompts, split=self.config.split)  # type: ignore[arg-type]
        # the runtime's decision path without a policy (the agent decides): same analysis,
        # observation and timed generation as AdaptiveLM and casrap serve
        self.router = Router(bank, tokenizer, policy=None, defaults=RuntimeDefaults(analysis_tokens=self.config.analysis_tokens),
                             telemetry=self.telemetry, clock=clock)
        self.analyzer: PromptAnalyzer = self.router.analyzer
        self.action_names = list(bank.names)
        self.action_space = spaces.Discrete(len(self.action_names))
        self.observation_space = spaces.Box(0.0, 1.0, shape=(len(OBSERVATION_FEATURES),), dtype=np.float32)
        self._baselines: dict[str, Baseline] = {}
        self._ids: dict[str, torch.Tensor] = {}
        self.prompts = self._fitting(self.prompts)
        self._prompt: Prompt | None = None
        self._features: PromptFeatures | None = None
        self._reading: TelemetryReading | None = None
        self._execution: Execution | None = None
        self._budget_ratio = float("inf")
        self._steps = 0
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    # ------------------------------------------------------------------ helpers
    def _fitting(self, prompts: list[Prompt]) -> list[Prompt]:
        """Drop prompts the context window cannot hold (logged), or fail if none fit."""
        kept = []
        for prompt in prompts:
            try:
                self._encode(prompt)
                kept.append(prompt)
            except InputError as err:
                log.warning("skipping prompt %s: %s", prompt.id, err)
        if not kept:
            raise InputError("no prompt fits the model's context window with max_new_tokens")
        return kept

    def _encode(self, prompt: Prompt) -> torch.Tensor:
        if prompt.id not in self._ids:
            ids = self.analyzer.encode(prompt.text)
            check_prompt_fits(self.model, int(ids.shape[1]), self.config.max_new_tokens)
            self._ids[prompt.id] = ids.to(next(self.model.parameters()).device)
        return self._ids[prompt.id]

    def _run_full(self, ids: torch.Tensor) -> tuple[float, float, torch.Tensor]:
        """The full model's timed generation through the Router (thread-aware execution, EOS ignored)."""
        n = self.config.max_new_tokens
        out = self.router.run(self.router.fixed_decision(FULL, ids, n), ids, n, ignore_eos=True).output
        return out.robust_latency_s, out.ttft_s, torch.tensor(out.token_ids, dtype=ids.dtype, device=ids.device)

    def baseline(self, prompt: Prompt, reading: TelemetryReading) -> Baseline:
        """Full-model answer and latency; latency re-measured if the load moved."""
        ids = self._encode(prompt)
        cached = self._baselines.get(prompt.id)
        if cached is not None and abs(reading.other_cpu_util - cached.cpu_util) <= self.config.rebaseline_cpu_delta:
            return cached
        self.bank.activate(FULL)
        latency, ttft, answer = self._run_full(ids)
        if cached is not None:
            answer, tf_ppl = cached.answer_ids, cached.tf_ppl
        else:
            tf_ppl = score_profiles(self.bank, ids, answer, [FULL], FULL)[FULL].ppl
        record = Baseline(answer, latency, ttft, tf_ppl, reading.other_cpu_util)
        self._baselines[prompt.id] = record
        return record

    def _observe(self) -> np.ndarray:
        assert self._reading is not None and self._features is not None
        ex = self._execution
        assert self._prompt is not None
        tokens = int(self._encode(self._prompt).shape[1])  # the templated prompt, as the Router counts it
        return self.router.observe(self._reading, tokens, self._features.ppl, self._budget_ratio,
                                   ex.slowdown if ex else 1.0, ex.thread_share if ex else 1.0)

    def _next_prompt(self, prompt: Prompt | None = None) -> None:
        self._prompt = prompt or self.prompts[int(self.np_random.integers(len(self.prompts)))]
        self._execution = self.router.prepare()  # telemetry, threads and slowdown, as a live decision sees them
        self._reading = self._execution.reading
        self._features = self.analyzer.analyze(self._prompt.text)
        self._encode(self._prompt)
        if self.config.reward.kind == "slo":
            lo, hi = self.config.reward.budget_range
            self._budget_ratio = float(self.np_random.uniform(lo, hi))
        else:
            self._budget_ratio = float("inf")

    # ---------------------------------------------------------------- gym API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        if seed is not None and hasattr(self.telemetry, "reseed"):
            self.telemetry.reseed(seed)
        if seed is not None:
            self.router.forget_slowdown()  # a seeded episode starts from a fresh measurement, as its first did
        self.bank.activate(FULL)
        self._steps = 0
        self._next_prompt((options or {}).get("prompt"))
        assert self._prompt is not None and self._features is not None
        return self._observe(), {"prompt_id": self._prompt.id, "prompt_tokens": self._features.tokens, "prompt_ppl": self._features.ppl, "complexity": self._features.complexity}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self._prompt is None or self._reading is None or self._features is None:
            raise RuntimeError("call reset() before step()")
        name = self.action_names[int(action)]
        prompt, reading, features = self._prompt, self._reading, self._features
        base = self.baseline(prompt, reading)
        ids = self._encode(prompt)
        answer = base.answer_ids
        n = self.config.max_new_tokens
        routed = self.router.run(self.router.fixed_decision(name, ids, n), ids, n, ignore_eos=True)  # switch, generate, restore
        switch_s, latency, ttft = routed.switch_s, routed.output.robust_latency_s, routed.output.ttft_s
        output = torch.tensor(routed.output.token_ids, dtype=ids.dtype, device=ids.device)
        if name == FULL:
            tf_ppl, kl = base.tf_ppl, 0.0
        else:  # one pass for the full model, one for the profile, along the full model's answer
            quality = score_profiles(self.bank, ids, answer, [name], FULL)[name]
            tf_ppl, kl = quality.ppl, quality.kl
        overhead = features.analysis_s + switch_s if self.config.count_router_overhead else 0.0
        total_latency = latency + overhead
        predicted_full = self.router.estimate_unloaded(int(ids.shape[1]), n)
        budget_s = predicted_full * self._budget_ratio
        reward_input = RewardInput(total_latency, base.latency_s, tf_ppl, base.tf_ppl, budget_s)
        reward, early_stop = compute_reward(reward_input, self.config.reward)
        n = self.config.max_new_tokens
        info: dict[str, Any] = {
            "prompt_id": prompt.id, "prompt_key": prompt.key, "category": prompt.category, "action": int(action), "profile": name,
            "prompt_tokens": features.tokens, "prompt_ppl": features.ppl, "complexity": features.complexity,
            "analysis_s": features.analysis_s, "switch_s": switch_s,
            "baseline_latency_s": base.latency_s, "baseline_ttft_s": base.ttft_s, "baseline_tokens_per_s": n / base.latency_s,
            "baseline_ppl": base.tf_ppl,
            "latency_s": total_latency, "generation_s": routed.output.generation_s, "robust_generation_s": latency,
            "decode_median_s": routed.output.decode_median_s, "ttft_s": ttft, "tokens_per_s": n / total_latency,
            "latency_source": "measured", "predicted_full_s": predicted_full,
            "ppl": tf_ppl, "kl": kl, "speedup": reward_input.speedup, "degradation": reward_input.degradation,
            "budget_s": budget_s if np.isfinite(budget_s) else None, "reward": reward,
            "telemetry": reading.to_dict(), "same_answer": bool(torch.equal(output.cpu(), answer.cpu())),
        }
        self._steps += 1
        terminated = early_stop or self._steps >= self.config.prompts_per_episode
        if not terminated:
            self._next_prompt()
        return self._observe(), float(reward), bool(terminated), False, info

    def close(self) -> None:
        self.bank.activate(FULL)
