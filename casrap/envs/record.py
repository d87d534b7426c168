"""``casrap record``: a replay recording at scale — hundreds of prompts x load levels x profiles.

Measuring every (prompt, load, profile) generation would take days on 2 cores; most of
it is not needed, because the figures split into two kinds:

- **Quality** (teacher-forced perplexity and KL of the full model's answer under each
  profile) does not depend on the machine's load: it is measured once per prompt and
  profile, for every prompt (:func:`quality_pass`).
- **Latency** depends on the profile, the load and the prompt length, and little else.
  It is *measured* on a subset of prompts at every load level — profiles interleaved
  in a rotating order within each (prompt, load) context, so the full model's baseline
  shares the candidate's load context — and *modelled* for the others by a
  per-(profile, load) :class:`~casrap.measure.latency_model.LatencyFit` of TTFT and the
  median decode step (:func:`timing_pass`, :func:`build_records`). Every record says
  whether its latency was measured or modelled, and the header holds each fit's
  leave-one-prompt-out error on measured contexts it was not fitted on.

Telemetry is read just before each measured decision (as the router does, right after
the previous generation); a modelled context takes a reading measured at its load
level. Both passes append to JSONL files in a work folder as they go, so an
interrupted recording resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from casrap.data.prompts import Prompt, load_prompts
from casrap.envs.analysis import PromptAnalyzer
from casrap.measure.latency_model import LatencyFit, LatencySample, cpu_name, fit_latency, fit_line, grouped_holdout_error
from casrap.profiles.catalogue import FULL
from casrap.runtime.generation import generate_timed

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]


@dataclass
class RecordConfig:
    """What a recording covers.

    Attributes:
        train_prompts / test_prompts: how many prompts of each fixed split (spread
            evenly over the file, so every template and source is represented).
        loads: background load levels, as numbers of CPU-burning worker processes.
        timed_prompts: prompts whose latency is measured at every load level (half
            from each split); the rest is modelled.
        max_new_tokens: answer length (EOS ignored, so latencies compare); every latency
            in the file is TTFT + (max_new_tokens - 1) x the median decode step.
        timing_tokens: new tokens per *timed* generation (default: max_new_tokens); fewer
            keep loaded timing affordable — under load a decode step on 2 cores can take
            ten times longer — and the median decode step still comes from several steps.
        analysis_tokens: leading prompt tokens the router scores (its overhead is counted).
        settle_s: seconds to let a new background load level settle before timing.
    """

    train_prompts: int = 160
    test_prompts: int = 60
    loads: tuple[int, ...] = (0, 1, 2)
    timed_prompts: int = 8
    max_new_tokens: int = 32
    timing_tokens: int | None = None
    analysis_tokens: int = 64
    settle_s: float = 3.0


def spread(items: list[Prompt], n: int) -> list[Prompt]:
    """``n`` items evenly spaced through ``items`` (deterministic, no seed)."""
    if n >= len(items):
        return list(items)
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def select_prompts(config: RecordConfig, source: str | None = None) -> list[Prompt]:
    return spread(load_prompts(source, split="train"), config.train_prompts) + spread(load_prompts(source, split="test"), config.test_prompts)


def timed_subset(prompts: list[Prompt], n: int) -> list[Prompt]:
    """Half train, half test prompts, spread by prompt length so the fits see short and long ones."""
    out: list[Prompt] = []
    for split in ("train", "test"):
        pool = sorted((p for p in prompts if p.split == split), key=lambda p: (len(p.text), p.key))
        out += spread(pool, (n + (split == "train")) // 2)
    return out


def _append(path: Path, row: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut by an interruption: measured again
            continue
    return rows


@torch.inference_mode()
def quality_pass(bank: Any, tokenizer: Any, prompts: list[Prompt], profiles: list[str], config: RecordConfig,
                 path: Path, progress: Progress | None = None) -> dict[str, dict[str, Any]]:
    """Per prompt: the full model's answer, and each profile's teacher-forced ppl and KL on it.

    One forward pass per profile scores both (the answer's tokens for perplexity, the
    full model's next-token distributions at the same positions for KL).
    """
    done = {r["prompt_key"]: r for r in _read_rows(path)}  # the last row of a prompt wins (rows grow as profiles are added)
    analyzer = PromptAnalyzer(bank.model, tokenizer, max_tokens=config.analysis_tokens)
    device = next(bank.model.parameters()).device
    for i, prompt in enumerate(prompts):
        previous = done.get(prompt.key)
        missing = [p for p in profiles if previous is None or p not in previous["ppl"]]
        if not missing:
            if progress:
                progress(i + 1, len(prompts))
            continue
        bank.activate(FULL)
        features = analyzer.analyze(prompt.text)
        ids = analyzer.encode(prompt.text).to(device)
        if previous is not None and len(previous["answer"]) == config.max_new_tokens:
            answer = list(previous["answer"])
        else:
            answer = generate_timed(bank.model, tokenizer, ids, config.max_new_tokens, ignore_eos=True).token_ids
            previous, missing = None, list(profiles)
        seq = torch.cat([ids[0], torch.tensor(answer, dtype=ids.dtype, device=device)]).unsqueeze(0)
        start = ids.shape[1] - 1
        targets = seq[0, ids.shape[1]:]
        full_lp = None
        ppl = dict(previous["ppl"]) if previous else {}
        kl = dict(previous["kl"]) if previous else {}
        for name in [FULL, *[p for p in missing if p != FULL]]:
            with bank.using(name):
                lp = F.log_softmax(bank.model(seq, use_cache=False).logits.float()[0, start:-1], dim=-1)
            if full_lp is None:
                full_lp = lp
            ppl[name] = float(torch.exp(-lp.gather(1, targets.unsqueeze(1)).mean()))
            kl[name] = float((full_lp.exp() * (full_lp - lp)).sum(-1).mean().clamp_min(0.0))
        row = {"prompt_id": prompt.id, "prompt_key": prompt.key, "split": prompt.split, "category": prompt.category,
               "prompt_tokens": features.tokens, "input_tokens": int(ids.shape[1]), "prompt_ppl": features.ppl,
               "answer": answer, "ppl": ppl, "kl": kl}
        _append(path, row)
        done[prompt.key] = row
        if progress:
            progress(i + 1, len(prompts))
    return {p.key: done[p.key] for p in prompts}


def timing_pass(bank: Any, tokenizer: Any, prompts: list[Prompt], profiles: list[str], config: RecordConfig, path: Path,
                telemetry: Any, load_factory: Callable[[int], Any] | None, progress: Progress | None = None) -> list[dict[str, Any]]:
    """Measure every profile on ``prompts`` at every load level, profiles interleaved per context.

    ``load_factory(workers)`` starts a background load (a context manager) or returns
    None for zero workers. Telemetry is read before every generation; the reading
    taken before a context's first generation is the context's observation.
    """
    rows = _read_rows(path)
    done = {(r["prompt_key"], r["load"], r["profile"]) for r in rows}
    analyzer = PromptAnalyzer(bank.model, tokenizer, max_tokens=config.analysis_tokens)
    device = next(bank.model.parameters()).device
    total = len(config.loads) * len(prompts) * len(profiles)
    count = len(done)
    for load in config.loads:
        if all((p.key, load, name) in done for p in prompts for name in profiles):
            continue
        background = load_factory(load) if (load_factory and load > 0) else None
        try:
            if background is not None:
                background.__enter__()
            time.sleep(config.settle_s if load > 0 else 0.0)
            bank.activate(FULL)
            warm = analyzer.encode(prompts[0].text).to(device)
            for name in profiles:  # one untimed pass per profile at this load: caches and allocator warm
                with bank.using(name):
                    generate_timed(bank.model, tokenizer, warm, 4, ignore_eos=True)
            telemetry.read()
            for j, prompt in enumerate(prompts):
                ids = analyzer.encode(prompt.text).to(device)
                order = profiles[j % len(profiles):] + profiles[: j % len(profiles)]  # rotate who goes first
                context_reading = None
                for name in order:
                    if (prompt.key, load, name) in done:
                        continue
                    reading = telemetry.read()
                    context_reading = context_reading or reading
                    analyzer._cache.pop(prompt.text, None)
                    bank.activate(FULL)
                    features = analyzer.analyze(prompt.text)  # the router's overhead, timed under this load
                    t0 = time.perf_counter()
                    bank.activate(name)
                    switch_s = time.perf_counter() - t0
                    try:
                        out = generate_timed(bank.model, tokenizer, ids, config.timing_tokens or config.max_new_tokens, ignore_eos=True)
                    finally:
                        bank.activate(FULL)
                    row = {"prompt_key": prompt.key, "prompt_id": prompt.id, "split": prompt.split, "load": load, "profile": name,
                           "input_tokens": int(ids.shape[1]), "ttft_s": out.ttft_s, "decode_s": out.decode_median_s,
                           "generation_s": out.generation_s, "new_tokens": len(out.token_ids), "analysis_s": features.analysis_s,
                           "switch_s": switch_s, "telemetry": reading.to_dict(), "context_telemetry": context_reading.to_dict(),
                           "at": time.time()}
                    _append(path, row)
                    rows.append(row)
                    done.add((prompt.key, load, name))
                    count += 1
                    if progress:
                        progress(count, total)
        finally:
            if background is not None:
                background.__exit__(None, None, None)
    return rows


@dataclass
class LatencyModels:
    """Per (profile, load) fits of generation latency, and per load of the router's analysis cost."""

    fits: dict[str, dict[str, LatencyFit]] = field(default_factory=dict)  # load -> profile -> fit
    errors: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # load -> profile -> LOO error
    analysis: dict[str, tuple[float, float]] = field(default_factory=dict)  # load -> (intercept, slope per token)
    switch_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"fits": {ld: {p: f.to_dict() for p, f in by.items()} for ld, by in self.fits.items()},
                "loo_errors": self.errors, "analysis": self.analysis, "switch_s": self.switch_s}


