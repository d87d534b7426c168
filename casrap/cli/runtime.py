"""``casrap generate | serve | loadtest | bundle``: adaptive inference for users."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from casrap.cli.common import DeviceOpt, JsonOpt, build_profiles, console, emit_json, load, out, progress_bar

BundleOpt = typer.Option(None, "--bundle", "-b", help="policy bundle folder (default: the one shipped for the embedded model)")
RuntimeModelOpt = typer.Option(None, "--model", "-m", help="model spec (default: the bundle's model)")


def _adaptive(bundle: Optional[Path], model: Optional[str], device: str) -> Any:
    from casrap.runtime.adaptive import AdaptiveLM
    from casrap.runtime.bundle import load_bundle

    checked = load_bundle(bundle)
    lm = load(model or checked.model_spec, device)
    return AdaptiveLM.load(checked, model=lm)


def _summary(rec: Any) -> str:
    target = "" if rec.target_met is None else (" · target met" if rec.target_met else f" · target {rec.target_s:.2f} s missed")
    return (f"profile {rec.profile} · decision {1000 * rec.decision_s:.1f} ms + switch {1000 * rec.switch_s:.2f} ms "
            f"· TTFT {rec.ttft_s:.2f} s · {rec.latency_s:.2f} s · {rec.completion_tokens} tokens at {rec.tokens_per_s:.1f} tok/s{target}")


# --------------------------------------------------------------------- generate
def generate(
    prompt: str = typer.Argument(..., help="the prompt"),
    bundle: Optional[Path] = BundleOpt,
    model: Optional[str] = RuntimeModelOpt,
    device: str = DeviceOpt,
    target: Optional[float] = typer.Option(None, "--target", help="latency target in seconds (default: the bundle's default budget)"),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", "-n", help="default: the bundle's"),
    stream: bool = typer.Option(False, "--stream", help="print text as it is generated"),
    profile: Optional[str] = typer.Option(None, "--profile", help="force a profile instead of asking the policy"),
    as_json: bool = JsonOpt,
) -> None:
    """Answer a prompt with the profile the policy picks for it, and say which."""
    lm = _adaptive(bundle, model, device)
    if stream and not as_json:
        result = lm.generate(prompt, max_new_tokens, target, stream=True, profile=profile)
        for piece in result:
            out.print(piece, end="", markup=False, highlight=False, soft_wrap=True)
        out.print()
        rec = result.record
        console.print(_summary(rec), highlight=False)
        return
    result = lm.generate(prompt, max_new_tokens, target, profile=profile)
    if as_json:
        emit_json({"text": result.text, "casrap": result.record.to_dict()})
        return
    out.print(result.text, markup=False, highlight=False, soft_wrap=True)
    console.print(_summary(result.record), highlight=False)


# ------------------------------------------------------------------------ serve
def serve(
    host: str = typer.Option("127.0.0.1", help="bind address (127.0.0.1: this machine only)"),
    port: int = typer.Option(8000),
    bundle: Optional[Path] = BundleOpt,
    model: Optional[str] = RuntimeModelOpt,
    device: str = DeviceOpt,
    model_id: Optional[str] = typer.Option(None, "--model-id", help="OpenAI model id to answer to (default: the model spec)"),
    log_level: str = typer.Option("info", help="uvicorn log level"),
) -> None:
    """OpenAI-compatible server: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics."""
    import uvicorn

    from casrap.runtime.server import create_app

    lm = _adaptive(bundle, model, device)
    app = create_app(lm, model_id=model_id)
    console.print(f"serving {model_id or lm.model_name} with profiles {', '.join(lm.profiles)} on http://{host}:{port}/v1", highlight=False)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


# --------------------------------------------------------------------- loadtest
def loadtest(
    bundle: Optional[Path] = BundleOpt,
    model: Optional[str] = RuntimeModelOpt,
    device: str = DeviceOpt,
    url: Optional[str] = typer.Option(None, "--url", help="run against a running casrap serve (policy only) instead of in-process"),
    prompts: int = typer.Option(8, help="held-out (test split) prompts"),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", "-n", help="tokens per request (EOS ignored, so latencies compare)"),
    budget_low: float = typer.Option(0.5, help="target range, as a multiple of the predicted unloaded full-model latency"),
    budget_high: float = typer.Option(3.0),
    background_load: float = typer.Option(1.0, "--background-load", help="background CPU load intensity (0 = none)"),
    load_workers: int = typer.Option(1, help="background load processes"),
    load_levels: Optional[str] = typer.Option(None, "--load-levels", help="sweep named load levels in one pass, e.g. 0,1,2,bursty (0/1/2 processes burning a core; bursty: two switching on and off); replaces --background-load/--load-workers"),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts-file", help="your prompts (CSV/JSONL with a prompt column); its fixed test split is used, as everywhere"),
    static: Optional[list[str]] = typer.Option(None, "--static", help="static profiles to compare (default: every bundle profile)"),
    seed: int = typer.Option(0),
    plot: Optional[Path] = typer.Option(None, "--plot", help="write a PNG of targets met vs quality loss, one panel per load level"),
    reports: Path = typer.Option(Path("reports"), help="parent of the numbered run folder holding requests.jsonl"),
    as_json: bool = JsonOpt,
) -> None:
    """Policy vs full model vs static profiles on held-out prompts under background load."""
    from casrap.runtime.loadtest import LoadTestConfig, run_loadtest
    from casrap.telemetry.load import parse_load_levels

    config = LoadTestConfig(prompts=prompts, max_new_tokens=max_new_tokens, budget_range=(budget_low, budget_high),
                            background_load=background_load, load_workers=load_workers, static=list(static or []), seed=seed, url=url,
                            source=str(prompts_file) if prompts_file else None,
                            load_levels=parse_load_levels(load_levels) if load_levels else [])
    from casrap.reports import append_jsonl, new_run_dir

    lm = _adaptive(bundle, model, device)
    run_dir = new_run_dir(reports, "loadtest")
    console.print(f"every request is appended to {run_dir / 'requests.jsonl'} as it finishes")
    with progress_bar() as bar:
        task = bar.add_task("load test (prompts)", total=prompts)
        result = run_loadtest(lm, config, progress=lambda i, n: bar.update(task, completed=i, total=n),
                              on_request=lambda record: append_jsonl(run_dir / "requests.jsonl", record))
    if plot:
        from casrap.runtime.loadtest import plot_result

        plot_result(result, plot)
    if as_json:
        emit_json(result.to_dict())
        return
    for level in result.levels.values():
        table = Table(title=f"casrap loadtest, load {level.level}: {level.n} held-out prompts x {max_new_tokens} tokens, "
                            f"targets {budget_low}-{budget_high} x predicted unloaded full latency")
        for col in ("runner", "targets met", "p50 s", "p90 s", "p99 s", "TTFT p50 s", "TPOT p50 ms", "KL vs full", "overhead", "profiles used"):
            table.add_column(col, justify="left" if col in ("runner", "profiles used") else "right")
        for row in level.rows:
            table.add_row(row.name, f"{row.targets_met}/{row.n}", f"{row.p50_s:.2f}", f"{row.p90_s:.2f}", f"{row.p99_s:.2f}",
                          f"{row.ttft_p50_s:.2f}", f"{1000 * row.tpot_p50_s:.1f}", f"{row.mean_kl:.3f}",
                          f"{100 * row.overhead_share:.1f}%", ", ".join(f"{k} {v}" for k, v in row.profiles.items()))
        out.print(table)
    for line in result.notes:
        out.print(line, markup=False, highlight=False)


# ----------------------------------------------------------------------- bundle
def bundle(
    checkpoint: Path = typer.Option(Path("checkpoints/rl_policy.zip"), "--checkpoint", help="trained policy zip (its .state.json names the actions)"),
    output: Path = typer.Option(..., "--out", "-o", help="bundle folder to write"),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="the model the plans are built for"),
    device: str = DeviceOpt,
    profiles: Optional[list[str]] = typer.Option(None, "--profiles", "-p", help="actions in policy order (default: from the checkpoint's state file)"),
    budget_ratio: float = typer.Option(3.0, help="default latency target (x predicted unloaded full-model latency) when a request names none"),
    max_new_tokens: int = typer.Option(64, help="default new tokens per request"),
    as_json: bool = JsonOpt,
) -> None:
    """Package a trained policy with the exact plans of its actions for a model (a bundle)."""
    from casrap.agents.training import read_state, state_path
    from casrap.errors import CheckpointError
    from casrap.pruners.importance import default_calibration_path
    from casrap.runtime.bundle import RuntimeDefaults, load_bundle, write_bundle
    from casrap.runtime.provenance import training_provenance

    state = read_state(checkpoint)
    names = list(profiles or state.get("profiles") or [])
    if not names:
        raise CheckpointError(f"no action list: {state_path(checkpoint)} names no profiles; give --profiles in policy order")
    lm = load(model, device)
    bank = build_profiles(lm, names, model)
    training, notes, bank = training_provenance(state, bank)
    reward = {k: state[k] for k in ("reward", "slo_lambda") if k in state}
    defaults = RuntimeDefaults(budget_ratio=budget_ratio, max_new_tokens=max_new_tokens)
    write_bundle(output, checkpoint, bank, model_spec=model, reward=reward, training=training, defaults=defaults,
                 calibration=default_calibration_path(lm.model))
    checked = load_bundle(output)
    checked.load_policy()
    summary = {"bundle": str(output), "model": model, "fingerprint": checked.fingerprint, "actions": checked.actions, "notes": notes}
    if as_json:
        emit_json(summary)
        return
    out.print(f"wrote {output}: {len(checked.actions)} actions ({', '.join(checked.actions)}) for {model} ({checked.fingerprint})")
    for line in notes:
        console.print(f"[yellow]note:[/] {line}", highlight=False)


def register(app: typer.Typer) -> None:
    """Attach this group's commands to the top-level app."""
    for command in (generate, serve, loadtest, bundle):
        app.command()(command)
