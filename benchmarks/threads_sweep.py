"""Full-model decode step by load level: plain transformers' fixed settings against casrap's execution.

    .venv/bin/python benchmarks/threads_sweep.py --rounds 2 --tokens 24

Each *variant* runs in its own process, because OpenMP reads its wait policy when torch
loads: plain transformers (``model.generate``, greedy, EOS ignored, a stopping criterion
stamps each new token) with 1 thread, 2 spinning threads (OpenMP's default wait), 2
passive threads (``OMP_WAIT_POLICY=PASSIVE``), and casrap's default execution (the
Router's fixed full-model decision: threads from telemetry before the request, the
thread governor during it, no wait policy set). ``--extra`` adds variants with a libgomp
spin count. In each process the load levels run in turn: ``0``, ``1``, ``2`` background
processes burning a core, and ``bursty`` (two processes switching on and off on seeded
exponential schedules, mean 1.5 s). Variants are interleaved over ``--rounds`` rounds (the
order rotates each round), and every decode step of every round is pooled per
(variant, level): median, p90, p99.

casrap's ratio at each level is its median step over the best plain setting's median at
that level (the setting a user who knew the load in advance would pick). Writes
``benchmarks/results/threads-sweep.json`` (the results schema of ``benchmarks/README.md``)
and the raw steps under ``benchmarks/raw/threads-sweep.json``. Nothing else may run on the
machine meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "threads-sweep.json"
RAW = ROOT / "benchmarks" / "raw" / "threads-sweep.json"
PROMPT = "Summarise the water cycle in a few sentences for a school pupil, naming evaporation and rain."

VARIANTS: dict[str, dict[str, Any]] = {
    "plain-1t": {"env": {}, "threads": 1, "label": "transformers, 1 thread"},
    "plain-2t-spin": {"env": {}, "threads": 2, "label": "transformers, 2 threads, spinning (OpenMP default)"},
    "plain-2t-passive": {"env": {"OMP_WAIT_POLICY": "PASSIVE"}, "threads": 2, "label": "transformers, 2 threads, passive"},
    "casrap": {"env": {}, "threads": 0, "label": "casrap default (free cores + governor, spinning)"},
}
EXTRA = {
    "casrap-spin20000": {"env": {"GOMP_SPINCOUNT": "20000"}, "threads": 0, "label": "casrap, GOMP_SPINCOUNT=20000"},
    "plain-2t-spin20000": {"env": {"GOMP_SPINCOUNT": "20000"}, "threads": 2, "label": "transformers, 2 threads, GOMP_SPINCOUNT=20000"},
}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, int(round(q / 100.0 * (len(ordered) - 1)))))
    return ordered[k]


# ----------------------------------------------------------------------------- child process
def _plain_steps(model: Any, ids: Any, tokens: int, cap_s: float) -> list[float]:
    """Per-token gaps of plain ``model.generate`` (a stopping criterion stamps each new token)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Stamp(StoppingCriteria):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.start = time.perf_counter()

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            self.times.append(time.perf_counter())
            done = self.times[-1] - self.start > cap_s
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool)

    stamp = Stamp()
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                       stopping_criteria=StoppingCriteriaList([stamp]), pad_token_id=0)
    return [b - a for a, b in zip(stamp.times, stamp.times[1:])]


def _casrap_steps(router: Any, ids: Any, tokens: int, cap_s: float, changes: list[Any]) -> list[float]:
    from casrap.decide.generation import Cancellation

    decision = router.fixed_decision("none", ids, tokens)
    routed = router.run(decision, ids, tokens, ignore_eos=True, cancel=Cancellation(timeout_s=cap_s))
    changes.extend((c.before, c.after, c.reason) for c in routed.thread_changes)
    return list(routed.output.decode_steps_s)


