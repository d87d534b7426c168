"""``casrap search``: genetic search for static pruning plans."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import typer

from casrap.cli.common import DeviceOpt, JsonOpt, ModelOpt, console, emit_json, importance_for, load, out
from casrap.errors import InputError


def search(
    model: str = ModelOpt,
    device: str = DeviceOpt,
    encodings: list[str] = typer.Option(["rates", "layers", "heads", "nsga2"], "--encoding", "-e", help="rates | layers | heads | nsga2 | ranks (low-rank projections; repeatable)"),
    sparsity: list[float] = typer.Option([0.2, 0.4], "--sparsity", help="targets for rates (FFN share), layers (share of layers) and ranks (share of projection parameters)"),
    ppl_tolerance: float = typer.Option(0.1, help="ranks: binary search for the largest reduction with search ppl <= (1 + this) x full"),
    calibration_text: Optional[Path] = typer.Option(None, "--calibration-text", help="ranks: fit the low-rank projections on this task text (LLM-Sieve); later commands need CASRAP_LOWRANK_CALIBRATION=FILE to rebuild its plans"),
    head_sparsity: float = typer.Option(0.2, help="target share of kv groups removed by the head-mask GA"),
    population: int = typer.Option(12),
    generations: Optional[int] = typer.Option(None, help="generation cap (default 6; with --time-budget, no cap unless given)"),
    time_budget: Optional[float] = typer.Option(None, "--time-budget", help="rates / layers: wall-clock seconds per search (each target); ends it besides --generations"),
    fitness: str = typer.Option("kl", "--fitness", help="rates / layers fitness on search text: kl (to the full model) | ppl | lm-eval (accuracy on --lm-eval-task)"),
    lm_eval_task: str = typer.Option("casrap_local", help="--fitness lm-eval: task name (casrap_local ships with casrap)"),
    lm_eval_limit: Optional[int] = typer.Option(None, help="--fitness lm-eval: questions used (default all)"),
    finalists: int = typer.Option(5, help="top genomes by search fitness compared on validation text; the best there wins"),
    workers: int = typer.Option(0, "--workers", help="rates / layers: evaluate fitness on N Ray workers, each rebuilding the model from --model (0 = in this process)"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="an existing Ray cluster (ray://host:10001 or auto); default: a local Ray when --workers > 0"),
    tokens: int = typer.Option(512, help="search-text tokens the fitness reads (validation and test use their whole split)"),
    ship: bool = typer.Option(False, "--ship", help="maintainers: also write the ga-* plans into casrap/data/plans/<model>/ (shipped with the package)"),
    task_data: str = typer.Option("auto", help="auto (walledai/XSTest, else bundled) | bundled | hub id"),
    plans_dir: Path = typer.Option(Path("checkpoints/profiles"), help="where the best plans go (usable by bench and the env)"),
    seed: int = typer.Option(0),
    reports: Path = typer.Option(Path("reports")),
    as_json: bool = JsonOpt,
) -> None:
    """Genetic search for static pruning plans; compares them with uniform and ranked pruning."""
    from casrap.models import describe
    from casrap.reports import new_run_dir
    from casrap.search.ga import SearchConfig
    from casrap.search.report import write_search_report
    from casrap.search.runner import SearchRun, run_search

    _check_options(encodings, fitness, time_budget, workers)
    if generations is None:
        generations = 0 if time_budget is not None else 6
    if calibration_text is not None:
        _use_calibration_text(calibration_text)
    lm = load(model, device)
    importance = importance_for(lm)
    if "ranks" in encodings:
        _announce_basis(lm)
    run_dir = new_run_dir(reports, "search")
    ship_dir = None
    if ship:
        from casrap.profiles.shipped import package_plans_dir

        ship_dir = package_plans_dir(Path(model).name)
    run = SearchRun(tuple(encodings), tuple(sparsity), head_sparsity, tokens, task_data, ppl_tolerance=ppl_tolerance,
                    config=SearchConfig(population=population, generations=generations, seed=seed),
                    fitness=fitness, time_budget=time_budget, finalists=finalists, model_spec=model, workers=workers,
                    ray_address=ray_address, lm_eval_task=lm_eval_task, lm_eval_limit=lm_eval_limit, ship_dir=ship_dir)
    started = time.perf_counter()

    def log(encoding: str, entry: Any) -> None:
        console.print(f"{encoding:<12} gen {entry.generation:>2}  best {entry.best:9.4f}  mean {entry.mean:9.4f}  "
                      f"evals {entry.evaluations:>4} ({entry.evals_per_min:.0f}/min)", highlight=False)

    report_data = run_search(lm.model, lm.tokenizer, run, run_dir, plans_dir, importance=importance, base_model=model, log=log)
    report_data["wall_s"] = time.perf_counter() - started
    info = describe(lm.model)
    path = write_search_report(run_dir, report_data, info.layers, info.kv_heads)
    (run_dir / "search.json").write_text(json.dumps(report_data, indent=1, default=float))
    if as_json:
        emit_json({"run_dir": str(run_dir), "report": str(path), **{k: v for k, v in report_data.items() if k.endswith("_table")}})
        return
    out.print(path.read_text(), soft_wrap=True, highlight=False, markup=False)
    out.print(f"plans saved under {plans_dir}; report {path}")


def _check_options(encodings: list[str], fitness: str, time_budget: float | None, workers: int) -> None:
    """One-line errors for options that cannot work, before the model loads."""
    from casrap.search.runner import ENCODINGS
    from casrap.search.scoring import FITNESS_KINDS

    unknown = [e for e in encodings if e not in ENCODINGS]
    if unknown:
        raise InputError(f"unknown encoding(s) {unknown}; choose from {', '.join(ENCODINGS)}")
    if fitness not in FITNESS_KINDS:
        raise InputError(f"unknown fitness {fitness!r}; choose from {', '.join(FITNESS_KINDS)}")
    if time_budget is not None and time_budget <= 0:
        raise InputError("--time-budget must be a positive number of seconds")
    if workers < 0:
        raise InputError("--workers must be 0 (in-process) or more")


def _use_calibration_text(calibration_text: Path) -> None:
    """Fit low-rank projections on this text (through the environment, as later commands read it)."""
    import os

    from casrap.pruners.lowrank import CALIBRATION_ENV, task_calibration

    if not calibration_text.is_file():
        raise InputError(f"--calibration-text {calibration_text}: no such file")
    os.environ[CALIBRATION_ENV] = str(calibration_text.resolve())
    task_calibration()  # unreadable or empty: one line now, not after the model loads


def _announce_basis(lm: Any) -> None:
    """Say so when the ranks search must first fit the PCA basis (it takes a while, once)."""
    from casrap.models.architecture import model_key
    from casrap.pruners.lowrank import default_basis_path

    basis_path = default_basis_path(model_key(lm.model))
    if not basis_path.is_file():
        console.print(f"no low-rank basis for this model yet: fitting the PCA of every projection's outputs on calibration text (once; cached at {basis_path})")


def register(app: typer.Typer) -> None:
    """Attach ``search`` to the top-level app."""
    app.command()(search)
