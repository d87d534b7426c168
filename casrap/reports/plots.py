"""Per-episode plots of a run (matplotlib, Agg backend: files only, no display)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from casrap.reports.summary import per_action


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(records: list[dict[str, Any]], key: str) -> np.ndarray:
    return np.array([float(r[key]) if isinstance(r.get(key), (int, float)) else np.nan for r in records])


def _trend(ax: Any, x: np.ndarray, y: np.ndarray, color: str) -> None:
    ok = np.isfinite(y)
    if ok.sum() >= 2:
        slope, intercept = np.polyfit(x[ok], y[ok], 1)
        ax.plot(x, slope * x + intercept, "--", color=color, linewidth=1)


def _pair_plot(path: Path, records: list[dict[str, Any]], base_key: str, key: str, ylabel: str, title: str) -> Path:
    plt = _plt()
    x = np.arange(1, len(records) + 1, dtype=float)
    fig, ax = plt.subplots(figsize=(8, 4))
    for k, label, color in ((base_key, "baseline (full model)", "tab:blue"), (key, "chosen profile", "tab:orange")):
        y = _series(records, k)
        ax.plot(x, y, ".", color=color, label=label, alpha=0.7)
        _trend(ax, x, y, color)
    ax.set(xlabel="episode", ylabel=ylabel, title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _bar(path: Path, names: list[str], values: list[float], ylabel: str, title: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(names, values, color="tab:green")
    ax.set(ylabel=ylabel, title=title)
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def make_plots(records: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Write every plot of the report; returns their paths."""
    plt = _plt()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for r in records:  # tokens/s of the baseline, derived where only latency was recorded
        if "baseline_tokens_per_s" not in r and r.get("baseline_latency_s") and r.get("latency_s"):
            n = r.get("max_new_tokens", 1)
            r["baseline_tokens_per_s"] = n / r["baseline_latency_s"]
            r["tokens_per_s"] = n / r["latency_s"]
    paths.append(_pair_plot(out_dir / "token_speed.png", records, "baseline_tokens_per_s", "tokens_per_s", "tokens/s", "Token speed: baseline vs pruned"))
    paths.append(_pair_plot(out_dir / "inference_time.png", records, "baseline_latency_s", "latency_s", "seconds", "Inference time: baseline vs pruned"))
    paths.append(_pair_plot(out_dir / "perplexity.png", records, "baseline_ppl", "ppl", "teacher-forced ppl", "Perplexity of the full model's answer: baseline vs pruned"))

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(_series(records, "prompt_tokens"), _series(records, "prompt_ppl"), s=10)
    ax.set(xlabel="prompt tokens", ylabel="prompt perplexity", title="Prompt length vs prompt perplexity")
    fig.tight_layout()
    fig.savefig(out_dir / "prompt_length_vs_ppl.png", dpi=100)
    plt.close(fig)
    paths.append(out_dir / "prompt_length_vs_ppl.png")

    stats = per_action(records)
    names = list(stats)
    paths.append(_bar(out_dir / "action_usage.png", names, [stats[n]["count"] for n in names], "episodes", "Action usage"))
    paths.append(_bar(out_dir / "time_per_action.png", names, [stats[n].get("latency_s", np.nan) for n in names], "seconds", "Inference time per action"))
    paths.append(_bar(out_dir / "ppl_per_action.png", names, [stats[n].get("ppl", np.nan) for n in names], "teacher-forced ppl", "Perplexity per action"))

    rewards = _series(records, "reward")
    fig, ax = plt.subplots(figsize=(8, 4))
    x = np.arange(1, len(rewards) + 1)
    ax.plot(x, rewards, ".", alpha=0.5, label="reward")
    window = max(1, min(20, len(rewards) // 5 or 1))
    if len(rewards) >= window:
        moving = np.convolve(np.nan_to_num(rewards), np.ones(window) / window, mode="valid")
        ax.plot(np.arange(window, len(rewards) + 1), moving, color="tab:red", label=f"moving average ({window})")
    ax.set(xlabel="episode", ylabel="reward", title="Reward per episode")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "reward.png", dpi=100)
    plt.close(fig)
    paths.append(out_dir / "reward.png")
    return paths
