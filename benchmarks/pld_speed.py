"""Prompt-lookup decoding (``pld-K`` profiles) against the dense full model, per prompt category, on this machine.

Five categories of prompt: ``summarise``, ``extract`` and ``rewrite`` (an instruction over a
passage of the test third of the bundled prose: the answer can copy from the prompt),
``chat`` (the bundled test prompts of the instruction and creative categories) and ``QA``
(the bundled factual test prompts). For each prompt, ``--pairs`` rounds of greedy
generation of ``--tokens`` new tokens (EOS ignored) by the full model (``none``),
``pld-4`` and ``pld-10``, interleaved with the order rotating every round, each through the
Router (the per-token clock every policy latency is read from; threads fixed at this
process's count). Per round the speed ratio is the dense generation's seconds over the
profile's; a prompt's speedup is the median over its rounds, a category's the median over
its prompts (with min and max). Every answer is checked token by token against the dense
answer (prompt lookup is lossless: they must be identical). The machine must be idle.

    OMP_NUM_THREADS=2 OMP_WAIT_POLICY=ACTIVE .venv/bin/python benchmarks/pld_speed.py
    .venv/bin/python benchmarks/pld_speed.py --tiny     # seconds: checks the script end to end

Writes ``benchmarks/results/pld.json`` (the results schema, ``benchmarks/README.md``) and the
raw runs to ``benchmarks/raw/pld.json``; ``--tiny`` writes under ``reports/pld-tiny/``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from casrap.version import measurement_versions

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CATEGORIES = ("summarise", "extract", "rewrite", "chat", "QA")
PROFILES = ("pld-4", "pld-10")
INSTRUCTIONS = {
    "summarise": "Summarise the following passage in three sentences.\n\n{passage}",
    "extract": "List every name, place, number and date that appears in the passage below, one per line.\n\n{passage}",
    "rewrite": "Rewrite the following passage in plain, simple English, keeping every fact.\n\n{passage}",
}


def category_prompts(n: int) -> dict[str, list[str]]:
    """``n`` fixed prompts per category (no seed: the first passages / prompts of the test splits)."""
    from casrap.data.prompts import load_prompts
    from casrap.measure.corpus import prose_split

    passages = [p for p in prose_split("test").paragraphs() if 400 <= len(p) <= 1600]
    test = load_prompts(None, split="test")
    chat = [p.text for p in test if p.category in {"instruction", "creative"}]
    prompts = {kind: [INSTRUCTIONS[kind].format(passage=p) for p in passages[i * n:(i + 1) * n]]
               for i, kind in enumerate(("summarise", "extract", "rewrite"))}  # a passage serves one category only
    prompts["chat"] = chat[:n]
    prompts["QA"] = [p.text for p in test if p.category == "factual"][:n]
    return prompts


def measure(router: Any, ids: torch.Tensor, tokens: int, pairs: int) -> dict[str, Any]:
    """Interleaved rounds of the dense model and each pld profile on one prompt."""
    names = ("none", *PROFILES)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    answers: dict[str, list[list[int]]] = {n: [] for n in names}
    passes: dict[str, list[int]] = {n: [] for n in names}
    router.run(router.fixed_decision("none", ids, 4), ids, 4, ignore_eos=True)  # warm
    for r in range(pairs):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            out = router.run(router.fixed_decision(name, ids, tokens), ids, tokens, ignore_eos=True).output
            seconds[name].append(out.generation_s)
            answers[name].append(out.token_ids)
            passes[name].append(len(out.decode_steps_s) + 1)
    dense = answers["none"][0]
    row: dict[str, Any] = {"prompt_tokens": int(ids.shape[-1]), "dense_s": seconds["none"]}
    for name in PROFILES:
        ratios = [a / b for a, b in zip(seconds["none"], seconds[name])]
        row[name] = {"speedup": statistics.median(ratios), "ratios": ratios, "seconds": seconds[name],
                     "identical": all(a == dense for a in answers[name]), "forward_passes": passes[name]}
    return row


def summarise(raw: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for category in CATEGORIES:
        runs = raw.get(category, [])
        if not runs:
            continue
        row: dict[str, Any] = {"category": category, "n": len(runs),
                               "prompt_tokens": statistics.median(r["prompt_tokens"] for r in runs)}
        for name in PROFILES:
            speedups = [r[name]["speedup"] for r in runs]
            key = name.replace("-", "")
            row[f"{key}_median"] = statistics.median(speedups)
            row[f"{key}_min"], row[f"{key}_max"] = min(speedups), max(speedups)
            row[f"{key}_identical"] = f"{sum(r[name]['identical'] for r in runs)}/{len(runs)}"
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=6, help="prompts per category")
    parser.add_argument("--pairs", type=int, default=3, help="interleaved rounds per prompt")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--tiny", action="store_true", help="tiny random model, 2 prompts, 1 round: checks the script")
    args = parser.parse_args()
    if args.tiny:
        args.model, args.n, args.pairs, args.tokens = "tiny-random-llama", 2, 1, 8

    from casrap.bench import bench_router
    from casrap.decide.latency_model import cpu_name
    from casrap.models import describe, load_model
    from casrap.profiles.bank import ProfileBank
    from casrap.profiles.catalogue import build_plan
    from casrap.telemetry.live import LiveTelemetry

    lm = load_model(args.model)
    bank = ProfileBank(lm.model, base_model=args.model)
    for name in PROFILES:
        bank.add(build_plan(name, None, describe(lm.model), base_model=args.model))
    router = bench_router(bank, lm.tokenizer)
    before = LiveTelemetry().read().to_dict()
    raw: dict[str, list[dict[str, Any]]] = {}
    for category, texts in category_prompts(args.n).items():
        for text in texts:
            ids = lm.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                   return_tensors="pt", return_dict=True)["input_ids"] \
                if getattr(lm.tokenizer, "chat_template", None) else lm.tokenizer(text, return_tensors="pt").input_ids
            raw.setdefault(category, []).append(measure(router, ids, args.tokens, args.pairs))
            print(f"{category}: {raw[category][-1]['prompt_tokens']} tokens, "
                  + ", ".join(f"{n} {raw[category][-1][n]['speedup']:.2f}x" for n in PROFILES), file=sys.stderr)
    command = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY") if k in os.environ)
    command = (command + " " if command else "") + ".venv/bin/python benchmarks/pld_speed.py " + " ".join(map(shlex.quote, sys.argv[1:]))
    rows = summarise(raw)
    pct = [{"key": f"{p.replace('-', '')}_{s}", "label": f"{p} {label}", **({"format": "{:.2f}x"} if s != "identical" else {})}
           for p in PROFILES for s, label in (("median", "median"), ("min", "min"), ("max", "max"), ("identical", "identical"))]
    result = {
        "title": "Prompt-lookup decoding per prompt category (greedy, idle)",
        "page": "options",
        "summary": (f"Speed of transformers' prompt-lookup decoding (pld-4, pld-10) over the dense full model, greedy "
                    f"{args.tokens} new tokens, per prompt category; a speedup below 1 is a slowdown. Answers are checked "
                    "token by token against the dense answer."),
        "command": command.strip(),
        "machine": {"description": f"{cpu_name()}, {os.cpu_count()} cores, {platform.platform()}; {args.model} "
                                   f"({next(lm.model.parameters()).dtype})",
                    "short": f"{os.cpu_count()}-core CPU, idle", "threads": torch.get_num_threads(), "load": "idle",
                    "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                    "telemetry_before": before},
        "versions": measurement_versions(str(ROOT)),
        "date": datetime.date.today().isoformat(),
        "n": f"{args.n} prompts per category x {args.pairs} interleaved rounds (dense, pld-4, pld-10, order rotating) "
             f"of {args.tokens} new tokens",
        "columns": [{"key": "category", "label": "category"}, {"key": "n", "label": "prompts"},
                    {"key": "prompt_tokens", "label": "prompt tokens (median)", "format": "{:.0f}"}, *pct],
        "rows": rows,
        "notes": ["speedup = dense generation seconds / pld generation seconds per round, median over rounds, then "
                  "median (min, max) over the category's prompts",
                  "timed through the Router (per-token clock, threads fixed at the process's count), EOS ignored"],
    }
    out_dir = ROOT / "reports" / "pld-tiny" if args.tiny else HERE
    results = out_dir / "pld.json" if args.tiny else HERE / "results" / "pld.json"
    raw_path = out_dir / "pld-raw.json" if args.tiny else HERE / "raw" / "pld.json"
    results.parent.mkdir(parents=True, exist_ok=True)
    raw_path.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(result, indent=1) + "\n")
    raw_path.write_text(json.dumps({"command": result["command"], "date": result["date"], "runs": raw}, indent=1) + "\n")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
