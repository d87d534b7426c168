"""The rates and layer-set searches of ``casrap search``: seeded evolution, validation pick, test report.

For each target: the rule-based plans seed the population (:mod:`casrap.search.evo`),
the search runs on the *search* tokens (KL to the full model by default), the top
``finalists`` genomes by search fitness are compared on *validation* perplexity and the
best one wins, and every plan in the table - the winner and each rule - is measured on
*test* (perplexity with its 95% CI and n tokens, KL to the full model). Validation
never feeds the search, test never feeds any choice.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from casrap.models.architecture import ArchitectureInfo
from casrap.profiles.bank import ProfileBank
from casrap.profiles.plan import PruningPlan
from casrap.pruners.importance import Importance
from casrap.search import evo
from casrap.search.ga import GenerationLog
from casrap.search.scoring import FitnessSpec, PlanScorer, SplitScorer



class EvolveContext:
    """What the rates and layers searches share: the bank, the scorers, the evaluation backend.

    Used as a context manager so that a Ray pool (``run.workers > 0`` or a
    ``run.ray_address``) is shut down when the searches end, even on error.
    """

    def __init__(self, bank: ProfileBank, tokenizer: Any, importance: Importance, info: ArchitectureInfo, run: Any,
                 search_ids: torch.Tensor, val_ids: torch.Tensor, test_ids: torch.Tensor, plans_dir: Path, base_model: str,
                 note: Callable[[str], Callable[[GenerationLog], None]]) -> None:
        self.bank, self.tokenizer, self.imp, self.info, self.run = bank, tokenizer, importance, info, run
        self.plans_dir, self.base_model, self.note = plans_dir, base_model, note
        self.fitness = FitnessSpec(run.fitness, search_ids.tolist(), run.lm_eval_task, run.lm_eval_limit)
        self.validation = SplitScorer(bank, val_ids)
        self.test = SplitScorer(bank, test_ids)
        self.full = {"validation": self.validation.measure(None), "test": self.test.measure(None)}
        self.pool: Any = None
        if run.workers > 0 or run.ray_address:
            from casrap.search.distributed import RayPool, WorkerSpec

            spec = WorkerSpec(run.model_spec or base_model, bank.fingerprint, self.fitness)
            self.pool = RayPool(spec, max(1, run.workers), run.ray_address)
            self.toolbox = evo.make_toolbox(lambda plan: plan, self.pool.map)
        else:
            self.toolbox = evo.make_toolbox(PlanScorer(bank, tokenizer, self.fitness))

    def __enter__(self) -> EvolveContext:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    # ----------------------------------------------------------------- helpers
    def row(self, method: str, plan: PruningPlan, extra: dict[str, Any]) -> dict[str, Any]:
        """Validation and test measurements of one plan, in the report's row format."""
        from casrap.search.fitness import plan_sparsity

        out: dict[str, Any] = {"method": method, "sparsity": plan_sparsity(plan, self.info), **extra}
        for split, scorer in (("validation", self.validation), ("test", self.test)):
            m = scorer.measure(plan)
            out.update({split: m["ppl"], f"{split}_ci95": m["ppl_ci95"], f"{split}_n": m["n"], f"{split}_kl": m["kl"]})
        return out

    def pick(self, result: Any, to_plan: Callable[[list[int]], PruningPlan]) -> tuple[list[int], float, list[dict[str, Any]]]:
        """The finalist (top by search fitness) with the lowest validation perplexity."""
        finalists = result.final[: max(1, self.run.finalists)]
        scored = []
        for genome, fitness in finalists:
            m = self.validation.measure(to_plan(genome))
            scored.append({"genome": genome, "search_fitness": fitness, "validation_ppl": m["ppl"], "validation_kl": m["kl"]})
        best = min(scored, key=lambda item: item["validation_ppl"])
        return best["genome"], best["search_fitness"], scored

    def save(self, plan: PruningPlan, name: str, description: str, meta: dict[str, Any], row: dict[str, Any]) -> None:
        """Write the winner as a structural plan (and into the shipped plans when asked)."""
        plan.name, plan.base_model, plan.fingerprint, plan.functional = name, self.base_model, self.bank.fingerprint, False
        plan.description = description
        plan.meta = {**meta, "fitness": self.run.fitness, "search_tokens": len(self.fitness.token_ids),
                     "picked_on": f"validation ppl of the top {self.run.finalists} by search fitness",
                     "test": {"ppl": row["test"], "kl": row["test_kl"], "n": row["test_n"],
                              "full_ppl": self.full["test"]["ppl"]}}
        plan.save(self.plans_dir / f"{name}.json")
        if self.run.ship_dir is not None:
            plan.save(Path(self.run.ship_dir) / f"{name}.json")

    def evolve(self, encoding: str, seeds: dict[str, list[int]], operators: evo.Operators,
               to_plan: Callable[[list[int]], PruningPlan]) -> tuple[Any, evo.BatchMemo, float]:
        memo = evo.BatchMemo(to_plan, self.toolbox)
        start = time.perf_counter()
        cfg = self.run.config
        result = evo.run_evolution(encoding, seeds, operators, memo, cfg, self.run.time_budget, self.note(encoding))
        return result, memo, time.perf_counter() - start


