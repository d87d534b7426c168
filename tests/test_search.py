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
    assert methods == {"GA layer set", "last k", "block influence"}
    run_dir = tmp_path / "reports" / "search-1"
    for name in ("report.md", "fitness.png", "head_mask.png", "pareto.png", "search.json", "generations.jsonl"):
        assert (run_dir / name).is_file(), name
    plans = sorted(p.name for p in (tmp_path / "plans").iterdir())
    assert "heads-ga.json" in plans and "layers-ga-k1.json" in plans and "rates-ga-25.json" in plans
    # saved plans load as profiles in bench
    bench = json.loads(run(["bench", "--model", "tiny-random-llama", "-p", "plans/layers-ga-k1.json", "--tokens", "3", "--pairs", "1",
                            "--corpus", "offline", "--ppl-max-tokens", "64", "--json"], tmp_path).stdout)
    assert bench["profiles"][1]["name"] == "layers-ga-k1"


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
