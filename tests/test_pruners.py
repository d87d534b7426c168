from __future__ import annotations

import pytest
import torch
from helpers import assert_full_model_restored

from casrap.errors import CheckpointError, InputError
from casrap.models import describe
from casrap.profiles import FULL, ProfileBank, PruningPlan, build_plan
from casrap.profiles.export import export_blocker, export_checkpoint
from casrap.pruners.heads import check_gqa_integrity, plan_kv_groups, plan_query_heads
from casrap.pruners.importance import Importance, calibrate, load_or_calibrate, weight_norm_importance
from casrap.pruners.layers import plan_skip_layers

IDS = torch.tensor([[5, 17, 42, 8, 99, 3, 77, 12, 64, 31, 2, 250]])


def _logits(model, ids=IDS):
    with torch.inference_mode():
        return model(ids, use_cache=False).logits


def _bank(lm, specs, importance=None, structural=True):
    info = describe(lm.model)
    imp = importance or weight_norm_importance(lm.model)
    bank = ProfileBank(lm.model, "tiny")
    for spec in specs:
        bank.add(build_plan(spec, imp, info, structural=structural))
    return bank


@pytest.mark.parametrize("fixture", ["tiny", "tiny_eager"])
@pytest.mark.parametrize("spec", ["heads-25", "heads-50", "kvheads-50"])
def test_head_slicing_keeps_gqa_groups_under_eager_and_sdpa(request, fixture, spec):
    lm = request.getfixturevalue(fixture)
    bank = _bank(lm, [spec])
    bank.activate(spec)
    for layer in lm.model.model.layers:
        check_gqa_integrity(layer.self_attn, 8)
    assert torch.isfinite(_logits(lm.model)).all()


@pytest.mark.parametrize("fixture", ["tiny", "tiny_eager"])
def test_sliced_heads_equal_masked_heads(request, fixture):
    """Removing heads structurally computes exactly what zeroing their outputs does."""
    lm = request.getfixturevalue(fixture)
    imp = weight_norm_importance(lm.model)
    info = describe(lm.model)
    bank = ProfileBank(lm.model)
    for spec in ("heads-50", "kvheads-50"):
        sliced = build_plan(spec, imp, info, structural=True)
        masked = build_plan(spec, imp, info, structural=False)
        masked.name = spec + "-mask"
        assert masked.functional and masked.heads == sliced.heads
        bank.add(sliced)
        bank.add(masked)
        with bank.using(spec):
            a = _logits(lm.model)
        with bank.using(spec + "-mask"):
            b = _logits(lm.model)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_misaligned_query_to_kv_mapping_is_refused(tiny):
    from casrap.pruners.heads import build_attention

    attn = tiny.model.model.layers[0].self_attn
    with pytest.raises(ValueError, match="removed kv head"):
        build_attention(attn, {"kv": [0], "q": [0, 1, 4, 5]}, 8, functional=False)


