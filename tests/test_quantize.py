"""int4 profiles: packed projections equal their dequantised weights, combine with structural
plans, count in the memory report, refuse a slow machine in one line; and the front rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_full_model_restored
from torch import nn

from casrap.errors import CheckpointError, InputError, UnsupportedModelError
from casrap.models import describe
from casrap.profiles import ProfileBank, PruningPlan, build_plan, parse_spec
from casrap.profiles.catalogue import (
    OptionPoint,
    default_catalogue,
    dominates,
    front_catalogue,
    near_front,
    on_front,
    split_quant,
)
from casrap.pruners.importance import weight_norm_importance
from casrap.pruners.quantize import (
    PROJECTIONS,
    Int4Linear,
    KernelCheck,
    dequantize_groups,
    effective_weight,
    kernel_blocker,
    kernel_check_result,
    packed_modules,
    quant_kernel_check,
    quantize_groups,
)

IDS = torch.tensor([[5, 17, 42, 8, 99, 3, 77, 12, 64, 31, 2, 250]])
FP32_FAST = KernelCheck({"bfloat16": 0.9, "float32": 1.5}, cpu="test")  # picks fp32 activations: tight comparisons
BF16_FAST = KernelCheck({"bfloat16": 1.6, "float32": 0.3}, cpu="test")
SLOW = KernelCheck({"bfloat16": 0.56, "float32": 0.06}, cpu="AVX2, no AVX-512-BF16")
needs_kernel = pytest.mark.skipif(not hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"),
                                  reason="this torch has no CPU int4 weight-only kernel (casrap refuses int4 in one line)")


def _logits(model, ids=IDS):
    with torch.inference_mode():
        return model(ids, use_cache=False).logits


def _bank(lm, specs, check=FP32_FAST):
    info = describe(lm.model)
    imp = weight_norm_importance(lm.model)
    bank = ProfileBank(lm.model, "tiny")
    with kernel_check_result(check):
        for spec in specs:
            plan = build_plan(spec, imp, info, structural=True)
            plan.fingerprint = bank.fingerprint
            bank.add(plan)
    return bank


def _grid_weight(rows, cols, seed=0, group=32):
    """A weight on a 16-level grid per group of 32 inputs (what GGUF Q4_1 weights are)."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (rows, cols), generator=gen)
    codes[:, ::group], codes[:, 1::group] = 0, 15  # every group spans the full range
    scale = torch.rand(rows, cols // group, generator=gen) * 0.01 + 0.001
    low = torch.randn(rows, cols // group, generator=gen) * 0.05
    return (codes.float().reshape(rows, -1, group) * scale.unsqueeze(-1) + low.unsqueeze(-1)).reshape(rows, cols)


# ------------------------------------------------------------------ the module
@pytest.mark.parametrize("shape", [(48, 96), (20, 64), (16, 48)])  # (out, in): padded rows, padded columns
@needs_kernel
def test_int4_is_lossless_on_weights_already_on_a_group_grid(shape):
    rows, cols = shape
    weight = _grid_weight(rows, 96)[:, :cols].contiguous()
    x = torch.randn(3, 5, cols)
    module = Int4Linear.from_weight(weight, act_dtype=torch.float32)
    assert module(x).shape == (3, 5, rows)
    torch.testing.assert_close(module(x), F.linear(x, weight), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(module.dequantized_weight(), weight, atol=1e-6, rtol=0)


@needs_kernel
def test_int4_output_equals_the_dequantised_weight_reference():
    weight = torch.randn(64, 128) * 0.05
    codes, scale, zero = quantize_groups(weight)
    assert codes.min() >= 0 and codes.max() <= 15 and scale.shape == (64, 4)
    reference = dequantize_groups(codes, scale, zero)
    assert 0 < (reference - weight).abs().max() <= scale.max() / 2 + 1e-6  # lossy, within half a step
    x = torch.randn(4, 128)
    fp32 = Int4Linear.from_weight(weight, act_dtype=torch.float32)
    torch.testing.assert_close(fp32(x), F.linear(x, reference), atol=1e-5, rtol=1e-5)
    # bf16 activations: scales and zeros in bf16, input rounded to bf16, output back in the input's dtype
    bf16 = Int4Linear.from_weight(weight, act_dtype=torch.bfloat16)
    out = bf16(x)
    assert out.dtype == torch.float32
    ref16 = dequantize_groups(codes, scale.bfloat16().float(), zero.bfloat16().float())
    torch.testing.assert_close(out, F.linear(x.bfloat16().float(), ref16), atol=2e-2, rtol=2e-2)


@needs_kernel
def test_packing_folds_an_unmerged_adapter_and_keeps_a_bias():
    from casrap.profiles.adapter import LoraLinear

    base = nn.Linear(64, 32, bias=True)
    a, b = torch.randn(2, 64) * 0.1, torch.randn(32, 2) * 0.1
    lora = LoraLinear(base, a, b, 0.5)
    weight, bias = effective_weight(lora)
    torch.testing.assert_close(weight, base.weight.detach() + 0.5 * b @ a, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(bias, base.bias.detach())
    packed = Int4Linear.from_module(lora, torch.float32)
    x = torch.randn(3, 64)
    torch.testing.assert_close(packed(x), F.linear(x, packed.dequantized_weight(), base.bias.detach()), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ in the bank
def _dequantised_copy(layers, like):
    """``layers`` (a structural profile) with every projection replaced by a plain Linear holding
    what packing *that* module gives (dequantised): the reference an int4 profile must equal."""
    from casrap.pruners.modules import shell

    out = []
    for layer, packed_layer in zip(layers, like):
        layer = shell(layer)
        for group, names in PROJECTIONS:
            parent = shell(getattr(layer, group))
            for name in names:
                order = getattr(getattr(packed_layer, group), name).in_order  # the packing order the profile chose
                ref = Int4Linear.from_module(getattr(parent, name), torch.float32, in_order=order).dequantized_weight()
                linear = nn.Linear(ref.shape[1], ref.shape[0], bias=False)
                linear.weight = nn.Parameter(ref, requires_grad=False)
                setattr(parent, name, linear)
                assert isinstance(getattr(getattr(packed_layer, group), name), Int4Linear)
            setattr(layer, group, parent)
        out.append(layer)
    return nn.ModuleList(out)


@pytest.mark.parametrize("spec", ["none", "layers-25", "ffn-25", "heads-25"])
@needs_kernel
def test_int4_profile_equals_its_structural_profile_with_dequantised_weights(tiny, spec):
    quant = "int4" if spec == "none" else f"{spec}+int4"
    bank = _bank(tiny, [s for s in (spec, quant) if s != "none"])
    structural = bank.profile(spec).layers
    packed = bank.profile(quant).layers
    assert len(packed) == len(structural)
    with bank.using(quant):
        got = _logits(tiny.model)
    reference = _dequantised_copy(structural, packed)
    model = tiny.model
    model.model.layers, model.config.num_hidden_layers = reference, len(reference)
    expected = _logits(model)
    bank.activate("none")
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # the sliced matrices were packed, not the base ones
    if spec == "ffn-25":
        assert packed[0].mlp.gate_proj.out_features == structural[0].mlp.gate_proj.out_features < 128
    # and int4 is an approximation: not the fp32 profile bit for bit
    with bank.using(spec):
        assert not torch.equal(_logits(tiny.model), got)


@needs_kernel
def test_int4_packs_zero_copy_views_of_a_reordered_base(tiny):
    """Calibrated plans on a reordered base are views (grouped query rows for heads-25): packing
    reads the map each view runs, and shares packed copies only within one layout."""
    from casrap.pruners.importance import calibrate
    from casrap.pruners.reorder import GroupedRowsLinear

    imp = calibrate(tiny.model, tiny.tokenizer, ["The river runs through the old town."] * 2)
    info = describe(tiny.model)
    bank = ProfileBank(tiny.model, "tiny")
    bank.reorder(imp)
    with kernel_check_result(FP32_FAST):
        for spec in ("heads-25", "heads-25+int4", "ffn-25", "ffn-25+int4"):
            bank.add(build_plan(spec, imp, info, structural=True))
    assert any(isinstance(layer.self_attn.q_proj, GroupedRowsLinear) for layer in bank.profile("heads-25").layers)
    for spec in ("heads-25", "ffn-25"):
        with bank.using(f"{spec}+int4"):
            got = _logits(tiny.model)
        reference = _dequantised_copy(bank.profile(spec).layers, bank.profile(f"{spec}+int4").layers)
        tiny.model.model.layers, tiny.model.config.num_hidden_layers = reference, len(reference)
        expected = _logits(tiny.model)
        bank.activate("none")
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@needs_kernel
def test_full_model_restores_bitwise_after_int4_profiles(tiny):
    before = _logits(tiny.model).clone()
    state = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    bank = _bank(tiny, ["int4", "layers-25+int4", "ffn-25+int4", "heads-25+int4"], check=BF16_FAST)
    assert bank.profile("int4").layers[0].self_attn.q_proj.act_dtype == torch.bfloat16  # the faster dtype was picked
    assert bank.profile("int4").layers[0].mlp is not bank._full_layers[0].mlp
    assert_full_model_restored(bank, tiny.model, IDS, before, state, rounds=3)


@needs_kernel
def test_memory_report_counts_the_packed_weights_once(tiny):
    bank = _bank(tiny, ["int4", "layers-25+int4", "ffn-25+int4"])
    full = bank.profile("int4").layers
    expected = sum(m.packed.numel() + m.scales_and_zeros.numel() * 4 for m in packed_modules(full))
    assert bank.packed_bytes("int4") == expected == bank.memory_overhead_bytes("int4")
    fp32 = sum(getattr(getattr(layer, g), n).weight.numel() * 4 for layer in bank._full_layers for g, ns in PROJECTIONS for n in ns)
    assert expected < fp32 / 4  # codes are 1/8, fp32 scales and zeros 1/16 of fp32 weights
    # layers-25+int4 holds the same packed copies as int4 (built once per bank); ffn-25+int4 shares
    # int4's attention and packs its own sliced MLPs
    assert bank.packed_bytes("layers-25+int4") < expected
    sliced = sum(m.nbytes for layer in bank.profile("ffn-25+int4").layers for m in packed_modules(layer.mlp))
    assert bank.packed_bytes() == expected + sliced
    assert bank.profile("ffn-25+int4").layers[1].self_attn.k_proj is bank.profile("int4").layers[1].self_attn.k_proj
    assert bank.memory_overhead_bytes() == bank.packed_bytes()
    # parameter counts and weight bytes read per token see the packed form
    assert bank.parameter_count("int4") == bank.parameter_count("none")
    assert 1.5 < bank.ideal_speedup("int4")
    for name in ("int4", "layers-25+int4", "ffn-25+int4"):
        bank.remove(name)
    assert bank.packed_bytes() == 0 and not bank._packed


@needs_kernel
def test_a_slow_kernel_refuses_int4_in_one_line_unless_allowed(tiny):
    bank = ProfileBank(tiny.model, "tiny")
    plan = build_plan("int4", None, describe(tiny.model))
    with kernel_check_result(SLOW), pytest.raises(UnsupportedModelError) as err:
        bank.add(plan)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("int4 weight-only matmul runs 0.56x fp32 on this CPU (AVX2, no AVX-512-BF16")
    assert "CASRAP_ALLOW_SLOW_QUANT=1" in message and "int4" not in bank.names
    bank.allow_slow_quant = True
    with kernel_check_result(SLOW):
        bank.add(plan)
    assert bank.profile("int4").layers[0].mlp.up_proj.act_dtype == torch.bfloat16  # the less slow one


@needs_kernel
def test_gpu_and_missing_kernels_are_named():
    assert "CPU only" in kernel_blocker("cuda") and "bitsandbytes" in kernel_blocker("cuda")
    assert kernel_blocker("cpu") is None
    assert "runs 1.63x" not in (BF16_FAST.refusal() or "") and BF16_FAST.refusal() is None


@needs_kernel
def test_kernel_check_measures_each_activation_dtype_once_per_process():
    shapes = [(32, 64), (64, 32)]
    first = quant_kernel_check(shapes, budget_s=0.01)
    assert set(first.speedups) == {"bfloat16", "float32"} and all(v > 0 for v in first.speedups.values())
    assert first.rounds >= 3 and first.act_dtype in first.speedups
    assert quant_kernel_check(shapes, budget_s=0.01) is first
    with kernel_check_result(SLOW):
        assert quant_kernel_check(shapes) is SLOW


# ------------------------------------------------------------------ names and plans
def test_int4_names_round_trip(tiny):
    info = describe(tiny.model)
    imp = weight_norm_importance(tiny.model)
    assert split_quant("int4") == ("none", "int4") and split_quant("layers-25+int4") == ("layers-25", "int4")
    assert split_quant("layers-25") == ("layers-25", None)
    assert parse_spec("int4") == ("int4", 0.0)
    assert parse_spec("layers-25+int4") == ("layers", 0.25)
    assert parse_spec("ffn-25+int4+kv50") == ("ffn", 0.25)
    for spec in ("int4", "layers-25+int4", "ffn-25+int4", "heads-25+int4", "ffn-25+int4+kv50", "layers-25+kv50+int4"):
        plan = build_plan(spec, imp, info, structural=True)
        assert plan.name == spec and plan.quant == "int4" and "int4" in plan.description
        again = PruningPlan.from_dict(plan.to_dict())
        assert again == plan and again.quant == "int4"
    combined = build_plan("layers-25+kv50+int4", imp, info, structural=True)
    assert combined.meta["kv_keep"] == 0.5 and combined.skip_layers == build_plan("layers-25", imp, info).skip_layers
    plain = build_plan("layers-25", imp, info)
    assert "quant" not in plain.to_dict() and PruningPlan.from_dict(plain.to_dict()).quant == ""
    with pytest.raises(InputError):
        parse_spec("int3")
    with pytest.raises(CheckpointError, match="masked or low-rank"):
        build_plan("ffnmask-25+int4", imp, info).validate(info.layers, info.query_heads, info.kv_heads, info.ffn_width)
    bad = PruningPlan(name="x", quant="int2")
    with pytest.raises(CheckpointError, match="unknown quantisation"):
        bad.validate(info.layers, info.query_heads, info.kv_heads, info.ffn_width)


def test_shipped_plans_take_the_suffix():
    assert parse_spec("ga-rates-20+int4") == ("shipped", 0.0)
    assert parse_spec("ffn-25+heal+int4") == ("shipped", 0.0)
    assert "int4" in default_catalogue(quant=True) and "int4" not in default_catalogue()


# ------------------------------------------------------------------ the front
def _points():
    return [
        OptionPoint("none", 1.0, 1.0),
        OptionPoint("int4", 1.60, 1.00, 60.0),
        OptionPoint("layers-25", 1.22, 3.1),
        OptionPoint("ga-rates-20", 1.10, 1.54),
        OptionPoint("ffn-25", 1.08, 1.56),  # a noise margin behind ga-rates-20: near the front
        OptionPoint("heads-25", 1.02, 4.4),  # far behind layers-25 on both axes: off
        OptionPoint("layers-50", 1.73, 9.0),
    ]


def test_front_and_near_front_rule():
    points = _points()
    by = {p.name: p for p in points}
    assert dominates(by["ga-rates-20"], by["ffn-25"]) and not dominates(by["ga-rates-20"], by["ffn-25"], 0.05, 0.05)
    assert not dominates(by["int4"], by["none"])  # faster, but it holds memory the full model does not
    assert on_front(points) == ["none", "int4", "layers-25", "ga-rates-20", "layers-50"]
    assert near_front(points) == ["none", "int4", "layers-25", "ga-rates-20", "ffn-25", "layers-50"]
    assert front_catalogue(points) == ["none", "int4", "ga-rates-20", "ffn-25", "layers-25", "layers-50"]
    # past the limit the options off the exact front go first
    assert front_catalogue(points, limit=5) == ["none", "int4", "ga-rates-20", "layers-25", "layers-50"]
    # were int4 free of memory, it would push every option it beats by the slack off the menu
    assert near_front([points[0], OptionPoint("int4", 1.6, 1.0), *points[2:]]) == ["none", "int4", "layers-50"]


def test_catalogue_keeps_only_measured_options_near_the_front():
    names = default_catalogue(quant=True, measured=_points())
    assert names[0] == "none" and "int4" in names and "heads-5" not in names  # unmeasured names are not kept
    assert default_catalogue(quant=True, measured=[OptionPoint("none", 1.0, 1.0), OptionPoint("int4", 1.6, 1.0)]) == ["none", "int4"]


def _load_script(path):
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def test_pareto_script_marks_the_front_with_the_catalogue_rule(tmp_path):
    import json
    import pathlib

    pareto = _load_script(pathlib.Path(__file__).resolve().parents[1] / "scripts" / "pareto.py")
    rows = [{"profile": "none", "speedup": None, "ppl": 20.0, "extra": 0}, {"profile": "int4", "speedup": 1.6, "ppl": 20.2, "extra": 60},
            {"profile": "ffn-25", "speedup": 1.08, "ppl": 31.2, "extra": 0}, {"profile": "ga-rates-20", "speedup": 1.10, "ppl": 30.8, "extra": 0},
            {"profile": "heads-25", "speedup": 1.02, "ppl": 88.0, "extra": 0}, {"profile": "layers-25", "speedup": 1.22, "ppl": 62.0, "extra": 0}]
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"columns": [{"key": k} for k in ("profile", "speedup", "ppl", "extra")], "rows": rows,
                                "machine": {"load": "idle"}}))
    points = pareto.mark_front(pareto.points_of(path))
    flags = {p.profile: (p.on_front, p.near_front, p.memory_mb) for p in points}
    assert flags["int4"] == (True, True, 60) and flags["ffn-25"] == (False, True, 0) and flags["heads-25"] == (False, False, 0)
    assert pareto.catalogue_of(points) == ["none", "int4", "ga-rates-20", "ffn-25", "layers-25"]
    out = pareto.plot(points, tmp_path / "front.png")
    assert out.stat().st_size > 0


@needs_kernel
def test_quant_benchmark_runs_end_to_end_on_the_tiny_model(tmp_path, monkeypatch):
    import json
    import pathlib

    monkeypatch.setenv("CASRAP_HOME", str(tmp_path / "home"))  # the script points it at its output folder: restored after

    script = _load_script(pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "quant_speed.py")
    threads = torch.get_num_threads()
    try:
        assert script.main(["--tiny", "--threads", "1", "--output", str(tmp_path / "quant.json")]) == 0
    finally:
        torch.set_num_threads(threads)
    table = json.loads((tmp_path / "quant.json").read_text())
    names = [r["profile"] for r in table["rows"]]
    assert names[0] == "none" and "layers-25+int4" in names and "ffn-25+int4" in names
    assert "int4" in names and sum(name.startswith("int4 (") for name in names) == 1  # both activation dtypes
    assert {r["act"] for r in table["rows"] if r["profile"].startswith("int4")} == {"bfloat16", "float32"}
    assert all(r["ppl"] > 0 and r["kl"] >= 0 for r in table["rows"]) and table["machine"]["omp_wait_policy"]
    int4 = next(r for r in table["rows"] if r["profile"].startswith("int4"))
    assert int4["packed"] > 0 and int4["extra"] == int4["packed"]
    assert "Kernel check" in table["notes"][0]
    raw = json.loads((tmp_path / "quant-raw.json").read_text())
    assert set(raw["kernel_check"]["speedups"]) == {"bfloat16", "float32"}


@pytest.mark.embedded
@needs_kernel
def test_int4_is_near_lossless_on_the_embedded_model(embedded):
    """The embedded weights were dequantised from Q4_1 groups of 32: int4 in groups of 32 finds
    the same grid, so with float32 activations the profile is the full model up to float error."""
    from casrap.measure import mean_kl, next_token_logits
    from casrap.measure.corpus import prose_split

    from casrap.models import load_model

    # a fresh copy in the checkpoint's channel order: other tests' banks reorder the shared model in place,
    # which moves FFN channels off the Q4_1 groups (int4 then reads KL ~0.1, not ~0)
    model = load_model("smollm2-135m", device="cpu").model
    ids = embedded.tokenizer(prose_split("test").text, return_tensors="pt").input_ids[:, :96]
    bank = ProfileBank(model, "smollm2-135m")
    side = bank.sibling()
    with kernel_check_result(FP32_FAST):
        bank.add(build_plan("int4", None, describe(model)))
    with kernel_check_result(BF16_FAST):
        side.add(build_plan("int4", None, describe(model)))
    full = next_token_logits(model, ids)
    try:
        bank.activate("int4")
        kl32 = mean_kl(full, next_token_logits(model, ids))
        side.activate("int4")
        kl16 = mean_kl(full, next_token_logits(model, ids))
    finally:
        bank.activate("none")
    assert kl32 < 1e-4 and kl16 < 0.01, (kl32, kl16)
    fp32 = sum(getattr(getattr(layer, g), n).weight.numel() * 4 for layer in bank._full_layers for g, ns in PROJECTIONS for n in ns)
    assert bank.packed_bytes("int4") == pytest.approx(fp32 * 3 / 16, rel=0.01)  # codes 1/8, fp32 scales+zeros 1/16
    assert side.packed_bytes("int4") == pytest.approx(fp32 * 5 / 32, rel=0.01)  # bf16 scales+zeros 1/32
    torch.testing.assert_close(next_token_logits(model, ids), full, atol=0, rtol=0)


@needs_kernel
def test_an_int4_profile_says_in_one_line_why_it_cannot_export(tiny):
    from casrap.profiles.export import export_blocker

    bank = _bank(tiny, ["int4", "layers-25+int4"])
    for name in ("int4", "layers-25+int4"):
        assert "packed" in (export_blocker(bank, name) or "")


@needs_kernel
def test_a_reordered_base_packs_down_proj_in_the_checkpoints_channel_order(tiny):
    """Weights on a group-32 grid in the checkpoint's channel order (a GGUF-dequantised model) stay lossless
    under int4 after the zero-copy reorder has laid the FFN channels out by importance."""
    from casrap.pruners.importance import calibrate
    from casrap.pruners.reorder import ffn_order

    with torch.no_grad():
        for k, layer in enumerate(tiny.model.model.layers):
            for name in ("gate_proj", "up_proj", "down_proj"):
                linear = getattr(layer.mlp, name)
                linear.weight.copy_(_grid_weight(*linear.weight.shape, seed=10 * k + len(name)))
    imp = calibrate(tiny.model, tiny.tokenizer, ["The river runs through the old town."] * 2)
    bank = ProfileBank(tiny.model, "tiny")
    bank.reorder(imp)
    assert ffn_order(bank._full_layers[0].mlp) is not None  # channels really moved
    with kernel_check_result(FP32_FAST):
        bank.add(build_plan("int4", imp, describe(tiny.model), structural=True))
    for packed_layer, base in zip(bank.profile("int4").layers, bank._full_layers):
        down = packed_layer.mlp.down_proj
        assert down.in_order is not None
        torch.testing.assert_close(down.dequantized_weight(), base.mlp.down_proj.weight, atol=1e-6, rtol=0)  # grid found
