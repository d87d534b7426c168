"""A bundle means the same thing on every machine: its own calibration, adapters that travel,
caches keyed to what they measured, and profiles whose memory does not depend on build order."""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from casrap.errors import CheckpointError, InputError
from casrap.models import describe
from casrap.models.tiny import tiny_llama
from casrap.profiles import ProfileBank, PruningPlan, build_plan
from casrap.profiles.adapter import (
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, DIGEST_KEY, LoraLinear, adapter_digest, load_adapter, plan_adapter_path, resolve_adapter,
)
from casrap.pruners.importance import Importance, calibrate, default_calibration_path
from casrap.pruners.reorder import is_reordered

IDS = torch.tensor([[5, 17, 42, 8, 99, 3, 77, 12, 64, 31, 2, 250]])
TEXTS = ["The river runs through the old town and under three stone bridges.",
         "Bread is made from flour, water, salt and yeast, then left to rise.",
         "A small garden can feed a family if the beds are planned in spring."] * 2
PROJECTIONS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def _logits(model, ids=IDS):
    with torch.inference_mode():
        return model(ids, use_cache=False).logits


@pytest.fixture(scope="module")
def importance():
    lm = tiny_llama()
    return calibrate(lm.model, lm.tokenizer, TEXTS)


def write_adapter(directory: Path, plan: PruningPlan, rank: int = 2, seed: int = 0, config: dict | None = None) -> Path:
    """A random PEFT-format LoRA for ``plan`` on the tiny model (factors in plan index order)."""
    from safetensors.torch import save_file

    bare = _bare(plan)
    scratch = ProfileBank(tiny_llama().model, lazy_reorder=False)
    scratch.add(bare)
    layers = scratch.profile(bare.name).layers
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for j, layer in enumerate(layers):
        for group, names in PROJECTIONS.items():
            for name in names:
                out_f, in_f = getattr(getattr(layer, group), name).weight.shape
                prefix = f"base_model.model.model.layers.{j}.{group}.{name}"
                tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_f, generator=gen) * 0.2
                tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_f, rank, generator=gen) * 0.2
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps({"r": rank, "lora_alpha": 2 * rank, "peft_type": "LORA", **(config or {})}))
    return directory


def _bare(plan: PruningPlan) -> PruningPlan:
    bare = PruningPlan.from_dict(plan.to_dict())
    bare.name = plan.name.replace("+heal", "")
    bare.meta = {k: v for k, v in plan.meta.items() if k not in ("adapter", DIGEST_KEY)}
    return bare


def healed_plan(folder: Path, base: PruningPlan, seed: int = 0) -> PruningPlan:
    """``base`` healed by a random adapter, saved as ``folder/NAME+heal.json`` beside ``folder/adapter``."""
    plan = PruningPlan.from_dict(base.to_dict())
    write_adapter(folder / "adapter", plan, seed=seed)
    plan.name = f"{base.name}+heal"
    plan.meta = {**plan.meta, "adapter": "adapter", DIGEST_KEY: adapter_digest(folder / "adapter")}
    plan.save(folder / f"{plan.name}.json")
    return PruningPlan.load(folder / f"{plan.name}.json")


def _plans(importance, folder: Path) -> dict[str, PruningPlan]:
    info = describe(tiny_llama().model)
    plans = {spec: build_plan(spec, importance, info) for spec in ("ffn-25", "heads-50", "layers-25")}
    plans["ffn-25+heal"] = healed_plan(folder / "ffn", plans["ffn-25"])
    plans["layers-25+heal"] = healed_plan(folder / "layers", plans["layers-25"], seed=1)
    return plans


def _copy(plan: PruningPlan) -> PruningPlan:
    out = PruningPlan.from_dict(plan.to_dict())
    out.source = plan.source
    return out


# ------------------------------------------------------------------ part 1: order and memory
def test_healed_profiles_run_unmerged_on_shared_weights_and_match_merged(importance, tmp_path):
    plans = _plans(importance, tmp_path)
    results, overhead = {}, {}
    for merged in (False, True):
        lm = tiny_llama()
        bank = ProfileBank(lm.model, "tiny", importance=importance, merge_healed=merged)
        for name in ("ffn-25+heal", "layers-25+heal"):
            bank.add(_copy(plans[name]))
            with bank.using(name):
                results[(merged, name)] = _logits(lm.model)
            overhead[(merged, name)] = bank.memory_overhead_bytes(name)
        if not merged:
            layer = bank.profile("ffn-25+heal").layers[0]
            assert isinstance(layer.mlp.up_proj, LoraLinear) and layer.mlp.up_proj.base.weight.untyped_storage().data_ptr() \
                == bank._full_layers[0].mlp.up_proj.weight.untyped_storage().data_ptr()
    for name in ("ffn-25+heal", "layers-25+heal"):
        torch.testing.assert_close(results[(False, name)], results[(True, name)], atol=1e-4, rtol=1e-4)
        factors = load_adapter(plan_adapter_path(plans[name])).parameters * 4
        assert overhead[(False, name)] == factors  # only the LoRA factors, float32
        assert overhead[(True, name)] > 4 * factors


