"""``casrap search``: genetic search for static pruning plans."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import typer

from casrap.cli.common import DeviceOpt, JsonOpt, ModelOpt, console, emit_json, importance_for, load, out
from casrap.errors import InputError


def search(
    model: str = ModelOpt,
    device: str = DeviceOpt,
    encodings: list[str] = typer.Option(["rates", "layers", "heads", "nsga2"], "--encoding", "-e", help="rates | layers | heads | nsga2 | ranks (low-rank projections; repeatable)"),
    sparsity: list[float] = typer.Option([0.2, 0.4], "--sparsity", help="targets for rates (FFN share), layers (share of layers) and ranks (share of projection parameters)"),
    ppl_tolerance: float = typer.Option(0.1, help="ranks: binary search for the largest reduction with search ppl <= (1 + this) x full"),
    head_sparsity: float = typer.Option(0.2, help="target share of kv groups removed by the head-mask GA"),
    population: int = typer.Option(12),
    generations: int = typer.Option(6),
    tokens: int = typer.Option(512, help="tokens per perplexity split (search / validation / test)"),
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
    from casrap.search.runner import ENCODINGS, SearchRun, run_search

    unknown = [e for e in encodings if e not in ENCODINGS]
    if unknown:
        raise InputError(f"unknown encoding(s) {unknown}; choose from {', '.join(ENCODINGS)}")
    lm = load(model, device)
    importance = importance_for(lm)
    if "ranks" in encodings:
        from casrap.models.architecture import model_key
        from casrap.pruners.lowrank import default_basis_path

        basis_path = default_basis_path(model_key(lm.model))
        if not basis_path.is_file():
            console.print(f"no low-rank basis for this model yet: fitting the PCA of every projection's outputs on calibration text (once; cached at {basis_path})")
    run_dir = new_run_dir(reports, "search")
    run = SearchRun(tuple(encodings), tuple(sparsity), head_sparsity, tokens, task_data, ppl_tolerance=ppl_tolerance,
                    config=SearchConfig(population=population, generations=generations, seed=seed))
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


def register(app: typer.Typer) -> None:
    """Attach ``search`` to the top-level app."""
    app.command()(search)
