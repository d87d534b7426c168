"""``casrap search -e ranks``: per-projection low-rank ranks by the GA, against uniform rank.

Genome: one gene per projection (q/k/v/o/gate/up/down of every layer), the share of
that projection's parameters removed; a gene maps to the rank that removes it
(:func:`casrap.pruners.lowrank.rank_for_rate`; 0 = dense). The repair keeps the
*parameter-weighted* mean of the genes at the target, so every genome removes the
same number of parameters as the uniform plan it is compared with.

Compared, all at the same parameter count, on validation and test (never search):

- GA per-projection ranks (seeded with the two plans below, then mutated; the winner
  is the final population's top 3 by search fitness, picked on validation);
- min-error allocation (``lowrank-P``: greedy on PCA eigenvalues, no evaluation);
- uniform: every projection loses the same share of its parameters.

And LLM-Sieve's uniform baseline: a binary search on the *search* split for the largest
uniform reduction whose perplexity stays within ``(1 + tolerance)`` of the full model's,
next to the same search for the min-error allocation and for per-matrix ranks under one
error threshold (each projection the smallest rank dropping at most that share of its
calibration output energy, :func:`casrap.pruners.lowrank.ranks_within_error`); the one
that removes the most parameters within the budget is saved as ``ranks-budget-T``.
The basis is fitted on the user's task text when ``--calibration-text`` is given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np

from casrap.profiles.bank import ProfileBank
from casrap.profiles.plan import PruningPlan
from casrap.pruners import lowrank
from casrap.search import ga

Score = tuple[float, tuple[float, float]]  # value and its 95% CI


def genome_keys(basis: lowrank.LowRankBasis) -> list[lowrank.Key]:
    return sorted(basis.matrices)


def gene_weights(basis: lowrank.LowRankBasis, keys: list[lowrank.Key]) -> np.ndarray:
    """Each projection's share of all projection parameters."""
    sizes = np.array([basis.matrices[k].d_in * basis.matrices[k].d_out for k in keys], dtype=float)
    return sizes / sizes.sum()


def repair_weighted_rates(genome: list[float], weights: np.ndarray, target: float, max_rate: float) -> list[float]:
    """Clip to [0, max_rate] and shift the free genes until ``Σ w·rate == target``."""
    values = np.clip(np.asarray(genome, dtype=float), 0.0, max_rate)
    for _ in range(100):
        gap = target - float(weights @ values)
        if abs(gap) < 1e-7:
            break
        free = (values < max_rate) if gap > 0 else (values > 0)
        if not free.any():
            break
        values[free] = np.clip(values[free] + gap / weights[free].sum(), 0.0, max_rate)
    genome[:] = values.tolist()
    return genome


def genome_plan(genome: list[float], keys: list[lowrank.Key], basis: lowrank.LowRankBasis, name: str = "ranks-ga") -> PruningPlan:
    ranks = lowrank.rates_to_ranks(dict(zip(keys, genome)), basis.shapes)
    return PruningPlan(name=name, ranks=ranks)


def plan_rates(ranks: lowrank.Ranks, keys: list[lowrank.Key], basis: lowrank.LowRankBasis) -> list[float]:
    rates = lowrank.ranks_to_rates(ranks, basis.shapes)
    return [rates[k] for k in keys]


def bisect_fraction(ppl_at: Callable[[float], float], limit: float, hi: float = 0.5, steps: int = 6) -> tuple[float, float | None]:
    """Largest fraction in [0, hi] (to hi / 2**steps) whose search perplexity is <= ``limit``.

    Assumes quality falls monotonically with the fraction, as LLM-Sieve's search does;
    returns ``(fraction, its perplexity)`` (``(0, None)`` when even the first step fails).
    """
    lo, lo_ppl = 0.0, None
    step = hi / 2
    mid = step
    for _ in range(steps):
        value = ppl_at(mid)
        step /= 2
        if value <= limit:
            lo, lo_ppl = mid, value
            mid += step
        else:
            mid -= step
    return lo, lo_ppl


