"""Plots and a Markdown table for a search run folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from casrap.reports.plots import _plt


def _ci(row: dict[str, Any], split: str) -> str:
    lo, hi = row.get(f"{split}_ci95", [float("nan")] * 2)
    return f"{row[split]:.3f} [{lo:.3f}, {hi:.3f}] (n={row.get(f'{split}_n')})"


def _kl(row: dict[str, Any]) -> str:
    return f"{row['test_kl']:.3f}" if "test_kl" in row else "-"


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# casrap search on {report['model']}", "",
             f"Perplexity data: {report['corpus']} (search / validation / test thirds); importance: {report['importance']}.", ""]
    full = report.get("full_model_ppl", {})
    if full:
        lines.append(f"Full model perplexity: validation {full['validation']:.3f}, test {full['test']:.3f}.")
        lines.append("")
    fit = report.get("fitness", {})
    if fit:
        budget = f"{fit['time_budget_s']:.0f} s per search" if fit.get("time_budget_s") else "generation cap"
        lines += [f"Rates / layers fitness: {fit['kind']} on {fit['search_tokens']} search tokens; {budget}; "
                  f"winner = best validation ppl among the top finalists by search fitness; rule plans seed the search.", ""]
    if "rates_table" in report:
        lines += ["## Per-layer FFN rates (GA) vs the rules, same FFN sparsity", "",
                  "| FFN sparsity | method | layer-param sparsity | validation ppl [95% CI] | test ppl [95% CI] | test KL |", "|---:|---|---:|---|---|---:|"]
        lines += [f"| {100 * r['ffn_sparsity']:.0f}% | {r['method']} | {100 * r['sparsity']:.1f}% | {_ci(r, 'validation')} | {_ci(r, 'test')} | {_kl(r)} |"
                  for r in report["rates_table"]]
        lines.append("")
    if "layers_table" in report:
        lines += ["## Layer sets: GA vs the rules (block influence = layers-P), same k", "",
                  "| k | method | layers removed | validation ppl [95% CI] | test ppl [95% CI] | test KL |", "|---:|---|---|---|---|---:|"]
        lines += [f"| {r['k']} | {r['method']} | {r['layers']} | {_ci(r, 'validation')} | {_ci(r, 'test')} | {_kl(r)} |" for r in report["layers_table"]]
        lines.append("")
    if "heads_table" in report:
        task = report["heads_task"]
        lines += [f"## Head masks (kv groups) on the safety task ({task['source']}), AUROC", "",
                  "| method | kv groups removed | layer-param sparsity | validation AUROC [95% CI] | test AUROC [95% CI] |", "|---|---:|---:|---|---|"]
        lines += [f"| {r['method']} | {r['groups_removed']} | {100 * r['sparsity']:.1f}% | {_ci(r, 'validation')} | {_ci(r, 'test')} |" for r in report["heads_table"]]
        terms = task["best_terms"]
        lines += ["", "Fitness terms of the best mask (they must not cancel): " + ", ".join(f"{k} {v:.4f}" for k, v in terms.items()), ""]
    if "ranks_table" in report:
        lines += ["## Low-rank projections (LLM-Sieve): GA ranks vs min-error allocation vs uniform, same parameter count", "",
                  f"PCA basis: {report.get('lowrank_basis', '?')} (calibration text only).", "",
                  "| target | method | projection params removed | summed relative error | validation ppl [95% CI] | test ppl [95% CI] |",
                  "|---:|---|---:|---:|---|---|"]
        lines += [f"| {100 * r['target']:.0f}% | {r['method']} | {100 * r['removed']:.1f}% | {r['relative_error']:.2f} | {_ci(r, 'validation')} | {_ci(r, 'test')} |"
                  for r in report["ranks_table"]]
        bis = report["ranks_bisect"]
        lines += ["", f"Binary search (search split) for the largest reduction with ppl <= {bis['limit_ppl']:.2f} "
                  f"(full {bis['full_search_ppl']:.2f} x {1 + bis['tolerance']:.2f}):", "",
                  "| method | projection params removed | search ppl | validation ppl | test ppl |", "|---|---:|---:|---:|---:|"]
        for r in bis["rows"]:
            found = f"{r['search_ppl']:.2f}" if r.get("search_ppl") else "none within tolerance"
            lines.append(f"| {r['method']} | {100 * r['fraction']:.1f}% | {found} | {r.get('validation', float('nan')):.2f} | {r.get('test', float('nan')):.2f} |")
        lines.append("")
    if "pareto" in report:
        lines += ["## NSGA-II front (layer sets): search-split perplexity vs ideal speedup", "", "| layers removed | ppl | ideal speedup |", "|---|---:|---:|"]
        lines += [f"| {p['skip']} | {p['ppl']:.2f} | {p['ideal_speedup']:.3f} |" for p in report["pareto"]["front"]]
        lines.append("")
    lines += ["![fitness](fitness.png)", ""]
    if "heads_table" in report:
        lines.append("![best head mask](head_mask.png)")
    if "pareto" in report:
        lines.append("![pareto](pareto.png)")
    return "\n".join(lines) + "\n"


def write_search_report(out_dir: Path, report: dict[str, Any], layers: int, kv_heads: int) -> Path:
    plt = _plt()
    history = [json.loads(l) for l in (out_dir / "generations.jsonl").read_text().splitlines() if l.strip()] if (out_dir / "generations.jsonl").is_file() else []
    fig, ax = plt.subplots(figsize=(8, 4))
    for enc in sorted({h["encoding"] for h in history}):
        rows = [h for h in history if h["encoding"] == enc]
        ax.plot([h["generation"] for h in rows], [h["best"] for h in rows], marker="o", label=f"{enc} best")
    ax.set(xlabel="generation", ylabel="fitness (higher is better)", title="Fitness per generation")
    if history:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "fitness.png", dpi=100)
    plt.close(fig)
    if "heads-ga" in report.get("results", {}):
        mask = np.array(report["results"]["heads-ga"]["mask"]).reshape(layers, kv_heads)
        fig, ax = plt.subplots(figsize=(3 + kv_heads * 0.5, 6))
        ax.imshow(mask, aspect="auto", cmap="Greens", vmin=0, vmax=1)
        ax.set(xlabel="kv group", ylabel="layer", title="Best head mask (green = kept)")
        fig.tight_layout()
        fig.savefig(out_dir / "head_mask.png", dpi=100)
        plt.close(fig)
    if "pareto" in report:
        fig, ax = plt.subplots(figsize=(7, 4))
        front = report["pareto"]["front"]
        ax.plot([p["ideal_speedup"] for p in front], [p["ppl"] for p in front], "o-", label="NSGA-II front")
        for method, points in report["pareto"]["baselines"].items():
            ax.plot([p["ideal_speedup"] for p in points], [p["ppl"] for p in points], "x--", label=method)
        ax.set(xlabel="ideal speedup (weight bytes)", ylabel="perplexity (search split)", yscale="log", title="Quality vs speed")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "pareto.png", dpi=100)
        plt.close(fig)
    path = out_dir / "report.md"
    path.write_text(markdown(report))
    return path