def test_the_order_profiles_are_added_in_changes_neither_memory_nor_outputs(importance, tmp_path):
    plans = _plans(importance, tmp_path)
    orders = (["layers-25+heal", "ffn-25+heal", "ffn-25", "heads-50"], ["heads-50", "ffn-25", "ffn-25+heal", "layers-25+heal"])
    seen = []
    for order in orders:
        lm = tiny_llama()
        bank = ProfileBank(lm.model, "tiny", importance=importance)
        for name in order:
            bank.add(_copy(plans[name]))
        logits = {}
        for name in sorted(order):
            with bank.using(name):
                logits[name] = _logits(lm.model)
        seen.append((bank.memory_overhead_bytes(), logits, dict(bank.copied_modules)))
        assert bank.memory_overhead_bytes("ffn-25") == 0 and bank.memory_overhead_bytes("heads-50") == 0
    assert seen[0][0] == seen[1][0] and seen[0][2] == seen[1][2]
    for name, value in seen[0][1].items():
        assert torch.equal(value, seen[1][1][name]), name


def test_a_model_with_layout_dependent_profiles_is_never_reordered_by_another_bank(importance, tmp_path):
    plans = _plans(importance, tmp_path)
    lm = tiny_llama()
    first = ProfileBank(lm.model, "tiny", lazy_reorder=False)
    first.add(_copy(plans["layers-25+heal"]))
    with first.using("layers-25+heal"):
        before = _logits(lm.model)
    with pytest.raises(InputError):
        ProfileBank(lm.model, "tiny", importance=importance)
    with pytest.raises(InputError):
        ProfileBank(lm.model, "tiny").reorder(importance)
    assert not is_reordered(lm.model)
    with first.using("layers-25+heal"):
        assert torch.equal(_logits(lm.model), before)


def test_rebuild_with_and_unmerged_export_keep_the_layout(importance, tmp_path, casrap_home):
    """A second bank on the same model (provenance, unmerged export) neither reorders it under
    the first bank's profiles nor loses its reorder."""
    from casrap.profiles.export import export_checkpoint
    from casrap.runtime.provenance import rebuild_with

    plans = _plans(importance, tmp_path)
    lm = tiny_llama()
    importance.save(default_calibration_path(lm.model))  # what a lazy reorder would pick up
    bank = ProfileBank(lm.model, "tiny")
    bank.add(_copy(plans["layers-25+heal"]))  # healed first: the model is locked in its order
    bank.add(_copy(plans["ffn-25+heal"]))  # so this one is built by copying
    with bank.using("layers-25+heal"):
        before = _logits(lm.model)
    export_checkpoint(bank, "ffn-25+heal", tmp_path / "export", lm.tokenizer, merge=False)  # a bare ffn-25 on a second bank
    assert not is_reordered(lm.model)
    plain = {name: _bare(plans[name]) for name in ("layers-25+heal", "ffn-25+heal")}
    for name, plan in plain.items():
        plan.name = name
    fresh = rebuild_with(bank, plain)
    fresh.add(_copy(plans["ffn-25"]))
    assert not is_reordered(lm.model)
    with bank.using("layers-25+heal"):
        assert torch.equal(_logits(lm.model), before)
    # on a reordered model a sibling inherits the layout: still views, no second reorder
    other = tiny_llama()
    lean = ProfileBank(other.model, "tiny", importance=importance)
    lean.add(_copy(plans["ffn-25"]))
    again = rebuild_with(lean, {})
    assert again.reorder_info == lean.reorder_info and again.memory_overhead_bytes("ffn-25") == 0