def run_ranks(
    bank: ProfileBank,
    score: Callable[[PruningPlan, str], Score],
    search_ppl: Callable[[], float],
    n_tokens: dict[str, int],
    targets: tuple[float, ...],
    config: ga.SearchConfig,
    tolerance: float,
    full_search_ppl: float,
    on_generation: Callable[[str], Callable[[ga.GenerationLog], None]],
) -> dict[str, Any]:
    """The ranks GA at each target, the baselines, the binary searches; plans to save.

    ``score(plan, split)`` evaluates a plan on a split (search for the binary search,
    validation to pick, test to report); ``search_ppl()`` scores the *active* profile on
    the search split (GA fitness, inside :class:`ga.MemoEvaluator`).
    """
    basis = bank.require_lowrank_basis()
    basis.precompute_projections(bank.model)
    keys = genome_keys(basis)
    weights = gene_weights(basis, keys)
    rows: list[dict[str, Any]] = []
    plans: dict[str, PruningPlan] = {}
    results: dict[str, Any] = {}

    def evaluate_ranks(ranks: lowrank.Ranks) -> float:
        return score(PruningPlan(name="x", ranks=ranks), "search")[0]

    def row(method: str, target: float, ranks: lowrank.Ranks) -> dict[str, Any]:
        out: dict[str, Any] = {"method": method, "target": target, "removed": lowrank.removed_fraction(ranks, basis.shapes),
                               "relative_error": lowrank.total_relative_error(basis, ranks)}
        for split in ("validation", "test"):
            value, ci = score(PruningPlan(name="x", ranks=ranks), split)
            out.update({split: value, f"{split}_ci95": list(ci), f"{split}_n": n_tokens[split]})
        return out

    try:
        for target in targets:
            uniform = lowrank.uniform_ranks(basis.shapes, target)
            greedy = lowrank.allocate_ranks(basis, target)
            evaluator = ga.MemoEvaluator(bank, lambda g: genome_plan(g, keys, basis), lambda p: (-search_ppl(), {}))
            result = ga.run_rates_ga(
                len(keys), target, evaluator, config, on_generation(f"ranks-{int(100 * target)}"),
                repair=lambda g: repair_weighted_rates(g, weights, target, config.max_rate),
                seeds=[plan_rates(greedy, keys, basis), plan_rates(uniform, keys, basis)],
            )
            finalists = [genome_plan(g, keys, basis).ranks for g, _ in result.final[:3]]
            picked = min(finalists, key=lambda r: score(PruningPlan(name="x", ranks=r), "validation")[0])
            for method, ranks in (("GA per-projection ranks", picked), ("min-error allocation (lowrank-P)", greedy), ("uniform", uniform)):
                rows.append(row(method, target, ranks))
            name = f"ranks-ga-{int(100 * target)}"
            plans[name] = PruningPlan(
                name=name, ranks=picked,
                description=f"GA per-projection ranks, {100 * lowrank.removed_fraction(picked, basis.shapes):.1f}% of projection parameters removed",
                meta={"search": "ranks", "evaluations": result.evaluations, "basis": basis.source, "picked_on": "validation of top 3 by search"},
            )
            results[name] = {"history": [asdict(h) for h in result.history], "search_fitness": result.best_fitness}
        bisect, budget_plan = _budget_search(basis, evaluate_ranks, row, tolerance, full_search_ppl)
        if budget_plan is not None:
            plans[budget_plan.name] = budget_plan
    finally:
        for m in basis.matrices.values():
            m.projected = None
    return {"ranks_table": rows, "ranks_bisect": bisect, "ranks_results": results, "ranks_plans": plans}


def _budget_search(basis: Any, evaluate_ranks: Callable[[lowrank.Ranks], float], row: Callable[[str, float, lowrank.Ranks], dict[str, Any]],
                   tolerance: float, full_search_ppl: float) -> tuple[dict[str, Any], PruningPlan | None]:
    """Binary searches for the largest reduction within ``(1 + tolerance) x`` the full model's search
    perplexity, one per allocation rule; their rows, and the plan that removes the most (None if none fits)."""
    limit = (1.0 + tolerance) * full_search_ppl
    bisect: dict[str, Any] = {"tolerance": tolerance, "limit_ppl": limit, "full_search_ppl": full_search_ppl, "rows": []}
    within: list[tuple[float, str, lowrank.Ranks]] = []
    for method, make in (("uniform (LLM-Sieve binary search)", lambda f: lowrank.uniform_ranks(basis.shapes, f)),
                         ("min-error allocation", lambda f: lowrank.allocate_ranks(basis, f)),
                         ("per-matrix error threshold", lambda e: lowrank.ranks_within_error(basis, e))):
        fraction, found = bisect_fraction(lambda f: evaluate_ranks(make(f)), limit)
        entry: dict[str, Any] = {"method": method, "fraction": fraction, "search_ppl": found}
        if fraction > 0:
            ranks = make(fraction)
            entry.update(row(method, fraction, ranks))
            within.append((lowrank.removed_fraction(ranks, basis.shapes), method, ranks))
        bisect["rows"].append(entry)
    if not within:
        return bisect, None
    removed, method, ranks = max(within, key=lambda w: w[0])  # the quality-budget plan: the most parameters removed
    name = f"ranks-budget-{round(100 * tolerance)}"
    return bisect, PruningPlan(
        name=name, ranks=ranks,
        description=(f"low-rank projections within {100 * tolerance:g}% of the full model's search perplexity: "
                     f"{100 * removed:.1f}% of projection parameters removed ({method})"),
        meta={"search": "ranks", "budget": {"tolerance": tolerance, "limit_ppl": limit}, "method": method, "basis": basis.source},
    )
