from __future__ import annotations

import json
import random

import pytest
import torch

pytest.importorskip("deap")

from casrap.models import describe  # noqa: E402
from casrap.search import ga  # noqa: E402
from casrap.search.data import load_safety_task  # noqa: E402
from casrap.search.fitness import auroc, plan_sparsity  # noqa: E402


def test_repairs_keep_constraints():
    rng = random.Random(0)
    genome = ga.repair_heads([0] * 8, layers=4, kv_heads=2, rng=rng)
    assert all(any(genome[l * 2 : l * 2 + 2]) for l in range(4))
    for _ in range(20):
        g = ga.repair_layer_set([rng.randint(0, 1) for _ in range(10)], 3, rng)
        assert sum(g) == 3
    assert sum(ga.repair_layer_set([1] * 6, None, rng)) == 5  # never every layer
    rates = ga.repair_rates([0.9, 0.0, 0.5, 0.1], 0.25, 0.8)
    assert abs(sum(rates) / 4 - 0.25) < 1e-6 and max(rates) <= 0.8 and min(rates) >= 0


def test_auroc_and_sparsity_weighting(tiny):
    import numpy as np

    assert auroc(np.array([0.9, 0.8, 0.1, 0.2]), np.array([True, True, False, False])) == 1.0
    assert auroc(np.array([1.0, 1.0]), np.array([True, False])) == 0.5
    info = describe(tiny.model)
    plan = ga.layers_plan([1, 0, 0, 0])
    assert plan_sparsity(plan, info) == pytest.approx(0.25)
    heads = ga.heads_plan([0, 1] * 4, info)  # half of the kv groups in every layer
    assert 0 < plan_sparsity(heads, info) < plan_sparsity(plan, info) * 2


def test_safety_task_splits_are_disjoint_and_stratified():
    task = load_safety_task("bundled")
    texts = [set(p.prompt for p in part) for part in (task.search, task.validation, task.test)]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    for part in (task.search, task.validation, task.test):
        assert any(p.unsafe for p in part) and any(not p.unsafe for p in part)


def test_memoisation_and_same_seed_same_result(tiny):
    from casrap.profiles.bank import ProfileBank

    bank = ProfileBank(tiny.model)
    ids = torch.randint(0, 300, (64,))
    from casrap.search.fitness import PerplexityScorer

    scorer = PerplexityScorer(tiny.model, ids)
    results = []
    for _ in range(2):
        evaluator = ga.MemoEvaluator(bank, ga.layers_plan, lambda p: (-scorer.ppl(), {}))
        cfg = ga.SearchConfig(population=6, generations=2, seed=3)
        result = ga.run_binary_ga("layers-test", 4, 0.25, lambda g, r: ga.repair_layer_set(g, 1, r), evaluator, cfg)
        assert evaluator.evaluations <= 6 * 3 and evaluator.evaluations == len(evaluator.cache)
        results.append((result.best_genome, result.best_fitness))
    assert results[0] == results[1]
    assert bank.active == "none" and bank.names == ["none"]


def test_search_cli_end_to_end_on_tiny(tmp_path):
    from tests.test_cli import run

    out = run(["search", "--model", "tiny-random-llama", "--population", "4", "--generations", "2", "--tokens", "96",
               "--sparsity", "0.25", "--task-data", "bundled", "--plans-dir", "plans", "--json"], tmp_path)
    data = json.loads(out.stdout)
    assert {"rates_table", "layers_table", "heads_table"} <= set(data)
    methods = {r["method"] for r in data["layers_table"]}
    assert methods == {"GA layer set", "last k", "block influence", "importance-ranked"}
    assert all("test_kl" in r and r["test_n"] > 0 for r in data["rates_table"] + data["layers_table"])
    run_dir = tmp_path / "reports" / "search-1"
    for name in ("report.md", "fitness.png", "head_mask.png", "pareto.png", "search.json", "generations.jsonl"):
        assert (run_dir / name).is_file(), name
    plans = sorted(p.name for p in (tmp_path / "plans").iterdir())
    assert "heads-ga.json" in plans and "ga-layers-25.json" in plans and "ga-rates-25.json" in plans
    saved = json.loads((tmp_path / "plans" / "ga-rates-25.json").read_text())
    assert saved["fingerprint"] and saved["meta"]["picked_on"].startswith("validation")
    # saved plans load as profiles in bench
    bench = json.loads(run(["bench", "--model", "tiny-random-llama", "-p", "plans/ga-layers-25.json", "--tokens", "3", "--pairs", "1",
                            "--corpus", "offline", "--ppl-max-tokens", "64", "--json"], tmp_path).stdout)
    assert bench["profiles"][1]["name"] == "ga-layers-25"