def child(variant: str, levels: list[str], tokens: int, level_s: float, bursty_s: float, seed: int) -> dict[str, Any]:
    import torch

    from casrap.cli.common import build_profiles, load
    from casrap.decide.router import Router
    from casrap.telemetry.live import LiveTelemetry
    from casrap.telemetry.load import LoadLevels

    spec = {**VARIANTS, **EXTRA}[variant]
    lm = load("smollm2-135m", "cpu")
    model, tok = lm.model, lm.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt")
    ids = ids if torch.is_tensor(ids) else ids["input_ids"]
    router = None
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    else:
        bank = build_profiles(lm, ["none"], "smollm2-135m")
        router = Router(bank, tok, None, telemetry=LiveTelemetry(), probe=False)
    out: dict[str, Any] = {"variant": variant, "levels": {}}
    with LoadLevels() as load_levels:
        for level in levels:
            load_levels.set(level, seed=seed)
            time.sleep(1.5)
            budget = bursty_s if level == "bursty" else level_s
            steps: list[float] = []
            changes: list[Any] = []
            threads_seen: list[int] = []
            warm = _casrap_steps(router, ids, 4, 30.0, []) if router else _plain_steps(model, ids, 4, 30.0)
            del warm
            start = time.perf_counter()
            while time.perf_counter() - start < budget:
                remaining = max(budget - (time.perf_counter() - start), 1.0)
                if router is not None:
                    steps += _casrap_steps(router, ids, tokens, remaining, changes)
                    threads_seen.append(torch.get_num_threads())
                else:
                    steps += _plain_steps(model, ids, tokens, remaining)
            out["levels"][level] = {"steps_s": steps, "thread_changes": changes, "threads_at_end": threads_seen,
                                    "loadavg": os.getloadavg()}
    return out


