"""``casrap generate | serve | loadtest | bundle``: adaptive inference for users."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from casrap.cli.common import DeviceOpt, JsonOpt, build_profiles, console, emit_json, load, out, progress_bar

BundleOpt = typer.Option(None, "--bundle", "-b", help="policy bundle folder (default: the one shipped for the embedded model)")
RuntimeModelOpt = typer.Option(None, "--model", "-m", help="model spec (default: the bundle's model)")


def _adaptive(bundle: Optional[Path], model: Optional[str], device: str, batching: Any = None) -> Any:
    from casrap.runtime.adaptive import AdaptiveLM
    from casrap.runtime.bundle import load_bundle

    checked = load_bundle(bundle)
    lm = load(model or checked.model_spec, device)
    return AdaptiveLM.load(checked, model=lm, batching=batching)


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
    max_queue: int = typer.Option(64, "--max-queue", help="requests that may wait for the model; beyond: 429 with Retry-After (0: no queue, one runs, the others get 429)"),
    max_tokens_cap: int = typer.Option(1024, "--max-tokens-cap", help="largest max_tokens a request may ask for (400 above)"),
    request_timeout: float = typer.Option(300.0, "--request-timeout", help="seconds a request may take, queue included (0 = none)"),
    max_body_bytes: int = typer.Option(1 << 20, "--max-body-bytes", help="largest request body (413 above)"),
    allow_debug_extensions: bool = typer.Option(False, "--allow-debug-extensions", help="let requests force a profile or ignore_eos (load tests, GuideLLM fixed lengths)"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="CASRAP_API_KEY", help="require Authorization: Bearer KEY on every route but /health"),
    max_batch: int = typer.Option(8, "--max-batch", help="concurrent requests decoded together (1: one request at a time)"),
    batch_mode: str = typer.Option("group", "--batch-mode", help="group: requests join a batch running the profile the policy chose for them; batch: the request that starts a batch chooses for all who join"),
) -> None:
    """OpenAI-compatible server: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics."""
    import uvicorn

    from casrap.decide.batching import BatchConfig
    from casrap.runtime.protocol import Limits
    from casrap.runtime.server import create_app

    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        console.print(f"[yellow]warning:[/] binding {host} without --api-key: anyone who can reach this port can use the model", highlight=False)
    limits = Limits(max_tokens_cap=max_tokens_cap, max_queue=max_queue, request_timeout_s=request_timeout or None,
                    max_body_bytes=max_body_bytes, allow_debug_extensions=allow_debug_extensions, api_key=api_key or None)
    batching = BatchConfig(max_batch=max_batch, batch_mode=batch_mode)  # a one-line error for a bad value
    lm = _adaptive(bundle, model, device, batching)
    app = create_app(lm, model_id=model_id, limits=limits)
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
    rate: Optional[str] = typer.Option(None, "--rate", help="with --url: serving benchmark, Poisson arrivals at R requests/s (seeded by --seed); a list (1,2,4) runs one benchmark per rate"),
    concurrency: Optional[str] = typer.Option(None, "--concurrency", help="with --url: serving benchmark, at most C requests in flight; a list (1,2,4,8) runs one benchmark per level"),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="with --url and --rate/--concurrency: fixed-length answers (the server needs --allow-debug-extensions)"),
    slo_ttft_ms: Optional[float] = typer.Option(None, "--slo-ttft-ms", help="serving benchmark goodput: TTFT SLO"),
    slo_tpot_ms: Optional[float] = typer.Option(None, "--slo-tpot-ms", help="serving benchmark goodput: TPOT SLO"),
    slo_e2el_ms: Optional[float] = typer.Option(None, "--slo-e2el-ms", help="serving benchmark goodput: end-to-end SLO"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="CASRAP_API_KEY", help="with --url: Bearer key of the server"),
    as_json: bool = JsonOpt,
) -> None:
    """Policy vs full model vs static profiles on held-out prompts under background load.

    With --url and --rate or --concurrency: a serving benchmark of that server instead
    (vLLM benchmark_serving / GuideLLM metric names; no model is loaded here)."""
    if url and (rate is not None or concurrency is not None):
        from casrap.runtime.serving_bench import parse_levels

        levels = (parse_levels(rate, float, "--rate"), parse_levels(concurrency, int, "--concurrency"))
        _serving_bench(url, prompts, prompts_file, max_new_tokens, levels, (slo_ttft_ms, slo_tpot_ms, slo_e2el_ms),
                       api_key, seed, reports, as_json, ignore_eos)
        return
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


def _serving_bench(url: str, prompts: int, prompts_file: Optional[Path], max_tokens: int, levels: tuple[list[Any], list[Any]],
                   slo: tuple[Optional[float], ...], api_key: Optional[str], seed: int, reports: Path, as_json: bool,
                   ignore_eos: bool = False) -> None:
    """``loadtest --url --rate/--concurrency``: drive a server and report vLLM / GuideLLM metrics, one run per level."""
    import json

    from casrap.reports import new_run_dir
    from casrap.runtime.serving_bench import ServingBenchConfig, load_prompt_file, run_serving_sweep

    if prompts_file:
        texts = load_prompt_file(prompts_file)
    else:
        from casrap.data.prompts import load_prompts

        texts = [p if isinstance(p, str) else str(getattr(p, "text", p)) for p in load_prompts(None, split="test")]
    texts = [texts[i % len(texts)] for i in range(prompts)] if texts else []
    rates, concurrencies = levels
    config = ServingBenchConfig(url=url, prompts=texts, max_tokens=max_tokens, api_key=api_key, slo_ttft_ms=slo[0],
                                slo_tpot_ms=slo[1], slo_e2el_ms=slo[2], seed=seed,
                                extra_body={"ignore_eos": True} if ignore_eos else {})
    with progress_bar() as bar:
        task = bar.add_task("serving benchmark (requests)", total=len(texts))

        def tick(level: int, n_levels: int, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, description=f"serving benchmark, level {level + 1}/{n_levels}")

        sweep = run_serving_sweep(config, concurrencies, rates, progress=tick)
    run_dir = new_run_dir(reports, "serving")
    data = sweep.results[0].to_dict() if len(sweep.results) == 1 else sweep.to_dict()
    (run_dir / "serving.json").write_text(json.dumps(data, indent=2))
    if as_json:
        emit_json(data)
        return
    for result in sweep.results:
        _serving_table(url, result, run_dir)
    if len(sweep.results) > 1:
        _sweep_table(sweep)


def _serving_table(url: str, result: Any, run_dir: Path) -> None:
    v = result.vllm()
    load = f"rate {v['request_rate']}/s" if v["request_rate"] is not None else ""
    load += (", " if load else "") + (f"concurrency {v['max_concurrency']}" if v["max_concurrency"] is not None else "")
    table = Table(title=f"serving benchmark of {url}: {v['completed']} ok / {v['failed']} failed, {load}, {v['duration']:.1f} s "
                        f"({run_dir / 'serving.json'})")
    for col in ("metric (vLLM name)", "mean", "median", "p90", "p99"):
        table.add_column(col, justify="left" if col.startswith("metric") else "right")
    for name in ("ttft", "tpot", "itl", "e2el"):
        table.add_row(f"{name} ms", *(f"{v[f'{s}_{name}_ms']:.1f}" for s in ("mean", "median", "p90", "p99")))
    out.print(table)
    line = f"request_throughput {v['request_throughput']:.2f} req/s · output_throughput {v['output_throughput']:.1f} tok/s"
    if "request_goodput" in v:
        line += f" · request_goodput {v['request_goodput']:.2f} req/s"
    out.print(line, markup=False, highlight=False)
    for timing in result.requests:
        if not timing.success:
            out.print(f"request {timing.index} failed ({timing.status}): {timing.error}", markup=False, highlight=False)


def _sweep_table(sweep: Any) -> None:
    table = Table(title="serving benchmark, all levels (throughput x the first level's; answers as at the first level)")
    for col in ("concurrency", "rate", "ok", "req/s", "out tok/s", "x first", "TTFT p50 ms", "TPOT p50 ms", "e2el p99 ms", "same text"):
        table.add_column(col, justify="right")
    for row in sweep.summary():
        vs, same = row["output_throughput_vs_first"], row["same_text_as_first"]
        table.add_row(str(row["max_concurrency"] or "-"), str(row["request_rate"] or "-"), f"{row['completed']}/{row['completed'] + row['failed']}",
                      f"{row['request_throughput']:.2f}", f"{row['output_throughput']:.1f}", "-" if vs is None else f"{vs:.2f}",
                      f"{row['median_ttft_ms']:.1f}", f"{row['median_tpot_ms']:.1f}", f"{row['p99_e2el_ms']:.1f}",
                      "-" if same is None else f"{100 * same:.0f}%")
    out.print(table)


# ----------------------------------------------------------------------- bundle
def bundle(
    checkpoint: Path = typer.Option(Path("checkpoints/rl_policy.zip"), "--checkpoint", help="trained policy zip (its .state.json names the actions)"),
    output: Path = typer.Option(..., "--out", "-o", help="bundle folder to write"),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="the model the plans are built for"),
    device: str = DeviceOpt,
    profiles: Optional[list[str]] = typer.Option(None, "--profiles", "-p", help="actions in policy order (default: from the checkpoint's state file)"),
    budget_ratio: float = typer.Option(3.0, help="default latency target (x predicted unloaded full-model latency) when a request names none"),
    max_new_tokens: int = typer.Option(64, help="default new tokens per request"),
    speeds_from: Optional[Path] = typer.Option(None, "--speeds-from", help="replay file whose header's measured unloaded "
                                                                           "profile speeds the slowdown feature uses"),
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
    speeds: dict[str, float] = {}
    if speeds_from is not None:
        from casrap.envs.replay import load_replay

        speeds = {k: float(v) for k, v in load_replay(speeds_from).header.get("profile_speed", {}).items() if k in names}
    defaults = RuntimeDefaults(budget_ratio=budget_ratio, max_new_tokens=max_new_tokens, profile_speed=speeds)
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
