"""Low-rank (LLM-Sieve) projections on the tiny GQA model: exactness, allocation, bank, search."""

from __future__ import annotations

import json
import random

import pytest
import torch
from helpers import assert_full_model_restored
from torch import nn

from casrap.errors import CheckpointError
from casrap.models import describe
from casrap.profiles import ProfileBank, PruningPlan, build_plan
from casrap.profiles.export import export_blocker
from casrap.profiles.factory import build_bank
from casrap.pruners import lowrank

IDS = torch.tensor([[5, 17, 42, 8, 99, 3, 77, 12, 64, 31, 2, 250]])
TEXTS = ["The river runs through the old town and under three stone bridges.",
         "Bread is made from flour, water, salt and yeast, then left to rise.",
         "A small garden can feed a family if the beds are planned in spring."] * 4


def _logits(model, ids=IDS):
    with torch.inference_mode():
        return model(ids, use_cache=False).logits


@pytest.fixture()
def basis(tiny):
    return lowrank.fit_basis(tiny.model, tiny.tokenizer, TEXTS)


@pytest.mark.parametrize("bias", [False, True])
def test_factorised_linear_equals_dense_at_full_rank(bias):
    torch.manual_seed(0)
    linear = nn.Linear(24, 16, bias=bias)
    full_basis, _ = torch.linalg.qr(torch.randn(16, 16))
    x = torch.randn(5, 24)
    torch.testing.assert_close(lowrank.factorise(linear, full_basis)(x), linear(x), atol=1e-5, rtol=1e-5)
    half = lowrank.factorise(linear, full_basis[:, :4])
    assert half.rank == 4 and half.in_features == 24 and half.out_features == 16
    assert not torch.allclose(half(x), linear(x), atol=1e-3)


def test_pca_projection_drops_exactly_the_energy_tail(tiny, basis):
    """Closed form: on the fitting text, ||Y - UUᵀY||² / ||Y||² equals the energy tail
    (Y: outputs of every token but the first, whose attention-sink outputs would swamp it)."""
    layer = tiny.model.model.layers[1]
    outputs = []
    handle = layer.mlp.up_proj.register_forward_hook(lambda m, a, out: outputs.append(out[0, 1:]))
    try:
        for text in TEXTS:
            tiny.model(tiny.tokenizer(text, return_tensors="pt").input_ids, use_cache=False)
    finally:
        handle.remove()
    y = torch.cat(outputs).detach().double()
    entry = basis.matrices[(1, "up_proj")]
    for rank in (4, 16):
        u = entry.vectors[:, :rank].double()
        dropped = ((y - y @ u @ u.T) ** 2).sum() / (y ** 2).sum()
        assert abs(float(dropped) - entry.relative_error(rank)) < 2e-3
    assert entry.relative_error(4) > entry.relative_error(16) > 0


def test_basis_cache_is_keyed_and_reused(tiny, casrap_home, monkeypatch):
    fitted = lowrank.load_or_fit_basis(tiny.model, tiny.tokenizer, texts=TEXTS)
    path = lowrank.default_basis_path(fitted.model_key)
    assert path.is_file()
    monkeypatch.setattr(lowrank, "fit_basis", lambda *a, **k: pytest.fail("refitted a cached basis"))
    again = lowrank.load_or_fit_basis(tiny.model)  # no tokenizer needed once cached
    assert again.shapes == fitted.shapes
    torch.testing.assert_close(again.matrices[(0, "q_proj")].energy, fitted.matrices[(0, "q_proj")].energy)
    with pytest.raises(CheckpointError, match="another model"):
        lowrank.LowRankBasis.load(path, expected_key="other-model")
    with torch.no_grad():
        tiny.model.model.layers[0].self_attn.q_proj.weight.add_(1.0)
    with pytest.raises(CheckpointError, match="no low-rank basis"):
        lowrank.load_or_fit_basis(tiny.model)


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.4])
def test_rank_allocation_hits_the_parameter_target_with_less_error_than_uniform(basis, fraction):
    greedy = lowrank.allocate_ranks(basis, fraction)
    uniform = lowrank.uniform_ranks(basis.shapes, fraction)
    assert abs(lowrank.removed_fraction(greedy, basis.shapes) - fraction) < 0.01
    assert abs(lowrank.removed_fraction(uniform, basis.shapes) - fraction) < 0.02
    assert lowrank.total_relative_error(basis, greedy) <= lowrank.total_relative_error(basis, uniform)
    for (layer, name), (d_in, d_out) in basis.shapes.items():
        rank = greedy.get(layer, {}).get(name)
        assert rank is None or 1 <= rank <= lowrank.breakeven_rank(d_in, d_out)  # never a rank that adds parameters


