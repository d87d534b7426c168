"""``casrap loadtest``: the policy against the full model and every static profile, under load.

Protocol (per held-out prompt, test split only): a *reference* full-model run gives
the full model's answer; the prompt's target is an absolute one, as a client would
set it: the *unloaded* full model's predicted latency for this prompt length
(:class:`casrap.measure.latency_model.UnloadedLatencyModel`) times a ratio drawn
(seeded) from ``budget_range``; then every runner (the policy,
the full model again, each static profile) answers the same prompt with a fixed
number of new tokens (EOS ignored, so latencies compare), in an order rotated per
prompt so that drift in machine load hits every runner alike. Quality is the KL
divergence of each profile's next-token distributions from the full model's, along
the full model's own answer (teacher-forced) - never the profile's own output.
Background CPU load (:class:`casrap.telemetry.load.BackgroundLoad`) runs throughout.

In-process by default; with ``url`` the runners' requests go to a running
``casrap serve`` (its ``profile`` and ``ignore_eos`` request extensions), while KL is
still computed on the model loaded here.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from casrap.measure.perplexity import mean_kl, next_token_logits
from casrap.runtime.adaptive import AdaptiveLM

POLICY = "policy"


@dataclass
class LoadTestConfig:
    """Settings of one load test.

    Attributes:
        prompts: held-out prompts (test split of the bundled set, or ``source``).
        max_new_tokens: tokens per request, EOS ignored.
        budget_range: targets as multiples of the predicted unloaded full-model latency.
        background_load: CPU burn intensity of each background worker (0 = none).
        load_workers: background worker processes.
        static: static profiles to compare (empty = every profile of the bundle).
        seed: prompt and target draws.
        url: a running ``casrap serve`` to send the requests to.
        source: prompt source for :func:`casrap.data.prompts.load_prompts`.
    """

    prompts: int = 8
    max_new_tokens: int = 32
    budget_range: tuple[float, float] = (0.5, 3.0)
    background_load: float = 1.0
    load_workers: int = 1
    static: list[str] = field(default_factory=list)
    seed: int = 0
    url: str | None = None
    source: str | None = None


@dataclass
class RunnerRow:
    name: str
    n: int
    targets_met: int
    p50_s: float
    p95_s: float
    mean_kl: float
    overhead_share: float
    profiles: dict[str, int]


@dataclass
class LoadTestResult:
    n: int
    rows: list[RunnerRow]
    requests: list[dict[str, Any]]
    notes: list[str]
    config: dict[str, Any]

    def row(self, name: str) -> RunnerRow:
        return next(r for r in self.rows if r.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "rows": [asdict(r) for r in self.rows], "notes": self.notes, "config": self.config,
                "requests": self.requests}


Runner = Callable[[str, int, "float | None", "str | None"], dict[str, Any]]


def in_process_runner(lm: AdaptiveLM) -> Runner:
    def run(prompt: str, n: int, target: float | None, profile: str | None) -> dict[str, Any]:
        result = lm.generate(prompt, n, target, ignore_eos=True, profile=profile)
        return {**result.record.to_dict(), "token_ids": result.token_ids}

    return run


def http_runner(url: str, model_id: str) -> Runner:
    import httpx

    client = httpx.Client(base_url=url.rstrip("/"), timeout=600)

    def run(prompt: str, n: int, target: float | None, profile: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model_id, "messages": [{"role": "user", "content": prompt}], "max_tokens": n,
                                "ignore_eos": True}
        if target is not None:
            body["latency_target_ms"] = 1000 * target
        if profile is not None:
            body["profile"] = profile
        path = "/chat/completions" if url.rstrip("/").endswith("/v1") else "/v1/chat/completions"
        response = client.post(path, json=body)
        response.raise_for_status()
        return dict(response.json()["casrap"])

    return run


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


@torch.inference_mode()
def _kl_per_profile(lm: AdaptiveLM, prompt: str, answer: list[int], profiles: list[str]) -> dict[str, float]:
    """KL(full || profile) along the full model's answer, per profile."""
    bank = lm.router.bank
    ids = lm.encode(prompt, max(len(answer), 1))
    seq = torch.cat([ids[0], torch.tensor(answer, dtype=ids.dtype)]).unsqueeze(0)
    start = ids.shape[1] - 1
    with bank.using("none"):
        full = next_token_logits(bank.model, seq)[start:-1]
    kls = {"none": 0.0}
    for name in profiles:
        if name == "none":
            continue
        with bank.using(name):
            kls[name] = mean_kl(full, next_token_logits(bank.model, seq)[start:-1])
    return kls


