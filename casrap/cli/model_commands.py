"""``casrap info | eval ppl | eval speed | calibrate | bench | export``: the model and its profiles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from casrap.profiles.catalogue import FULL
from casrap.cli.common import (
    DeviceOpt,
    JsonOpt,
    ModelOpt,
    StructuralOpt,
    WeightNormOpt,
    build_profiles,
    emit_json,
    load,
    measure_latency_model,
    out,
    progress_bar,
)


# ------------------------------------------------------------------------- info
def info(model: str = ModelOpt, device: str = DeviceOpt, as_json: bool = JsonOpt) -> None:
    """Architecture, parameter breakdown and prunable units of a model."""
    from casrap.models import describe

    lm = load(model, device)
    data = describe(lm.model).to_dict()
    data["model"] = model
    data["device"] = lm.device
    data["dtype"] = str(lm.dtype).replace("torch.", "")
    if as_json:
        emit_json(data)
        return
    table = Table(title=f"{model} ({data['model_type']}, {data['device']}, {data['dtype']})")
    table.add_column("property")
    table.add_column("value", justify="right")
    for key in ("layers", "query_heads", "kv_heads", "group_size", "head_dim", "hidden_size", "ffn_width", "vocab_size", "tied_embeddings"):
        table.add_row(key, str(data[key]))
    params = data["parameters"]
    pct = data["parameter_percentages"]
    for key in ("attention", "mlp", "embeddings", "lm_head", "norms"):
        table.add_row(f"params: {key}", f"{params[key]:,} ({pct.get(key, 0):.1f}%)")
    table.add_row("params: total", f"{params['total']:,}")
    for key, value in data["prunable_units"].items():
        table.add_row(f"prunable: {key}", f"{value:,}")
    out.print(table)


# ------------------------------------------------------------------------- eval
def eval_ppl(
    model: str = ModelOpt,
    device: str = DeviceOpt,
    corpus: str = typer.Option("auto", help="auto (WikiText-2 test, else the held-out test third of the bundled prose) | wikitext2 | offline | PATH"),
    window: int = typer.Option(512, help="sliding window length"),
    max_tokens: int | None = typer.Option(None, help="score at most this many tokens"),
    as_json: bool = JsonOpt,
) -> None:
    """Sliding-window perplexity on WikiText-2 or the bundled prose (says which)."""
    from casrap.measure import load_corpus, perplexity

    lm = load(model, device)
    text = load_corpus(corpus)
    ids = lm.tokenizer(text.text, return_tensors="pt").input_ids[0]
    if max_tokens:
        ids = ids[:max_tokens]
    result = perplexity(lm.model, ids, window=window, stride=window // 2, corpus=text.name)
    data = {"model": model, "corpus": result.corpus, "ppl": result.ppl, "mean_nll": result.mean_nll, "tokens": result.tokens}
    if as_json:
        emit_json(data)
    else:
        out.print(f"perplexity {result.ppl:.3f} on {result.corpus} ({result.tokens} tokens, window {window})")


def eval_speed(
    model: str = ModelOpt,
    device: str = DeviceOpt,
    prompt: str = typer.Option("Explain how bread rises.", help="prompt to time"),
    tokens: int = typer.Option(32, help="new tokens per run (EOS ignored)"),
    repetitions: int = typer.Option(5),
    as_json: bool = JsonOpt,
) -> None:
    """Generation timing: time to first token, decode ms/token, tokens/s (medians)."""
    import torch

    from casrap.bench import router_timing
    from casrap.profiles.bank import ProfileBank

    lm = load(model, device)
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids
    timing = router_timing(ProfileBank(lm.model, base_model=model), lm.tokenizer, ids, new_tokens=tokens, repetitions=repetitions)
    data = {"model": model, "device": lm.device, "threads": torch.get_num_threads(), "prompt_tokens": int(ids.shape[1]), **timing.to_dict()}
    if as_json:
        emit_json(data)
    else:
        out.print(
            f"{model} on {lm.device} ({data['threads']} threads): TTFT {1000 * timing.ttft_s:.1f} ms, "
            f"decode {timing.decode_ms_per_token:.1f} ms/token, {timing.tokens_per_s:.1f} tokens/s "
            f"(median of {repetitions}, {tokens} tokens)"
        )


# -------------------------------------------------------------------- calibrate
def calibrate(
    model: str = ModelOpt,
    device: str = DeviceOpt,
    samples: int = typer.Option(64, help="number of calibration texts"),
    dataset: str | None = typer.Option(None, help="CSV/JSONL with a prompt column (default: the bundled calibration text)"),
    max_tokens: int = typer.Option(256, help="tokens per calibration text"),
    output: Path | None = typer.Option(None, help="file to write (default: keyed to the model under CASRAP_HOME)"),
    latency_only: bool = typer.Option(False, "--latency", help="only re-measure the unloaded latency model (for this device, dtype and thread policy)"),
) -> None:
    """Measure head, FFN-channel and layer importance from activations; save it.

    Other commands calibrate on first use; run this to recalibrate or to use your own text.
    Either way the unloaded latency model is measured again afterwards.
    """
    from casrap.data.calibration import calibration_texts
    from casrap.data.prompts import load_prompts
    from casrap.pruners.importance import calibrate as run_calibration
    from casrap.pruners.importance import default_calibration_path

    lm = load(model, device)
    if latency_only:
        _measure_latency(lm)
        return
    texts = [p.text for p in load_prompts(dataset, split="train")][:samples] if dataset else calibration_texts(samples)
    with progress_bar() as bar:
        task = bar.add_task("calibrating", total=len(texts))
        importance = run_calibration(lm.model, lm.tokenizer, texts, max_tokens=max_tokens, progress=lambda i, n: bar.update(task, completed=i))
    path = importance.save(output or default_calibration_path(lm.model))
    influence = ", ".join(f"{v:.3f}" for v in importance.layers.tolist())
    out.print(f"saved {importance.source} importance to {path}")
    out.print(f"block influence per layer: {influence}")
    _measure_latency(lm)


def _measure_latency(lm: Any) -> None:
    """The unloaded latency model latency targets are normalised by (per model, device, dtype,
    thread policy and machine), measured now and cached unless the machine was busy."""
    from casrap.decide.latency_model import LOAD_LIMIT_PCT
    from casrap.telemetry.live import LiveTelemetry

    latency = measure_latency_model(lm.model, lm.tokenizer, LiveTelemetry(device=lm.model.device), force=True)
    fit, held = latency.fit, latency.holdout
    out.print(f"unloaded latency model ({latency.device}, {latency.dtype}, threads {latency.threads}): TTFT {1e3 * fit.ttft_a:.1f} ms + "
              f"{1e3 * fit.ttft_b:.3f} ms/prompt token, decode {1e3 * fit.decode_c:.1f} ms/token (+{1e6 * fit.decode_d:.1f} us per "
              f"context token); held-out median error {100 * held.get('median_rel_error', float('nan')):.1f}% "
              f"(other processes used {latency.other_cpu_util:.0f}% CPU meanwhile)")
    if latency.other_cpu_util > LOAD_LIMIT_PCT:
        out.print(f"[yellow]measured under load:[/] other processes used more than {LOAD_LIMIT_PCT:.0f}% CPU, so this fit is measured "
                  "again on next use; run casrap calibrate --latency on a quiet machine")


def bench(
    model: str = ModelOpt,
    device: str = DeviceOpt,
    profiles: list[str] | None = typer.Option(None, "--profiles", "-p", help="specs (ffn-25, heads-10, layers-25, kvheads-33, ffnmask-25) or plan .json files; default: CASRAP v2.2 set + trade-off set"),
    tokens: int = typer.Option(32, help="new tokens per timed run"),
    pairs: int = typer.Option(5, help="interleaved baseline/profile pairs"),
    corpus: str = typer.Option("auto", help="auto (WikiText-2 test, else the held-out test third of the bundled prose) | wikitext2 | offline | PATH"),
    ppl_max_tokens: int | None = typer.Option(None, help="cap corpus tokens for perplexity"),
    structural: bool | None = StructuralOpt,
    weight_norm: bool = WeightNormOpt,
    as_json: bool = JsonOpt,
    output: Path | None = typer.Option(None, help="also write the JSON report here"),
    compile_decode: bool = typer.Option(False, "--compile", help="also time decode under torch.compile with a static cache (eager vs compiled, per profile)"),
    memory_with: list[str] | None = typer.Option(None, "--memory-with", help="extra profiles built (not timed) so that total_memory_overhead_mb counts them too; 'default' = CASRAP v2.2 + trade-off sets"),
) -> None:
    """Speed, quality and memory of pruned profiles against the full model."""
    from casrap.bench import BenchConfig, compile_blocker, run_bench
    from casrap.errors import InputError
    from casrap.measure import load_corpus
    from casrap.profiles import CASRAP_V22, TRADE_OFF

    if compile_decode and compile_blocker():
        raise InputError(compile_blocker())
    lm = load(model, device)
    names = list(profiles) if profiles else CASRAP_V22 + TRADE_OFF
    if FULL not in names:
        names.insert(0, FULL)
    extra = [n for m in (memory_with or []) for n in (CASRAP_V22 + TRADE_OFF if m == "default" else [m])]
    bank = build_profiles(lm, list(dict.fromkeys(names + extra)), model, structural, weight_norm)
    timed = [n for n in bank.names if n in names or n not in extra]
    text = load_corpus(corpus)
    cfg = BenchConfig(new_tokens=tokens, pairs=pairs, ppl_max_tokens=ppl_max_tokens, compile=compile_decode)
    with progress_bar() as bar:
        task = bar.add_task("bench", total=len(timed))
        report = run_bench(bank, lm.tokenizer, text, timed, cfg, progress=lambda n: bar.update(task, advance=1, description=f"bench {n}"))
    data = report.to_dict()
    data["total_memory_overhead_mb"] = bank.memory_overhead_bytes() / 2**20
    data["base_weight_mb"] = bank.base_weight_bytes() / 2**20
    data["total_memory_overhead_pct"] = 100 * bank.memory_overhead_bytes() / bank.base_weight_bytes()
    data["profiles_in_bank"] = bank.names
    data["reorder"] = bank.reorder_info
    data["copied_modules"] = bank.copied_modules
    if _save_or_emit(data, output, as_json):
        return
    table = Table(title=f"casrap bench: {model} on {report.device} ({report.threads} threads), ppl on {report.corpus}, {tokens} new tokens, {pairs} pairs")
    columns = ["profile", "removed", "ideal", "speedup", "decode ms/tok", "TTFT ms", "ppl", "KL", "switch ms", "extra MB", "peak MB"]
    if compile_decode:
        columns += ["compiled ms/tok", "compiled speedup", "eager/compiled", "compile s"]
    for col in columns:
        table.add_column(col, justify="left" if col == "profile" else "right", no_wrap=True)
    for p in report.profiles:
        row = [
            p.name, f"{100 * p.params_removed:.1f}%", f"{p.ideal_speedup:.2f}x", f"{p.speedup:.2f}x",
            f"{p.decode_ms_per_token:.1f}", f"{p.ttft_ms:.0f}", f"{p.ppl:.2f}", f"{p.kl:.3f}",
            f"{p.switch_ms:.3f}", f"{p.memory_overhead_mb:.1f}", "-" if p.peak_memory_mb is None else f"{p.peak_memory_mb:.0f}",
        ]
        if p.compiled:
            c = p.compiled
            row += [f"{c['decode_ms_per_token']:.1f}", f"{c['speedup']:.2f}x", f"{c['eager_over_compiled']:.2f}x", f"{c['compile_s']:.0f}"]
        table.add_row(*row)
    out.print(table)
    for p in report.profiles:
        out.print(f"  {p.name}: {p.description}", soft_wrap=True, highlight=False)
    out.print(f"memory held by all {len(bank.names) - 1} profiles beyond the base model ({data['base_weight_mb']:.0f} MB): "
              f"{data['total_memory_overhead_mb']:.1f} MB ({data['total_memory_overhead_pct']:.1f}%); modules copied: "
              f"{sum(bank.copied_modules.values())}")
    if bank.reorder_info:
        out.print(f"base reordered by {bank.reorder_info['importance']} importance for zero-copy profiles: largest logit change "
                  f"{bank.reorder_info['max_abs_logit_diff']:.2e} on {bank.reorder_info['probe_tokens']} tokens")


def _save_or_emit(data: dict, output: Path | None, as_json: bool) -> bool:
    """Write the JSON report to ``output`` if given; print it and return True under ``--json``."""
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(data, indent=1, default=float))
    if as_json:
        emit_json(data)
    return as_json


def bench_kv(
    model: str = ModelOpt,
    device: str = DeviceOpt,
    keep_ratio: list[float] = typer.Option([0.5, 0.25], "--kv-keep-ratio", help="share of prompt tokens the compressed cache keeps (repeatable)"),
    prompt_tokens: list[int] = typer.Option([256, 512, 1024], "--prompt-tokens", help="prompt lengths (search prose, then calibration text)"),
    tokens: int = typer.Option(32, help="answer tokens (quality) and decoded tokens per timed run"),
    pairs: int = typer.Option(3, help="interleaved full/compressed pairs"),
    sinks: int = typer.Option(4, help="first tokens always kept (attention sinks)"),
    recent: int = typer.Option(32, help="last prompt tokens always kept"),
    as_json: bool = JsonOpt,
    output: Path | None = typer.Option(None, help="also write the JSON report here"),
) -> None:
    """KV-cache compression for long prompts: KL on the full model's answer and decode speed, by prompt length."""
    import torch

    from casrap.bench_kv import as_dicts, kv_study
    from casrap.pruners.kvcache import KVCompression

    lm = load(model, device)
    rows = kv_study(lm.model, lm.tokenizer, list(prompt_tokens), list(keep_ratio), tokens, pairs, KVCompression(sinks=sinks, recent=recent))
    data = {"model": model, "device": lm.device, "threads": torch.get_num_threads(), "sinks": sinks, "recent": recent,
            "text": "casrap-prose/search + calibration text", "rows": as_dicts(rows)}
    if _save_or_emit(data, output, as_json):
        return
    table = Table(title=f"KV-cache compression: {model} on {lm.device} ({data['threads']} threads), {tokens} answer tokens, {pairs} pairs")
    for col in ("prompt", "keep", "kept", "KL", "top-1 agree", "decode ms full", "decode ms kv", "speedup", "prefill ms full", "prefill ms kv"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        table.add_row(str(r.prompt_tokens), f"{r.keep_ratio:.2f}", str(r.kept_tokens), f"{r.kl:.3f}", f"{100 * r.top1_agreement:.0f}%",
                      f"{r.decode_ms_full:.1f}", f"{r.decode_ms_compressed:.1f}", f"{r.speedup:.2f}x",
                      f"{r.prefill_ms_full:.0f}", f"{r.prefill_ms_compressed:.0f}")
    out.print(table)


# ----------------------------------------------------------------------- export
def export(
    profile: str = typer.Argument(..., help="spec (ffn-25, layers-25, kvheads-33) or plan .json"),
    output: Path = typer.Argument(..., help="directory for the HF checkpoint"),
    model: str = ModelOpt,
    device: str = DeviceOpt,
    save_plan: Path | None = typer.Option(None, help="also write the plan JSON here"),
    merge: bool = typer.Option(True, "--merge/--no-merge", help="healed profiles: merge the LoRA adapter into the weights (default), or write the unhealed checkpoint plus OUTPUT/adapter"),
) -> None:
    """Export a uniform-shape profile as a plain HF checkpoint (no casrap needed to load)."""
    from casrap.profiles.export import export_checkpoint

    lm = load(model, device)
    bank = build_profiles(lm, [profile], model)
    name = bank.names[-1]
    if save_plan:
        bank.profile(name).plan.save(save_plan)
    export_checkpoint(bank, name, output, lm.tokenizer, merge=merge)
    out.print(f"wrote {output} ({100 * bank.params_removed(name):.1f}% parameters removed); load it with AutoModelForCausalLM.from_pretrained")


def register(app: typer.Typer) -> None:
    """Attach this group's commands to the top-level app."""
    eval_app = typer.Typer(no_args_is_help=True, help="Measure a model: perplexity, generation speed.")
    eval_app.command("ppl")(eval_ppl)
    eval_app.command("speed")(eval_speed)
    app.add_typer(eval_app, name="eval")
    for command in (info, calibrate, bench, export):
        app.command()(command)
    app.command("bench-kv")(bench_kv)