def test_nsga2_scores_each_layer_set_once_and_never_removes_every_layer():
    calls: list[tuple[int, ...]] = []

    def objectives(genome: list[int]) -> tuple[float, float]:
        calls.append(tuple(genome))
        return float(2 ** sum(genome)), 1.0 + sum(genome) / len(genome)

    config = ga.SearchConfig(population=8, generations=3, seed=3)
    result = ga.run_nsga2(10, objectives, config)
    assert len(calls) == len(set(calls)) == result.evaluations
    assert result.history[-1].evaluations == result.evaluations
    assert all(0 < len(genome) - sum(genome) for genome, _ in result.front)


# -------------------------------------------------------------------- seeded evolution
def test_level_genomes_keep_sparsity_exact():
    from casrap.search import evo

    levels = evo.Levels(layers=10, target=0.4, step=0.05, max_rate=0.9)
    rng = random.Random(1)
    imp = torch.rand(10, 64)
    seeds = evo.rate_seeds(levels, imp, torch.rand(10))
    assert {"uniform", "importance-ranked", "influence-0.2"} <= set(seeds)
    for genome in seeds.values():
        assert sum(genome) == levels.total and 0 <= min(genome) and max(genome) <= levels.max_level
    g = list(seeds["uniform"])
    for _ in range(200):
        g = levels.switch(g, rng, rng.choice((1, 2, 3)))
        assert sum(g) == levels.total and max(g) <= levels.max_level and min(g) >= 0
    a, b = levels.crossover(list(g), list(seeds["importance-ranked"]), rng)
    assert sum(a) == sum(b) == levels.total
    assert sum(levels.rates(seeds["uniform"])) == pytest.approx(4.0)
    layer_sets = evo.layer_seeds(torch.rand(10), imp, torch.rand(10, 8), 3)
    for genome in layer_sets.values():
        assert sum(genome) == 3
        for _ in range(20):
            genome = evo.swap_layers(genome, rng, 2)
            assert sum(genome) == 3


def test_evolution_starts_from_seeds_and_scores_each_genome_once():
    from casrap.profiles.plan import PruningPlan
    from casrap.search import evo

    levels = evo.Levels(layers=8, target=0.25, step=0.05)
    best = [0, 0, 4, 10, 10, 10, 6, 0]  # the optimum the fitness rewards
    assert sum(best) == levels.total
    calls: list[tuple[int, ...]] = []

    def score(plan: PruningPlan):
        genome = tuple(plan.meta["genome"])
        calls.append(genome)
        return -float(sum(abs(a - b) for a, b in zip(genome, best))), {}

    memo = evo.BatchMemo(lambda g: PruningPlan(name="x", meta={"genome": list(g)}), evo.make_toolbox(score))
    seeds = {"uniform": levels.quantize([0.25] * 8)}
    result = evo.run_evolution("t", seeds, evo.Operators(levels.switch, levels.crossover), memo, ga.SearchConfig(population=8, generations=40, seed=0))
    assert calls[0] == tuple(seeds["uniform"]) and len(calls) == len(set(calls)) == memo.evaluations
    assert result.best_fitness > score(PruningPlan(name="x", meta={"genome": seeds["uniform"]}))[0]
    assert [f for _, f in result.final] == sorted((f for _, f in result.final), reverse=True)


def test_a_time_budget_without_a_generation_cap_runs_until_the_budget_is_spent(monkeypatch):
    """On a fake clock where every evaluation costs 10 ms: generations continue past the seeds while
    budget is left, and the search stops within one generation of the budget, never far past it."""
    import types

    from casrap.profiles.plan import PruningPlan
    from casrap.search import evo

    clock = {"now": 0.0}
    monkeypatch.setattr(evo, "time", types.SimpleNamespace(perf_counter=lambda: clock["now"]))
    levels = evo.Levels(layers=8, target=0.25, step=0.05)
    seeds = {"uniform": levels.quantize([0.25] * 8)}

    def score(plan: PruningPlan):
        clock["now"] += 0.01
        return -float(sum(plan.meta["genome"][:4])), {}

    def search(budget: float) -> tuple[evo.SearchResult, float]:
        clock["now"] = 0.0
        memo = evo.BatchMemo(lambda g: PruningPlan(name="x", meta={"genome": list(g)}), evo.make_toolbox(score))
        result = evo.run_evolution("t", seeds, evo.Operators(levels.switch, levels.crossover), memo,
                                   ga.SearchConfig(population=8, generations=0, seed=0), time_budget=budget)
        return result, clock["now"]

    short, short_s = search(0.5)
    long, long_s = search(2.0)
    per_generation = 8 * 0.01  # at most one child per population slot, 10 ms each
    for result, spent, budget in ((short, short_s, 0.5), (long, long_s, 2.0)):
        assert len(result.history) > 3, result.history  # generation 0 alone would mean the budget was ignored
        assert budget - 2 * per_generation <= spent <= budget + per_generation, (spent, budget)
    assert len(long.history) > 2 * len(short.history)


