"""Should ``casrap serve`` decode through torch.compile? Eager against compiled, by profile and load.

    .venv/bin/python benchmarks/compile_decision.py --profiles none,layers-25,ffn-25,ga-rates-20

For each profile of one bank: compile it (transformers' static cache + ``CompileConfig``,
CPUs opted in, as ``casrap bench --compile`` does) and time the first compiled request
(compile included) and the compile-free first eager request; then, at each load level
(idle, one background process burning a core), time eager and compiled decode in
interleaved pairs (``--pairs``, ``--tokens`` new tokens, EOS ignored, per-token median of
each run) with the thread count casrap's execution picks at that level (all free cores;
one when a core is taken). Greedy answers of eager and compiled are compared token for
token. Writes ``benchmarks/results/compile-decision.json``. Nothing else may run meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "compile-decision.json"
PROMPT = "Explain in a few sentences why the sky looks blue during the day and red at sunset."


class _Stamp(StoppingCriteria):
    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        self.times.append(time.perf_counter())
        return torch.zeros((input_ids.shape[0],), dtype=torch.bool)


def run(bank: Any, name: str, ids: torch.Tensor, tokens: int, options: dict[str, Any]) -> tuple[float, float, list[int]]:
    """(median decode step s, wall s, new ids) of one greedy generation on ``name``."""
    bank.activate(name)
    stamp = _Stamp()
    start = time.perf_counter()
    with torch.inference_mode():
        out = bank.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                                  do_sample=False, pad_token_id=0, stopping_criteria=StoppingCriteriaList([stamp]), **options)
    wall = time.perf_counter() - start
    steps = [b - a for a, b in zip(stamp.times, stamp.times[1:])]
    return statistics.median(steps), wall, out[0, ids.shape[1]:].tolist()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--profiles", default="none,layers-25,ffn-25,ga-rates-20")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--levels", default="0,1")
    args = parser.parse_args()

    from casrap.bench import _compile_options
    from casrap.cli.common import build_profiles, load
    from casrap.decide.latency_model import cpu_name
    from casrap.telemetry.load import LoadLevels

    names = args.profiles.split(",")
    lm = load("smollm2-135m", "cpu")
    bank = build_profiles(lm, names, "smollm2-135m")
    ids = lm.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                           return_tensors="pt")
    ids = ids if torch.is_tensor(ids) else ids["input_ids"]
    compiled = _compile_options()
    eager: dict[str, Any] = {}
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    first: dict[str, dict[str, float]] = {}
    same: dict[str, bool] = {}
    for name in names:  # first requests: eager (warm model) and compiled (its wall time includes the compilation)
        _, eager_wall, eager_ids = run(bank, name, ids, args.tokens, eager)
        _, comp_wall, comp_ids = run(bank, name, ids, args.tokens, compiled)
        first[name] = {"eager_first_s": eager_wall, "compile_s": comp_wall}
        same[name] = eager_ids == comp_ids
    rows = []
    loadavg = []
    with LoadLevels() as levels:
        for level in args.levels.split(","):
            levels.set(level)
            time.sleep(1.5)
            threads = max(1, cores - int(level))
            torch.set_num_threads(threads)
            for name in names:
                run(bank, name, ids, 4, eager)
                run(bank, name, ids, 4, compiled)
                e_steps, c_steps = [], []
                for pair in range(args.pairs):
                    order = [(eager, e_steps), (compiled, c_steps)]
                    for options, sink in (order if pair % 2 == 0 else order[::-1]):
                        sink.append(run(bank, name, ids, args.tokens, options)[0])
                e, c = statistics.median(e_steps), statistics.median(c_steps)
                rows.append({"level": level, "threads": threads, "profile": name, "eager_ms": 1000 * e, "compiled_ms": 1000 * c,
                             "eager_over_compiled": e / c, "compile_s": first[name]["compile_s"],
                             "first_eager_s": first[name]["eager_first_s"],
                             "same_greedy_answer": same[name]})
                print(f"{level} {name:>12} threads {threads} eager {1000 * e:6.1f} compiled {1000 * c:6.1f} "
                      f"x{e / c:.2f} same={same[name]}", file=sys.stderr, flush=True)
            loadavg.append(os.getloadavg()[0])
    bank.activate("none")
    from casrap.version import measurement_versions

    columns = [{"key": "level", "label": "load"}, {"key": "threads", "label": "threads"}, {"key": "profile", "label": "profile"},
               {"key": "eager_ms", "label": "eager ms/step", "format": "{:.1f}"},
               {"key": "compiled_ms", "label": "compiled ms/step", "format": "{:.1f}"},
               {"key": "eager_over_compiled", "label": "compiled speedup", "format": "{:.2f}"},
               {"key": "compile_s", "label": "first compiled request, s", "format": "{:.1f}"},
               {"key": "first_eager_s", "label": "first eager request, s", "format": "{:.2f}"},
               {"key": "same_greedy_answer", "label": "same greedy answer"}]
    result = {
        "title": "Compiled decode under casrap's execution: eager against torch.compile (static cache), idle and one busy core",
        "page": "compiled-decode", "order": 0,
        "summary": (f"Median decode step of {args.tokens}-token greedy generations (EOS ignored), eager and compiled interleaved "
                    f"in {args.pairs} pairs per profile and level, threads as casrap's execution sets them (all cores idle, "
                    "one fewer per busy core); OpenMP default (spinning) wait."),
        "command": "python benchmarks/compile_decision.py " + " ".join(sys.argv[1:]),
        "machine": {"description": f"{cpu_name()}, {cores} cores, SmolLM2-135M-Instruct fp32", "short": "2-core CPU",
                    "threads": "2 idle, 1 with one busy core", "load": "quiet apart from the background load",
                    "load_average": round(statistics.median(loadavg), 2) if loadavg else None},
        "versions": measurement_versions(str(ROOT)),
        "date": datetime.now(timezone.utc).date().isoformat(),
        "n": f"{args.pairs} pairs x {len(names)} profiles x {len(args.levels.split(','))} levels",
        "columns": columns, "rows": rows, "notes": [],
    }
    RESULT.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