def test_query_head_plan_removes_equal_count_per_group():
    imp = torch.rand(6, 12)
    plan, removed = plan_query_heads(imp, kv_heads=3, fraction=0.25)
    assert removed == 18
    for kept in plan.values():
        per_group = [sum(1 for q in kept["q"] if q // 4 == g) for g in range(3)]
        assert len(set(per_group)) == 1 and per_group[0] >= 1
    plan, removed = plan_query_heads(imp, kv_heads=3, fraction=0.99)
    assert all(len(k["q"]) == 3 for k in plan.values())  # capped: one head left per group


def test_kv_group_plan_never_empties_a_layer():
    plan, removed = plan_kv_groups(torch.rand(4, 2), group_size=4, fraction=0.9)
    assert all(len(k["kv"]) >= 1 for k in plan.values())
    assert removed == 4 * 4


def test_ffn_mask_equals_slice_of_complement(tiny):
    bank = _bank(tiny, ["ffn-25"])
    plan = bank.profile("ffn-25").plan
    masked = PruningPlan(name="ffnmask", ffn=plan.ffn, functional=True)
    bank.add(masked)
    with bank.using("ffn-25"):
        a = _logits(tiny.model)
    with bank.using("ffnmask"):
        b = _logits(tiny.model)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert bank.ideal_speedup("ffn-25") > 1.0
    assert bank.memory_overhead_bytes("ffnmask") < bank.memory_overhead_bytes("ffn-25")


def test_full_model_restored_bitwise_after_many_switches(tiny):
    before = _logits(tiny.model).clone()
    state = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    bank = _bank(tiny, ["heads-50", "kvheads-50", "ffn-25", "layers-25", "layers-50"])
    assert_full_model_restored(bank, tiny.model, IDS, before, state, rounds=25)
    assert tiny.model.config.num_hidden_layers == 4


def test_profiles_change_outputs_and_report_savings(tiny):
    bank = _bank(tiny, ["layers-25", "ffn-50"])
    full = _logits(tiny.model)
    for name in ("layers-25", "ffn-50"):
        with bank.using(name):
            assert not torch.allclose(_logits(tiny.model), full)
        assert 0 < bank.params_removed(name) < 1
        assert bank.ideal_speedup(name) > 1
    assert bank.active == FULL


def _greedy_manual(model, ids, steps):
    """Greedy decoding with no cache: recompute everything every token."""
    seq = ids
    for _ in range(steps):
        nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    return seq


@pytest.mark.parametrize("spec", ["layers-25", "layers-50"])
def test_skipped_layers_keep_the_kv_cache_consistent(tiny, spec):
    bank = _bank(tiny, [spec])
    bank.activate(spec)
    assert [l.self_attn.layer_idx for l in tiny.model.model.layers] == list(range(len(tiny.model.model.layers)))
    with torch.inference_mode():
        cached = tiny.model.generate(IDS, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
        uncached = _greedy_manual(tiny.model, IDS, 10)
        # a manual decode step through the cache matches the uncached logits
        out = tiny.model(IDS, use_cache=True)
        assert out.past_key_values.get_seq_length() == IDS.shape[1]
        nxt = out.logits[:, -1:].argmax(-1)
        step = tiny.model(nxt, past_key_values=out.past_key_values, use_cache=True).logits[:, -1]
        ref = tiny.model(torch.cat([IDS, nxt], 1), use_cache=False).logits[:, -1]
    assert torch.equal(cached, uncached)
    torch.testing.assert_close(step, ref, atol=1e-4, rtol=1e-4)


def test_layer_plan_uses_influence_not_position():
    influence = torch.tensor([5.0, 0.1, 3.0, 0.2, 4.0, 6.0])
    assert plan_skip_layers(influence, 0.34) == [1, 3]
    assert plan_skip_layers(influence, 0.99) == [1, 2, 3, 4]  # ends protected


def test_rounding_to_zero_is_described(tiny):
    plan = build_plan("layers-5", weight_norm_importance(tiny.model), describe(tiny.model))
    assert plan.is_identity and "rounds to zero" in plan.description


def test_bad_specs_and_plans():
    imp = Importance(torch.rand(2, 4), torch.rand(2, 8), torch.rand(2), "x", "k")
    with pytest.raises(InputError):
        build_plan("prune-everything", imp, None)
    with pytest.raises(InputError):
        build_plan("ffn-150", imp, None)
    with pytest.raises(CheckpointError):
        PruningPlan.from_dict({"format": "other"})


def test_plan_json_round_trip_replays_identically(tiny, tmp_path):
    bank = _bank(tiny, ["heads-50", "ffn-25"])
    for name in ("heads-50", "ffn-25"):
        path = bank.profile(name).plan.save(tmp_path / f"{name}.json")
        loaded = PruningPlan.load(path)
        assert loaded == bank.profile(name).plan
        loaded.name = name + "-replayed"
        bank.add(loaded)
        with bank.using(name):
            a = _logits(tiny.model)
        with bank.using(loaded.name):
            b = _logits(tiny.model)
        assert torch.equal(a, b)
    (tmp_path / "bad.json").write_text("{broken")
    with pytest.raises(CheckpointError):
        PruningPlan.load(tmp_path / "bad.json")


@pytest.mark.parametrize("spec", ["ffn-25", "layers-25", "kvheads-50"])
def test_uniform_profiles_export_to_plain_checkpoints(tiny, tmp_path, spec):
    from transformers import AutoModelForCausalLM

    bank = _bank(tiny, [spec])
    export_checkpoint(bank, spec, tmp_path / spec, tiny.tokenizer)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / spec)
    with bank.using(spec):
        expected = _logits(tiny.model)
    torch.testing.assert_close(_logits(reloaded), expected)


def test_nonuniform_profile_export_explains_why(tiny, tmp_path):
    bank = _bank(tiny, ["heads-25"])
    assert "head counts differ" in export_blocker(bank, "heads-25")
    uniform = _bank(tiny, ["heads-25:layer"])  # 6 of 8 heads everywhere: 64 % 6 != 0
    assert "do not divide hidden_size" in export_blocker(uniform, "heads-25:layer")
    with pytest.raises(InputError):
        export_checkpoint(bank, "heads-25", tmp_path)


def test_calibration_is_saved_keyed_and_reused(tiny, casrap_home):
    texts = ["The river runs through the old town.", "Bread is made from flour, water, salt and yeast."]
    imp = calibrate(tiny.model, tiny.tokenizer, texts)
    assert imp.heads.shape == (4, 8) and imp.ffn.shape == (4, 128) and imp.layers.shape == (4,)
    assert (imp.heads > 0).all() and (imp.layers > 0).all()
    assert imp.heads.std() > 0  # activation-based, not the constant 1/L of mean attention
    from casrap.models.architecture import model_key
    from casrap.pruners.importance import default_calibration_path

    saved = imp.save(default_calibration_path(tiny.model))
    again, calibrated_now = load_or_calibrate(tiny.model)
    assert again.source == "calibrated:2" and not calibrated_now
    torch.testing.assert_close(again.heads, imp.heads)
    with torch.no_grad():  # a different model must not reuse this calibration
        tiny.model.model.layers[0].self_attn.q_proj.weight.add_(1.0)
    with pytest.raises(CheckpointError, match="no calibration"):
        load_or_calibrate(tiny.model)  # no tokenizer: a one-line error, never a silent weight-norm fallback
    fresh, calibrated_now = load_or_calibrate(tiny.model, tiny.tokenizer)
    assert calibrated_now and fresh.source.startswith("calibrated:") and default_calibration_path(tiny.model).is_file()
    with pytest.raises(CheckpointError, match="another model"):
        Importance.load(saved, expected_key=model_key(tiny.model))
