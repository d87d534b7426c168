"""Plot the Pareto front of measured decode speedup against test-prose perplexity ratio.

Reads every ``benchmarks/results/*.json`` (schema: ``benchmarks/README.md``) and takes,
from each file whose rows name a ``profile`` and carry a measured speedup and a
perplexity, one point per profile: x = perplexity / the full model's perplexity *in the
same file* (so every ratio compares like with like: same text, same run), y = measured
decode speedup over the full model. Rows whose speedup or perplexity is ``null`` (not
measured) are left out, never filled in; a file without a ``none`` row with a perplexity
gives no points (nothing to divide by).

Memory beyond the base model's weights (a column ``extra``/``memory_mb``/``extra_mb``, MB;
0 where a file has none) is the marker's size and a third objective: an option that holds
more memory never pushes a leaner one off the front. The front is the set of points no other
point beats (faster, closer to the full model, no more memory); "near the front" is casrap's
catalogue rule (:func:`casrap.profiles.catalogue.near_front`: no other point is 5% faster
*and* 5% closer in perplexity ratio with no more memory). Writes ``docs/results/pareto.png``
and prints the points as JSON (``--json``) or a table, front first, then the catalogue the
measurements support (:func:`casrap.profiles.catalogue.front_catalogue`, each profile at the
median of its files' points).

    python scripts/pareto.py                         # every results file
    python scripts/pareto.py --results benchmarks/results/profiles-idle.json --out /tmp/p.png

A ``casrap bench --json --output BENCH.json`` report becomes a results file (then re-run
without arguments to plot it with the rest):

    python scripts/pareto.py --from-bench BENCH.json --write-results benchmarks/results/pareto-options.json \
        --command "OMP_NUM_THREADS=2 casrap bench ..." --machine "2-core ... CPU, SmolLM2-135M float32" \
        --load idle --load-average "0.05 0.10 0.08"
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # casrap from this checkout, installed or not
from casrap.profiles.catalogue import QUALITY_SLACK, SPEED_SLACK, OptionPoint, dominates, front_catalogue  # noqa: E402
SPEED_KEYS = ("speedup", "decode_speedup", "comp_speedup", "eager_speedup")
PPL_KEYS = ("ppl", "test_ppl")
MEMORY_KEYS = ("extra", "memory_mb", "extra_mb")
FULL = "none"


@dataclass
class Point:
    profile: str
    speedup: float
    ppl: float
    ppl_ratio: float
    source: str  # results file name
    load: str  # the file's machine.load: idle, or what else ran
    on_front: bool = False
    memory_mb: float = 0.0  # held beyond the base model's weights (0 where the file has no memory column)
    near_front: bool = False  # casrap's catalogue rule (on the front, or within its slack of it)

    def option(self) -> OptionPoint:
        return OptionPoint(self.profile, self.speedup, self.ppl_ratio, self.memory_mb)


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _profile_name(row: dict) -> str | None:
    name = row.get("profile")
    if not isinstance(name, str):
        return None
    return FULL if name.split(" ")[0] == FULL else name


def points_of(path: Path, speed_key: str | None = None, ppl_key: str | None = None) -> list[Point]:
    """The measured (speedup, perplexity ratio) points of one results file."""
    data = json.loads(path.read_text(encoding="utf-8"))
    keys = {c.get("key") for c in data.get("columns", [])}
    speed = speed_key if speed_key in keys else next((k for k in SPEED_KEYS if k in keys), None)
    ppl = ppl_key if ppl_key in keys else next((k for k in PPL_KEYS if k in keys), None)
    memory = next((k for k in MEMORY_KEYS if k in keys), None)
    if "profile" not in keys or speed is None or ppl is None:
        return []
    rows = [r for r in data.get("rows", []) if _profile_name(r)]
    full = next((_number(r.get(ppl)) for r in rows if _profile_name(r) == FULL and _number(r.get(ppl))), None)
    if not full:
        return []
    load = str((data.get("machine") or {}).get("load", "?"))
    found = []
    for row in rows:
        name, s, p = _profile_name(row), _number(row.get(speed)), _number(row.get(ppl))
        mb = (_number(row.get(memory)) if memory else None) or 0.0
        if name == FULL:
            found.append(Point(FULL, 1.0, full, 1.0, path.name, load))  # the reference itself, by definition
        elif s is not None and p is not None:
            found.append(Point(name, s, p, p / full, path.name, load, memory_mb=mb))
    return found


def mark_front(points: list[Point]) -> list[Point]:
    """Flag the points no other point dominates (speed, perplexity ratio, memory) and those on
    or near the front by the catalogue's rule (the same function the catalogue uses)."""
    options = [p.option() for p in points]
    for p, mine in zip(points, options):
        p.on_front = not any(q is not mine and dominates(q, mine) for q in options)
        p.near_front = not any(q is not mine and dominates(q, mine, SPEED_SLACK, QUALITY_SLACK) for q in options)
    return points


