"""``casrap loadtest``: the policy against the full model and every static profile, as a serving benchmark.

Protocol (docs/how-to/benchmark.md has the long form):

- **Prompts**: held-out prompts only - the fixed test split of the bundled set or of a
  user's CSV/JSONL (``source``, read by :func:`casrap.data.prompts.load_prompts` with the
  same split rules as everywhere) - ``prompts`` of them drawn with ``seed``.
- **Targets**: absolute, as a client would set them: the *unloaded* full model's
  predicted latency for the prompt length times a ratio drawn from ``budget_range``
  (default U(0.5, 3.0), the range the policies are trained on) by a generator seeded
  with ``seed`` and the prompt's text key. A prompt keeps its target at every load
  level: a client's deadline does not know how busy the server is.
- **Reference and quality**: one full-model run per prompt (before its levels) gives the
  full model's answer; quality is the KL divergence of each profile's next-token
  distributions from the full model's along that answer (teacher-forced, never the
  profile's own output). It does not depend on load, so it is computed once per prompt.
- **Sweep**: one pass. For each prompt, the load levels in an order rotated per prompt;
  for each level its background load (:func:`casrap.telemetry.load.background_for_level`:
  0, 1 or 2 processes burning a core, or ``bursty`` on a schedule seeded per prompt) is
  started, given ``settle_s`` to reach its duty, every runner (the policy, the full
  model, each static profile) answers with ``max_new_tokens`` tokens (EOS ignored, so
  latencies compare) in an order rotated per (prompt, level) step, and the load is
  stopped. Drift in the machine thus hits every level and runner alike.
- **Per level and runner**: SLO attainment (targets met / n), mean KL, p50/p90/p95/p99
  end-to-end latency, TTFT, time per output token (TPOT = (latency - TTFT) / (tokens - 1)),
  decision-overhead share, profiles used.
- **Policy vs statics, per level**: against the best static profile at that level and the
  best static profile overall (best = most targets met, ties to the lower mean KL),
  paired by prompt: mean difference in targets met and in KL, each with a 95% bootstrap
  interval over prompts. A static profile that meets at least as many targets with no
  more KL (and is better in one) *dominates* the policy; the verdict lines name it.

In-process by default; with ``url`` the runners' requests go to a running ``casrap
serve`` (its ``profile`` and ``ignore_eos`` request extensions), while the reference
and KL are still computed on the model loaded here.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from casrap.agents.evaluate import bootstrap_ci
from casrap.measure.quality import score_profiles
from casrap.profiles.catalogue import FULL
from casrap.runtime.adaptive import AdaptiveLM

POLICY = "policy"
TARGET_RULE = "target = predicted unloaded full-model latency x ratio, ratio ~ U(budget_range), seeded per prompt"


@dataclass
class LoadTestConfig:
    """Settings of one load test.

    Attributes:
        prompts: held-out prompts (test split of the bundled set, or of ``source``).
        max_new_tokens: tokens per request, EOS ignored.
        budget_range: targets as multiples of the predicted unloaded full-model latency.
        background_load: without ``load_levels``: CPU burn intensity of each background worker (0 = none).
        load_workers: without ``load_levels``: background worker processes.
        static: static profiles to compare (empty = every profile of the bundle).
        seed: prompt and target draws, bursty schedules, bootstrap.
        url: a running ``casrap serve`` to send the requests to.
        source: a prompts file (CSV/JSONL) or hub id for :func:`casrap.data.prompts.load_prompts`.
        load_levels: named levels to sweep (``0``, ``1``, ``2``, ``bursty``); empty = one level
            made of ``background_load`` x ``load_workers``.
        settle_s: seconds a started background load runs before the first request.
        resamples: bootstrap resamples over prompts.
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
    load_levels: list[str] = field(default_factory=list)
    settle_s: float = 1.0
    resamples: int = 2000


@dataclass
class RunnerRow:
    """One runner's figures over a set of requests (one level, or all levels pooled)."""

    name: str
    n: int
    targets_met: int
    slo_attainment: float
    mean_kl: float
    p50_s: float
    p90_s: float
    p95_s: float
    p99_s: float
    ttft_p50_s: float
    ttft_p90_s: float
    tpot_p50_s: float
    tpot_p90_s: float
    overhead_share: float
    profiles: dict[str, int]


