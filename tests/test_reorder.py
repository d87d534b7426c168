"""Zero-copy profiles on a reordered base (casrap.pruners.reorder), on the tiny GQA model."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_full_model_restored

from casrap.models import describe
from casrap.models.tiny import tiny_llama
from casrap.profiles import ProfileBank, PruningPlan, build_plan
from casrap.pruners import lowrank
from casrap.pruners.importance import calibrate
from casrap.pruners.reorder import ffn_order, head_orders, plan_to_module_order

IDS = torch.tensor([[5, 17, 42, 8, 99, 3, 77, 12, 64, 31, 2, 250]])
TEXTS = ["The river runs through the old town and under three stone bridges.",
         "Bread is made from flour, water, salt and yeast, then left to rise.",
         "A small garden can feed a family if the beds are planned in spring."] * 2
SPECS = ["heads-25", "heads-50", "kvheads-50", "ffn-25", "ffn-50", "layers-25"]


def _logits(model, ids=IDS):
    with torch.inference_mode():
        return model(ids, use_cache=False).logits


def _pair(attn="sdpa"):
    """The same tiny model twice: one bank that copies (old layout), one reordered."""
    kwargs = {} if attn == "sdpa" else {"attn_implementation": attn}
    a, b = tiny_llama(**kwargs), tiny_llama(**kwargs)
    imp = calibrate(a.model, a.tokenizer, TEXTS)
    copied = ProfileBank(a.model, "tiny")
    copied.auto_reorder = False
    lean = ProfileBank(b.model, "tiny")
    return a, b, imp, copied, lean


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_reordered_profiles_are_views_and_compute_what_copies_compute(attn):
    a, b, imp, copied, lean = _pair(attn)
    info = describe(a.model)
    report = lean.reorder(imp)
    assert 0 <= report["max_abs_logit_diff"] < 1e-4  # float summation order only
    for spec in SPECS:
        copied.add(build_plan(spec, imp, info))
        lean.add(build_plan(spec, imp, info))
        with copied.using(spec):
            expected = _logits(a.model)
        with lean.using(spec):
            got = _logits(b.model)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        assert lean.memory_overhead_bytes(spec) == 0 and lean.copied_modules[spec] == 0, spec
        assert lean.ideal_speedup(spec) == pytest.approx(copied.ideal_speedup(spec))
        assert lean.parameter_count(spec) == copied.parameter_count(spec)
    assert copied.memory_overhead_bytes() > 0 and lean.memory_overhead_bytes() == 0
    # head profiles that keep every kv head reuse the base k/v modules
    layer = next(i for i, kept in lean.profile("heads-50").plan.heads.items() if len(kept["kv"]) == 2)
    position = layer - sum(1 for s in lean.profile("heads-50").plan.skip_layers if s < layer)
    built = lean.profile("heads-50").layers[position].self_attn
    assert built.k_proj is b.model.model.layers[layer].self_attn.k_proj


def test_reordered_full_model_switches_back_bitwise():
    _, b, imp, _, lean = _pair()
    lean.reorder(imp)
    before = _logits(b.model).clone()
    state = {k: v.clone() for k, v in b.model.state_dict().items()}
    info = describe(b.model)
    for spec in SPECS:
        lean.add(build_plan(spec, imp, info))
    assert_full_model_restored(lean, b.model, IDS, before, state, rounds=10)


def test_plans_and_calibration_keep_original_indices():
    a, b, imp, _, lean = _pair()
    lean.reorder(imp)
    assert ffn_order(b.model.model.layers[0].mlp) is not None and head_orders(b.model.model.layers[0].self_attn)[0] is not None
    again = calibrate(b.model, b.tokenizer, TEXTS)  # measured on the reordered layout, reported in original order
    torch.testing.assert_close(again.ffn, imp.ffn, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(again.heads, imp.heads, atol=1e-4, rtol=1e-3)
    info = describe(a.model)
    assert build_plan("ffn-25", again, info).ffn == build_plan("ffn-25", imp, info).ffn


def test_a_plan_that_is_not_a_prefix_is_copied_and_counted():
    _, b, imp, _, lean = _pair()
    lean.reorder(imp)
    width = describe(b.model).ffn_width
    odd = PruningPlan(name="odd", ffn={1: list(range(0, width, 2))})  # not the top half by importance
    masked = PruningPlan(name="odd-mask", ffn=odd.ffn, functional=True)
    lean.add(odd)
    lean.add(masked)
    assert lean.copied_modules["odd"] == 1 and lean.memory_overhead_bytes("odd") > 0
    with lean.using("odd"):
        sliced = _logits(b.model)
    with lean.using("odd-mask"):
        reference = _logits(b.model)
    torch.testing.assert_close(sliced, reference, atol=1e-5, rtol=1e-5)


def test_built_modules_expose_their_kept_order_for_healing():
    """The contract with healing: data stored in a plan's index order is laid out in a
    built module's order by plan_to_module_order; the module's weight rows are then
    exactly the original model's rows for those indices."""
    a, _, imp, _, lean = _pair()
    lean.reorder(imp)
    info = describe(a.model)
    for spec in ("ffn-25", "heads-50"):
        lean.add(build_plan(spec, imp, info))
    plan = lean.profile("ffn-25").plan
    kept = lean.kept_order("ffn-25", 2)["ffn"]
    perm = plan_to_module_order(plan.ffn[2], kept)
    original_rows = a.model.model.layers[2].mlp.up_proj.weight[torch.tensor(plan.ffn[2])]
    module = lean.profile("ffn-25").layers[2].mlp
    assert torch.equal(module.up_proj.weight, original_rows[perm])
    heads = lean.profile("heads-50").plan.heads
    layer = next(iter(heads))
    order = lean.kept_order("heads-50", layer)
    assert sorted(order["q"]) == sorted(heads[layer]["q"]) and sorted(order["kv"]) == sorted(heads[layer]["kv"])
    d = 8
    q_rows = a.model.model.layers[layer].self_attn.q_proj.weight.view(-1, d, info.hidden_size)[torch.tensor(order["q"])]
    attn = lean.profile("heads-50").layers[layer].self_attn
    assert torch.equal(attn.q_proj.weight, q_rows.reshape(-1, info.hidden_size))
    from casrap.errors import CheckpointError

    with pytest.raises(CheckpointError, match="does not keep"):
        plan_to_module_order([1, 2], [1, 3])