def catalogue_of(points: list[Point]) -> list[str]:
    """The catalogue the points support: each profile at the median of its files' points."""
    import statistics

    names = sorted({p.profile for p in points})
    merged = []
    for name in names:
        mine = [p for p in points if p.profile == name]
        merged.append(OptionPoint(name, statistics.median(p.speedup for p in mine), statistics.median(p.ppl_ratio for p in mine),
                                  statistics.median(p.memory_mb for p in mine)))
    return front_catalogue(merged)


def plot(points: list[Point], out: Path, target: tuple[float, float] | None = (1.2, 1.5)) -> Path:
    """Scatter every point, join the front, shade the target region (speedup >= 1.2x at
    <= 1.5x the full model's perplexity)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import FormatStrFormatter

    fig, ax = plt.subplots(figsize=(8, 7))
    sources = sorted({p.source for p in points})
    markers = "osD^v<>Pp*hX"
    most = max((p.memory_mb for p in points), default=0.0) or 1.0
    for i, source in enumerate(sources):
        mine = [p for p in points if p.source == source]
        ax.scatter([p.ppl_ratio for p in mine], [p.speedup for p in mine], marker=markers[i % len(markers)],
                   s=[30 + 270 * p.memory_mb / most for p in mine], alpha=0.6,
                   edgecolors="black", linewidths=[1.4 if p.near_front else 0.0 for p in mine],
                   label=f"{source} ({mine[0].load})")
    front = sorted((p for p in points if p.on_front), key=lambda p: p.ppl_ratio)
    if front:
        ax.plot([p.ppl_ratio for p in front], [p.speedup for p in front], "k--", lw=1, label="Pareto front")
    for p in points:
        if p.on_front or p.profile != FULL:
            ax.annotate(p.profile, (p.ppl_ratio, p.speedup), textcoords="offset points", xytext=(4, 3), fontsize=7)
    if target:
        speed, ratio = target
        ax.fill_between([1.0, ratio], speed, max(speed + 0.1, max((p.speedup for p in points), default=speed) + 0.05),
                        color="tab:green", alpha=0.08, label=f">= {speed}x at <= {ratio}x perplexity")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FormatStrFormatter("%.1f"))
    ax.xaxis.set_minor_formatter(FormatStrFormatter("%.1f"))
    ax.set_xlabel("test-prose perplexity / full model's (same file; log scale)")
    ax.set_ylabel("measured decode speedup over the full model")
    ax.set_title("Measured options: speed against quality")
    ax.text(0.99, 0.01, "marker area: memory beyond the base weights; outlined: on or near the front",
            transform=ax.transAxes, ha="right", va="bottom", fontsize=7, color="0.3")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.12))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out


def results_from_bench(bench: dict, command: str, machine: str, load: str, load_average: str | None, date: str) -> dict:
    """A ``benchmarks/results`` file (README schema) holding one ``casrap bench`` report's
    speedup and perplexity per profile, copied as measured."""
    import importlib.metadata as md

    versions = {}
    for package in ("casrap", "torch", "transformers"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            pass
    rows = [{"profile": p["name"], "ideal": round(p["ideal_speedup"], 2),
             "speedup": None if p["name"] == FULL else round(p["speedup"], 2),
             "pairs": None if p["name"] == FULL or not p.get("speedup_pairs") else
             f"{min(p['speedup_pairs']):.2f}-{max(p['speedup_pairs']):.2f}",
             "ppl": round(p["ppl"], 2), "kl": round(p["kl"], 3)} for p in bench["profiles"]]
    pairs = bench.get("config", {}).get("pairs")
    return {
        "title": "Every option: measured decode speedup against test-prose perplexity",
        "page": "pareto", "page_title": "Speed against quality",
        "summary": ("Decode speedup over the full model in interleaved pairs and perplexity on "
                    f"{bench['corpus']} ({bench['corpus_tokens']} tokens), one run; the Pareto front is drawn by scripts/pareto.py."),
        "command": command,
        "machine": {"description": machine, "threads": bench.get("threads"), "load": load, "load_average": load_average},
        "versions": versions, "date": date,
        "n": f"{pairs} interleaved pairs of {bench.get('config', {}).get('new_tokens', '?')} new tokens per profile",
        "columns": [{"key": "profile", "label": "profile"}, {"key": "ideal", "label": "ideal", "format": "{:.2f}x"},
                    {"key": "speedup", "label": "speedup (median of pairs)", "format": "{:.2f}x"},
                    {"key": "pairs", "label": "min-max"}, {"key": "ppl", "label": "test ppl", "format": "{:.2f}"},
                    {"key": "kl", "label": "KL", "format": "{:.3f}"}],
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", nargs="*", type=Path, help="results JSON files (default: benchmarks/results/*.json)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "pareto.png")
    parser.add_argument("--speed-key", help=f"column holding the measured speedup (default: first of {', '.join(SPEED_KEYS)})")
    parser.add_argument("--ppl-key", help=f"column holding the perplexity (default: first of {', '.join(PPL_KEYS)})")
    parser.add_argument("--json", action="store_true", help="print the points as JSON")
    parser.add_argument("--from-bench", type=Path, help="a `casrap bench --json` report to turn into a results file")
    parser.add_argument("--write-results", type=Path, help="with --from-bench: the results file to write")
    parser.add_argument("--command", default="", help="with --from-bench: the exact bench command line")
    parser.add_argument("--machine", default="", help="with --from-bench: CPU/GPU, cores, memory, model and dtype")
    parser.add_argument("--load", default="", help="with --from-bench: idle, or what else ran")
    parser.add_argument("--load-average", default=None, help="with --from-bench: as read during the run")
    args = parser.parse_args(argv)
    if args.from_bench:
        import datetime

        if not (args.write_results and args.command and args.machine and args.load):
            parser.error("--from-bench needs --write-results, --command, --machine and --load (numbers need their conditions)")
        bench = json.loads(args.from_bench.read_text(encoding="utf-8"))
        data = results_from_bench(bench, args.command, args.machine, args.load, args.load_average,
                                  datetime.date.fromtimestamp(args.from_bench.stat().st_mtime).isoformat())
        args.write_results.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.write_results}")
        return 0
    files = args.results or sorted((ROOT / "benchmarks" / "results").glob("*.json"))
    found = [p for f in files for p in points_of(Path(f), args.speed_key, args.ppl_key)]
    # the full model is (1, 1) in every file by definition: one reference point is enough
    points = mark_front([p for p in found if p.profile != FULL] + [p for p in found if p.profile == FULL][:1])
    if not points:
        print("no results file has measured speedup and perplexity per profile", file=sys.stderr)
        return 1
    plot(points, args.out)
    ordered = sorted(points, key=lambda p: (not p.on_front, p.ppl_ratio))
    if args.json:
        print(json.dumps({"plot": str(args.out), "points": [asdict(p) for p in ordered], "catalogue": catalogue_of(points)}, indent=1))
    else:
        print(f"{'profile':<28} {'speedup':>8} {'ppl':>8} {'ratio':>6} {'MB':>6}  front  source")
        for p in ordered:
            front = "yes" if p.on_front else ("near" if p.near_front else "")
            print(f"{p.profile:<28} {p.speedup:>7.2f}x {p.ppl:>8.2f} {p.ppl_ratio:>6.2f} {p.memory_mb:>6.1f}  {front:<5}  {p.source} ({p.load})")
        print(f"catalogue on or near the front: {', '.join(catalogue_of(points))}")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