# ------------------------------------------------------------------ part 2 and 4: bundles
def _write_bundle(bank, out: Path) -> Path:
    from runtime_helpers import SpacesEnv

    from casrap.agents.double_dqn import DoubleDQN
    from casrap.runtime.bundle import write_bundle

    policy = DoubleDQN("MlpPolicy", SpacesEnv(len(bank.names)), seed=0, device="cpu", learning_starts=0, buffer_size=10)
    zip_path = out.parent / f"{out.name}-policy.zip"
    policy.save(str(zip_path))
    return write_bundle(out, zip_path, bank, model_spec="tiny-random-llama", reward={"kind": "slo"})


@pytest.fixture()
def bundle(importance, tmp_path):
    plans = _plans(importance, tmp_path / "user")
    lm = tiny_llama()
    bank = ProfileBank(lm.model, "tiny", importance=importance)
    for name in ("ffn-25", "ffn-25+heal", "heads-50", "layers-25+heal"):
        bank.add(_copy(plans[name]))
    out = _write_bundle(bank, tmp_path / "bundle")
    expected = {}
    for name in bank.names:
        with bank.using(name):
            expected[name] = _logits(lm.model)
    return out, expected


def _bundle_logits(path: Path) -> tuple[dict[str, torch.Tensor], object]:
    from casrap.runtime.bundle import load_bundle

    lm = tiny_llama()
    bank = load_bundle(path).build_bank(lm.model)
    found = {}
    for name in bank.names:
        with bank.using(name):
            found[name] = _logits(lm.model)
    return found, bank


def test_a_bundle_builds_from_its_own_calibration_whatever_the_home_holds(bundle, importance, tmp_path, monkeypatch):
    path, expected = bundle
    monkeypatch.setenv("CASRAP_HOME", str(tmp_path / "empty-home"))
    cold, bank = _bundle_logits(path)
    assert bank.reorder_info and bank.memory_overhead_bytes("ffn-25") == 0 and bank.memory_overhead_bytes("heads-50") == 0
    # a warm home holding another calibration with the same source label changes nothing
    monkeypatch.setenv("CASRAP_HOME", str(tmp_path / "warm-home"))
    lm = tiny_llama()
    other = Importance(torch.rand(4, 8), torch.rand(4, 128), torch.rand(4), importance.source, importance.model_key)
    other.save(default_calibration_path(lm.model))
    warm, _ = _bundle_logits(path)
    for name, value in cold.items():
        assert torch.equal(value, warm[name]), name
        assert torch.equal(value, expected[name]), name


def test_a_bundle_holds_its_adapters_and_still_answers_after_moving(bundle, tmp_path):
    path, expected = bundle
    manifest = json.loads((path / "bundle.json").read_text())
    assert manifest["calibration"]["file"] and (path / manifest["calibration"]["file"]).is_file()
    healed = [PruningPlan.load(path / f) for f in manifest["plans"] if "heal" in PruningPlan.load(path / f).name]
    assert len(healed) == 2
    for plan in healed:
        assert not Path(plan.meta["adapter"]).is_absolute() and len(plan.meta[DIGEST_KEY]) == 64
        assert (path / "plans" / plan.meta["adapter"] / ADAPTER_WEIGHTS).is_file()
    shutil.rmtree(tmp_path / "user")  # the user's healing folders are gone
    moved = shutil.move(str(path), str(tmp_path / "elsewhere" / "moved"))
    found, _ = _bundle_logits(Path(moved))
    for name, value in expected.items():
        assert torch.equal(found[name], value), name


def test_a_tampered_adapter_is_refused_in_one_line(bundle):
    from safetensors.torch import load_file, save_file

    from casrap.runtime.bundle import load_bundle

    path, _ = bundle
    weights = next((path / "plans").glob("*.adapter")) / ADAPTER_WEIGHTS
    tensors = load_file(str(weights))
    key = next(iter(tensors))
    tensors[key] = tensors[key] + 0.01
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="sha256") as err:
        load_bundle(path)
    assert "\n" not in str(err.value)


