"""Turn raw measurements into result tables (``benchmarks/results/*.json``, the schema in README.md).

    python benchmarks/summarise.py recording FILE         # a replay file written by `casrap record`
    python benchmarks/summarise.py replay TEST_JSON       # `casrap test --replay ... --json` output
    python benchmarks/summarise.py loadtest LOADTEST_JSON # `casrap loadtest --load-levels ... --json` output
    python benchmarks/summarise.py serving SWEEP_JSON RATE_JSON  # `casrap loadtest --url ... --concurrency/--rate --json`

Figures are copied from the measurement files, never typed in; each table names its command,
machine, versions, date and n.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
    except OSError:
        return "unknown"


def _write(name: str, table: dict) -> Path:
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(table, indent=1) + "\n")
    return path


def recording(path: str) -> Path:
    lines = Path(path).read_text().splitlines()
    header = json.loads(lines[0])
    records = [json.loads(line) for line in lines[1:]]
    contexts = {(r["prompt_key"], r["load"]) for r in records}
    rows = []
    for level in sorted({r["load"] for r in records}, key=lambda v: (not str(v).isdigit(), str(v))):
        at = [r for r in records if r["load"] == level]
        row: dict = {"level": str(level), "contexts": len({r["prompt_key"] for r in at})}
        for profile in header["profiles"]:
            mine = [r["latency_s"] for r in at if r["profile"] == profile]
            row[profile] = round(statistics.median(mine), 2) if mine else None
        full = [r["decode_s"] * 1000 for r in at if r["profile"] == "none"]
        row["full_decode_ms"] = round(statistics.median(full), 1) if full else None
        row["slowdown"] = round(statistics.median(r["slowdown"] for r in at if r["profile"] == "none"), 2)
        rows.append(row)
    measured = sum(r["latency_source"] == "measured" for r in records)
    return _write("recording", {
        "title": "The recording: every latency measured, by load level",
        "page": "policy", "page_title": "Policy vs fixed profiles", "page_rank": 1, "order": 1,
        "summary": "Median latency (s) of a 32-token answer per profile (TTFT + 31 x the median decode step of a 16-token timed "
                   "generation, + prompt analysis, telemetry and thread change), the full model's median decode step and "
                   "casrap's measured slowdown, per load level. Threads set by the rule before every generation.",
        "command": "casrap record --output checkpoints/replay-v3.jsonl --quality-from casrap/data/replay_smollm2.jsonl "
                   + " ".join(f"-p {p}" for p in header["profiles"]),
        "machine": {"description": f"{header['machine']['cpu']}, {header['machine']['cores']} cores, SmolLM2-135M-Instruct fp32",
                    "short": f"{header['machine']['cores']}-core CPU", "threads": header["thread_policy"],
                    "load": "quiet apart from the background load levels", "load_average": None},
        "versions": {**header["versions"], "casrap": f"{header['versions']['casrap']} (commit {_commit()})"},
        "date": header.get("date", "")[:10] or _today(),
        "n": f"{len(contexts)} contexts ({len({k for k, _ in contexts})} prompts: {header['prompts']['train']} train, "
             f"{header['prompts']['test']} test) x {len(header['profiles'])} profiles; {measured}/{len(records)} latencies measured",
        "columns": [{"key": "level", "label": "load"}, {"key": "contexts", "label": "prompts"},
                    *[{"key": p, "label": p, "format": "{:.2f}"} for p in header["profiles"]],
                    {"key": "full_decode_ms", "label": "full decode ms/token", "format": "{:.1f}"},
                    {"key": "slowdown", "label": "slowdown", "format": "{:.2f}"}],
        "rows": rows,
        "notes": [f"Wall time of the timing pass: {header['durations_s'].get('timing_wall_s', 0) / 60:.0f} min; "
                  f"dropped actions and why: {json.dumps(header.get('dropped_profiles', {}))}"],
    })


def serving(sweep_path: str, rate_path: str, machine: str, load_average: float | None) -> Path:
    """The serving benchmark: a concurrency sweep and a Poisson-rate run against `casrap serve` (vLLM's metric names)."""
    sweep, rate = json.loads(Path(sweep_path).read_text()), json.loads(Path(rate_path).read_text())
    keys = ("request_throughput", "output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms",
            "median_itl_ms", "p99_itl_ms", "median_e2el_ms", "p99_e2el_ms")
    rows = []
    for r in sweep["summary"]:
        rows.append({"arrivals": f"{r['max_concurrency']} clients", "completed": r["completed"],
                     **{k: r[k] for k in keys}, "vs_one": r["output_throughput_vs_first"], "same": r["same_text_as_first"]})
    v = rate["vllm"]
    rows.append({"arrivals": f"Poisson {v['request_rate']:g}/s, <= {v['max_concurrency']} in flight", "completed": v["completed"],
                 **{k: v[k] for k in keys}, "vs_one": None, "same": None})
    labels = {"request_throughput": ("req/s", "{:.2f}"), "output_throughput": ("output tok/s", "{:.1f}"),
              "median_ttft_ms": ("TTFT p50 ms", "{:.0f}"), "p99_ttft_ms": ("TTFT p99 ms", "{:.0f}"),
              "median_tpot_ms": ("TPOT p50 ms", "{:.1f}"), "p99_tpot_ms": ("TPOT p99 ms", "{:.1f}"),
              "median_itl_ms": ("ITL p50 ms", "{:.1f}"), "p99_itl_ms": ("ITL p99 ms", "{:.1f}"),
              "median_e2el_ms": ("e2e p50 ms", "{:.0f}"), "p99_e2el_ms": ("e2e p99 ms", "{:.0f}")}
    columns = [{"key": "arrivals", "label": "clients"}, {"key": "completed", "label": "requests"},
               *[{"key": k, "label": labels[k][0], "format": labels[k][1]} for k in keys],
               {"key": "vs_one", "label": "output tok/s vs 1 client", "format": "{:.2f}x"},
               {"key": "same", "label": "answers same as 1 client", "format": "{:.0%}"}]
    config = sweep["runs"][0]["config"] if isinstance(sweep.get("runs"), list) else sweep.get("config", {})
    return _write("serving", {
        "title": "Serving: concurrent streaming clients against casrap serve (continuous batching)",
        "page": "serving", "page_title": "Serving benchmark", "page_rank": 3, "order": 1,
        "summary": ("`casrap loadtest --url` streaming chat completions of 64 tokens (EOS ignored) to a local `casrap serve` "
                    "(shipped bundle, embedded model, batching on: up to 8 requests per forward pass), the same prompts at each "
                    "concurrency; metrics named as vLLM's benchmark_serving names them (TTFT stamped at the first chunk)."),
        "command": ["casrap serve --port 8000 --allow-debug-extensions",
                    "casrap loadtest --url http://127.0.0.1:8000/v1 --concurrency 1,2,4,8 --prompts 32 -n 64 --ignore-eos --json",
                    "casrap loadtest --url http://127.0.0.1:8000/v1 --rate 2 --concurrency 8 --prompts 48 -n 64 --seed 0 --ignore-eos --json"],
        "machine": {"description": f"{machine}, 2 cores, SmolLM2-135M-Instruct fp32", "short": "2-core CPU",
                    "threads": "casrap default (free cores + governor)", "load": "idle (server and load generator only)",
                    "load_average": load_average},
        "versions": {"casrap": f"0.1.0 (commit {_commit()})"},
        "date": _today(), "n": "32 prompts per concurrency level; 48 requests at the Poisson rate",
        "columns": columns, "rows": rows,
        "headline": [{"label": "serve: output tokens/s with 8 streaming clients over 1 client", "column": "vs_one",
                      "row": len(sweep["summary"]) - 1}],
        "notes": [f"Client config: {json.dumps({k: config.get(k) for k in ('max_tokens', 'model', 'seed')})}.",
                  "Median TPOT by concurrency (a batched step shared by that many requests), ms: " +
                  ", ".join(f"{r['max_concurrency']}: {r['median_tpot_ms']:.1f}" for r in sweep["summary"]) + "."],
    })


def batching(raw_path: str = str(HERE / "raw" / "batching.json")) -> Path:
    """The batching engine: 8 concurrent greedy requests against the same prompts one at a time (benchmarks/batching.py)."""
    raw = json.loads(Path(raw_path).read_text())
    rows = []
    for rep in raw["reps"]:
        rows.append({"rep": rep["rep"] + 1, "solo": rep["solo"]["tokens_per_s"], "serial_solo": rep["solo_serial_path"]["tokens_per_s"],
                     "concurrent": rep["concurrent"]["tokens_per_s"], "ratio": rep["throughput_ratio"],
                     "step_ms": 1000 * rep["concurrent"]["per_token_median_s"], "solo_step_ms": 1000 * rep["solo"]["per_token_median_s"],
                     "identical": f"{rep['identical_answers']}/{raw['n']['clients']}", "peak": rep["engine_peak_batch"]})
    m = raw["machine"]
    return _write("batching", {
        "title": "Continuous batching: 8 concurrent greedy requests against the same prompts one at a time",
        "page": "serving", "page_title": "Serving benchmark", "page_rank": 3, "order": 2,
        "summary": (f"{raw['n']['clients']} requests of {raw['n']['tokens']} new tokens (EOS ignored, full model) submitted together "
                    "to `AdaptiveLM` (batching engine, max_batch 8) against the same prompts answered one after another; "
                    "every concurrent answer compared token for token with its solo answer."),
        "command": raw["command"].replace(str(HERE.parent) + "/", "").replace(".venv/bin/python", "python"),
        "machine": {"description": f"{m['cpu']}, {m['cores']} cores, SmolLM2-135M-Instruct fp32", "short": f"{m['cores']}-core CPU",
                    "threads": f"{m['torch_threads']} (OpenMP default wait)", "load": "idle", "load_average": 1.06},
        "versions": raw["versions"], "date": raw["date"][:10], "n": f"{raw['n']['reps']} repetitions x {raw['n']['clients']} prompts",
        "columns": [{"key": "rep", "label": "rep"}, {"key": "solo", "label": "one at a time, tok/s", "format": "{:.1f}"},
                    {"key": "serial_solo", "label": "serial path, tok/s", "format": "{:.1f}"},
                    {"key": "concurrent", "label": "8 concurrent, tok/s", "format": "{:.1f}"},
                    {"key": "ratio", "label": "concurrent / one at a time", "format": "{:.2f}x"},
                    {"key": "solo_step_ms", "label": "solo step ms", "format": "{:.1f}"},
                    {"key": "step_ms", "label": "batched step ms", "format": "{:.1f}"},
                    {"key": "identical", "label": "answers identical"}, {"key": "peak", "label": "peak batch"}],
        "rows": rows,
        "headline": [{"label": "continuous batching: output tokens/s, 8 concurrent requests over one at a time", "column": "ratio",
                      "row": 0}],
        "notes": [f"Median ratio {raw['median_throughput_ratio']:.2f}x; all answers identical: {raw['all_identical']}."],
    })


def _today() -> str:
    from datetime import date

    return date.today().isoformat()


if __name__ == "__main__":
    kind = sys.argv[1]
    if kind == "recording":
        print(recording(sys.argv[2]))
    elif kind == "batching":
        print(batching(*sys.argv[2:3]))
    elif kind == "serving":
        print(serving(sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5]) if len(sys.argv) > 5 else None))
    else:
        raise SystemExit(f"unknown kind {kind}")
