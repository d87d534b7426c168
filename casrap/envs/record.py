"""``casrap record``: the replay recording — prompts x load levels x profiles, every latency measured.

- **Quality** (teacher-forced perplexity and KL of the full model's answer under each
  profile) does not depend on the machine's load: it is measured once per prompt and
  profile (:func:`quality_pass`).
- **Latency** is measured for every (prompt, load level, profile) (:func:`timing_pass`):
  TTFT plus the median decode step per further token, timed through the Router — so under
  the same thread-aware execution that serves (threads set from telemetry before each
  generation, OpenMP waiting passively) — with profiles interleaved in a rotating order
  within each (prompt, load) context. Load levels are switched every few prompts by two
  long-lived background workers (:class:`casrap.telemetry.load.LoadLevels`: ``0``, ``1``,
  ``2`` busy cores, and ``bursty``), so an interrupted recording holds every level for the
  prompts it finished. At the start of each context the Router's slowdown probe runs, and
  the reading, thread count and slowdown taken then are the context's observation.

Both passes append to JSONL files in a work folder as they go: an interrupted recording
resumes where it stopped, without re-measuring what is done. A replay file is written
from the contexts whose every profile was measured; each record says ``latency_source:
measured``.
"""

from __future__ import annotations

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

import torch

from casrap.data.prompts import Prompt, load_prompts
from casrap.decide.analysis import PromptAnalyzer
from casrap.decide.latency_model import LatencyFit, LatencySample, cpu_name, fit_latency
from casrap.measure.quality import score_profiles
from casrap.profiles.catalogue import FULL
from casrap.decide.generation import generate_timed

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]


@dataclass
class RecordConfig:
    """What a recording covers.

    Attributes:
        train_prompts / test_prompts: how many prompts of each fixed split (spread
            evenly over the file, so every template and source is represented).
        loads: background load levels (:data:`casrap.telemetry.load.LOAD_LEVELS`).
        max_new_tokens: answer length (EOS ignored, so latencies compare); every latency
            in the file is TTFT + (max_new_tokens - 1) x the median decode step.
        timing_tokens: new tokens per *timed* generation (default: max_new_tokens); fewer
            keep loaded timing affordable — under load a decode step on 2 cores can take
            ten times longer — and the median decode step still comes from several steps.
        analysis_tokens: leading prompt tokens the router scores (its overhead is counted).
        settle_s: seconds to let a new background load level settle before timing.
        block: prompts timed at one level before the level changes (levels rotate per block).
        seed: seeds the bursty level's schedule (per block).
    """

    train_prompts: int = 160
    test_prompts: int = 60
    loads: tuple[str, ...] = ("0", "1", "2", "bursty")
    max_new_tokens: int = 32
    timing_tokens: int | None = 16
    analysis_tokens: int = 64
    settle_s: float = 1.5
    block: int = 4
    seed: int = 0


def spread(items: list[Prompt], n: int) -> list[Prompt]:
    """``n`` items evenly spaced through ``items`` (deterministic, no seed)."""
    if n >= len(items):
        return list(items)
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def select_prompts(config: RecordConfig, source: str | None = None) -> list[Prompt]:
    return spread(load_prompts(source, split="train"), config.train_prompts) + spread(load_prompts(source, split="test"), config.test_prompts)


def timing_order(prompts: list[Prompt]) -> list[Prompt]:
    """Test and train prompts alternating (then the rest), so a recording cut short holds both splits.

    The test split is what every reported figure is computed on, and it is the smaller:
    alternating one for one measures all of it first.
    """
    test = [p for p in prompts if p.split == "test"]
    train = [p for p in prompts if p.split != "test"]
    ordered: list[Prompt] = []
    for i in range(max(len(test), len(train))):
        ordered += [pool[i] for pool in (test, train) if i < len(pool)]
    return ordered


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
    full model's next-token distributions at the same positions for KL), through
    :func:`casrap.measure.quality.score_profiles`.
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
        scores = score_profiles(bank, ids, torch.tensor(answer, dtype=ids.dtype, device=device),
                                [FULL, *[p for p in missing if p != FULL]], FULL)
        ppl = dict(previous["ppl"]) if previous else {}
        kl = dict(previous["kl"]) if previous else {}
        for name, quality in scores.items():
            ppl[name], kl[name] = quality.ppl, quality.kl
        row = {"prompt_id": prompt.id, "prompt_key": prompt.key, "split": prompt.split, "category": prompt.category,
               "prompt_tokens": features.tokens, "input_tokens": int(ids.shape[1]), "prompt_ppl": features.ppl,
               "answer": answer, "ppl": ppl, "kl": kl}
        _append(path, row)
        done[prompt.key] = row
        if progress:
            progress(i + 1, len(prompts))
    return {p.key: done[p.key] for p in prompts}