def test_lowrank_basis_and_profiles_survive_reordering():
    a, b, imp, copied, lean = _pair()
    basis = lowrank.fit_basis(a.model, a.tokenizer, TEXTS)
    lean.reorder(imp)
    refit = lowrank.fit_basis(b.model, b.tokenizer, TEXTS)  # fitted on the reordered layout
    for key in ((0, "up_proj"), (1, "q_proj"), (2, "k_proj"), (3, "down_proj")):
        torch.testing.assert_close(refit.matrices[key].energy, basis.matrices[key].energy, atol=1e-3, rtol=1e-3)
    copied.lowrank_basis = basis
    lean.lowrank_basis = basis
    plan = build_plan("lowrank-25", None, describe(a.model), lowrank_basis=basis)
    copied.add(plan)
    lean.add(PruningPlan.from_dict(plan.to_dict()))
    with copied.using("lowrank-25"):
        expected = _logits(a.model)
    with lean.using("lowrank-25"):
        got = _logits(b.model)
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-3)


def test_build_bank_reorders_from_the_cached_calibration(casrap_home, monkeypatch):
    from casrap.profiles.factory import build_bank

    lm = tiny_llama()
    bank = build_bank(lm.model, ["ffn-25", "heads-25", "kvheads-50"], base_model="tiny", tokenizer=lm.tokenizer)
    assert bank.reorder_info["importance"].startswith("calibrated")
    assert bank.memory_overhead_bytes() == 0
    monkeypatch.setenv("CASRAP_REORDER", "0")
    other = tiny_llama()
    off = build_bank(other.model, ["ffn-25"], base_model="tiny", tokenizer=other.tokenizer)
    assert not off.reorder_info and off.memory_overhead_bytes() > 0


def test_weight_norm_plans_do_not_reorder():
    from casrap.pruners.importance import weight_norm_importance

    lm = tiny_llama()
    bank = ProfileBank(lm.model)
    bank.add(build_plan("ffn-25", weight_norm_importance(lm.model), describe(lm.model)))
    assert not bank.reorder_info and ffn_order(lm.model.model.layers[0].mlp) is None


