"""Genetic search over pruning plans with DEAP: head masks, layer sets, per-layer rates, NSGA-II.

Hygiene built in: fitness is computed on the *search* split only, the final pick is
made on *validation*, and only *test* figures are reported against baselines.
Chromosomes that break a constraint are repaired (not zeroed): every layer keeps a kv
group, never every layer is removed, a layer set has exactly k layers, and rates meet
the sparsity target. Genomes are memoised.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from casrap.models.architecture import ArchitectureInfo
from casrap.profiles.bank import ProfileBank
from casrap.profiles.plan import PruningPlan


@dataclass
class SearchConfig:
    """GA settings (defaults from the published designs casrap follows).

    Attributes:
        population: individuals per generation.
        generations: generations to run.
        cxpb / mutpb: crossover and mutation probabilities (0.5 / 0.5).
        tournament: tournament size for selection.
        elite_fraction: share of the population kept as is (rates: 50%).
        rate_step: bound of the per-gene rate mutation (±10%).
        seed: seeds ``random`` and numpy; same seed, same result.
    """

    population: int = 12
    generations: int = 6
    cxpb: float = 0.5
    mutpb: float = 0.5
    tournament: int = 3
    elite_fraction: float = 0.5
    rate_step: float = 0.10
    max_rate: float = 0.9
    seed: int = 0


@dataclass
class GenerationLog:
    generation: int
    best: float
    mean: float
    evaluations: int
    evals_per_min: float
    best_terms: dict[str, float] = field(default_factory=dict)


@dataclass
class SearchResult:
    encoding: str
    best_genome: list[Any]
    best_fitness: float
    history: list[GenerationLog]
    evaluations: int
    front: list[tuple[list[Any], tuple[float, ...]]] = field(default_factory=list)
    final: list[tuple[list[Any], float]] = field(default_factory=list)  # last population, best first


class Memo:
    """Calls ``fn`` once per distinct genome; counts and times those calls (evaluations/min)."""

    def __init__(self, fn: Callable[[list[Any]], Any]) -> None:
        self.fn = fn
        self.cache: dict[tuple[Any, ...], Any] = {}
        self.evaluations = 0
        self.seconds = 0.0

    @staticmethod
    def key(genome: list[Any]) -> tuple[Any, ...]:
        return tuple(round(g, 4) if isinstance(g, float) else g for g in genome)

    def __call__(self, genome: list[Any]) -> Any:
        k = self.key(genome)
        if k not in self.cache:
            start = time.perf_counter()
            self.cache[k] = self.fn(list(genome))
            self.evaluations += 1
            self.seconds += time.perf_counter() - start
        return self.cache[k]

    @property
    def per_minute(self) -> float:
        return 60.0 * self.evaluations / self.seconds if self.seconds else float("nan")


class MemoEvaluator(Memo):
    """Evaluates a genome once: builds its plan, activates it in the bank, scores it."""

    def __init__(self, bank: ProfileBank, to_plan: Callable[[list[Any]], PruningPlan],
                 score: Callable[[PruningPlan], tuple[float, dict[str, float]]]) -> None:
        super().__init__(self._score_genome)
        self.bank = bank
        self.to_plan = to_plan
        self.score = score

    def _score_genome(self, genome: list[Any]) -> tuple[float, dict[str, float]]:
        with self.bank.scratch(self.to_plan(genome)) as profile:
            return self.score(profile.plan)


# ------------------------------------------------------------------ genome -> plan
def heads_plan(genome: list[int], info: ArchitectureInfo, functional: bool = True) -> PruningPlan:
    """Genome: layers x kv groups, 1 = keep the group (kv head and its query heads)."""
    plan = PruningPlan(name="heads-ga", functional=functional)
    g = info.group_size
    for layer in range(info.layers):
        row = genome[layer * info.kv_heads : (layer + 1) * info.kv_heads]
        kept = [j for j, bit in enumerate(row) if bit]
        if len(kept) < info.kv_heads:
            plan.heads[layer] = {"kv": kept, "q": [j * g + h for j in kept for h in range(g)]}
    return plan


def layers_plan(genome: list[int]) -> PruningPlan:
    """Genome: one bit per layer, 1 = remove."""
    return PruningPlan(name="layers-ga", skip_layers=[i for i, bit in enumerate(genome) if bit])


def rates_plan(genome: list[float], ffn_importance: torch.Tensor, functional: bool = True) -> PruningPlan:
    """Genome: per-layer share of FFN channels removed (least important first)."""
    plan = PruningPlan(name="rates-ga", functional=functional)
    width = ffn_importance.shape[1]
    for layer, rate in enumerate(genome):
        drop = min(int(round(rate * width)), width - 1)
        if drop > 0:
            plan.ffn[layer] = sorted(ffn_importance[layer].argsort(descending=True)[: width - drop].tolist())
    return plan


# ------------------------------------------------------------------------ repairs
def repair_heads(genome: list[int], layers: int, kv_heads: int, rng: random.Random) -> list[int]:
    """Every layer keeps at least one kv group."""
    for layer in range(layers):
        row = slice(layer * kv_heads, (layer + 1) * kv_heads)
        if not any(genome[row]):
            genome[layer * kv_heads + rng.randrange(kv_heads)] = 1
    return genome


def repair_layer_set(genome: list[int], k: int | None, rng: random.Random) -> list[int]:
    """Exactly ``k`` layers removed (or at most L-1 when k is free)."""
    n = len(genome)
    ones = [i for i, b in enumerate(genome) if b]
    target = k if k is not None else min(len(ones), n - 1)
    while len(ones) > target:
        genome[ones.pop(rng.randrange(len(ones)))] = 0
    zeros = [i for i, b in enumerate(genome) if not b]
    while len(ones) < target:
        i = zeros.pop(rng.randrange(len(zeros)))
        genome[i] = 1
        ones.append(i)
    return genome


def repair_rates(genome: list[float], target: float, max_rate: float) -> list[float]:
    """Clip to [0, max_rate] and shift so the mean rate equals the target."""
    values = np.clip(np.asarray(genome, dtype=float), 0.0, max_rate)
    for _ in range(50):
        gap = target - values.mean()
        if abs(gap) < 1e-6:
            break
        free = (values < max_rate) if gap > 0 else (values > 0)
        if not free.any():
            break
        values[free] = np.clip(values[free] + gap * len(values) / free.sum(), 0.0, max_rate)
    genome[:] = values.tolist()
    return genome


# -------------------------------------------------------------------------- runs
def _seeded(config: SearchConfig, name: str, weights: tuple[float, ...]) -> tuple[random.Random, Any]:
    """Seed every RNG DEAP may touch; return our RNG and the DEAP individual class."""
    random.seed(config.seed)
    np.random.seed(config.seed)
    return random.Random(config.seed), _creator(name, weights, list)


def _score_generation(pop: list[Any], generation: int, evaluate: MemoEvaluator, history: list[GenerationLog],
                      on_generation: Callable[[GenerationLog], None] | None) -> None:
    """Evaluate (memoised) every individual and log the generation."""
    for ind in pop:
        ind.fitness.values = (evaluate(ind)[0],)
    fits = [ind.fitness.values[0] for ind in pop]
    best = max(pop, key=lambda i: i.fitness.values[0])
    log = GenerationLog(generation, max(fits), float(np.mean(fits)), evaluate.evaluations, evaluate.per_minute, evaluate(best)[1])
    history.append(log)
    if on_generation:
        on_generation(log)


def _creator(name: str, weights: tuple[float, ...], base: type) -> Any:
    from deap import base as deap_base
    from deap import creator

    fit_name = f"Fitness_{name}"
    if not hasattr(creator, fit_name):
        creator.create(fit_name, deap_base.Fitness, weights=weights)
    ind_name = f"Individual_{name}"
    if not hasattr(creator, ind_name):
        creator.create(ind_name, base, fitness=getattr(creator, fit_name))
    return getattr(creator, ind_name)


def _vary_bits(offspring: list[Any], config: SearchConfig, rng: random.Random, repair: Callable[[Any], Any]) -> None:
    """One-point crossover on pairs, flip-bit mutation (about two bits), then repair, in place."""
    from deap import tools

    for a, b in zip(offspring[::2], offspring[1::2]):
        if rng.random() < config.cxpb:
            tools.cxOnePoint(a, b)
    for ind in offspring:
        if rng.random() < config.mutpb:
            tools.mutFlipBit(ind, indpb=2.0 / len(ind))
        repair(ind)


def run_binary_ga(
    encoding: str,
    length: int,
    init_one_prob: float,
    repair: Callable[[list[int], random.Random], list[int]],
    evaluate: MemoEvaluator,
    config: SearchConfig,
    on_generation: Callable[[GenerationLog], None] | None = None,
) -> SearchResult:
    """Single-objective GA over bit strings: cxOnePoint, mutFlipBit, selTournament."""
    from deap import tools

    rng, Individual = _seeded(config, encoding, (1.0,))
    pop = [Individual(repair([int(rng.random() < init_one_prob) for _ in range(length)], rng)) for _ in range(config.population)]
    history: list[GenerationLog] = []
    for generation in range(config.generations + 1):
        _score_generation(pop, generation, evaluate, history, on_generation)
        if generation == config.generations:
            break
        elite = tools.selBest(pop, 1)
        offspring = [Individual(list(i)) for i in tools.selTournament(pop, len(pop) - 1, tournsize=config.tournament)]
        _vary_bits(offspring, config, rng, lambda ind: repair(ind, rng))
        pop = [Individual(list(e)) for e in elite] + offspring
    ranked = sorted(pop, key=lambda i: -i.fitness.values[0])
    return SearchResult(encoding, list(ranked[0]), ranked[0].fitness.values[0], history, evaluate.evaluations,
                        final=[(list(i), i.fitness.values[0]) for i in ranked])


def run_rates_ga(
    layers: int,
    target: float,
    evaluate: MemoEvaluator,
    config: SearchConfig,
    on_generation: Callable[[GenerationLog], None] | None = None,
    repair: Callable[[list[float]], list[float]] | None = None,
    seeds: list[list[float]] | None = None,
) -> SearchResult:
    """Per-gene rates: 50% elitism, bounded mutation (±rate_step), blend crossover.

    ``layers`` is the genome length (one rate per layer, or per projection for ranks).
    ``repair`` replaces the unweighted mean-rate repair (ranks weight genes by size);
    ``seeds`` replace the uniform starting point, and the rest of the first population
    are their mutants instead of random rates around the target (a long genome's
    random rates are far from any good plan).
    """
    from deap import tools

    rng, Individual = _seeded(config, "rates", (1.0,))

    def fix(ind: list[float]) -> list[float]:
        return repair(ind) if repair else repair_rates(ind, target, config.max_rate)

    def mutate(ind: list[float]) -> None:
        for i in range(len(ind)):
            if rng.random() < 0.3:
                ind[i] += rng.uniform(-config.rate_step, config.rate_step)

    if seeds:
        pop = [Individual(fix(list(seed))) for seed in seeds[: config.population]]
        while len(pop) < config.population:
            child = list(seeds[len(pop) % len(seeds)])
            mutate(child)
            pop.append(Individual(fix(child)))
    else:
        pop = [Individual(fix([target] * layers))]  # the uniform plan is one starting point
    while len(pop) < config.population:
        pop.append(Individual(fix([min(config.max_rate, max(0.0, target + rng.uniform(-0.2, 0.2))) for _ in range(layers)])))
    history: list[GenerationLog] = []
    n_elite = max(1, int(config.elite_fraction * config.population))
    for generation in range(config.generations + 1):
        _score_generation(pop, generation, evaluate, history, on_generation)
        if generation == config.generations:
            break
        elite = [Individual(list(i)) for i in tools.selBest(pop, n_elite)]
        children = []
        while len(elite) + len(children) < config.population:
            a, b = (Individual(list(i)) for i in tools.selTournament(pop, 2, tournsize=config.tournament))
            if rng.random() < config.cxpb:
                tools.cxBlend(a, b, alpha=0.3)
            if rng.random() < config.mutpb:
                mutate(a)
            children.append(Individual(fix(list(a))))
        pop = elite + children
    ranked = sorted(pop, key=lambda i: -i.fitness.values[0])
    best = ranked[0]
    return SearchResult("rates", list(best), best.fitness.values[0], history, evaluate.evaluations,
                        final=[(list(i), i.fitness.values[0]) for i in ranked])


def run_nsga2(
    layers: int,
    evaluate_objectives: Callable[[list[int]], tuple[float, float]],
    config: SearchConfig,
    on_generation: Callable[[GenerationLog], None] | None = None,
) -> SearchResult:
    """Pareto front over layer sets: minimise perplexity, maximise ideal speedup."""
    from deap import tools

    rng, Individual = _seeded(config, "nsga2", (-1.0, 1.0))
    objectives = Memo(evaluate_objectives)

    def fix(ind: list[int]) -> list[int]:
        return repair_layer_set(ind, None, rng)

    size = config.population + (-config.population % 4)
    pop = [Individual(fix([int(rng.random() < rng.uniform(0.05, 0.5)) if 0 < i < layers - 1 else 0 for i in range(layers)])) for _ in range(size)]
    for ind in pop:
        ind.fitness.values = objectives(ind)
    pop = tools.selNSGA2(pop, size)
    history: list[GenerationLog] = []
    for generation in range(config.generations):
        offspring = [Individual(list(i)) for i in tools.selTournamentDCD(pop, size)]
        _vary_bits(offspring, config, rng, fix)
        for ind in offspring:
            ind.fitness.values = objectives(ind)
        pop = tools.selNSGA2(pop + offspring, size)
        ppls = [i.fitness.values[0] for i in pop]
        log = GenerationLog(generation + 1, -min(ppls), -float(np.mean(ppls)), objectives.evaluations, objectives.per_minute)
        history.append(log)
        if on_generation:
            on_generation(log)
    front = tools.sortNondominated(pop, len(pop), first_front_only=True)[0]
    unique = {tuple(i): (list(i), tuple(i.fitness.values)) for i in front}
    ordered = sorted(unique.values(), key=lambda item: item[1][1])
    best = ordered[0]
    return SearchResult("nsga2", best[0], -best[1][0], history, objectives.evaluations, front=ordered)


def finite(value: float) -> float:
    return value if math.isfinite(value) else -1e9
