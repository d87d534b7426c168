"""Decode speed and quality of int4 profiles against the float32 full model, on this machine.

For the full model and each variant (``int4`` with the activation dtype the machine's kernel
check prefers and with the other one, ``layers-25`` / ``ffn-25`` with and without ``+int4``,
and any ``--extra`` spec with and without it): the decode-step median of a greedy generation
of ``--tokens`` new tokens (EOS ignored; per-token median inside each run), in ``--pairs``
interleaved pairs against the full model (order alternating, ratio per pair, median of
ratios); perplexity on the test third of the bundled prose and KL to the full model's
next-token distribution on its first 512 tokens; packed bytes and memory beyond the base.
It also records the kernel check a bank runs before building int4 profiles (and whether it
would refuse them here). Nothing else may run on the machine meanwhile.

    OMP_NUM_THREADS=2 OMP_WAIT_POLICY=ACTIVE .venv/bin/python benchmarks/quant_speed.py
    .venv/bin/python benchmarks/quant_speed.py --tiny     # seconds: checks the script end to end

Writes ``benchmarks/results/quant.json`` (the results schema, ``benchmarks/README.md``) and
the raw runs to ``benchmarks/raw/quant.json``; ``--tiny`` writes under ``reports/quant-tiny/``.
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
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from casrap.version import measurement_versions

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _forced(real: Any, dtype: str) -> Any:
    """A kernel check that makes a bank build int4 with ``dtype`` activations (the measured figure kept)."""
    from casrap.pruners.quantize import KernelCheck

    return KernelCheck({dtype: real.speedups[dtype]}, cpu=real.cpu, threads=real.threads, tokens=real.tokens,
                       rounds=real.rounds, shapes=real.shapes)


def build_variants(lm: Any, spec: str, extra: list[str], both_acts: bool = True) -> tuple[list[tuple[str, Any, str]], Any]:
    """[(row label, bank, profile name)] and the machine's real kernel check.

    One bank holds the structural profiles and the int4 ones with the preferred activation
    dtype; a sibling bank on the same model holds ``int4`` with the other dtype.
    """
    from casrap.cli.common import build_profiles
    from casrap.profiles.catalogue import build_plan
    from casrap.models import describe
    from casrap.pruners.quantize import ACT_DTYPES, layer_shapes, quant_kernel_check

    structural = ["layers-25", "ffn-25", *extra]
    bank = build_profiles(lm, ["none", *structural], spec)
    real = quant_kernel_check(layer_shapes(bank.profile("none").layers[0]))
    preferred = real.act_dtype
    other = next(d for d in ACT_DTYPES if d != preferred)
    bank.quant_check = _forced(real, preferred)
    int4 = build_plan("int4", None, describe(lm.model))
    int4.fingerprint = bank.fingerprint
    bank.add(int4)
    rows = [("none", bank, "none"), ("int4", bank, "int4")]  # the dtype a bank here would pick
    if both_acts:
        side = bank.sibling()
        side.quant_check = _forced(real, other)
        side.add(replace(int4))
        rows.append((f"int4 ({other} activations)", side, "int4"))
    for name in structural:
        plan = bank.profile(name).plan
        bank.add(replace(plan, name=f"{name}+int4", quant="int4", meta=dict(plan.meta)))
        rows += [(name, bank, name), (f"{name}+int4", bank, f"{name}+int4")]
    return rows, real


def decode_ms(bank: Any, name: str, tok: Any, ids: torch.Tensor, tokens: int) -> float:
    """Per-token median decode step of one greedy run of ``tokens`` new tokens (EOS ignored)."""
    from casrap.decide.generation import generate_timed

    bank.activate(name)
    try:
        return 1000.0 * generate_timed(bank.model, tok, ids, tokens, ignore_eos=True).decode_median_s
    finally:
        bank.activate("none")


def quality(bank: Any, name: str, corpus_ids: torch.Tensor, full_logits: torch.Tensor, window: int) -> tuple[float, float]:
    from casrap.measure import mean_kl, next_token_logits, perplexity

    with bank.using(name):
        ppl = perplexity(bank.model, corpus_ids, window=window, stride=window // 2).ppl
        kl = mean_kl(full_logits, next_token_logits(bank.model, corpus_ids[: full_logits.shape[0]].unsqueeze(0)))
    return ppl, kl


def measure(rows: list[tuple[str, Any, str]], lm: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    from casrap.bench import BENCH_PROMPT
    from casrap.measure import next_token_logits
    from casrap.measure.corpus import prose_split

    tok = lm.tokenizer
    ids = tok(BENCH_PROMPT, return_tensors="pt").input_ids
    corpus_ids = tok(prose_split("test").text, return_tensors="pt").input_ids[0][: args.ppl_max_tokens]
    full_bank = rows[0][1]
    full_bank.activate("none")
    full_logits = next_token_logits(lm.model, corpus_ids[: args.kl_tokens].unsqueeze(0))
    for label, bank, name in rows:  # warm-up: every variant once
        decode_ms(bank, name, tok, ids, args.tokens)
    out = []
    for label, bank, name in rows:
        pairs = []
        for i in range(args.pairs):
            if i % 2 == 0:
                base, cand = decode_ms(full_bank, "none", tok, ids, args.tokens), decode_ms(bank, name, tok, ids, args.tokens)
            else:
                cand, base = decode_ms(bank, name, tok, ids, args.tokens), decode_ms(full_bank, "none", tok, ids, args.tokens)
            pairs.append((base, cand))
        ppl, kl = quality(bank, name, corpus_ids, full_logits, args.window)
        ratios = [b / c for b, c in pairs]
        out.append({
            "profile": label, "act": bank.quant_check.act_dtype if bank.profile(name).plan.quant else "float32",
            "ms": statistics.median(c for _, c in pairs), "full_ms": statistics.median(b for b, _ in pairs),
            "speedup": statistics.median(ratios), "ratios": ratios, "ideal": bank.ideal_speedup(name),
            "ppl": ppl, "kl": 0.0 if name == "none" else kl,
            "packed_mb": bank.packed_bytes(name) / 2**20,
            "extra_mb": bank.memory_overhead_bytes(name) / 2**20 if name != "none" else 0.0,
        })
    return out


def results_table(measured: list[dict[str, Any]], real: Any, args: argparse.Namespace, model: str) -> dict[str, Any]:
    from casrap.decide.latency_model import cpu_name

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    refusal = real.refusal()
    rows = [{"profile": m["profile"], "act": m["act"], "ideal": round(m["ideal"], 2),
             "speedup": None if m["profile"] == "none" else round(m["speedup"], 2),
             "pairs": None if m["profile"] == "none" else f"{min(m['ratios']):.2f}-{max(m['ratios']):.2f}",
             "ms": round(m["ms"], 1), "full_ms": round(m["full_ms"], 1), "ppl": round(m["ppl"], 2), "kl": round(m["kl"], 4),
             "packed": round(m["packed_mb"], 1), "extra": round(m["extra_mb"], 1)} for m in measured]
    checks = ", ".join(f"{v:.2f}x with {k} activations" for k, v in real.speedups.items())
    return {
        "title": "int4 weight-only profiles: decode speed and quality against float32",
        "page": "quantized", "page_title": "Quantized profiles",
        "summary": ("Decode step of each variant against the float32 full model in interleaved pairs (per-token medians), "
                    "perplexity and KL against the full model on the test third of the bundled prose. int4 packs every "
                    "decoder projection in groups of 32 (asymmetric); embeddings and the tied head stay float32."),
        "command": " ".join(shlex.quote(a) for a in [f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')}",
                                                      f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')}",
                                                      ".venv/bin/python", "benchmarks/quant_speed.py", *sys.argv[1:]]),
        "machine": {"description": f"{cpu_name()} ({os.cpu_count()} cores, {real.cpu}), {model} in float32",
                    "short": f"{os.cpu_count()}-core CPU", "threads": torch.get_num_threads(),
                    "load": args.load, "load_average": " ".join(f"{x:.2f}" for x in load) if load else None,
                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset")},
        "versions": measurement_versions(str(ROOT)), "date": datetime.date.today().isoformat(),
        "n": (f"{args.pairs} interleaved pairs of {args.tokens} new tokens (EOS ignored) per variant; perplexity on "
              f"{args.ppl_max_tokens} tokens, KL on the first {args.kl_tokens}"),
        "columns": [{"key": "profile", "label": "profile"}, {"key": "act", "label": "activations"},
                    {"key": "ideal", "label": "ideal", "format": "{:.2f}x"},
                    {"key": "speedup", "label": "speedup (median of pairs)", "format": "{:.2f}x"},
                    {"key": "pairs", "label": "min-max"}, {"key": "ms", "label": "decode ms/token", "format": "{:.1f}"},
                    {"key": "full_ms", "label": "full ms/token", "format": "{:.1f}"},
                    {"key": "ppl", "label": "test ppl", "format": "{:.2f}"}, {"key": "kl", "label": "KL", "format": "{:.4f}"},
                    {"key": "packed", "label": "packed MB", "format": "{:.1f}"}, {"key": "extra", "label": "extra MB", "format": "{:.1f}"}],
        "rows": rows,
        "notes": [f"Kernel check at this model's projection shapes (one decode row, {real.threads} threads): int4 matmul "
                  f"{checks} against float32 F.linear; a bank here would "
                  + (f"refuse int4 profiles ({refusal})." if refusal else f"build them with {real.act_dtype} activations.")],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny random model, a few tokens (checks the script)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--ppl-max-tokens", type=int, default=4096)
    parser.add_argument("--kl-tokens", type=int, default=512)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--extra", nargs="*", default=[], help="more specs or shipped plans, timed with and without +int4")
    parser.add_argument("--one-act", action="store_true",
                        help="time int4 with the preferred activation dtype only (the other one can be 20x slower)")
    parser.add_argument("--threads", type=int, help="torch threads (default: as torch starts, OMP_NUM_THREADS)")
    parser.add_argument("--load", default="idle (nothing else running)", help="what else ran on the machine")
    parser.add_argument("--output", type=Path, help="results file (default benchmarks/results/quant.json)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:
        from casrap.models.tiny import TINY_ALIAS, tiny_llama

        out = args.output or ROOT / "reports" / "quant-tiny" / "quant.json"
        os.environ["CASRAP_HOME"] = str(out.parent / "home")  # the tiny model's calibration stays out of the user's cache
        lm, model = tiny_llama(), TINY_ALIAS
        args.pairs, args.tokens, args.ppl_max_tokens, args.kl_tokens, args.window = 2, 4, 128, 32, 64
    else:
        from casrap.cli.common import load

        lm, model = load(args.model, "cpu"), args.model
        out = args.output or HERE / "results" / "quant.json"
    rows, real = build_variants(lm, model, args.extra, both_acts=not args.one_act)
    measured = measure(rows, lm, args)
    table = results_table(measured, real, args, model)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")
    raw = (out.parent / "quant-raw.json") if args.tiny else HERE / "raw" / "quant.json"
    raw.write_text(json.dumps({"kernel_check": real.to_dict(), "platform": platform.platform(), "rows": measured}, indent=1) + "\n")
    for row in table["rows"]:
        print(json.dumps(row))
    print(f"wrote {out} and {raw}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