def _heal_both_banks(merge_fn):
    """The same random LoRA deltas (plan index order) merged into ffn-25 and heads-50 on a
    copying bank and on a reordered one by ``merge_fn(layers, plan, adapter)``; logits."""
    from casrap.profiles import adapter as merge

    a, b, imp, copied, lean = _pair()
    lean.reorder(imp)
    info = describe(a.model)
    for bank in (copied, lean):
        for spec in ("ffn-25", "heads-50"):
            bank.add(build_plan(spec, imp, info))
    gen = torch.Generator().manual_seed(0)
    results = []
    for bank, model in ((copied, a.model), (lean, b.model)):
        for spec in ("ffn-25", "heads-50"):
            layers = bank.profile(spec).layers
            factors = {}
            for j, layer in enumerate(layers):
                for parent, names in (("mlp", ("up_proj", "down_proj")), ("self_attn", ("q_proj", "o_proj"))):
                    for name in names:
                        out_f, in_f = getattr(getattr(layer, parent), name).weight.shape
                        factors[(j, name)] = (torch.randn(2, in_f, generator=gen) * 0.1, torch.randn(out_f, 2, generator=gen) * 0.1)
            gen.manual_seed(0)  # the second bank gets the same factors (same shapes, same order)
            adapter = merge.LoraAdapter(factors, scale=1.0, rank=2)
            healed = torch.nn.ModuleList([merge.shell(layer) for layer in layers])
            merge_fn(healed, bank.profile(spec).plan, adapter)
            bank.profile(spec).layers = healed
            with bank.using(spec):
                results.append(_logits(model))
    return results[:2], results[2:]


def test_deltas_in_module_order_heal_a_reordered_bank_like_a_copying_one():
    """delta_in_module_order is what a merge needs on a reordered base (no skipped layers here)."""
    from casrap.profiles import adapter as merge
    from casrap.pruners.reorder import delta_in_module_order

    def permuting_merge(layers, plan, adapter):
        for j, layer in enumerate(layers):
            for group, names in (("self_attn", merge.ATTENTION), ("mlp", merge.MLP)):
                deltas = {n: adapter.delta(j, n) for n in names}
                deltas = {n: d for n, d in deltas.items() if d is not None}
                if not deltas:
                    continue
                parent = merge.shell(getattr(layer, group))
                for name, delta in deltas.items():
                    ordered = delta_in_module_order(delta, name, getattr(layer, group), plan, j)
                    setattr(parent, name, merge._merged_linear(getattr(parent, name), ordered))
                setattr(layer, group, parent)

    copied, lean = _heal_both_banks(permuting_merge)
    for x, y in zip(copied, lean):
        torch.testing.assert_close(y, x, atol=1e-4, rtol=1e-4)


def test_a_healed_plan_matches_after_reordering():
    """Healing merges LoRA deltas stored in the plan's index order (casrap.profiles.adapter);
    on a reordered base the built modules hold their units in another order, so the merge
    must permute through the modules' kept order. Same adapter, same plan: same logits."""
    merge = pytest.importorskip("casrap.profiles.adapter")
    from pathlib import Path

    if "delta_in_module_order" not in Path(merge.__file__).read_text():
        pytest.xfail("casrap.heal trains and merges in the module order of the bank it runs on; an adapter in plan order "
                     "(trained on a copying bank) does not fit a reordered one until heal uses delta_in_module_order")
    copied, lean = _heal_both_banks(merge.merge_adapter_into)
    for x, y in zip(copied, lean):
        torch.testing.assert_close(y, x, atol=1e-4, rtol=1e-4)


def test_a_deep_copy_of_a_lean_heads_profile_is_a_plain_model():
    """Standalone copies (healing's student, exporters) get plain Linears owning their weights."""
    import copy

    _, b, imp, _, lean = _pair()
    lean.reorder(imp)
    lean.add(build_plan("heads-50", imp, describe(b.model)))
    with lean.using("heads-50"):
        expected = _logits(b.model)
        clone = copy.deepcopy(b.model)
    for layer in clone.model.layers:
        assert type(layer.self_attn.q_proj) is torch.nn.Linear and type(layer.self_attn.o_proj) is torch.nn.Linear
    torch.testing.assert_close(_logits(clone), expected, atol=1e-5, rtol=1e-5)


def test_a_uniform_lean_heads_profile_exports_to_a_plain_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    from casrap.profiles.export import export_checkpoint

    _, b, imp, _, lean = _pair()
    lean.reorder(imp)
    lean.add(build_plan("heads-50:layer", imp, describe(b.model)))  # 4 of 8 heads in every layer
    export_checkpoint(lean, "heads-50:layer", tmp_path / "out", b.tokenizer)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with lean.using("heads-50:layer"):
        expected = _logits(b.model)
    torch.testing.assert_close(_logits(reloaded), expected, atol=1e-5, rtol=1e-5)


def test_reordering_keeps_the_fingerprint():
    from casrap.models.architecture import model_key

    _, b, imp, _, lean = _pair()
    before = lean.fingerprint
    lean.reorder(imp)
    assert ProfileBank(b.model).fingerprint == before
    assert model_key(b.model) == before  # order-invariant probe (mean magnitudes)
