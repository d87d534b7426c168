"""What every command module shares: consoles, common options, progress bars, model loading.

Only the ``casrap.cli`` package prints; library code returns data or logs.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

def _width() -> int | None:
    """Terminal width, or a wide default when piped (tables stay readable in logs)."""
    return None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", 160))


console = Console(stderr=True, width=_width())
out = Console(width=_width())

ModelOpt = typer.Option("smollm2-135m", "--model", "-m", help="smollm2-135m (embedded), a checkpoint dir, a .gguf file, or a hub id")
DeviceOpt = typer.Option("auto", "--device", help="auto | cpu | cuda (gpu)")
JsonOpt = typer.Option(False, "--json", help="print one JSON object instead of tables")
StructuralOpt = typer.Option(None, "--structural/--functional", help="slice (default; STRUCTURAL_PRUNING in .env) or mask")
WeightNormOpt = typer.Option(False, "--weight-norm-importance", help="skip calibration and rank units by weight norms (much worse profiles; for comparison only)")


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




def importance_for(lm: Any, weight_norm: bool = False) -> Any:
    """The model's calibrated importance: the cached one, or a calibration run now (visible).

    ``weight_norm`` asks for the data-free fallback explicitly; it is announced at the
    default log level because profiles built from it are far worse.
    """
    from casrap.pruners.importance import default_calibration_path, load_or_calibrate, weight_norm_importance

    if weight_norm:
        console.print("[yellow]warning:[/] importance from weight norms, not calibration: pruned profiles will be much worse")
        return weight_norm_importance(lm.model)
    path = default_calibration_path(lm.model)
    if path.is_file():
        return load_or_calibrate(lm.model, lm.tokenizer, path=path)[0]
    shipped = shipped_calibration(lm.model)
    if shipped is not None:
        return shipped
    from casrap.data.calibration import calibration_texts

    texts = calibration_texts()
    console.print(f"no calibration for this model yet: calibrating on {len(texts)} calibration texts (once; cached at {path})")
    with progress_bar() as bar:
        task = bar.add_task("calibrating", total=len(texts))
        importance, _ = load_or_calibrate(lm.model, lm.tokenizer, path=path, texts=texts,
                                          progress=lambda i, n: bar.update(task, completed=i))
    return importance


def shipped_calibration(model: Any) -> Any:
    """The shipped bundle's calibration when it was made for these weights (the embedded
    model): what a fresh install would otherwise spend minutes recomputing; else None."""
    from casrap.errors import CasrapError
    from casrap.profiles.bank import bank_fingerprint
    from casrap.runtime.bundle import load_bundle

    try:
        bundle = load_bundle(None)
        return bundle.importance() if bundle.fingerprint == bank_fingerprint(model) else None
    except CasrapError:
        return None


def announce_lowrank_fit(lm: Any, names: list[str]) -> None:
    """One visible line before a low-rank basis is fitted (minutes on 2 CPU cores, once per model)."""
    from casrap.models.architecture import model_key
    from casrap.profiles.catalogue import parse_spec
    from casrap.profiles.factory import is_plan_file
    from casrap.pruners.lowrank import default_basis_path

    if not any(not is_plan_file(n) and n != "none" and parse_spec(n)[0] == "lowrank" for n in names):
        return
    path = default_basis_path(model_key(lm.model))
    if not path.is_file():
        console.print(f"no low-rank basis for this model yet: fitting it on the calibration text (once; minutes on a CPU; cached at {path})")


SLICING_KINDS = {"heads", "kvheads", "ffn", "shipped"}  # spec kinds whose profiles can be views of a reordered base


def build_profiles(lm: Any, names: list[str], model: str, structural: bool | None = None, weight_norm: bool = False) -> Any:
    """A ProfileBank for ``names`` on a loaded model, calibrating on first use.

    When a head/FFN spec or plan is asked for, the base is reordered by this command's
    calibration before any profile is built (zero-copy profiles, whatever the order of
    ``names``); the bank created afterwards inherits that layout.
    """
    from pathlib import Path

    from casrap.profiles.bank import ProfileBank, needs_reorder
    from casrap.profiles.catalogue import parse_spec
    from casrap.profiles.factory import build_bank, is_plan_file
    from casrap.profiles.plan import PruningPlan

    specs = [n for n in names if n != "none" and not is_plan_file(n)]
    files = [PruningPlan.load(Path(n)) for n in names if is_plan_file(n)]
    slicing = (structural is not False and any(parse_spec(n)[0] in SLICING_KINDS for n in specs)) or needs_reorder(files)
    needs_importance = any(parse_spec(n)[0] != "lowrank" for n in specs) or slicing
    importance = importance_for(lm, weight_norm) if needs_importance else None
    if slicing and importance is not None and importance.source.startswith("calibrated"):
        ProfileBank(lm.model, base_model=model, importance=importance)  # reorders the base now (recorded on the model)
    announce_lowrank_fit(lm, names)
    return build_bank(lm.model, names, base_model=model, importance=importance, structural=structural, tokenizer=lm.tokenizer)


def measure_latency_model(bank_or_model: Any, tokenizer: Any, telemetry: Any = None, force: bool = False) -> Any:
    """The unloaded latency model, measured now with a progress bar (``force``: even if a
    matching fit is cached; the new fit replaces it unless the machine was busy meanwhile)."""
    from casrap.decide.latency_model import load_or_fit_latency_model

    with progress_bar() as bar:
        task = bar.add_task("timing the full model (latency model)", total=8)
        latency = load_or_fit_latency_model(bank_or_model, tokenizer, telemetry=telemetry, refit=force,
                                            progress=lambda i, n: bar.update(task, completed=i, total=n))
    return latency