# ----------------------------------------------------------------------------- parent
def run_child(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    spec = {**VARIANTS, **EXTRA}[variant]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    env.update(spec["env"])
    cmd = [sys.executable, __file__, "--child", variant, "--levels", args.levels, "--tokens", str(args.tokens),
           "--level-s", str(args.level_s), "--bursty-s", str(args.bursty_s), "--seed", str(args.seed)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{variant} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(raw: dict[str, dict[str, list[float]]], levels: list[str]) -> list[dict[str, Any]]:
    rows = []
    for level in levels:
        medians = {v: statistics.median(raw[v][level]) for v in raw if raw[v].get(level)}
        plain = {v: m for v, m in medians.items() if v.startswith("plain")}
        best = min(plain, key=plain.get) if plain else None
        one = raw.get("plain-1t", {}).get(level)
        for variant in raw:
            steps = raw[variant].get(level) or []
            if not steps:
                continue
            med = medians[variant]
            rows.append({
                "level": level, "variant": variant, "label": {**VARIANTS, **EXTRA}[variant]["label"], "n": len(steps),
                "median_ms": 1000 * med, "p90_ms": 1000 * percentile(steps, 90), "p99_ms": 1000 * percentile(steps, 99),
                "vs_best": med / plain[best] if best else None, "best": best,
                "p99_vs_1t_median": percentile(steps, 99) / statistics.median(one) if one else None,
            })
    return rows


def parent(args: argparse.Namespace) -> None:
    from casrap.decide.latency_model import cpu_name
    from casrap.version import measurement_versions

    levels = args.levels.split(",")
    names = list(VARIANTS) + ([v for v in EXTRA] if args.extra else [])
    if args.variants:
        names = [v for v in args.variants.split(",") if v in {**VARIANTS, **EXTRA}]
    raw: dict[str, dict[str, list[float]]] = {n: {lv: [] for lv in levels} for n in names}
    trace: dict[str, Any] = {}
    loadavg: list[float] = []
    started = time.time()
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for variant in order:
            result = run_child(variant, args)
            for level, data in result["levels"].items():
                raw[variant][level] += data["steps_s"]
                loadavg.append(data["loadavg"][0])
                if data["thread_changes"]:
                    trace.setdefault(variant, {}).setdefault(level, []).extend(data["thread_changes"])
            print(f"round {r + 1} {variant}: " + ", ".join(
                f"{lv} {1000 * statistics.median(d['steps_s']):.1f} ms" for lv, d in result["levels"].items() if d["steps_s"]),
                file=sys.stderr, flush=True)
    rows = summarise(raw, levels)
    today = datetime.now(timezone.utc).date().isoformat()
    columns = [{"key": "level", "label": "load"}, {"key": "label", "label": "execution"}, {"key": "n", "label": "steps"},
               {"key": "median_ms", "label": "median ms/step", "format": "{:.1f}"},
               {"key": "p99_ms", "label": "p99 ms/step", "format": "{:.1f}"},
               {"key": "vs_best", "label": "median / best plain at this level", "format": "{:.2f}"},
               {"key": "p99_vs_1t_median", "label": "p99 / 1-thread median", "format": "{:.2f}"}]
    shown = [{k: row[k] for k in ("level", "label", "n", "median_ms", "p99_ms", "vs_best", "p99_vs_1t_median")} for row in rows]
    headline = []
    for i, row in enumerate(rows):
        if row["variant"] == "casrap" and row["level"] in ("0", "1"):
            headline.append({"label": f"casrap full-model decode step / best plain transformers setting, load {row['level']}",
                             "column": "vs_best", "row": i})
    result = {
        "title": "Execution: casrap's decode step against plain transformers' fixed settings, by load",
        "page": "execution", "page_title": "Execution: threads and wait policy under load", "page_rank": 2, "order": 1,
        "summary": ("Full-model (SmolLM2-135M fp32) greedy decode step, EOS ignored, pooled over every step of every round. "
                    "Load: 0, 1 or 2 background processes burning a core, or bursty (two processes switching on/off, "
                    "exponential durations with mean 1.5 s). Best plain = the fastest fixed transformers setting at that level."),
        "command": "python benchmarks/threads_sweep.py " + " ".join(sys.argv[1:]),
        "machine": {"description": f"{cpu_name()}, {os.cpu_count()} cores, SmolLM2-135M-Instruct fp32", "short": "2-core CPU",
                    "threads": "per variant (see the execution column)",
                    "load": "quiet apart from the background load levels",
                    "load_average": round(statistics.median(loadavg), 2) if loadavg else None},
        "versions": measurement_versions(str(ROOT)), "date": today,
        "n": f"{args.rounds} rounds x {len(names)} variants x {len(levels)} levels; {args.level_s:.0f} s of "
             f"{args.tokens}-token generations per level ({args.bursty_s:.0f} s bursty)",
        "columns": columns, "rows": shown, "headline": headline,
        "notes": [f"Wall time {(time.time() - started) / 60:.1f} min.",
                  "casrap thread changes during requests (before, after, reason), per level: " +
                  json.dumps({lv: len(ch) for lv, ch in trace.get("casrap", {}).items()})],
    }
    result_path, raw_path = (Path(args.out), Path(args.out).with_suffix(".raw.json")) if args.out else (RESULT, RAW)
    result_path.write_text(json.dumps(result, indent=1) + "\n")
    raw_path.parent.mkdir(parents=True, exist_ok=True)
    raw_path.write_text(json.dumps({"rows": rows, "thread_changes": trace,
                               "steps_ms": {v: {lv: [round(1000 * s, 2) for s in st] for lv, st in d.items()} for v, d in raw.items()}})
                   + "\n")
    for row in rows:
        print(f"{row['level']:>6} {row['variant']:>18} n={row['n']:>4} median {row['median_ms']:7.1f} p99 {row['p99_ms']:7.1f} "
              f"vs best {row['vs_best']:.2f} p99/1t {row['p99_vs_1t_median'] or float('nan'):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--levels", default="0,1,2,bursty")
    parser.add_argument("--level-s", type=float, default=8.0, help="seconds of generation per level and round")
    parser.add_argument("--bursty-s", type=float, default=20.0, help="seconds of generation at the bursty level")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--extra", action="store_true", help="also libgomp spin-count variants")
    parser.add_argument("--variants", default="", help="comma-separated subset (a smoke run)")
    parser.add_argument("--out", default=None, help="write the result here instead of benchmarks/results/")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.levels.split(","), args.tokens, args.level_s, args.bursty_s, args.seed)))
    else:
        parent(args)


if __name__ == "__main__":
    main()