def test_kl_fitness_is_zero_for_the_full_model_and_positive_when_pruned(tiny):
    from casrap.profiles.bank import ProfileBank
    from casrap.profiles.plan import PruningPlan
    from casrap.search.scoring import FitnessSpec, PlanScorer, SplitScorer

    bank = ProfileBank(tiny.model)
    ids = tiny.tokenizer("The river ran past the old mill and into the town.", return_tensors="pt").input_ids[0]
    scorer = PlanScorer(bank, tiny.tokenizer, FitnessSpec("kl", ids.tolist()))
    full, terms = scorer(PruningPlan(name="x"))
    assert full == pytest.approx(0.0, abs=1e-6) and terms["kl"] == pytest.approx(0.0, abs=1e-6)
    pruned, terms = scorer(PruningPlan(name="x", skip_layers=[1]))
    assert pruned < 0 and terms["kl"] > 0 and terms["ppl"] > 0
    measured = SplitScorer(bank, ids).measure(PruningPlan(name="y", skip_layers=[1]))
    assert measured["kl"] == pytest.approx(terms["kl"], rel=1e-4) and measured["n"] == ids.numel() - 1
    assert bank.names == ["none"]


def test_lm_eval_fitness_scores_a_layer_set_on_the_tiny_model(tiny):
    pytest.importorskip("lm_eval")
    from casrap.profiles.bank import ProfileBank
    from casrap.profiles.plan import PruningPlan
    from casrap.search.scoring import FitnessSpec, PlanScorer

    scorer = PlanScorer(ProfileBank(tiny.model), tiny.tokenizer, FitnessSpec("lm-eval", task_limit=2))
    fitness, terms = scorer(PruningPlan(name="x", skip_layers=[2]))
    assert 0.0 <= fitness <= 1.0 and fitness == terms["acc"]


def test_ray_pool_of_two_workers_scores_like_the_local_scorer(tiny):
    ray = pytest.importorskip("ray")
    from casrap.profiles.bank import ProfileBank
    from casrap.profiles.plan import PruningPlan
    from casrap.search import evo
    from casrap.search.distributed import RayPool, WorkerSpec
    from casrap.search.scoring import FitnessSpec, PlanScorer

    bank = ProfileBank(tiny.model)
    ids = tiny.tokenizer("Rain fell on the hills all night.", return_tensors="pt").input_ids[0].tolist()
    spec = FitnessSpec("kl", ids)
    plans = [PruningPlan(name="x", skip_layers=[i]) for i in range(4)]
    local = [PlanScorer(bank, tiny.tokenizer, spec)(p)[0] for p in plans]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with RayPool(WorkerSpec("tiny-random-llama", bank.fingerprint, spec), workers=2) as pool:
            assert len(pool.actors) == 2
            toolbox = evo.make_toolbox(lambda plan: plan, pool.map)
            remote = [f for f, _ in toolbox.map(toolbox.evaluate, plans)]
        assert remote == pytest.approx(local, rel=1e-4, abs=1e-6)
        from casrap.errors import CasrapError

        with pytest.raises(CasrapError, match="fingerprint"):
            RayPool(WorkerSpec("tiny-random-llama", "llama-4L-000000000000", spec), workers=1)
    finally:
        ray.shutdown()


# ----------------------------------------------------------------------- shipped plans
SHIPPED = ("ga-rates-20", "ga-rates-40", "ga-layers-20", "ga-layers-40")


def test_shipped_plans_are_named_listed_and_in_the_default_catalogue():
    from casrap.profiles.catalogue import CASRAP_V22, SHIPPED as KIND, parse_spec
    from casrap.profiles.catalogue import default_catalogue
    from casrap.profiles.shipped import shipped_index, shipped_names

    names = shipped_names("smollm2-135m")
    assert set(SHIPPED) <= set(names)
    assert all(parse_spec(n) == (KIND, 0.0) for n in SHIPPED)
    catalogue = default_catalogue("smollm2-135m")
    assert catalogue[: len(CASRAP_V22)] == CASRAP_V22 and set(SHIPPED) <= set(catalogue)
    fingerprint = shipped_index()["ga-rates-40"][0].fingerprint
    assert set(SHIPPED) <= set(shipped_names(fingerprint))
    assert default_catalogue("tiny-random-llama") == CASRAP_V22
    from casrap.envs.config import EnvConfig

    assert EnvConfig().profiles == catalogue and EnvConfig(model="tiny-random-llama").profiles == CASRAP_V22
    plan = shipped_index()["ga-layers-20"][0].load()
    assert len(plan.skip_layers) == 6 and plan.meta["picked_on"].startswith("validation")


def test_a_shipped_plan_is_refused_on_another_model(tiny):
    from casrap.errors import CheckpointError
    from casrap.profiles.factory import build_bank
    from casrap.pruners.importance import weight_norm_importance

    with pytest.raises(CheckpointError, match="made for smollm2-135m"):
        build_bank(tiny.model, ["none", "ga-rates-40"], importance=weight_norm_importance(tiny.model))
