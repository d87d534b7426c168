"""``casrap record``: the replay recording (quality for every prompt, latency measured for every prompt, load and profile)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import typer

from casrap.profiles.catalogue import FULL
from casrap.cli.common import DeviceOpt, JsonOpt, ModelOpt, build_profiles, console, emit_json, load, out, progress_bar
from casrap.cli.rl import ProfilesOpt, interrupt_on_sigterm


def record(
    output: Path = typer.Option(Path("checkpoints/replay-v3.jsonl"), help="replay file to write (JSONL)"),
    work: Optional[Path] = typer.Option(None, help="folder for the resumable per-pass files (default: OUTPUT's stem + '.work')"),
    model: str = ModelOpt,
    device: str = DeviceOpt,
    profiles: Optional[list[str]] = ProfilesOpt,
    dataset: Optional[str] = typer.Option(None, help="CSV/JSONL/hub id with a prompt column; its fixed train/test splits (default: the bundled prompts)"),
    train_prompts: int = typer.Option(160, help="prompts from the fixed train split"),
    test_prompts: int = typer.Option(60, help="prompts from the fixed test split"),
    loads: str = typer.Option("0,1,2,bursty", help="background load levels: 0, 1, 2 busy cores, bursty"),
    max_new_tokens: int = typer.Option(32, help="answer length the latencies and quality describe"),
    timing_tokens: int = typer.Option(16, help="new tokens per timed generation; latency = TTFT + (max_new_tokens - 1) x median step"),
    block: int = typer.Option(4, help="prompts timed at one load level before it changes"),
    settle: float = typer.Option(1.5, help="seconds a new load level settles before timing"),
    minutes: Optional[float] = typer.Option(None, help="stop timing after this many minutes (resume later with the same command)"),
    quality_from: Optional[Path] = typer.Option(None, help="take quality (ppl, KL per prompt and profile) from this replay file "
                                                           "where it has every profile, instead of measuring it again"),
    phase: str = typer.Option("all", help="quality | timing | all (a later run resumes and writes the file)"),
    as_json: bool = JsonOpt,
) -> None:
    """Record prompts x load levels x profiles for the replay env: quality once per prompt and profile, latency measured
    for every (prompt, load, profile) through the thread-aware Router, profiles interleaved. Resumable."""
    from casrap.envs.record import RecordConfig, select_prompts, seed_quality
    from casrap.errors import InputError
    from casrap.profiles.catalogue import default_catalogue
    from casrap.telemetry.load import parse_load_levels

    if phase not in {"quality", "timing", "all"}:
        raise InputError(f"--phase must be quality, timing or all, not {phase!r}")
    levels = tuple(parse_load_levels(loads))
    config = RecordConfig(train_prompts=train_prompts, test_prompts=test_prompts, loads=levels, max_new_tokens=max_new_tokens,
                          timing_tokens=timing_tokens, block=block, settle_s=settle)
    work = work or output.with_name(output.stem + ".work")
    work.mkdir(parents=True, exist_ok=True)
    lm = load(model, device)
    names = [FULL, *[p for p in (profiles or default_catalogue(model)) if p != FULL]]
    bank = build_profiles(lm, names, model)
    names = list(bank.names)
    prompts = select_prompts(config, dataset)
    if quality_from is not None:
        seeded = seed_quality(quality_from, prompts, names, work / "quality.jsonl")
        out.print(f"quality of {seeded} prompts taken from {quality_from}")
    interrupt_on_sigterm()
    durations: dict[str, float] = {}
    quality = _quality_phase(bank, lm, prompts, names, config, work, durations)
    if phase == "quality":
        out.print(f"quality of {len(quality)} prompts in {work / 'quality.jsonl'} ({durations['quality_s']:.0f} s)")
        return
    router, timing = _timing_phase(bank, lm, prompts, names, config, work, durations, minutes)
    if phase == "timing":
        out.print(f"timing rows in {work / 'timing.jsonl'} ({durations['timing_s_this_run']:.0f} s)")
        return
    summary = _write(output, model, bank, names, config, quality, timing, durations, router)
    if as_json:
        emit_json(summary)
    else:
        console.print(f"wrote {output}: {summary['contexts']} measured contexts ({summary['prompts']} prompts x "
                      f"{len(levels)} loads) x {len(names)} profiles; every latency measured")


def _quality_phase(bank: Any, lm: Any, prompts: list[Any], names: list[str], config: Any, work: Path,
                   durations: dict[str, float]) -> dict[str, Any]:
    """Every prompt's full-model answer and each profile's quality on it (resumable)."""
    from casrap.envs.record import quality_pass

    started = time.perf_counter()
    with progress_bar() as bar:
        task = bar.add_task(f"quality ({len(prompts)} prompts x {len(names)} profiles)", total=len(prompts))
        quality = quality_pass(bank, lm.tokenizer, prompts, names, config, work / "quality.jsonl",
                               progress=lambda i, n: bar.update(task, completed=i))
    durations["quality_s"] = time.perf_counter() - started
    return quality


def _timing_phase(bank: Any, lm: Any, prompts: list[Any], names: list[str], config: Any, work: Path,
                  durations: dict[str, float], minutes: float | None) -> tuple[Any, list[dict[str, Any]]]:
    """Latency of every (prompt, load, profile) through the thread-aware Router (resumable, stops at ``minutes``)."""
    from casrap.decide.router import Router
    from casrap.envs.record import timing_order, timing_pass
    from casrap.telemetry.live import LiveTelemetry
    from casrap.telemetry.load import LoadLevels

    router = Router(bank, lm.tokenizer, policy=None, telemetry=LiveTelemetry())
    _ = router.unloaded
    ordered = timing_order(prompts)
    deadline = time.time() + 60 * minutes if minutes else None
    t0 = time.perf_counter()
    levels = config.loads
    with progress_bar() as bar, LoadLevels() as switch:
        task = bar.add_task(f"timing ({len(ordered)} prompts x {len(levels)} loads x {len(names)} profiles)",
                            total=len(ordered) * len(levels) * len(names))
        timing = timing_pass(router, ordered, names, config, work / "timing.jsonl", switch,
                             progress=lambda i, n: bar.update(task, completed=i), deadline=deadline)
    durations["timing_s_this_run"] = time.perf_counter() - t0
    if timing:
        first, last = min(r["at"] for r in timing), max(r["at"] for r in timing)
        durations["timing_wall_s"] = last - first
    return router, timing


def _write(output: Path, model: str, bank: Any, names: list[str], config: Any, quality: dict[str, Any],
           timing: list[dict[str, Any]], durations: dict[str, float], router: Any) -> dict[str, Any]:
    """Join quality and timing into the replay file; its summary."""
    from casrap.envs.record import build_records, recording_header
    from casrap.envs.replay import write_replay

    header = recording_header(model, bank, names, config, quality, timing, durations, router.threads.key())
    records = list(build_records(quality, timing, names, config))
    write_replay(output, header, records)
    contexts = {(r["prompt_key"], r["load"]) for r in records}
    return {"output": str(output), "prompts": len({k for k, _ in contexts}), "contexts": len(contexts),
            "loads": list(config.loads), "profiles": names, "records": len(records), "durations_s": durations,
            "thread_policy": router.threads.key()}


def register(app: typer.Typer) -> None:
    app.command()(record)