def search_rates(ctx: EvolveContext, target: float) -> tuple[list[dict[str, Any]], str, dict[str, Any]]:
    """Per-layer FFN rates at ``target`` FFN sparsity: GA vs every rule seed (uniform = ``ffn-P``)."""
    pct = int(round(100 * target))
    levels = evo.Levels(ctx.info.layers, target, ctx.run.level_step, ctx.run.config.max_rate)
    seeds = evo.rate_seeds(levels, ctx.imp.ffn, ctx.imp.layers)

    def to_plan(genome: list[int]) -> PruningPlan:
        return evo.rates_plan(levels, genome, ctx.imp.ffn)

    ops = evo.Operators(levels.switch, levels.crossover)
    result, memo, seconds = ctx.evolve(f"rates-{pct}", seeds, ops, to_plan)
    genome, fitness, finalists = ctx.pick(result, to_plan)
    rows = [ctx.row("GA per-layer rates", to_plan(genome), {"ffn_sparsity": target, "rates": levels.rates(genome)})]
    for name, seed in seeds.items():
        label = f"uniform (ffn-{pct})" if name == "uniform" else f"rule: {name}"
        rows.append(ctx.row(label, to_plan(seed), {"ffn_sparsity": target, "rates": levels.rates(seed),
                                                   "search_fitness": memo.cache.get(tuple(seed), (float("nan"),))[0]}))
    rows[0]["search_fitness"] = fitness
    name = f"ga-rates-{pct}"
    ctx.save(to_plan(genome), name, f"GA per-layer FFN rates, {pct}% of FFN channels (searched by casrap search)",
             {"search": "rates", "rates": levels.rates(genome), "evaluations": memo.evaluations, "seconds": round(seconds, 1),
              "seeds": list(seeds)}, rows[0])
    history = {"history": [asdict(h) for h in result.history], "rates": levels.rates(genome), "finalists": finalists,
               "evaluations": memo.evaluations, "seconds": seconds}
    return rows, name, history


def search_layers(ctx: EvolveContext, target: float) -> tuple[list[dict[str, Any]], str, dict[str, Any]]:
    """Layer sets of k = round(target x L) layers: GA vs block influence (``layers-P``), last k, importance-ranked."""
    n = ctx.info.layers
    k = max(1, int(round(target * n)))
    pct = int(round(100 * target))
    seeds = evo.layer_seeds(ctx.imp.layers, ctx.imp.ffn, ctx.imp.heads, k)

    def to_plan(genome: list[int]) -> PruningPlan:
        return PruningPlan(name="layers-ga", skip_layers=[i for i, bit in enumerate(genome) if bit])

    ops = evo.Operators(evo.swap_layers, evo.layer_crossover(k))
    result, memo, seconds = ctx.evolve(f"layers-k{k}", seeds, ops, to_plan)
    genome, fitness, finalists = ctx.pick(result, to_plan)
    best = to_plan(genome)
    rows = [ctx.row("GA layer set", best, {"k": k, "layers": best.skip_layers, "search_fitness": fitness})]
    for name, seed in seeds.items():
        plan = to_plan(seed)
        rows.append(ctx.row(name, plan, {"k": k, "layers": plan.skip_layers, "search_fitness": memo.cache.get(tuple(seed), (float("nan"),))[0]}))
    name = f"ga-layers-{pct}"
    ctx.save(best, name, f"GA layer set, {k}/{n} layers skipped: {best.skip_layers} (searched by casrap search)",
             {"search": "layers", "k": k, "evaluations": memo.evaluations, "seconds": round(seconds, 1), "seeds": list(seeds)}, rows[0])
    history = {"history": [asdict(h) for h in result.history], "skip": best.skip_layers, "finalists": finalists,
               "evaluations": memo.evaluations, "seconds": seconds}
    return rows, name, history
