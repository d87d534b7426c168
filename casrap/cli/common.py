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
    """The model's importance as :func:`casrap.profiles.resolve.resolve_importance` finds it (the cached
    calibration, the shipped bundle's, or a calibration run now, visibly).

    ``weight_norm`` asks for the data-free fallback explicitly; it is announced at the
    default log level because profiles built from it are far worse.
    """
    from casrap.profiles.resolve import resolve_importance

    if weight_norm:
        console.print("[yellow]warning:[/] importance from weight norms, not calibration: pruned profiles will be much worse")
    with _CalibrationBar() as hooks:
        return resolve_importance(lm.model, lm.tokenizer, weight_norm, **hooks)


class _CalibrationBar:
    """``fallback``, ``on_calibrate`` and ``progress`` hooks that show a calibration run (only if one runs)."""

    def __enter__(self) -> dict[str, Any]:
        self.bar: Progress | None = None
        return {"fallback": shipped_calibration, "on_calibrate": self._start, "progress": self._update}

    def _start(self, path: Any, n: int) -> None:
        console.print(f"no calibration for this model yet: calibrating on {n} calibration texts (once; cached at {path})")
        self.bar = progress_bar()
        self.bar.start()
        self.task = self.bar.add_task("calibrating", total=n)

    def _update(self, i: int, n: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=i)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()


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
    from casrap.profiles.catalogue import FULL, parse_spec
    from casrap.profiles.factory import is_plan_file
    from casrap.pruners.lowrank import default_basis_path

    if not any(not is_plan_file(n) and n != FULL and parse_spec(n)[0] == "lowrank" for n in names):
        return
    path = default_basis_path(model_key(lm.model))
    if not path.is_file():
        console.print(f"no low-rank basis for this model yet: fitting it on the calibration text (once; minutes on a CPU; cached at {path})")


def build_profiles(lm: Any, names: list[str], model: str, structural: bool | None = None, weight_norm: bool = False) -> Any:
    """A ProfileBank for ``names`` on a loaded model (:func:`casrap.profiles.resolve.bank_for`, as the
    environment builds its own), calibrating visibly on first use; zero-copy layout whatever the order of ``names``."""
    from casrap.profiles.resolve import bank_for

    if weight_norm:
        console.print("[yellow]warning:[/] importance from weight norms, not calibration: pruned profiles will be much worse")
    announce_lowrank_fit(lm, names)
    with _CalibrationBar() as hooks:
        return bank_for(lm.model, lm.tokenizer, names, base_model=model, structural=structural, weight_norm=weight_norm, **hooks)


def measure_latency_model(bank_or_model: Any, tokenizer: Any, telemetry: Any = None, force: bool = False) -> Any:
    """The unloaded latency model, measured now with a progress bar (``force``: even if a
    matching fit is cached; the new fit replaces it unless the machine was busy meanwhile)."""
    from casrap.decide.latency_model import load_or_fit_latency_model

    with progress_bar() as bar:
        task = bar.add_task("timing the full model (latency model)", total=8)
        latency = load_or_fit_latency_model(bank_or_model, tokenizer, telemetry=telemetry, refit=force,
                                            progress=lambda i, n: bar.update(task, completed=i, total=n))
    return latency