def fit_models(rows: list[dict[str, Any]], new_tokens: int) -> LatencyModels:
    models = LatencyModels()
    for load in sorted({str(r["load"]) for r in rows}, key=float):
        at = [r for r in rows if str(r["load"]) == load]
        models.fits[load], models.errors[load] = {}, {}
        for name in sorted({r["profile"] for r in at}):
            mine = [r for r in at if r["profile"] == name]
            samples = [LatencySample(r["input_tokens"], r["ttft_s"], r["decode_s"], r["new_tokens"]) for r in mine]
            models.fits[load][name] = fit_latency(samples)
            models.errors[load][name] = grouped_holdout_error(samples, [r["prompt_key"] for r in mine], new_tokens)
        models.analysis[load] = fit_line(np.array([float(min(r["input_tokens"], 64)) for r in at]),
                                         np.array([float(r["analysis_s"]) for r in at]))
    models.switch_s = statistics.median(float(r["switch_s"]) for r in rows) if rows else 0.0
    return models


def _pick(readings: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """A measured reading for a modelled context, chosen by the prompt key (stable, no seed)."""
    return readings[int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) % len(readings)]


def build_records(quality: dict[str, dict[str, Any]], timing: list[dict[str, Any]], profiles: list[str],
                  models: LatencyModels, config: RecordConfig) -> Iterator[dict[str, Any]]:
    """One replay record per (prompt, load, profile): measured latency where timed, else modelled."""
    n = config.max_new_tokens
    measured = {(r["prompt_key"], str(r["load"]), r["profile"]): r for r in timing}
    readings = {ld: [r["telemetry"] for r in timing if str(r["load"]) == ld] for ld in models.fits}  # every measured reading
    unloaded = models.fits[min(models.fits, key=float)][FULL]  # the lowest load level: 0 background workers
    for key, q in quality.items():
        predicted_full = unloaded.predict(q["input_tokens"], n)
        for load in models.fits:
            timed = [measured.get((key, load, p)) for p in profiles]
            if all(timed):
                latency = {p: r["ttft_s"] + (n - 1) * r["decode_s"] + r["analysis_s"] + r["switch_s"] for p, r in zip(profiles, timed)}
                source, telemetry = "measured", timed[0]["context_telemetry"]  # type: ignore[index]
            else:
                a, b = models.analysis[load]
                analysis = max(a + b * min(q["prompt_tokens"], 64), 0.0)
                latency = {p: models.fits[load][p].predict(q["input_tokens"], n) + analysis + models.switch_s for p in profiles}
                source, telemetry = "modelled", _pick(readings[load], key)
            telemetry = {k: round(float(v), 3) for k, v in telemetry.items()}  # a few MB for the whole file
            for p in profiles:
                yield {
                    "prompt_id": q["prompt_id"], "prompt_key": key, "split": q["split"], "category": q["category"], "load": int(load),
                    "profile": p, "latency_s": round(latency[p], 5), "latency_source": source,
                    "baseline_latency_s": round(latency[FULL], 5), "predicted_full_s": round(predicted_full, 5),
                    "ppl": round(q["ppl"][p], 5), "kl": round(q["kl"][p], 6), "baseline_ppl": round(q["ppl"][FULL], 5),
                    "prompt_tokens": q["prompt_tokens"], "input_tokens": q["input_tokens"], "prompt_ppl": round(q["prompt_ppl"], 4),
                    "telemetry": telemetry,
                }


