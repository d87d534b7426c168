"""Decode speed of the embedded model under background load, by thread count and OpenMP wait policy.

Run twice, because OpenMP reads its wait policy when torch loads:

    OMP_WAIT_POLICY=ACTIVE  .venv/bin/python benchmarks/thread_policy.py --tag active
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/thread_policy.py --tag passive

Each run measures, at each load level (0, 1, 2 background processes burning a core, and
bursty), the median decode step of a 16-token greedy generation (EOS ignored) of the full
model and of one pruned profile with 1 thread, with 2 threads, and with the thread count
casrap's rule picks from telemetry; configurations interleaved, ``--reps`` repetitions
each, median reported. It also times ``torch.set_num_threads`` and the first forward after
a change. Raw runs are merged into ``benchmarks/raw/thread-policy.json``.
Nothing else may run a model on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from casrap.cli.common import build_profiles, load
from casrap.data.prompts import load_prompts
from casrap.decide.generation import generate_timed
from casrap.decide.latency_model import cpu_name
from casrap.telemetry.live import LiveTelemetry
from casrap.telemetry.load import LoadLevels
from casrap.telemetry.threads import ThreadPolicy, apply_threads

RESULTS = Path(__file__).parent / "raw" / "thread-policy.json"  # raw runs; results/thread-policy.json is the rendered table


def decode_ms(bank, tok, ids, profile: str, tokens: int) -> float:
    with bank.using(profile):
        out = generate_timed(bank.model, tok, ids, tokens, ignore_eos=True)
    return 1000.0 * out.decode_median_s


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tag", required=True, help="label of this run's wait policy (active | passive)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--levels", default="0,1,2,bursty")
    parser.add_argument("--profile", default="layers-25+heal")
    args = parser.parse_args()
    lm = load("smollm2-135m", "cpu")
    bank = build_profiles(lm, ["none", args.profile], "smollm2-135m")
    tok = lm.tokenizer
    prompts = load_prompts(None, split="train")[:args.reps]
    ids = [tok(p.text, return_tensors="pt").input_ids[:, :64] for p in prompts]
    rule = ThreadPolicy()
    telemetry = LiveTelemetry()
    rows = []
    switch = {"set_num_threads_ms": [], "first_forward_after_change_ms": [], "steady_forward_ms": []}
    with LoadLevels() as levels:
        for level in args.levels.split(","):
            levels.set(level, seed=7)
            time.sleep(2.0)
            for profile in ("none", args.profile):  # warm both at this level
                with bank.using(profile):
                    generate_timed(bank.model, tok, ids[0], 4, ignore_eos=True)
            samples: dict[str, list[float]] = {}
            chosen: list[int] = []
            for rep in range(args.reps):
                for config in (["1", "2", "rule"] if rep % 2 == 0 else ["rule", "2", "1"]):
                    telemetry.read()
                    threads = rule.choose(telemetry.read()) if config == "rule" else int(config)
                    if config == "rule":
                        chosen.append(threads)
                    apply_threads(threads)
                    for profile in ("none", args.profile):
                        samples.setdefault(f"{profile}|{config}", []).append(decode_ms(bank, tok, ids[rep], profile, args.tokens))
            for key, values in samples.items():
                profile, config = key.split("|")
                rows.append({"level": level, "profile": profile, "threads": config, "decode_ms": statistics.median(values),
                             "samples_ms": [round(v, 2) for v in values],
                             "rule_threads": chosen if config == "rule" else None})
            if level == "0":  # cost of a thread change, idle
                x = ids[0]
                for _ in range(5):
                    for threads in (1, 2):
                        t0 = time.perf_counter()
                        torch.set_num_threads(threads)
                        t1 = time.perf_counter()
                        with torch.inference_mode():
                            bank.model(x)
                        t2 = time.perf_counter()
                        with torch.inference_mode():
                            bank.model(x)
                        t3 = time.perf_counter()
                        switch["set_num_threads_ms"].append(1000 * (t1 - t0))
                        switch["first_forward_after_change_ms"].append(1000 * (t2 - t1))
                        switch["steady_forward_ms"].append(1000 * (t3 - t2))
    import transformers

    run = {
        "command": f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')} python benchmarks/thread_policy.py " + " ".join(sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_at_end": os.getloadavg()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()},
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset: libgomp default, spins)"),
        "n": {"reps": args.reps, "decode_steps_per_rep": args.tokens - 1},
        "model": "smollm2-135m (fp32)", "rows": rows,
        "thread_change_ms": {k: statistics.median(v) for k, v in switch.items() if v},
    }
    data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"name": "thread-policy", "runs": {}}
    data["runs"][args.tag] = run
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=1) + "\n")
    for r in rows:
        print(f"{r['level']:>6} {r['profile']:>16} threads={r['threads']:>4} {r['decode_ms']:7.1f} ms/token {r['rule_threads'] or ''}")
    print("thread change:", run["thread_change_ms"])


if __name__ == "__main__":
    main()
