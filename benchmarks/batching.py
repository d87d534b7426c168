"""Throughput of concurrent greedy requests on the embedded model: batched engine vs one client at a time.

    .venv/bin/python benchmarks/batching.py                 # writes benchmarks/results/batching.json
    .venv/bin/python benchmarks/batching.py --clients 8 --tokens 64 --reps 3

Every request runs on the full model (``profile="none"``: a fixed choice, so the policy
does not make requests differ) with a fixed number of new tokens (EOS ignored) and a
fixed thread count (``thread_policy="fixed"``: all cores, never governed). Per repetition,
interleaved:

- ``solo_serial_path``: the ``--clients`` prompts one after another on the serial path
  (``max_batch=1``: ``model.generate``); output tokens / wall seconds of the whole sequence;
- ``solo``: the same, through the batching engine (each runs alone: a batch of one), so
  the engine's own per-step cost against ``model.generate`` shows;
- ``concurrent``: the same prompts from ``--clients`` threads at once (all submitted
  while the bank is held, then released together); output tokens / wall seconds;
- ``serial``: the same concurrent clients with ``max_batch=1`` (today's one-at-a-time
  path).

It checks that every concurrent answer is token for token the solo answers (both paths) of
the same prompt, and reports per-request TTFT and decode-step medians. Nothing else may run on
the machine meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from casrap.version import measurement_versions

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "raw" / "batching.json"  # raw runs; `python benchmarks/summarise.py batching` renders the table


def build(model: str, max_batch: int) -> Any:
    from casrap.cli.common import load
    from casrap.decide.batching import BatchConfig
    from casrap.decide.defaults import RuntimeDefaults
    from casrap.decide.router import Router
    from casrap.profiles.bank import ProfileBank
    from casrap.runtime.adaptive import AdaptiveLM

    lm = load(model, "cpu")
    bank = ProfileBank(lm.model, base_model=model)
    router = Router(bank, lm.tokenizer, None, RuntimeDefaults(thread_policy="fixed"), probe=False)
    return AdaptiveLM(router, lm.tokenizer, model, batching=BatchConfig(max_batch=max_batch))


def concurrent(lm: Any, prompts: list[str], tokens: int) -> tuple[float, list[Any]]:
    """All prompts from one thread each, released together; (wall seconds, generations in prompt order)."""
    out: list[Any] = [None] * len(prompts)
    threads = [threading.Thread(target=lambda k=k: out.__setitem__(k, lm.generate(prompts[k], max_new_tokens=tokens,
                                                                                     ignore_eos=True, profile="none")))
               for k in range(len(prompts))]
    lm._gate.acquire()
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while lm.queue_length < len(prompts) and time.monotonic() < deadline:
        time.sleep(0.001)
    start = time.perf_counter()
    lm._gate.release()
    for t in threads:
        t.join()
    return time.perf_counter() - start, out


def solo(lm: Any, prompts: list[str], tokens: int) -> tuple[float, list[Any]]:
    start = time.perf_counter()
    out = [lm.generate(p, max_new_tokens=tokens, ignore_eos=True, profile="none") for p in prompts]
    return time.perf_counter() - start, out


def summary(wall: float, gens: list[Any]) -> dict[str, Any]:
    tokens = sum(len(g.token_ids) for g in gens)
    steps = [s for g in gens for s in [g.record.generation_s / max(g.record.completion_tokens, 1)]]
    return {"wall_s": wall, "output_tokens": tokens, "tokens_per_s": tokens / wall,
            "ttft_median_s": statistics.median(g.record.ttft_s for g in gens),
            "total_median_s": statistics.median(g.record.total_s for g in gens),
            "per_token_median_s": statistics.median(steps)}


def main(argv: list[str] | None = None) -> int:
    from casrap.data.prompts import load_prompts
    from casrap.decide.batching import BatchConfig
    from casrap.decide.latency_model import cpu_name
    from casrap.runtime.adaptive import AdaptiveLM

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--model", default="smollm2-135m", help="model spec (tiny-random-llama: a smoke run, not a measurement)")
    args = parser.parse_args(argv)
    batched = build(args.model, args.clients)
    serial = AdaptiveLM(batched.router, batched.tokenizer, args.model, batching=BatchConfig(max_batch=1))
    prompts = [p.text for p in load_prompts(None, split="test")][: args.clients]
    batched.generate("Hello.", max_new_tokens=4, ignore_eos=True, profile="none")  # warm-up
    reps, mismatches = [], 0
    for rep in range(args.reps):
        serial_solo_wall, serial_alone = solo(serial, prompts, args.tokens)
        solo_wall, alone = solo(batched, prompts, args.tokens)
        conc_wall, together = concurrent(batched, prompts, args.tokens)
        serial_wall, one_by_one = concurrent(serial, prompts, args.tokens)
        same = [a.token_ids == b.token_ids == c.token_ids for a, b, c in zip(alone, together, serial_alone)]
        mismatches += same.count(False)
        row = {"rep": rep, "solo_serial_path": summary(serial_solo_wall, serial_alone), "solo": summary(solo_wall, alone),
               "concurrent": summary(conc_wall, together),
               "serial_concurrent": summary(serial_wall, one_by_one), "identical_answers": sum(same),
               "engine_peak_batch": batched._engine.peak}
        row["throughput_ratio"] = row["concurrent"]["tokens_per_s"] / row["solo"]["tokens_per_s"]
        row["throughput_ratio_vs_serial_solo"] = row["concurrent"]["tokens_per_s"] / row["solo_serial_path"]["tokens_per_s"]
        row["engine_solo_vs_serial_solo"] = row["solo"]["tokens_per_s"] / row["solo_serial_path"]["tokens_per_s"]
        reps.append(row)
        print(f"rep {rep}: solo {row['solo']['tokens_per_s']:.1f} tok/s, {args.clients} concurrent "
              f"{row['concurrent']['tokens_per_s']:.1f} tok/s ({row['throughput_ratio']:.2f}x), serial "
              f"{row['serial_concurrent']['tokens_per_s']:.1f} tok/s; identical {sum(same)}/{len(same)}", file=sys.stderr)
    result = {
        "what": f"{args.clients} concurrent greedy requests ({args.tokens} new tokens, EOS ignored, full {args.model}) through "
                "the batching engine vs the same prompts one at a time",
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
        "versions": measurement_versions(str(ROOT)), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "n": {"clients": args.clients, "reps": args.reps, "tokens": args.tokens, "prompts": "bundled prompts, test split"},
        "median_throughput_ratio": statistics.median(r["throughput_ratio"] for r in reps),
        "median_throughput_ratio_vs_serial_solo": statistics.median(r["throughput_ratio_vs_serial_solo"] for r in reps),
        "median_engine_solo_vs_serial_solo": statistics.median(r["engine_solo_vs_serial_solo"] for r in reps),
        "median_serial_ratio": statistics.median(r["serial_concurrent"]["tokens_per_s"] / r["solo"]["tokens_per_s"] for r in reps),
        "all_identical": mismatches == 0, "mismatches": mismatches, "reps": reps,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median_throughput_ratio", "median_serial_ratio", "all_identical")}))
    return 0 if mismatches == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