@dataclass
class LevelResult:
    """Rows, comparisons and verdict lines of one load level (or of all levels pooled, level ``all``)."""

    level: str
    n: int
    rows: list[RunnerRow]
    best_static: str | None
    versus: dict[str, dict[str, Any]]  # "best_static_here" / "best_static_overall" -> paired comparison
    dominated_by: list[str]
    notes: list[str]

    def row(self, name: str) -> RunnerRow:
        return next(r for r in self.rows if r.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rows": [asdict(r) for r in self.rows]}


@dataclass
class LoadTestResult:
    n: int
    rows: list[RunnerRow]  # all levels pooled
    requests: list[dict[str, Any]]
    notes: list[str]
    config: dict[str, Any]
    levels: dict[str, LevelResult] = field(default_factory=dict)
    overall: LevelResult | None = None
    best_static_overall: str | None = None

    def row(self, name: str) -> RunnerRow:
        return next(r for r in self.rows if r.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "levels": list(self.levels), "rows": [asdict(r) for r in self.rows],
                "best_static_overall": self.best_static_overall,
                "overall": self.overall.to_dict() if self.overall else None,
                "by_level": {name: level.to_dict() for name, level in self.levels.items()},
                "targets": {"rule": TARGET_RULE, "budget_range": self.config.get("budget_range")},
                "notes": self.notes, "config": self.config, "requests": self.requests}


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


# ----------------------------------------------------------------- the protocol
def rotate(items: list[str], k: int) -> list[str]:
    """``items`` started at position ``k`` (mod its length)."""
    k %= max(len(items), 1)
    return items[k:] + items[:k]


def sweep_order(n_prompts: int, levels: list[str], runners: list[str]) -> list[tuple[int, str, list[str]]]:
    """Every (prompt, level, runner order) step of one sweep, in the order they run.

    Per prompt the levels start one later than for the previous prompt; the runner order
    rotates by one per step, so no runner always goes first, or always right after a
    load starts.
    """
    steps = []
    for i in range(n_prompts):
        for level in rotate(list(levels), i):
            steps.append((i, level, rotate(list(runners), len(steps))))
    return steps


def level_names(config: LoadTestConfig) -> list[str]:
    """The levels to sweep: ``load_levels``, else one level named after ``background_load`` x ``load_workers``."""
    if config.load_levels:
        from casrap.telemetry.load import parse_load_levels

        return parse_load_levels(",".join(config.load_levels))
    if config.background_load <= 0 or config.load_workers <= 0:
        return ["0"]
    if config.background_load == 1.0:
        return [str(config.load_workers)]
    return [f"{config.load_workers}x{config.background_load:g}"]


def background_for(config: LoadTestConfig, level: str, seed: int) -> Any:
    """An unstarted background load for ``level`` (named levels by the telemetry module's definition)."""
    from casrap.telemetry.load import LOAD_LEVELS, BackgroundLoad, background_for_level

    if config.load_levels or level in LOAD_LEVELS:
        return background_for_level(level, seed=seed)
    return BackgroundLoad(workers=config.load_workers, intensity=config.background_load)


def target_ratio(config: LoadTestConfig, prompt_key: str) -> float:
    """The prompt's target ratio: the same for a prompt whatever else is in the sample."""
    rng = np.random.default_rng([config.seed, int(prompt_key, 16)])
    return float(rng.uniform(*config.budget_range))


def choose_prompts(config: LoadTestConfig) -> list[Any]:
    """``config.prompts`` prompts of the test split of ``config.source``, drawn with the seed."""
    from casrap.data.prompts import load_prompts

    pool = load_prompts(config.source, split="test")
    rng = np.random.default_rng(config.seed)
    return [pool[i] for i in rng.choice(len(pool), min(config.prompts, len(pool)), replace=False)]


def _kl_per_profile(lm: AdaptiveLM, prompt: str, answer: list[int], profiles: list[str]) -> dict[str, float]:
    """KL(full || profile) along the full model's answer, per profile."""
    ids = lm.encode(prompt, max(len(answer), 1))
    scores = score_profiles(lm.router.bank, ids, torch.tensor(answer, dtype=ids.dtype), [FULL, *profiles], FULL)
    return {name: quality.kl for name, quality in scores.items()}


def request_record(rec: dict[str, Any], runner: str, prompt_id: str, level: str, target: float, ratio: float,
                   kl: float, reference_latency_s: float) -> dict[str, Any]:
    """One request's line in ``requests.jsonl``: end-to-end latency, TTFT, TPOT, target met, KL."""
    tokens = int(rec["completion_tokens"])
    wait = float(rec.get("queue_wait_s") or 0.0)
    ttft = float(rec["ttft_s"]) + wait
    return {
        "runner": runner, "level": level, "prompt_id": prompt_id, "profile": rec["profile"], "target_s": target,
        "budget_ratio": ratio, "latency_s": rec["latency_s"], "total_s": rec["total_s"], "ttft_s": ttft,
        "tpot_s": (float(rec["latency_s"]) - float(rec["ttft_s"])) / (tokens - 1) if tokens > 1 else float("nan"),
        "met": rec["total_s"] <= target, "kl": kl, "overhead_s": rec["decision_s"] + rec["switch_s"],
        **{k: rec[k] for k in ("telemetry_s", "analysis_s", "policy_s", "switch_s", "completion_tokens")},
        "reference_latency_s": reference_latency_s,
    }


def run_loadtest(
    lm: AdaptiveLM,
    config: LoadTestConfig,
    progress: Callable[[int, int], None] | None = None,
    on_request: Callable[[dict[str, Any]], None] | None = None,
    runner: Runner | None = None,
    background: Callable[[str, int], Any] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> LoadTestResult:
    """Run the protocol in the module docstring; returns per-level rows, comparisons and every request.

    ``on_request`` sees each request's record as soon as it is measured (the CLI appends
    it to ``requests.jsonl``), so an interrupted run keeps what it measured. ``runner``
    and ``background`` (level, seed -> an object with ``start``, ``stop``, ``workers``)
    replace the real requests and loads, for tests.
    """
    chosen = choose_prompts(config)
    statics = config.static or list(lm.profiles)
    runners = [POLICY, *statics]
    levels = level_names(config)
    run = runner or (http_runner(config.url, lm.model_name) if config.url else in_process_runner(lm))
    make_load = background or (lambda level, seed: background_for(config, level, seed))
    reference_run = in_process_runner(lm)
    n = config.max_new_tokens
    requests: list[dict[str, Any]] = []
    run(chosen[0].text, n, None, FULL)  # warm-up
    current, reference, target, ratio, kls = -1, {}, 0.0, 0.0, {}
    for i, level, order in sweep_order(len(chosen), levels, runners):
        prompt = chosen[i]
        if i != current:
            if progress and current >= 0:
                progress(current + 1, len(chosen))
            current = i
            reference = reference_run(prompt.text, n, None, FULL)
            ratio = target_ratio(config, prompt.key)
            target = lm.router.estimate_unloaded(int(reference["prompt_tokens"]), n) * ratio
            kls = _kl_per_profile(lm, prompt.text, reference["token_ids"], list(lm.profiles))
        load = make_load(level, config.seed * 100_003 + i)
        try:
            load.start()
            if getattr(load, "workers", 0) and config.settle_s > 0:
                sleep(config.settle_s)
            for name in order:
                rec = run(prompt.text, n, target, None if name == POLICY else name)
                requests.append(request_record(rec, name, prompt.id, level, target, ratio, kls[rec["profile"]],
                                               float(reference["latency_s"])))
                if on_request:
                    on_request(requests[-1])
        finally:
            load.stop()
    if progress:
        progress(len(chosen), len(chosen))
    return summarise(requests, runners, levels, len(chosen),
                     {**asdict(config), "budget_range": list(config.budget_range), "levels": levels}, config.resamples, config.seed)


# ------------------------------------------------------------------- statistics
def _percentile(values: list[float], q: float) -> float:
    values = [v for v in values if np.isfinite(v)]
    return float(np.percentile(values, q)) if values else float("nan")


def runner_rows(requests: list[dict[str, Any]], runners: list[str]) -> list[RunnerRow]:
    """Per-runner figures over ``requests`` (one level's, or all)."""
    rows = []
    for name in runners:
        mine = [r for r in requests if r["runner"] == name]
        total = [r["total_s"] for r in mine]
        ttft = [r["ttft_s"] for r in mine]
        tpot = [r["tpot_s"] for r in mine]
        met = sum(bool(r["met"]) for r in mine)
        rows.append(RunnerRow(
            name=name, n=len(mine), targets_met=met, slo_attainment=met / len(mine) if mine else float("nan"),
            mean_kl=statistics.fmean(r["kl"] for r in mine) if mine else float("nan"),
            p50_s=_percentile(total, 50), p90_s=_percentile(total, 90), p95_s=_percentile(total, 95), p99_s=_percentile(total, 99),
            ttft_p50_s=_percentile(ttft, 50), ttft_p90_s=_percentile(ttft, 90),
            tpot_p50_s=_percentile(tpot, 50), tpot_p90_s=_percentile(tpot, 90),
            overhead_share=statistics.fmean(r["overhead_s"] / r["latency_s"] for r in mine if r["latency_s"] > 0) if mine else 0.0,
            profiles=dict(Counter(r["profile"] for r in mine)),
        ))
    return rows


def best_static(rows: list[RunnerRow]) -> str | None:
    """The static runner meeting the most targets; ties go to the lower mean KL."""
    statics = [r for r in rows if r.name != POLICY and r.n]
    return min(statics, key=lambda r: (-r.targets_met, r.mean_kl)).name if statics else None


def dominating(rows: list[RunnerRow]) -> list[RunnerRow]:
    """Static runners meeting at least as many targets with no more mean KL, and better in one."""
    policy = next(r for r in rows if r.name == POLICY)
    return [r for r in rows if r.name != POLICY and r.targets_met >= policy.targets_met and r.mean_kl <= policy.mean_kl
            and (r.targets_met > policy.targets_met or r.mean_kl < policy.mean_kl)]


def paired_difference(requests: list[dict[str, Any]], other: str, resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Policy minus ``other``, paired by (prompt, level): targets met (share) and KL, 95% CIs over prompts."""
    by_key: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for r in requests:
        if r["runner"] in (POLICY, other):
            by_key.setdefault((str(r["prompt_id"]), r["level"]), {})[r["runner"]] = r
    pairs = [(key[0], d[POLICY], d[other]) for key, d in by_key.items() if POLICY in d and other in d]
    if not pairs:
        return {"against": other, "n_pairs": 0, "n_prompts": 0}
    groups = np.array([p for p, _, _ in pairs])
    met = np.array([float(a["met"]) - float(b["met"]) for _, a, b in pairs])
    kl = np.array([a["kl"] - b["kl"] for _, a, b in pairs])
    return {"against": other, "n_pairs": len(pairs), "n_prompts": int(len(np.unique(groups))),
            "targets_met_diff": float(met.mean()), "targets_met_diff_ci95": bootstrap_ci(met, groups, resamples, seed),
            "kl_diff": float(kl.mean()), "kl_diff_ci95": bootstrap_ci(kl, groups, resamples, seed)}


def _ci(value: float, ci: list[float], digits: int = 2) -> str:
    return f"{value:+.{digits}f} [{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]"


def level_result(requests: list[dict[str, Any]], runners: list[str], level: str, overall_best: str | None,
                 resamples: int = 2000, seed: int = 0) -> LevelResult:
    """Rows, paired comparisons and verdict lines of one level (``level="all"``: every request)."""
    mine = requests if level == "all" else [r for r in requests if r["level"] == level]
    rows = runner_rows(mine, runners)
    n = len({r["prompt_id"] for r in mine})
    best = best_static(rows)
    versus = {}
    if best is not None:
        versus["best_static_here"] = paired_difference(mine, best, resamples, seed)
    if overall_best is not None:
        versus["best_static_overall"] = paired_difference(mine, overall_best, resamples, seed)
    rivals = dominating(rows)
    policy = next(r for r in rows if r.name == POLICY)
    where = "all levels" if level == "all" else f"load {level}"
    notes = [f"{where}: policy met {policy.targets_met}/{policy.n} targets at mean KL {policy.mean_kl:.3f}"
             + (f"; full model {rows[runners.index(FULL)].targets_met}/{policy.n} at KL 0" if FULL in runners else "") + "."]
    same = best == overall_best
    for key, label in (("best_static_here", "best static here" + (" and overall" if same else "")), ("best_static_overall", "best static overall")):
        d = versus.get(key)
        if d and d["n_pairs"] and not (same and key == "best_static_overall"):
            row = next(r for r in rows if r.name == d["against"])
            notes.append(f"{where}: vs {label} {d['against']} ({row.targets_met}/{row.n}, KL {row.mean_kl:.3f}): policy minus it, "
                         f"targets met {_ci(d['targets_met_diff'], d['targets_met_diff_ci95'])}, "
                         f"KL {_ci(d['kl_diff'], d['kl_diff_ci95'], 3)} (95% CI over {d['n_prompts']} prompts).")
    if rivals:
        notes.append(f"{where}: the policy is DOMINATED by " + ", ".join(f"{r.name} ({r.targets_met}/{r.n}, KL {r.mean_kl:.3f})" for r in rivals)
                     + ": as many or more targets met with no more quality loss.")
    else:
        notes.append(f"{where}: no static profile dominates the policy (none meets as many targets with no more quality loss).")
    return LevelResult(level, n, rows, best, versus, [r.name for r in rivals], notes)


def summarise(requests: list[dict[str, Any]], runners: list[str], levels: list[str], n_prompts: int,
              config: dict[str, Any], resamples: int = 2000, seed: int = 0) -> LoadTestResult:
    """Every figure of a load test from its request records (so a saved ``requests.jsonl`` can be re-read)."""
    pooled = runner_rows(requests, runners)
    overall_best = best_static(pooled)
    per_level = {level: level_result(requests, runners, level, overall_best, resamples, seed) for level in levels}
    overall = level_result(requests, runners, "all", overall_best, resamples, seed)
    result = LoadTestResult(n_prompts, pooled, requests, [], config, per_level, overall, overall_best)
    policy = result.row(POLICY)
    notes = [line for level in per_level.values() for line in level.notes]
    if len(levels) > 1:
        notes += overall.notes
    notes.append(f"decision overhead (telemetry + analysis + policy + switch): {100 * policy.overhead_share:.1f}% of the policy's request latency.")
    result.notes = notes
    return result


def plot_result(result: LoadTestResult, path: Path) -> Path:
    """One panel per load level: share of targets met (x) against mean KL (y), one point per runner; the policy is the star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = list(result.levels.values())
    fig, axes = plt.subplots(1, len(levels), figsize=(4.5 * len(levels), 4), squeeze=False)
    for ax, level in zip(axes[0], levels):
        for row in level.rows:
            x, y = row.targets_met / max(row.n, 1), row.mean_kl
            if row.name == POLICY:
                ax.scatter(x, y, marker="*", s=220, color="crimson", zorder=3, label="policy")
            else:
                dominated = row.name in level.dominated_by
                ax.scatter(x, y, marker="s" if row.name == FULL else "o", s=50, color="black" if dominated else "tab:blue")
            ax.annotate(row.name, (x, y), fontsize=8, xytext=(3, 3), textcoords="offset points")
        ax.set_xlim(-0.05, 1.05)
        ax.set_xlabel("share of latency targets met")
        ax.set_ylabel("mean KL vs full model (nats/token)")
        verdict = "policy dominated" if level.dominated_by else "policy undominated"
        ax.set_title(f"load {level.level}: {level.n} prompts, {verdict}", fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle("casrap loadtest (black: static profiles that dominate the policy)", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
