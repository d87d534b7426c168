"""Does the policy's choice move with the machine's load? A table, a plot and a test of independence.

With ``casrap train --background-load`` every episode record carries the background
load intensity it ran under. If the policy reads the machine, the distribution of
chosen profiles differs between load levels. The test is a chi-square statistic on
the level x profile contingency table with its p-value from a permutation test
(load labels shuffled across episodes, 2,000 times): exact for small counts, no
scipy needed, and it asks only whether choice and load are independent.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np


def _labels(records: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    rows = [r for r in records if isinstance(r.get("background_load"), (int, float)) and "profile" in r]
    return np.array([float(r["background_load"]) for r in rows]), np.array([str(r["profile"]) for r in rows])


def _chi2(loads: np.ndarray, profiles: np.ndarray) -> float:
    _, li = np.unique(loads, return_inverse=True)
    _, pi = np.unique(profiles, return_inverse=True)
    table = np.zeros((li.max() + 1, pi.max() + 1))
    np.add.at(table, (li, pi), 1)
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    ok = expected > 0
    return float((((table - expected) ** 2)[ok] / expected[ok]).sum())


def choice_by_load(records: list[dict[str, Any]], permutations: int = 2000, seed: int = 0) -> dict[str, Any] | None:
    """Profile counts per load level and the permutation test of independence (None without two levels)."""
    loads, profiles = _labels(records)
    levels = sorted(set(loads.tolist()))
    if len(levels) < 2:
        return None
    counts = {f"{level:g}": dict(Counter(profiles[loads == level].tolist())) for level in levels}
    observed = _chi2(loads, profiles)
    rng = np.random.default_rng(seed)
    exceed = sum(_chi2(rng.permutation(loads), profiles) >= observed - 1e-12 for _ in range(permutations))
    return {"n": int(len(loads)), "levels": [f"{x:g}" for x in levels], "counts": counts, "chi2": observed,
            "p_value": (exceed + 1) / (permutations + 1), "test": f"chi-square, permutation p-value ({permutations} shuffles of the load labels)"}


def plot_choice_by_load(result: dict[str, Any], path: Path) -> Path:
    """Stacked bars: the share of each profile at each load level."""
    from casrap.reports.plots import _plt

    plt = _plt()
    levels = result["levels"]
    names = sorted({n for c in result["counts"].values() for n in c})
    totals = [sum(result["counts"][lv].values()) for lv in levels]
    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = np.zeros(len(levels))
    for name in names:
        share = np.array([result["counts"][lv].get(name, 0) / t for lv, t in zip(levels, totals)])
        ax.bar(levels, share, bottom=bottom, label=name)
        bottom += share
    ax.set(xlabel="background load intensity", ylabel="share of episodes",
           title=f"chosen profile by load (n={result['n']}, permutation p={result['p_value']:.3g})")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def choice_by_load_text(result: dict[str, Any]) -> str:
    lines = ["", f"chosen profile by background load ({result['n']} episodes; {result['test']}: chi2 {result['chi2']:.2f}, "
                 f"p = {result['p_value']:.3g}):"]
    for level in result["levels"]:
        counts = result["counts"][level]
        total = sum(counts.values())
        top = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
        lines.append(f"  load {level}: {top}")
    return "\n".join(lines) + "\n"