def recording_header(model: str, bank: Any, profiles: list[str], config: RecordConfig, models: LatencyModels,
                     quality: dict[str, dict[str, Any]], timing: list[dict[str, Any]], durations: dict[str, float]) -> dict[str, Any]:
    import transformers

    import casrap

    cpu = cpu_name()
    splits = [q["split"] for q in quality.values()]
    return {
        "model": model, "fingerprint": bank.fingerprint, "profiles": profiles, "max_new_tokens": config.max_new_tokens,
        "descriptions": {n: bank.profile(n).plan.description for n in profiles},
        "machine": {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(),
                    "threads": torch.get_num_threads(), "device": str(next(bank.model.parameters()).device)},
        "versions": {"casrap": casrap.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "config": asdict(config), "prompts": {"train": splits.count("train"), "test": splits.count("test")},
        "loads": {"unit": "background worker processes, each burning one core at 100% duty",
                  "levels": sorted({int(r["load"]) for r in timing})},
        "how_measured": {
            "quality": "teacher-forced ppl and mean KL of the full model's greedy answer (max_new_tokens, EOS ignored) under each "
                       "profile, one forward pass per prompt and profile, measured for every prompt (load-independent)",
            "latency": "TTFT + (max_new_tokens - 1) x median decode step (timed generations may be shorter: timing_tokens) + the router's prompt analysis + profile switch; "
                       "'measured' records were timed with profiles interleaved in a rotating order per (prompt, load) context; "
                       "'modelled' records use the per-(profile, load) fit in latency_models, whose leave-one-prompt-out "
                       "relative error on measured contexts is loo_errors",
            "telemetry": "read just before each measured decision; a modelled context takes a reading measured at its load level",
            "predicted_full_s": "the unloaded (load 0) full-model fit at this prompt length: latency targets are multiples of it",
        },
        "timed_prompts": sorted({r["prompt_key"] for r in timing}),
        "latency_models": models.to_dict(), "durations_s": durations,
    }
