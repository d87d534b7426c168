"""``casrap record``: the replay recording at scale (quality for every prompt, latency measured on a subset and modelled)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from casrap.cli.common import DeviceOpt, JsonOpt, ModelOpt, build_profiles, console, emit_json, load, out, progress_bar
from casrap.cli.rl import ProfilesOpt, interrupt_on_sigterm


def record(
    output: Path = typer.Option(Path("checkpoints/replay-v2.jsonl"), help="replay file to write (JSONL)"),
    work: Optional[Path] = typer.Option(None, help="folder for the resumable per-pass files (default: OUTPUT's stem + '.work')"),
    model: str = ModelOpt,
    device: str = DeviceOpt,
    profiles: Optional[list[str]] = ProfilesOpt,
    train_prompts: int = typer.Option(160, help="prompts from the fixed train split"),
    test_prompts: int = typer.Option(60, help="prompts from the fixed test split"),
    loads: str = typer.Option("0,1,2", help="background load levels: numbers of CPU-burning worker processes"),
    timed_prompts: int = typer.Option(8, help="prompts whose latency is measured at every load (the rest is modelled)"),
    max_new_tokens: int = typer.Option(32),
    timing_tokens: Optional[int] = typer.Option(None, help="new tokens per timed generation (default: --max-new-tokens); latency = TTFT + (max_new_tokens - 1) x median step"),
    phase: str = typer.Option("all", help="quality | timing | all (a later run resumes and writes the file)"),
    as_json: bool = JsonOpt,
) -> None:
    """Record prompts x load levels x profiles for the replay env: quality measured for every prompt, latency
    measured on a subset with profiles interleaved and modelled for the rest (the file says which)."""
    from casrap.envs.record import (
        RecordConfig, build_records, fit_models, quality_pass, recording_header, select_prompts, timed_subset, timing_pass,
    )
    from casrap.envs.replay import write_replay
    from casrap.errors import InputError
    from casrap.profiles.catalogue import default_catalogue
    from casrap.telemetry.live import LiveTelemetry
    from casrap.telemetry.load import BackgroundLoad

    def steady_load(workers: int) -> BackgroundLoad:  # every worker burns its core at 100% duty
        return BackgroundLoad(workers=workers, intensity=1.0)

    if phase not in {"quality", "timing", "all"}:
        raise InputError(f"--phase must be quality, timing or all, not {phase!r}")
    try:
        levels = tuple(int(x) for x in loads.split(","))
    except ValueError:
        raise InputError(f"--loads must be comma-separated worker counts like 0,1,2, not {loads!r}") from None
    config = RecordConfig(train_prompts=train_prompts, test_prompts=test_prompts, loads=levels, timed_prompts=timed_prompts,
                          max_new_tokens=max_new_tokens, timing_tokens=timing_tokens)
    work = work or output.with_name(output.stem + ".work")
    work.mkdir(parents=True, exist_ok=True)
    lm = load(model, device)
    names = ["none", *[p for p in (profiles or default_catalogue(model)) if p != "none"]]
    bank = build_profiles(lm, names, model)
    names = list(bank.names)
    prompts = select_prompts(config)
    interrupt_on_sigterm()
    durations: dict[str, float] = {}
    started = time.perf_counter()
    with progress_bar() as bar:
        task = bar.add_task(f"quality ({len(prompts)} prompts x {len(names)} profiles)", total=len(prompts))
        quality = quality_pass(bank, lm.tokenizer, prompts, names, config, work / "quality.jsonl",
                               progress=lambda i, n: bar.update(task, completed=i))
    durations["quality_s"] = time.perf_counter() - started
    if phase == "quality":
        out.print(f"quality of {len(quality)} prompts in {work / 'quality.jsonl'} ({durations['quality_s']:.0f} s)")
        return
    timed = timed_subset(prompts, config.timed_prompts)
    t0 = time.perf_counter()
    with progress_bar() as bar:
        task = bar.add_task(f"timing ({len(timed)} prompts x {len(levels)} loads x {len(names)} profiles)",
                            total=len(timed) * len(levels) * len(names))
        timing = timing_pass(bank, lm.tokenizer, timed, names, config, work / "timing.jsonl", LiveTelemetry(), steady_load,
                             progress=lambda i, n: bar.update(task, completed=i))
    durations["timing_s"] = time.perf_counter() - t0
    if phase == "timing":
        out.print(f"timing rows in {work / 'timing.jsonl'} ({durations['timing_s']:.0f} s)")
        return
    models = fit_models(timing, config.max_new_tokens)
    header = recording_header(model, bank, names, config, models, quality, timing, durations)
    write_replay(output, header, build_records(quality, timing, names, models, config))
    loo = [e["median_rel_error"] for by in models.errors.values() for e in by.values()]
    summary = {"output": str(output), "prompts": len(quality), "loads": list(levels), "profiles": names,
               "timed_prompts": len(timed), "durations_s": durations,
               "median_loo_latency_error": float(sorted(loo)[len(loo) // 2]) if loo else None}
    if as_json:
        emit_json(summary)
    else:
        console.print(f"wrote {output}: {len(quality)} prompts x {len(levels)} loads x {len(names)} profiles; "
                      f"latency measured on {len(timed)} prompts, modelled elsewhere (median leave-one-prompt-out error "
                      f"{100 * summary['median_loo_latency_error']:.1f}%)")


def register(app: typer.Typer) -> None:
    app.command()(record)