def run_loadtest(
    lm: AdaptiveLM,
    config: LoadTestConfig,
    progress: Callable[[int, int], None] | None = None,
    on_request: Callable[[dict[str, Any]], None] | None = None,
) -> LoadTestResult:
    """Run the protocol in the module docstring; returns per-runner rows and every request.

    ``on_request`` sees each request's record as soon as it is measured (the CLI appends
    it to ``requests.jsonl``), so an interrupted run keeps what it measured.
    """
    from casrap.data.prompts import load_prompts
    from casrap.telemetry.load import BackgroundLoad

    rng = np.random.default_rng(config.seed)
    pool = load_prompts(config.source, split="test")
    chosen = [pool[i] for i in rng.choice(len(pool), min(config.prompts, len(pool)), replace=False)]
    statics = config.static or list(lm.profiles)
    runners = [POLICY, *statics]
    run = http_runner(config.url, lm.model_name) if config.url else in_process_runner(lm)
    n = config.max_new_tokens
    background = BackgroundLoad(workers=config.load_workers, intensity=config.background_load) if config.background_load > 0 else None
    requests: list[dict[str, Any]] = []
    try:
        if background:
            background.start()
        run(chosen[0].text, n, None, "none")  # warm-up
        for i, prompt in enumerate(chosen):
            reference = in_process_runner(lm)(prompt.text, n, None, "none")
            ratio = float(rng.uniform(*config.budget_range))
            target = lm.router.estimate_unloaded(int(reference["prompt_tokens"]), n) * ratio
            kls = _kl_per_profile(lm, prompt.text, reference["token_ids"], list(lm.profiles))
            order = runners[i % len(runners):] + runners[: i % len(runners)]
            for name in order:
                rec = run(prompt.text, n, target, None if name == POLICY else name)
                requests.append({
                    "runner": name, "prompt_id": prompt.id, "profile": rec["profile"], "target_s": target, "budget_ratio": ratio,
                    "latency_s": rec["latency_s"], "total_s": rec["total_s"], "met": rec["total_s"] <= target,
                    "kl": kls[rec["profile"]], "overhead_s": rec["decision_s"] + rec["switch_s"],
                    **{k: rec[k] for k in ("telemetry_s", "analysis_s", "policy_s", "switch_s", "completion_tokens")},
                    "reference_latency_s": reference["latency_s"],
                })
                if on_request:
                    on_request(requests[-1])
            if progress:
                progress(i + 1, len(chosen))
    finally:
        if background:
            background.stop()
    rows = []
    for name in runners:
        mine = [r for r in requests if r["runner"] == name]
        latencies = [r["total_s"] for r in mine]
        rows.append(RunnerRow(
            name=name, n=len(mine), targets_met=sum(r["met"] for r in mine), p50_s=_percentile(latencies, 50),
            p95_s=_percentile(latencies, 95), mean_kl=statistics.fmean(r["kl"] for r in mine) if mine else float("nan"),
            overhead_share=statistics.fmean(r["overhead_s"] / r["latency_s"] for r in mine) if mine else 0.0,
            profiles=dict(Counter(r["profile"] for r in mine)),
        ))
    result = LoadTestResult(len(chosen), rows, requests, [], {**asdict(config), "budget_range": list(config.budget_range)})
    result.notes = verdict(result)
    return result


def verdict(result: LoadTestResult) -> list[str]:
    """The issue's question, answered from the rows: more targets than the full model, less loss than equals."""
    policy = result.row(POLICY)
    full = result.row("none") if any(r.name == "none" for r in result.rows) else None
    notes = []
    if full is not None:
        better = "more than" if policy.targets_met > full.targets_met else ("as many as" if policy.targets_met == full.targets_met else "fewer than")
        notes.append(f"policy met {policy.targets_met}/{policy.n} targets, {better} the full model ({full.targets_met}/{full.n}).")
    rivals = [r for r in result.rows if r.name not in (POLICY, "none") and r.targets_met >= policy.targets_met]
    if rivals:
        worse = [r for r in rivals if r.mean_kl <= policy.mean_kl]
        if worse:
            notes.append("static profiles meeting at least as many targets with no more quality loss: "
                         + ", ".join(f"{r.name} ({r.targets_met}, KL {r.mean_kl:.3f})" for r in worse)
                         + f" - the policy (KL {policy.mean_kl:.3f}) does not beat them here.")
        else:
            notes.append(f"every static profile meeting at least as many targets loses more quality than the policy (KL {policy.mean_kl:.3f} vs "
                         + ", ".join(f"{r.name} {r.mean_kl:.3f}" for r in rivals) + ").")
    notes.append(f"decision overhead (telemetry + analysis + policy + switch): {100 * policy.overhead_share:.1f}% of the policy's request latency.")
    return notes


def plot_result(result: LoadTestResult, path: Path) -> Path:
    """Targets met (x) against quality loss (y), one point per runner."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in result.rows:
        ax.scatter(row.targets_met / max(row.n, 1), row.mean_kl, marker="*" if row.name == POLICY else "o", s=120 if row.name == POLICY else 40)
        ax.annotate(row.name, (row.targets_met / max(row.n, 1), row.mean_kl), fontsize=8, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("share of latency targets met")
    ax.set_ylabel("KL vs full model (nats/token)")
    ax.set_title(f"casrap loadtest, {result.n} held-out prompts")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
