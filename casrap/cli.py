"""The ``casrap`` command line: a thin layer mapping flags onto library calls.

Only this module (and the other ``cli_*`` modules) prints. ``.env`` is read here and
nowhere else; tokens from it are never logged.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from casrap.errors import CasrapError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Context Aware Structured Runtime Adaptive Pruning.")
eval_app = typer.Typer(no_args_is_help=True, help="Measure a model: perplexity, generation speed.")
app.add_typer(eval_app, name="eval")
def _width() -> int | None:
    """Terminal width, or a wide default when piped (tables stay readable in logs)."""
    return None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", 160))


console = Console(stderr=True, width=_width())
out = Console(width=_width())

ModelOpt = typer.Option("smollm2-135m", "--model", "-m", help="smollm2-135m (embedded), a checkpoint dir, a .gguf file, or a hub id")
DeviceOpt = typer.Option("auto", "--device", help="auto | cpu | cuda (gpu)")
JsonOpt = typer.Option(False, "--json", help="print one JSON object instead of tables")


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
    )


def load(spec: str, device: str = "auto") -> Any:
    """Load a model, showing a progress bar if the embedded model is converted first."""
    from transformers.utils import logging as hf_logging

    from casrap.models import load_model

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    state: dict[str, Any] = {}

    def on_progress(stage: str, step: int, total: int) -> None:
        if "bar" not in state:
            console.print("[dim]first use of the embedded model: converting GGUF to a cached checkpoint (once)[/]")
            state["bar"] = progress_bar()
            state["bar"].start()
            state["task"] = state["bar"].add_task(stage, total=total)
        state["bar"].update(state["task"], completed=step, description=stage)

    try:
        return load_model(spec, device=device, progress=on_progress)
    finally:
        if "bar" in state:
            state["bar"].stop()


def emit_json(data: Any) -> None:
    out.print_json(json.dumps(data, default=float))


# ------------------------------------------------------------------------- info
@app.command()
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
@eval_app.command("ppl")
def eval_ppl(
    model: str = ModelOpt,
    device: str = DeviceOpt,
    corpus: str = typer.Option("auto", help="auto (WikiText-2, else bundled prose) | wikitext2 | offline | PATH"),
    window: int = typer.Option(512, help="sliding window length"),
    max_tokens: Optional[int] = typer.Option(None, help="score at most this many tokens"),
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


@eval_app.command("speed")
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

    from casrap.measure import time_generation

    lm = load(model, device)
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids
    timing = time_generation(lm.model, ids, new_tokens=tokens, repetitions=repetitions)
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
@app.command()
def calibrate(
    model: str = ModelOpt,
    device: str = DeviceOpt,
    samples: int = typer.Option(64, help="number of calibration prompts"),
    dataset: Optional[str] = typer.Option(None, help="CSV/JSONL with a prompt column (default: bundled train split)"),
    max_tokens: int = typer.Option(256, help="tokens per calibration text"),
    output: Optional[Path] = typer.Option(None, help="file to write (default: keyed to the model under CASRAP_HOME)"),
) -> None:
    """Measure head, FFN-channel and layer importance from activations; save it."""
    from casrap.data.prompts import load_prompts
    from casrap.measure import offline_corpus
    from casrap.pruners.importance import calibrate as run_calibration
    from casrap.pruners.importance import default_calibration_path

    lm = load(model, device)
    prompts = [p.text for p in load_prompts(dataset, split="train")][:samples] if dataset else None
    texts = prompts or ([p.text for p in load_prompts(None, split="train")][: max(samples - 8, 1)] + offline_corpus().paragraphs()[:8])
    with progress_bar() as bar:
        task = bar.add_task("calibrating", total=len(texts))
        importance = run_calibration(lm.model, lm.tokenizer, texts, max_tokens=max_tokens, progress=lambda i, n: bar.update(task, completed=i))
    path = importance.save(output or default_calibration_path(lm.model))
    influence = ", ".join(f"{v:.3f}" for v in importance.layers.tolist())
    out.print(f"saved {importance.source} importance to {path}")
    out.print(f"block influence per layer: {influence}")


# ------------------------------------------------------------------------ bench
@app.command()
def bench(
    model: str = ModelOpt,
    device: str = DeviceOpt,
    profiles: Optional[list[str]] = typer.Option(None, "--profiles", "-p", help="specs (ffn-25, heads-10, layers-25, kvheads-33, ffnmask-25) or plan .json files; default: CASRAP v2.2 set + trade-off set"),
    tokens: int = typer.Option(32, help="new tokens per timed run"),
    pairs: int = typer.Option(5, help="interleaved baseline/profile pairs"),
    corpus: str = typer.Option("auto", help="auto | wikitext2 | offline | PATH"),
    ppl_max_tokens: Optional[int] = typer.Option(None, help="cap corpus tokens for perplexity"),
    structural: Optional[bool] = typer.Option(None, "--structural/--functional", help="slice (default; STRUCTURAL_PRUNING in .env) or mask"),
    as_json: bool = JsonOpt,
    output: Optional[Path] = typer.Option(None, help="also write the JSON report here"),
) -> None:
    """Speed and quality of pruned profiles against the full model."""
    from casrap.bench import BenchConfig, run_bench
    from casrap.measure import load_corpus
    from casrap.profiles import CASRAP_V22, TRADE_OFF
    from casrap.profiles.factory import build_bank

    lm = load(model, device)
    names = list(profiles) if profiles else CASRAP_V22 + TRADE_OFF
    if "none" not in names:
        names.insert(0, "none")
    bank = build_bank(lm.model, names, base_model=model, structural=structural)
    text = load_corpus(corpus)
    cfg = BenchConfig(new_tokens=tokens, pairs=pairs, ppl_max_tokens=ppl_max_tokens)
    with progress_bar() as bar:
        task = bar.add_task("bench", total=len(bank.names))
        report = run_bench(bank, lm.tokenizer, text, bank.names, cfg, progress=lambda n: bar.update(task, advance=1, description=f"bench {n}"))
    data = report.to_dict()
    data["total_memory_overhead_mb"] = bank.memory_overhead_bytes() / 2**20
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(data, indent=1, default=float))
    if as_json:
        emit_json(data)
        return
    table = Table(title=f"casrap bench: {model} on {report.device} ({report.threads} threads), ppl on {report.corpus}, {tokens} new tokens, {pairs} pairs")
    for col in ("profile", "removed", "ideal", "speedup", "decode ms/tok", "TTFT ms", "ppl", "KL", "switch ms", "extra MB"):
        table.add_column(col, justify="left" if col == "profile" else "right", no_wrap=True)
    for p in report.profiles:
        table.add_row(
            p.name, f"{100 * p.params_removed:.1f}%", f"{p.ideal_speedup:.2f}x", f"{p.speedup:.2f}x",
            f"{p.decode_ms_per_token:.1f}", f"{p.ttft_ms:.0f}", f"{p.ppl:.2f}", f"{p.kl:.3f}",
            f"{p.switch_ms:.3f}", f"{p.memory_overhead_mb:.1f}",
        )
    out.print(table)
    for p in report.profiles:
        out.print(f"  {p.name}: {p.description}", soft_wrap=True, highlight=False)
    out.print(f"memory held by all profiles beyond the base model: {data['total_memory_overhead_mb']:.1f} MB")


# ----------------------------------------------------------------------- export
@app.command()
def export(
    profile: str = typer.Argument(..., help="spec (ffn-25, layers-25, kvheads-33) or plan .json"),
    output: Path = typer.Argument(..., help="directory for the HF checkpoint"),
    model: str = ModelOpt,
    device: str = DeviceOpt,
    save_plan: Optional[Path] = typer.Option(None, help="also write the plan JSON here"),
) -> None:
    """Export a uniform-shape profile as a plain HF checkpoint (no casrap needed to load)."""
    from casrap.profiles.export import export_checkpoint
    from casrap.profiles.factory import build_bank

    lm = load(model, device)
    bank = build_bank(lm.model, [profile], base_model=model)
    name = bank.names[-1]
    if save_plan:
        bank.profile(name).plan.save(save_plan)
    export_checkpoint(bank, name, output, lm.tokenizer)
    out.print(f"wrote {output} ({100 * bank.params_removed(name):.1f}% parameters removed); load it with AutoModelForCausalLM.from_pretrained")


def _register_extensions() -> None:
    """Attach the RL commands (train/test/report/collect) when their modules exist."""
    try:
        from casrap import cli_rl  # noqa: F401
    except ImportError as err:  # pragma: no cover
        logging.getLogger(__name__).debug("RL commands unavailable: %s", err)


def main() -> None:
    """Console-script entry: one-line errors for user mistakes, no tracebacks."""
    try:
        from dotenv import load_dotenv

        load_dotenv(Path.cwd() / ".env", override=False)
    except ImportError:  # pragma: no cover
        pass
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _register_extensions()
    try:
        app(standalone_mode=False)
    except CasrapError as err:
        console.print(f"[red]error:[/] {err}", soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as err:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(err, click.exceptions.ClickException):
            err.show()
            sys.exit(err.exit_code)
        if isinstance(err, click.exceptions.Abort):
            sys.exit(1)
        raise


if __name__ == "__main__":
    # run through the importable module so the RL commands register on the same app
    from casrap.cli import main as _module_main

    _module_main()