def test_bundle_and_package_paths_that_leave_their_folder_are_refused(bundle, tmp_path):
    from casrap.runtime.bundle import load_bundle

    path, _ = bundle
    manifest_path = path / "bundle.json"
    manifest = json.loads(manifest_path.read_text())
    outside = tmp_path / "outside.json"
    shutil.copyfile(path / manifest["plans"][1], outside)
    for bad in ("../outside.json", str(outside)):
        changed = {**manifest, "plans": [manifest["plans"][0], bad, *manifest["plans"][2:]]}
        manifest_path.write_text(json.dumps(changed))
        with pytest.raises(CheckpointError, match="outside the bundle"):
            load_bundle(path)
    manifest_path.write_text(json.dumps(manifest))
    # a bundled plan naming an adapter outside the bundle
    plan_file = next(f for f in manifest["plans"] if "heal" in json.loads((path / f).read_text())["name"])
    data = json.loads((path / plan_file).read_text())
    shutil.copytree(path / "plans" / data["meta"]["adapter"], tmp_path / "stray.adapter")
    for bad in ("../../stray.adapter", str(tmp_path / "stray.adapter")):
        (path / plan_file).write_text(json.dumps({**data, "meta": {**data["meta"], "adapter": bad}}))
        with pytest.raises(CheckpointError, match="leaves the bundle"):
            load_bundle(path)
    with pytest.raises(CheckpointError, match="outside casrap's package data"):
        resolve_adapter("casrap-data:../../../etc")


def test_relative_adapters_resolve_beside_the_plan_not_the_working_directory(importance, tmp_path, monkeypatch):
    plan = _plans(importance, tmp_path / "a")["ffn-25+heal"]
    assert plan.meta["adapter"] == "adapter" and plan_adapter_path(plan) == tmp_path / "a" / "ffn" / "adapter"
    decoy = write_adapter(tmp_path / "cwd" / "adapter", _bare(plan), seed=5)
    monkeypatch.chdir(decoy.parent)
    shutil.move(str(tmp_path / "a" / "ffn"), str(tmp_path / "b"))
    moved = PruningPlan.load(tmp_path / "b" / "ffn-25+heal.json")
    assert plan_adapter_path(moved) == tmp_path / "b" / "adapter"


def test_healed_plans_pin_their_adapter(importance, tmp_path):
    plan = _plans(importance, tmp_path)["layers-25+heal"]
    config = Path(plan_adapter_path(plan)) / ADAPTER_CONFIG
    config.write_text(config.read_text().replace('"lora_alpha": 4', '"lora_alpha": 40'))
    bank = ProfileBank(tiny_llama().model, "tiny", lazy_reorder=False)
    with pytest.raises(CheckpointError, match="not the one plan"):
        bank.add(plan)


# ------------------------------------------------------------------ part 6: smaller items
def test_load_adapter_honours_rank_and_alpha_patterns(tmp_path):
    from safetensors.torch import save_file

    tensors = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(4, 8),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(8, 4),
        "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.ones(2, 8),
        "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight": torch.ones(8, 2),
        "base_model.model.model.layers.1.mlp.up_proj.lora_A.weight": torch.ones(2, 8),
        "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight": torch.ones(8, 2),
    }
    save_file(tensors, str(tmp_path / ADAPTER_WEIGHTS))
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({"r": 2, "lora_alpha": 4, "rank_pattern": {"q_proj": 4},
                                                       "alpha_pattern": {"layers.1.mlp.up_proj": 16}}))
    adapter = load_adapter(tmp_path)
    assert adapter.scale_of(0, "q_proj") == pytest.approx(4 / 4)
    assert adapter.scale_of(0, "up_proj") == pytest.approx(4 / 2)
    assert adapter.scale_of(1, "up_proj") == pytest.approx(16 / 2)
    torch.testing.assert_close(adapter.delta(1, "up_proj"), torch.full((8, 8), 2.0 * 16 / 2))
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({"r": 2, "lora_alpha": 4}))
    with pytest.raises(CheckpointError, match="rank 4"):
        load_adapter(tmp_path)


def test_check_model_uses_the_reorder_stable_fingerprint(bundle, monkeypatch):
    """A probe of reordered weights may round differently; the bank's fingerprint does not move."""
    import casrap.models.architecture as architecture
    import casrap.profiles.bank as bank_module
    from casrap.runtime.bundle import load_bundle

    path, _ = bundle
    checked = load_bundle(path)
    lm = tiny_llama()
    checked.build_bank(lm.model)  # reorders the model
    for module in (architecture, bank_module):  # as if a probe of the reordered weights rounded differently
        monkeypatch.setattr(module, "model_key", lambda model: "llama-4L-000000000000")
    checked.check_model(lm.model)
    with pytest.raises(CheckpointError):
        checked.check_model(tiny_llama().model)


