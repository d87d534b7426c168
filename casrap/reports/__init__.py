"""Run folders, per-episode metrics, text summaries, plots and the Markdown report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from casrap.reports.load_shift import choice_by_load, choice_by_load_text, plot_choice_by_load
from casrap.reports.plots import make_plots
from casrap.reports.runs import append_jsonl, new_run_dir, read_metrics
from casrap.reports.summary import per_action, text_report


def build_report(run_dir: Path, title: str | None = None, extra: dict[str, Any] | None = None, comparison_md: str = "") -> Path:
    """(Re)build training_metrics.json, training_report.txt, plots and report.md."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    name = title or f"casrap run {run_dir.name}"
    (run_dir / "training_metrics.json").write_text(json.dumps(records, indent=1, default=float))
    report = text_report(records, name, extra)
    shift = choice_by_load(records)
    if shift is not None:
        report += choice_by_load_text(shift)
        (run_dir / "choice_by_load.json").write_text(json.dumps(shift, indent=1))
    (run_dir / "training_report.txt").write_text(report)
    plots = make_plots(records, run_dir) if records else []
    if shift is not None:
        plots.append(plot_choice_by_load(shift, run_dir / "choice_by_load.png"))
    comparison_path = run_dir / "comparison.md"
    if comparison_md:
        comparison_path.write_text(comparison_md)
    elif comparison_path.is_file():
        comparison_md = comparison_path.read_text()
    md = [f"# {name}", "", "```", report.rstrip(), "```", ""]
    if comparison_md:
        md += [comparison_md, ""]
    md += [f"![{p.stem}]({p.name})" for p in plots]
    path = run_dir / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path


__all__ = ["append_jsonl", "new_run_dir", "read_metrics", "per_action", "text_report", "make_plots", "build_report"]