def timing_pass(router: Any, prompts: list[Prompt], profiles: list[str], config: RecordConfig, path: Path,
                levels: Any | None, progress: Progress | None = None, sleep: Callable[[float], None] = time.sleep,
                deadline: float | None = None) -> list[dict[str, Any]]:
    """Measure every profile on ``prompts`` at every load level through ``router`` (thread-aware), appending rows.

    ``levels`` switches the background load (a :class:`~casrap.telemetry.load.LoadLevels`,
    or None to record level ``"0"`` only as the machine is). Prompts go in blocks of
    ``config.block``; within a block each level in turn (the first level rotates per
    block), within a level each prompt, within a prompt each profile in a rotating order.
    Stops cleanly (between contexts) at ``deadline`` (``time.time()``), keeping what is done.
    """
    rows = _read_rows(path)
    done = {(r["prompt_key"], str(r["load"]), r["profile"]) for r in rows}
    bank, tokenizer, analyzer = router.bank, router.tokenizer, router.analyzer
    device = next(bank.model.parameters()).device
    n_tokens = config.timing_tokens or config.max_new_tokens
    total = len(config.loads) * len(prompts) * len(profiles)
    count = len(done)
    warmed: set[str] = set()
    for b in range(0, len(prompts), max(config.block, 1)):
        block = prompts[b: b + config.block]
        shift = (b // max(config.block, 1)) % len(config.loads)
        for level in list(config.loads[shift:]) + list(config.loads[:shift]):
            todo = [p for p in block if any((p.key, level, name) not in done for name in profiles)]
            if not todo:
                continue
            if deadline is not None and time.time() > deadline:
                return rows
            if levels is not None:
                levels.set(level, seed=config.seed * 100003 + b)
                sleep(config.settle_s)
            if level not in warmed:  # one untimed pass per profile at this level: caches and allocator warm
                warm = analyzer.encode(block[0].text).to(device)
                router.prepare()
                for name in profiles:
                    with bank.using(name):  # the profile's own generator (dense, compressed KV, prompt lookup)
                        router.generator(name)(bank.model, tokenizer, warm, 4, ignore_eos=True)
                warmed.add(level)
            for j, prompt in enumerate(todo):
                ids = analyzer.encode(prompt.text).to(device)
                context = router.prepare(force_probe=True)  # the context's observation: reading, threads, slowdown
                analyzer.forget(prompt.text)
                bank.activate(FULL)
                t0 = time.perf_counter()
                features = analyzer.analyze(prompt.text)  # the router's analysis, timed under this load and thread count
                analysis_s = time.perf_counter() - t0
                shift_p = (b + j) % len(profiles)
                for name in profiles[shift_p:] + profiles[:shift_p]:
                    if (prompt.key, level, name) in done:
                        continue
                    decision = router.fixed_decision(name, ids, n_tokens)
                    out = router.run(decision, ids, n_tokens, ignore_eos=True).output
                    row = {"prompt_key": prompt.key, "prompt_id": prompt.id, "split": prompt.split, "load": level,
                           "profile": name, "input_tokens": int(ids.shape[1]), "ttft_s": out.ttft_s,
                           "decode_s": out.decode_median_s, "generation_s": out.generation_s, "new_tokens": len(out.token_ids),
                           "analysis_s": analysis_s, "prompt_tokens": features.tokens, "switch_s": 0.0,
                           "threads": decision.threads, "threads_s": decision.threads_s, "telemetry_s": decision.telemetry_s,
                           "context_threads": context.threads, "thread_share": context.thread_share,
                           "slowdown": context.slowdown, "probe_s": context.probe_s,
                           "context_telemetry": context.reading.to_dict(), "at": time.time()}
                    _append(path, row)
                    rows.append(row)
                    done.add((prompt.key, level, name))
                    count += 1
                    if progress:
                        progress(count, total)
    return rows


def unloaded_fit(rows: list[dict[str, Any]]) -> LatencyFit:
    """The full model's latency line on level ``0`` of this recording: what targets are multiples of."""
    idle = [r for r in rows if str(r["load"]) == "0" and r["profile"] == FULL]
    if not idle:
        raise ValueError("the recording has no level-0 full-model timings")
    return fit_latency([LatencySample(r["input_tokens"], r["ttft_s"], r["decode_s"], r["new_tokens"]) for r in idle])


def profile_speeds(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Unloaded decode speed of each profile relative to the full model: median over level-0 contexts of the paired ratio."""
    by_context: dict[str, dict[str, float]] = {}
    for r in rows:
        if str(r["load"]) == "0" and r["decode_s"] > 0:
            by_context.setdefault(r["prompt_key"], {})[r["profile"]] = float(r["decode_s"])
    ratios: dict[str, list[float]] = {}
    for steps in by_context.values():
        if FULL in steps:
            for name, step in steps.items():
                ratios.setdefault(name, []).append(steps[FULL] / step)
    return {name: float(statistics.median(v)) for name, v in ratios.items() if v}


def build_records(quality: dict[str, dict[str, Any]], timing: list[dict[str, Any]], profiles: list[str],
                  config: RecordConfig) -> Iterator[dict[str, Any]]:
    """One replay record per (prompt, load, profile), for every context whose profiles were all measured."""
    n = config.max_new_tokens
    measured: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for r in timing:
        measured.setdefault((r["prompt_key"], str(r["load"])), {})[r["profile"]] = r
    unloaded = unloaded_fit(timing)
    for (key, load), by_profile in measured.items():
        q = quality.get(key)
        if q is None or any(p not in by_profile or p not in q["ppl"] for p in profiles):
            continue
        first = by_profile[profiles[0]]
        latency = {p: r["ttft_s"] + (n - 1) * r["decode_s"] + r["analysis_s"] + r["switch_s"] + r["threads_s"] + r["telemetry_s"]
                   for p, r in by_profile.items()}
        telemetry = {k: round(float(v), 3) for k, v in first["context_telemetry"].items()}
        for p in profiles:
            r = by_profile[p]
            yield {
                "prompt_id": q["prompt_id"], "prompt_key": key, "split": q["split"], "category": q["category"], "load": load,
                "profile": p, "latency_s": round(latency[p], 5), "latency_source": "measured",
                "baseline_latency_s": round(latency[FULL], 5), "predicted_full_s": round(unloaded.predict(q["input_tokens"], n), 5),
                "ppl": round(q["ppl"][p], 5), "kl": round(q["kl"][p], 6), "baseline_ppl": round(q["ppl"][FULL], 5),
                "prompt_tokens": q["prompt_tokens"], "input_tokens": q["input_tokens"], "prompt_ppl": round(q["prompt_ppl"], 4),
                "telemetry": telemetry, "slowdown": round(float(first["slowdown"]), 4),
                "thread_share": round(float(first["thread_share"]), 4), "threads": int(r["threads"]),
                "decode_s": round(float(r["decode_s"]), 6), "ttft_s": round(float(r["ttft_s"]), 6),
            }


def recording_header(model: str, bank: Any, profiles: list[str], config: RecordConfig, quality: dict[str, dict[str, Any]],
                     timing: list[dict[str, Any]], durations: dict[str, float], thread_policy: str,
                     dropped: dict[str, str] | None = None) -> dict[str, Any]:
    import transformers

    from casrap.version import package_version

    contexts = {(r["prompt_key"], str(r["load"])) for r in timing}
    timed_keys = {k for k, _ in contexts}
    splits = [quality[k]["split"] for k in timed_keys if k in quality]
    return {
        "model": model, "fingerprint": bank.fingerprint, "profiles": profiles, "max_new_tokens": config.max_new_tokens,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "descriptions": {n: bank.profile(n).plan.description for n in profiles},
        "machine": {"platform": platform.platform(), "cpu": cpu_name(), "cores": os.cpu_count(),
                    "device": str(next(bank.model.parameters()).device)},
        "versions": {"casrap": package_version(), "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "thread_policy": thread_policy, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "config": asdict(config), "prompts": {"train": splits.count("train"), "test": splits.count("test")},
        "loads": {"unit": "background worker processes, each burning one core; bursty: two switching on/off (exponential, mean 1.5 s)",
                  "levels": sorted({str(r["load"]) for r in timing})},
        "dropped_profiles": dropped or {},
        "how_measured": {
            "quality": "teacher-forced ppl and mean KL of the full model's greedy answer (max_new_tokens, EOS ignored) under each "
                       "profile, one forward pass per prompt and profile (load-independent)",
            "latency": "every record measured: TTFT + (max_new_tokens - 1) x median decode step of a timing_tokens-token "
                       "generation through the Router (threads from telemetry), + prompt analysis + telemetry + thread change; "
                       "profiles interleaved in a rotating order per (prompt, load) context",
            "telemetry": "read at the start of the context, with the Router's slowdown probe and thread choice",
            "predicted_full_s": "this recording's level-0 full-model fit at this prompt length: latency targets are multiples of it",
        },
        "unloaded_fit": unloaded_fit(timing).to_dict(), "profile_speed": profile_speeds(timing),
        "durations_s": durations,
    }


def seed_quality(source: str | Path, prompts: list[Prompt], profiles: list[str], path: Path) -> int:
    """Copy quality (ppl, KL per profile) of ``prompts`` from an earlier replay file into the work file.

    Quality does not depend on load or threads, so a re-recording of latency keeps it; only
    prompts that file has for *every* profile are taken (the rest are measured), and rows
    already in the work file are left alone. Returns how many prompts were taken.
    """
    from casrap.envs.replay import _read_lines

    have = {r["prompt_key"] for r in _read_rows(path)}
    wanted = {p.key: p for p in prompts if p.key not in have}
    found: dict[str, dict[str, Any]] = {}
    for line in _read_lines(source)[1:]:
        if not line.strip():
            continue
        r = json.loads(line)
        key = r.get("prompt_key")
        if key not in wanted:
            continue
        row = found.setdefault(key, {"prompt_id": wanted[key].id, "prompt_key": key, "split": wanted[key].split,
                                     "category": wanted[key].category, "prompt_tokens": r["prompt_tokens"],
                                     "input_tokens": r["input_tokens"], "prompt_ppl": r["prompt_ppl"], "answer": [],
                                     "ppl": {}, "kl": {}, "quality_from": str(source)})
        row["ppl"][r["profile"]] = r["ppl"]
        row["kl"][r["profile"]] = r["kl"]
    taken = 0
    for key, row in found.items():
        if all(p in row["ppl"] for p in profiles):
            _append(path, row)
            taken += 1
    return taken


def record_replay(router: Any, prompts: list[Prompt], profiles: list[str], config: RecordConfig, work: Path, output: Path,
                  model: str, levels: Any | None = None, progress: Progress | None = None) -> Path:
    """Both passes, then the replay file: what ``casrap record`` runs, in one call.

    ``levels`` switches the background load (None: record level ``"0"`` as the machine is,
    e.g. live ``casrap test``); ``work`` holds the resumable per-pass files. Progress counts
    quality prompts, then timed (prompt, load, profile) runs.
    """
    from casrap.envs.replay import write_replay

    work.mkdir(parents=True, exist_ok=True)
    bank = router.bank
    total = len(prompts) + len(config.loads) * len(prompts) * len(profiles)
    started = time.perf_counter()
    quality = quality_pass(bank, router.tokenizer, prompts, profiles, config, work / "quality.jsonl",
                           progress=(lambda i, n: progress(i, total)) if progress else None)
    durations = {"quality_s": time.perf_counter() - started}
    t0 = time.perf_counter()
    timing = timing_pass(router, timing_order(prompts), profiles, config, work / "timing.jsonl", levels,
                         progress=(lambda i, n: progress(len(prompts) + i, total)) if progress else None)
    durations["timing_s_this_run"] = time.perf_counter() - t0
    header = recording_header(model, bank, profiles, config, quality, timing, durations, router.threads.key())
    return write_replay(output, header, build_records(quality, timing, profiles, config))
