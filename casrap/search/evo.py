"""Seeded evolutionary search with exact sparsity (EvoPress-style) for rates and layer sets.

Why not the plain GA of :mod:`casrap.search.ga` for these encodings: started from random
genomes, it spent its ~40 evaluations far from any good plan and lost to the one-shot
rules. Here:

- the first population *is* the rules (uniform rates, block-influence-weighted rates,
  globally importance-ranked channels; block-influence, last-k and importance-ranked
  layer sets) plus their one-step mutants, so the search starts where the rules end;
- genomes are integer *levels* (rate = level x ``level_step``) whose sum is fixed, and
  the mutation is EvoPress's level switch: one layer goes up a level, another goes down
  one, so every genome has exactly the target sparsity (no repair drift, no penalty);
  for layer sets the same idea is a swap (one removed layer back, one kept layer out);
- (mu + lambda) survival keeps the best plans found so far, and duplicate children are
  re-drawn so that no evaluation is spent twice;
- fitness is evaluated through DEAP's ``toolbox.map`` in batches (one batch per
  generation), so the same loop runs in-process or on a Ray pool; a wall-clock budget
  ends the search besides the generation count.

The winner is not chosen here: :func:`run_evolution` returns the final population ranked
by *search* fitness, and the caller picks among the top few on *validation* text.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from casrap.profiles.plan import PruningPlan
from casrap.search.ga import GenerationLog, SearchConfig, SearchResult

Genome = list[int]
Scores = tuple[float, dict[str, float]]


# ------------------------------------------------------------------- rates (levels)
@dataclass(frozen=True)
class Levels:
    """Discrete per-layer FFN rates: ``rate = level * step``; the level sum is fixed."""

    layers: int
    target: float
    step: float = 0.05
    max_rate: float = 0.9

    @property
    def max_level(self) -> int:
        return int(round(self.max_rate / self.step))

    @property
    def total(self) -> int:
        """Sum of levels that gives exactly ``target`` on average."""
        return int(round(self.target * self.layers / self.step))

    def rates(self, genome: Sequence[int]) -> list[float]:
        return [round(level * self.step, 6) for level in genome]

    def quantize(self, rates: Iterable[float]) -> Genome:
        """Nearest levels with the exact level sum (largest remainders first)."""
        raw = np.clip(np.asarray(list(rates), dtype=float) / self.step, 0, self.max_level)
        raw *= self.total / raw.sum() if raw.sum() > 0 else 0.0
        raw = np.clip(raw, 0, self.max_level)
        levels = np.floor(raw).astype(int)
        order = np.argsort(-(raw - levels))
        i = 0
        while levels.sum() < self.total and i < 10 * self.layers:
            j = order[i % self.layers]
            if levels[j] < self.max_level:
                levels[j] += 1
            i += 1
        return self.repair(levels.tolist(), random.Random(0))

    def repair(self, genome: Genome, rng: random.Random) -> Genome:
        """Clip to [0, max_level], then move single levels until the sum is exact."""
        genome[:] = [min(self.max_level, max(0, int(g))) for g in genome]
        gap = self.total - sum(genome)
        while gap:
            pool = [i for i, g in enumerate(genome) if (g < self.max_level if gap > 0 else g > 0)]
            if not pool:
                break
            i = rng.choice(pool)
            genome[i] += 1 if gap > 0 else -1
            gap += -1 if gap > 0 else 1
        return genome

    def switch(self, genome: Genome, rng: random.Random, moves: int = 1) -> Genome:
        """EvoPress level switch: ``moves`` times, one layer up a level and another down one."""
        for _ in range(moves):
            ups = [i for i, g in enumerate(genome) if g < self.max_level]
            downs = [i for i, g in enumerate(genome) if g > 0]
            if not ups or not downs:
                break
            i = rng.choice(ups)
            j = rng.choice([d for d in downs if d != i] or downs)
            if i != j:
                genome[i] += 1
                genome[j] -= 1
        return genome

    def crossover(self, a: Genome, b: Genome, rng: random.Random) -> tuple[Genome, Genome]:
        """Uniform crossover, then repair both children to the exact level sum."""
        for i in range(len(a)):
            if rng.random() < 0.5:
                a[i], b[i] = b[i], a[i]
        return self.repair(a, rng), self.repair(b, rng)


def rate_seeds(levels: Levels, ffn_importance: torch.Tensor, layer_influence: torch.Tensor) -> dict[str, Genome]:
    """The rule-based starting points for per-layer FFN rates, as exact-sum level genomes.

    - ``uniform``: every layer at the target;
    - ``influence-D``: rates linear in the rank of the layer's block influence, from
      target + D (least influential layer) to target - D (most influential); D in
      {0.1, 0.2, 0.3} (layers that barely change the residual lose more channels);
    - ``importance-ranked``: the globally least important channels (Wanda score over
      the layer's mean), i.e. per-layer rates a global ranking implies;
    - ``importance-ranked-raw``: the same on raw scores.
    """
    n, width = ffn_importance.shape
    seeds = {"uniform": levels.quantize([levels.target] * n)}
    ranks = torch.argsort(torch.argsort(layer_influence.float())).float()  # 0 = least influential
    position = 1.0 - 2.0 * ranks / max(1, n - 1)  # +1 least influential .. -1 most
    for spread in (0.1, 0.2, 0.3):
        seeds[f"influence-{spread:g}"] = levels.quantize((levels.target + spread * position).clamp(0, levels.max_rate).tolist())
    for name, scores in (("importance-ranked", ffn_importance / ffn_importance.mean(1, keepdim=True)), ("importance-ranked-raw", ffn_importance)):
        flat = scores.float().flatten()
        cut = torch.kthvalue(flat, max(1, int(levels.target * flat.numel()))).values
        rates = (scores.float() <= cut).float().mean(1).clamp(0, levels.max_rate)
        seeds[name] = levels.quantize(rates.tolist())
    return seeds


def rates_plan(levels: Levels, genome: Sequence[int], ffn_importance: torch.Tensor, functional: bool = False) -> PruningPlan:
    """Level genome -> plan: each layer drops its least important ``rate x width`` channels."""
    from casrap.search.ga import rates_plan as plan_from_rates

    return plan_from_rates(levels.rates(genome), ffn_importance, functional=functional)


# ---------------------------------------------------------------------- layer sets
def layer_seeds(layer_influence: torch.Tensor, ffn_importance: torch.Tensor, head_importance: torch.Tensor, k: int) -> dict[str, Genome]:
    """Rule-based layer sets with exactly ``k`` layers removed.

    - ``block influence``: the k layers that change the residual least (ShortGPT; the
      ``layers-P`` catalogue rule, first and last layer protected);
    - ``last k``: the k last layers but the final one;
    - ``importance-ranked``: the k layers with the least summed unit importance (head and
      FFN importance, each normalised over the model).
    """
    from casrap.pruners.layers import plan_skip_layers, skip_last_layers

    n = len(layer_influence)
    unit = head_importance.float().sum(1) / head_importance.float().sum() + ffn_importance.float().sum(1) / ffn_importance.float().sum()
    sets = {
        "block influence": plan_skip_layers(layer_influence, k / n + 1e-9),
        "last k": skip_last_layers(n, k),
        "importance-ranked": torch.argsort(unit)[:k].tolist(),
    }
    return {name: [int(i in set(skip)) for i in range(n)] for name, skip in sets.items()}


def swap_layers(genome: Genome, rng: random.Random, moves: int = 1) -> Genome:
    """Layer-set level switch: put one removed layer back and remove one kept layer."""
    for _ in range(moves):
        ones = [i for i, b in enumerate(genome) if b]
        zeros = [i for i, b in enumerate(genome) if not b]
        if not ones or not zeros:
            break
        genome[rng.choice(ones)] = 0
        genome[rng.choice(zeros)] = 1
    return genome


def layer_crossover(k: int) -> Callable[[Genome, Genome, random.Random], tuple[Genome, Genome]]:
    from casrap.search.ga import repair_layer_set

    def cross(a: Genome, b: Genome, rng: random.Random) -> tuple[Genome, Genome]:
        for i in range(len(a)):
            if rng.random() < 0.5:
                a[i], b[i] = b[i], a[i]
        return repair_layer_set(a, k, rng), repair_layer_set(b, k, rng)

    return cross


# ------------------------------------------------------------------------- search
@dataclass
class Operators:
    """How one encoding varies: ``mutate(genome, rng, moves)`` and ``crossover(a, b, rng)``, both exact."""

    mutate: Callable[[Genome, random.Random, int], Genome]
    crossover: Callable[[Genome, Genome, random.Random], tuple[Genome, Genome]]


class BatchMemo:
    """Scores each distinct genome once; new genomes of a generation go through ``toolbox.map`` together."""

    def __init__(self, to_plan: Callable[[Genome], PruningPlan], toolbox: Any) -> None:
        self.to_plan = to_plan
        self.toolbox = toolbox
        self.cache: dict[tuple[int, ...], Scores] = {}
        self.seconds = 0.0

    @property
    def evaluations(self) -> int:
        return len(self.cache)

    @property
    def per_minute(self) -> float:
        return 60.0 * self.evaluations / self.seconds if self.seconds else float("nan")

    def score_all(self, genomes: Iterable[Genome]) -> list[Scores]:
        genomes = [list(g) for g in genomes]
        new = list(dict.fromkeys(tuple(g) for g in genomes if tuple(g) not in self.cache))
        if new:
            start = time.perf_counter()
            plans = [self.to_plan(list(g)) for g in new]
            for key, scores in zip(new, self.toolbox.map(self.toolbox.evaluate, plans)):
                self.cache[key] = scores
            self.seconds += time.perf_counter() - start
        return [self.cache[tuple(g)] for g in genomes]


def make_toolbox(score: Callable[[PruningPlan], Scores], mapper: Callable[..., Iterable[Any]] = map) -> Any:
    """A DEAP toolbox whose ``evaluate`` scores a plan and whose ``map`` is local or Ray's."""
    from deap import base

    toolbox = base.Toolbox()
    toolbox.register("evaluate", score)
    toolbox.register("map", mapper)
    return toolbox


def run_evolution(
    encoding: str,
    seeds: dict[str, Genome],
    operators: Operators,
    memo: BatchMemo,
    config: SearchConfig,
    time_budget: float | None = None,
    on_generation: Callable[[GenerationLog], None] | None = None,
) -> SearchResult:
    """(mu + lambda) evolution from the seeds; stops after ``config.generations`` or ``time_budget`` seconds.

    ``config.generations`` of 0 with a time budget means "until the budget is spent".
    Returns the final population ranked by search fitness in ``final`` (best first)
    and the seeds' search fitness in ``best_genome``'s history terms.
    """
    rng = random.Random(config.seed)
    start = time.perf_counter()
    population = max(2, config.population)
    pool: list[Genome] = []
    for genome in seeds.values():
        if genome not in pool:
            pool.append(list(genome))
    seed_list = list(pool)
    attempts = 0
    while len(pool) < population and attempts < 50 * population:
        attempts += 1
        child = operators.mutate(list(seed_list[len(pool) % len(seed_list)]), rng, rng.choice((1, 2, 3)))
        if child not in pool:
            pool.append(child)
    history: list[GenerationLog] = []

    def log(generation: int, scored: list[tuple[Genome, Scores]]) -> None:
        fits = [s[0] for _, s in scored]
        best = max(scored, key=lambda item: item[1][0])
        entry = GenerationLog(generation, max(fits), float(np.mean(fits)), memo.evaluations, memo.per_minute, dict(best[1][1]))
        history.append(entry)
        if on_generation:
            on_generation(entry)

    current = list(zip(pool, memo.score_all(pool)))
    current.sort(key=lambda item: -item[1][0])
    current = current[:population]
    log(0, current)
    generation = 0

    def out_of_time() -> bool:
        if time_budget is None:
            return False
        elapsed = time.perf_counter() - start
        per_generation = elapsed / (generation + 1)
        return elapsed + 0.5 * per_generation > time_budget

    while (config.generations <= 0 and time_budget is not None) or generation < config.generations:
        if out_of_time():
            break
        generation += 1
        children: list[Genome] = []
        tries = 0
        while len(children) < population and tries < 50 * population:
            tries += 1
            a, b = (list(_tournament(current, config.tournament, rng)) for _ in range(2))
            if rng.random() < config.cxpb:
                a, _ = operators.crossover(a, b, rng)
            a = operators.mutate(a, rng, rng.choice((1, 1, 2, 3)))
            if tuple(a) not in memo.cache and a not in children:
                children.append(a)
        if not children:
            break
        scored = list(zip(children, memo.score_all(children)))
        current = sorted(current + scored, key=lambda item: -item[1][0])[:population]
        log(generation, current)
    best_genome, (best_fitness, _) = current[0]
    return SearchResult(encoding, list(best_genome), best_fitness, history, memo.evaluations,
                        final=[(list(g), s[0]) for g, s in current])


def _tournament(scored: list[tuple[Genome, Scores]], size: int, rng: random.Random) -> Genome:
    picks = [scored[rng.randrange(len(scored))] for _ in range(max(1, size))]
    return max(picks, key=lambda item: item[1][0])[0]