def test_nvml_reads_the_gpu_the_model_runs_on(monkeypatch):
    from casrap.telemetry.live import LiveTelemetry

    calls = []
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda i: calls.append(("index", i)) or ("handle", i),
        nvmlDeviceGetHandleByUUID=lambda u: calls.append(("uuid", u)) or ("handle", u),
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    LiveTelemetry(device="cuda:1")
    LiveTelemetry()
    LiveTelemetry(gpu_index=2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-abc")
    LiveTelemetry(device=torch.device("cuda", 0))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    LiveTelemetry(device="cuda:1")
    assert calls == [("index", 1), ("index", 3), ("index", 2), ("uuid", "GPU-abc"), ("index", 1)]


def test_kv_cache_argument_follows_the_transformers_version():
    from casrap.pruners.kvcache import cache_argument

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None, **kwargs):
            return None

    class New(torch.nn.Module):
        def forward(self, input_ids=None, cache=None, use_cache=None, **kwargs):
            return None

    assert cache_argument(Old()) == "past_key_values" and cache_argument(New()) == "cache"
    lm = tiny_llama()
    import inspect

    assert cache_argument(lm.model) in inspect.signature(lm.model.forward).parameters


# ------------------------------------------------------------------ part 3: latency cache
class _Samples:
    """Stands in for measure_latency: counts calls, returns a fixed flat fit."""

    def __init__(self):
        self.calls = 0

    def __call__(self, model, tokenizer, prompts, new_tokens, repeats=1, clock=None, progress=None):
        from casrap.decide.latency_model import LatencySample

        self.calls += 1
        samples = [LatencySample(int(p.shape[-1]), 0.01 * self.calls, 0.002, new_tokens) for p in prompts]
        return samples, [str(i) for i in range(len(prompts))]


class _Telemetry:
    def __init__(self, other):
        self.other = other

    def read(self):
        return types.SimpleNamespace(other_cpu_util=self.other)


def test_a_cpu_latency_fit_is_refitted_for_a_cuda_model_or_another_dtype(casrap_home, monkeypatch):
    from casrap.decide import latency_model as lat

    fake = _Samples()
    monkeypatch.setattr(lat, "measure_latency", fake)
    lm = tiny_llama()
    cpu = lat.load_or_fit_latency_model(lm.model, lm.tokenizer, lengths=(4, 8))
    assert fake.calls == 1 and cpu.device == "cpu" and cpu.dtype == "float32" and cpu.threads
    assert lat.load_or_fit_latency_model(lm.model, lm.tokenizer, lengths=(4, 8)).measured_at == cpu.measured_at
    assert fake.calls == 1
    real = lat.run_context
    cuda = {**real(lm.model), "device": "cuda:0 NVIDIA H200"}
    monkeypatch.setattr(lat, "run_context", lambda model: cuda)
    # even a CPU fit sitting at the CUDA fit's path (an old cache) is not used
    shutil.copyfile(lat.latency_cache_path(cpu.model_key, context=real(lm.model)), lat.latency_cache_path(cpu.model_key, context=cuda))
    refit = lat.load_or_fit_latency_model(lm.model, lm.tokenizer, lengths=(4, 8))
    assert fake.calls == 2 and refit.device == "cuda:0 NVIDIA H200"
    monkeypatch.setattr(lat, "run_context", lambda model: {**cuda, "dtype": "bfloat16"})
    lat.load_or_fit_latency_model(lm.model, lm.tokenizer, lengths=(4, 8))
    assert fake.calls == 3


def test_a_latency_fit_taken_under_load_is_measured_again(casrap_home, monkeypatch):
    from casrap.decide import latency_model as lat

    fake = _Samples()
    monkeypatch.setattr(lat, "measure_latency", fake)
    lm = tiny_llama()
    busy = lat.load_or_fit_latency_model(lm.model, lm.tokenizer, telemetry=_Telemetry(lat.LOAD_LIMIT_PCT + 30), lengths=(4, 8))
    assert busy.other_cpu_util > lat.LOAD_LIMIT_PCT
    lat.load_or_fit_latency_model(lm.model, lm.tokenizer, telemetry=_Telemetry(2.0), lengths=(4, 8))
    assert fake.calls == 2
    lat.load_or_fit_latency_model(lm.model, lm.tokenizer, telemetry=_Telemetry(2.0), lengths=(4, 8))
    assert fake.calls == 2
    lat.load_or_fit_latency_model(lm.model, lm.tokenizer, telemetry=_Telemetry(2.0), lengths=(4, 8), refit=True)
    assert fake.calls == 3
    # a busy fit written by an older version is refused on load, too
    path = lat.latency_cache_path(busy.model_key, context=lat.run_context(lm.model))
    busy.save(path)
    lat.load_or_fit_latency_model(lm.model, lm.tokenizer, lengths=(4, 8))
    assert fake.calls == 4