def test_lowrank_profile_runs_saves_and_switches_back_bitwise(tiny, casrap_home, tmp_path):
    before = _logits(tiny.model).clone()
    state = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    bank = build_bank(tiny.model, ["lowrank-25", "lowrank-40", "layers-25"], tokenizer=tiny.tokenizer)
    plan = bank.profile("lowrank-25").plan
    assert plan.ranks and not plan.functional and bank.lowrank_basis is None  # released after building
    assert 0.1 < bank.params_removed("lowrank-25") < 0.25 and bank.ideal_speedup("lowrank-25") > 1.1
    assert bank.memory_overhead_bytes("lowrank-25") > 0
    with bank.using("lowrank-25"):
        pruned = _logits(tiny.model)
        info = describe(tiny.model)  # shape-reading code still sees the original widths
        assert info.query_heads == 8 and info.ffn_width == 128
        with torch.inference_mode():  # KV-cached greedy decode equals uncached recompute
            cached = tiny.model.generate(IDS, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
            seq = IDS
            for _ in range(6):
                seq = torch.cat([seq, tiny.model(seq, use_cache=False).logits[:, -1:].argmax(-1)], 1)
        assert torch.equal(cached, seq)
    assert not torch.allclose(pruned, before)
    assert_full_model_restored(bank, tiny.model, IDS, before, state, rounds=5)
    # the plan replays from JSON in a fresh bank, taking the basis from the cache
    path = plan.save(tmp_path / "lowrank-25.json")
    loaded = PruningPlan.load(path)
    assert loaded == plan
    loaded.name = "replayed"
    fresh = ProfileBank(tiny.model)
    fresh.add(loaded)
    with fresh.using("replayed"):
        assert torch.equal(_logits(tiny.model), pruned)
    assert "low-rank" in export_blocker(bank, "lowrank-25")


def test_rank_plans_are_validated(tiny):
    info = describe(tiny.model)
    for bad in ({0: {"q_proj": 0}}, {0: {"w_proj": 4}}, {9: {"q_proj": 4}}):
        with pytest.raises(CheckpointError):
            PruningPlan(name="bad", ranks=bad).validate(info.layers, info.query_heads, info.kv_heads, info.ffn_width)
    mixed = PruningPlan(name="mixed", ranks={0: {"up_proj": 4}}, ffn={0: list(range(64))})
    with pytest.raises(CheckpointError, match="PCA basis"):
        mixed.validate(info.layers, info.query_heads, info.kv_heads, info.ffn_width)
    with pytest.raises(CheckpointError, match="basis"):
        build_plan("lowrank-25", None, info)


def test_ranks_search_repair_and_plans(tiny, basis):
    from casrap.search import ranks
    from casrap.search.fitness import plan_sparsity

    keys = ranks.genome_keys(basis)
    weights = ranks.gene_weights(basis, keys)
    rng = random.Random(0)
    for _ in range(10):
        genome = ranks.repair_weighted_rates([rng.uniform(0, 1) for _ in keys], weights, 0.3, 0.9)
        assert abs(float(weights @ torch.tensor(genome).double().numpy()) - 0.3) < 1e-6 and max(genome) <= 0.9
        plan = ranks.genome_plan(genome, keys, basis)
        assert abs(lowrank.removed_fraction(plan.ranks, basis.shapes) - 0.3) < 0.03
    greedy = lowrank.allocate_ranks(basis, 0.25)
    assert ranks.genome_plan(ranks.plan_rates(greedy, keys, basis), keys, basis).ranks == greedy  # seeds round-trip
    # the search report's layer-parameter sparsity counts factor pairs (norms are the only other layer weights)
    assert abs(plan_sparsity(PruningPlan(name="g", ranks=greedy), describe(tiny.model)) - 0.25) < 0.01
    calls = []

    def ppl_at(fraction: float) -> float:
        calls.append(fraction)
        return 10 + 100 * fraction  # monotone: within 1.3x of 10 means fraction <= 0.03
    fraction, value = ranks.bisect_fraction(ppl_at, limit=13.0, hi=0.5, steps=6)
    assert len(calls) == 6 and 0.02 <= fraction <= 0.03 and value <= 13.0


def test_ranks_search_cli_on_tiny(tmp_path):
    from tests.test_cli import run

    (tmp_path / "task.txt").write_text("Invoices are due within thirty days of the delivery date.\n\n"
                                       "A late invoice is charged two percent interest each month.\n")
    out = run(["search", "--model", "tiny-random-llama", "-e", "ranks", "--population", "4", "--generations", "1", "--tokens", "96",
               "--sparsity", "0.25", "--plans-dir", "plans", "--calibration-text", "task.txt", "--ppl-tolerance", "3", "--json"], tmp_path)
    data = json.loads(out.stdout)
    methods = [r["method"] for r in data["ranks_table"]]
    assert methods == ["GA per-projection ranks", "min-error allocation (lowrank-P)", "uniform"]
    # --tokens caps the search text only; validation and test read their whole split, the same for every method
    assert all(abs(r["removed"] - 0.25) < 0.03 for r in data["ranks_table"])
    assert len({r["test_n"] for r in data["ranks_table"]}) == 1 and data["ranks_table"][0]["test_n"] > 95
    plan = PruningPlan.load(tmp_path / "plans" / "ranks-ga-25.json")
    assert plan.ranks and plan.fingerprint
    # the quality-budget plan: per-matrix ranks within 4x the full model's search perplexity, on the task text's basis
    budget = PruningPlan.load(tmp_path / "plans" / "ranks-budget-300.json")
    assert budget.ranks and budget.meta["budget"]["tolerance"] == 3 and "task text" in budget.meta["basis"]
    assert "Low-rank projections" in (tmp_path / "reports" / "search-1" / "report.md").read_text()


def test_ranks_within_error_are_the_smallest_per_matrix(basis):
    """Each factorised projection drops at most the threshold, one rank less would drop
    more; a looser threshold never keeps more parameters; zero keeps everything dense."""
    assert lowrank.ranks_within_error(basis, 0.0) == {}
    shapes = basis.shapes
    removed = []
    for threshold in (0.02, 0.1, 0.3):
        ranks = lowrank.ranks_within_error(basis, threshold)
        for layer, names in ranks.items():
            for name, rank in names.items():
                m = basis.matrices[(layer, name)]
                assert m.relative_error(rank) <= threshold + 1e-9
                assert rank == 1 or m.relative_error(rank - 1) > threshold
        removed.append(lowrank.removed_fraction(ranks, shapes))
    assert removed == sorted(removed) and removed[-1] > 0


def test_task_calibration_text_gets_its_own_basis(tiny, casrap_home, monkeypatch, tmp_path):
    """--calibration-text: the basis is fitted on the user's text (long paragraphs in
    chunks) and cached apart from the bundled calibration's, keyed by the text."""
    default = lowrank.default_basis_path("k")
    task = tmp_path / "task.txt"
    task.write_text(" ".join(["word"] * 400) + "\n\nA second, short paragraph about invoices.\n")
    monkeypatch.setenv(lowrank.CALIBRATION_ENV, str(task))
    assert lowrank.default_basis_path("k") != default
    seen = []
    real = lowrank.fit_basis

    def spy(model, tokenizer, texts, **kwargs):
        seen.extend(texts)
        return real(model, tokenizer, texts, **kwargs)

    monkeypatch.setattr(lowrank, "fit_basis", spy)
    fitted = lowrank.load_or_fit_basis(tiny.model, tiny.tokenizer)
    assert len(seen) == 4 and seen[-1].startswith("A second") and all(len(t.split()) <= 160 for t in seen)
    assert "task text" in fitted.source and lowrank.default_basis_path(fitted.model_key).is_file()
    first = lowrank.default_basis_path("k")
    task.write_text("Other text entirely.")
    assert lowrank.default_basis_path("k") not in (default, first)  # a new text, a new key
    monkeypatch.setenv(lowrank.CALIBRATION_ENV, str(tmp_path / "missing.txt"))
    with pytest.raises(CheckpointError, match="cannot read"):
        lowrank.default_basis_path("k")
