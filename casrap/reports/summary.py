"""Per-action averages and the text report of a run."""

from __future__ import annotations

from collections import defaultdict
from statistics import mean
from typing import Any


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and value == value else None


def per_action(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[str(r.get("profile", r.get("action")))].append(r)
    table = {}
    for name, rows in sorted(groups.items()):
        stats: dict[str, float] = {"count": float(len(rows))}
        for key in ("reward", "speedup", "degradation", "latency_s", "baseline_latency_s", "tokens_per_s", "ppl", "baseline_ppl", "kl"):
            values = [v for r in rows if (v := _num(r.get(key))) is not None]
            if values:
                stats[key] = mean(values)
        table[name] = stats
    return table


def text_report(records: list[dict[str, Any]], title: str, extra: dict[str, Any] | None = None) -> str:
    lines = [title, "=" * len(title), f"episodes: {len(records)}"]
    rewards = [r["reward"] for r in records if "reward" in r]
    if rewards:
        lines.append(f"mean reward: {mean(rewards):.4f}   last 20: {mean(rewards[-20:]):.4f}")
    for key, value in (extra or {}).items():
        lines.append(f"{key}: {value}")
    lines += ["", "averages per action:", f"{'action':<14}{'n':>5}{'reward':>10}{'speedup':>10}{'degrad.':>10}{'latency s':>11}{'ppl':>9}{'KL':>8}"]
    for name, s in per_action(records).items():
        lines.append(
            f"{name:<14}{int(s['count']):>5}{s.get('reward', float('nan')):>10.3f}{s.get('speedup', float('nan')):>10.3f}"
            f"{s.get('degradation', float('nan')):>10.3f}{s.get('latency_s', float('nan')):>11.3f}{s.get('ppl', float('nan')):>9.2f}{s.get('kl', float('nan')):>8.3f}"
        )
    return "\n".join(lines) + "\n"
