"""What deciding costs: telemetry, thread change, probe, prompt analysis and policy, against a 50-token request.

    .venv/bin/python benchmarks/decision_overhead.py --requests 8 --tokens 50

Loads the shipped bundle and the embedded model (``AdaptiveLM.load()``), then on an idle
machine answers ``--requests`` distinct held-out prompts three ways, interleaved: with no
target (the full model answers by rule), with a target the full model meets (``ample-budget``
rule), and with a tight target (half the predicted unloaded full-model latency: the policy is
asked). Every request generates exactly ``--tokens`` tokens (EOS ignored). Reports the median
of each decision component and of ``decision_s / latency_s``. Writes
``benchmarks/results/decision-overhead.json``. Nothing else may run meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "decision-overhead.json"
PARTS = ("telemetry_s", "threads_s", "probe_s", "analysis_s", "policy_s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=50)
    args = parser.parse_args()

    from casrap import AdaptiveLM
    from casrap.data.prompts import load_prompts
    from casrap.decide.latency_model import cpu_name
    from casrap.version import measurement_versions

    lm = AdaptiveLM.load()
    decisions: list[Any] = []
    decide = lm.router.decide
    lm.router.decide = lambda *a, **k: decisions.append(decide(*a, **k)) or decisions[-1]  # keep each decision's parts
    prompts = [p.text for p in load_prompts(None, split="test")][: args.requests]
    modes = {"no target": lambda est: None, "ample target (rule)": lambda est: 3.0 * est,
             "tight target (policy asked)": lambda est: 0.5 * est}
    samples: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for i, prompt in enumerate(prompts):
        order = list(modes) if i % 2 == 0 else list(modes)[::-1]
        for mode in order:
            ids = lm.encode(prompt, args.tokens)
            estimate = lm.router.estimate_unloaded(int(ids.shape[-1]), args.tokens)
            lm.router.analyzer.forget(prompt)  # every mode pays the analysis it needs, never a cached one
            answer = lm.generate(prompt, max_new_tokens=args.tokens, latency_target_s=modes[mode](estimate), ignore_eos=True)
            record, decision = answer.record, decisions[-1]
            samples[mode].append({"decision_s": record.decision_s, "latency_s": record.latency_s,
                                  "profile": record.profile, "rule": decision.rule,
                                  **{part: getattr(decision, part) for part in PARTS}})
            print(f"{mode:>28} {record.profile:>14} decision {1000 * record.decision_s:6.1f} ms of "
                  f"{record.latency_s:5.2f} s", file=sys.stderr, flush=True)
    rows = []
    for mode, runs in samples.items():
        row: dict[str, Any] = {"mode": mode, "n": len(runs), "rule": runs[0]["rule"] or "(policy)",
                               "latency_s": statistics.median(r["latency_s"] for r in runs),
                               "decision_ms": 1000 * statistics.median(r["decision_s"] for r in runs),
                               "share_pct": 100 * statistics.median(r["decision_s"] / r["latency_s"] for r in runs)}
        for part in PARTS:
            row[part.replace("_s", "_ms")] = 1000 * statistics.median(r[part] for r in runs)
        rows.append(row)
    columns = [{"key": "mode", "label": "request"}, {"key": "rule", "label": "decided by"}, {"key": "n", "label": "n"},
               {"key": "latency_s", "label": "latency s", "format": "{:.2f}"},
               {"key": "decision_ms", "label": "decision ms", "format": "{:.1f}"},
               {"key": "share_pct", "label": "decision % of request", "format": "{:.1f}"}] + [
               {"key": part.replace("_s", "_ms"), "label": part.replace("_s", " ms"), "format": "{:.2f}"} for part in PARTS]
    result = {
        "title": "Decision overhead on a 50-token request, idle",
        "page": "execution", "order": 3,
        "summary": (f"Medians over {args.requests} distinct held-out prompts per mode, {args.tokens} new tokens each "
                    "(EOS ignored), shipped bundle, casrap's default execution; each prompt's analysis measured afresh."),
        "command": "python benchmarks/decision_overhead.py " + " ".join(sys.argv[1:]),
        "machine": {"description": f"{cpu_name()}, {os.cpu_count()} cores, SmolLM2-135M-Instruct fp32", "short": "2-core CPU",
                    "threads": "casrap default (free cores + governor)", "load": "idle",
                    "load_average": round(os.getloadavg()[0], 2)},
        "versions": measurement_versions(str(ROOT)),
        "date": datetime.now(timezone.utc).date().isoformat(),
        "n": f"{args.requests} prompts x {len(modes)} modes", "columns": columns, "rows": rows, "notes": [],
    }
    RESULT.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
