"""Healing: LoRA adapters trained on a standalone copy, merged into the profile's own modules."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
from helpers import assert_full_model_restored

from casrap.errors import CheckpointError, InputError
from casrap.profiles.adapter import load_adapter, merge_adapter_into, resolve_adapter
from casrap.heal.train import HealConfig, distill_loss, heal_profile
from casrap.models import describe
from casrap.profiles import ProfileBank, PruningPlan, build_plan
from casrap.pruners.importance import weight_norm_importance

IDS = torch.tensor([[5, 17, 42, 8, 99, 3, 77, 12, 64, 31, 2, 250]])


def _logits(model, ids=IDS):
    with torch.inference_mode():
        return model(ids, use_cache=False).logits


def _bank(lm, specs):
    info = describe(lm.model)
    imp = weight_norm_importance(lm.model)
    bank = ProfileBank(lm.model, "tiny")
    for spec in specs:
        plan = build_plan(spec, imp, info, structural=True)
        plan.fingerprint = bank.fingerprint
        bank.add(plan)
    return bank


def _blocks(n=12, length=16, seed=0):
    return torch.randint(0, 300, (n, length), generator=torch.Generator().manual_seed(seed))


def _healed(bank, name, adapter_dir):
    plan = PruningPlan.from_dict(bank.profile(name).plan.to_dict())
    plan.name = f"{name}+heal"
    plan.meta["adapter"] = str(adapter_dir)
    return plan


@pytest.mark.parametrize("spec", ["layers-50", "ffn-25", "heads-50"])
def test_healing_lowers_kl_and_bank_equals_peft_model(tiny, tmp_path, spec):
    """The merged profile computes what the trained PEFT model computes, and training helped."""
    bank = _bank(tiny, [spec])
    blocks = _blocks()
    cfg = HealConfig(steps=12, rank=4, lr=1e-2, batch=4, save_every=100)
    with torch.no_grad():
        teacher = tiny.model(blocks, use_cache=False).logits
        with bank.using(spec):
            before = distill_loss(tiny.model(blocks, use_cache=False).logits, teacher, blocks, 0.0).item()
    result = heal_profile(bank, spec, blocks, tmp_path / "run", cfg)
    assert (result.adapter_dir / "adapter_config.json").is_file() and (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    healed = _healed(bank, spec, result.adapter_dir)
    bank.add(healed)
    with torch.no_grad(), bank.using(healed.name):
        after = distill_loss(tiny.model(blocks, use_cache=False).logits, teacher, blocks, 0.0).item()
    assert after < before
    # the PEFT model (unmerged) and the bank's merged copies agree
    from peft import PeftModel

    from casrap.heal.train import standalone_student

    peft_model = PeftModel.from_pretrained(standalone_student(bank, spec), str(result.adapter_dir)).eval()
    with bank.using(healed.name):
        torch.testing.assert_close(_logits(tiny.model), _logits(peft_model), atol=1e-4, rtol=1e-4)


def test_healed_profile_shares_base_and_restores_full_model_bitwise(tiny, tmp_path):
    before = _logits(tiny.model).clone()
    state = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    bank = _bank(tiny, ["ffn-25", "layers-50"])
    cfg = HealConfig(steps=3, rank=2, batch=2, targets=["o_proj", "down_proj"], save_every=100)
    for name in ("ffn-25", "layers-50"):
        result = heal_profile(bank, name, _blocks(), tmp_path / name, cfg)
        bank.add(_healed(bank, name, result.adapter_dir))
    # the unhealed profile is unchanged by its healed sibling, and the healed one computes differently
    with bank.using("layers-50"):
        plain = _logits(tiny.model).clone()
    with bank.using("layers-50+heal"):
        healed = _logits(tiny.model).clone()
    assert not torch.equal(plain, healed)
    assert bank.profile("layers-50").layers[0].mlp is bank._full_layers[0].mlp
    # the adapter runs unmerged on the shared base weights: only its low-rank factors are new,
    # far less than copies of the adapted o_proj and down_proj of each kept layer would be
    layers = bank.profile("layers-50+heal").layers
    copies = sum(layer.self_attn.o_proj.weight.numel() + layer.mlp.down_proj.weight.numel() for layer in layers) * 4
    assert 0 < bank.memory_overhead_bytes("layers-50+heal") < copies / 4
    assert layers[0].self_attn.q_proj.weight is bank._full_layers[0].self_attn.q_proj.weight
    assert_full_model_restored(bank, tiny.model, IDS, before, state, rounds=5)


def test_training_never_touches_base_modules(tiny, tmp_path):
    state = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    modules = {id(m) for m in tiny.model.modules()}
    bank = _bank(tiny, ["ffn-25"])
    heal_profile(bank, "ffn-25", _blocks(), tmp_path, HealConfig(steps=2, rank=2, batch=2, save_every=100))
    assert not any("lora" in n for n, _ in tiny.model.named_modules())
    assert {id(m) for m in tiny.model.modules()} == modules
    for key, value in tiny.model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_healing_resumes_from_its_checkpoint(tiny, tmp_path):
    bank = _bank(tiny, ["layers-25"])
    blocks = _blocks()
    full = heal_profile(bank, "layers-25", blocks, tmp_path / "a", HealConfig(steps=6, rank=2, batch=2, save_every=3))
    # a run interrupted after step 3 leaves its checkpoint; the rerun continues from there
    cfg = HealConfig(steps=6, rank=2, batch=2, save_every=3)

    class Stop(Exception):
        pass

    def interrupt(step, total, loss):
        if step == 4:
            raise Stop

    with pytest.raises(Stop):
        heal_profile(bank, "layers-25", blocks, tmp_path / "b", cfg, progress=interrupt)
    assert (tmp_path / "b" / "checkpoint.pt").is_file()
    resumed = heal_profile(bank, "layers-25", blocks, tmp_path / "b", cfg)
    assert resumed.resumed_from == 3
    assert resumed.losses[:3] == pytest.approx(full.losses[:3])
    a, b = load_adapter(full.adapter_dir), load_adapter(resumed.adapter_dir)
    for key in a.factors:
        torch.testing.assert_close(a.factors[key][1], b.factors[key][1], atol=1e-5, rtol=1e-4)


def test_adapter_order_follows_the_plan_index_lists(tiny, tmp_path):
    """Contract with channel reordering: adapter rows are in plan.ffn[layer] order."""
    bank = _bank(tiny, ["ffn-25"])
    result = heal_profile(bank, "ffn-25", _blocks(), tmp_path, HealConfig(steps=2, rank=2, batch=2, targets=["up_proj"], save_every=100))
    adapter = load_adapter(result.adapter_dir)
    plan = bank.profile("ffn-25").plan
    for j, kept in plan.ffn.items():
        a, b = adapter.factors[(j, "up_proj")]
        assert b.shape[0] == len(kept)
    # merging into a profile whose layers do not fit the adapter is refused
    with pytest.raises(CheckpointError):
        merge_adapter_into(bank.profile("none").layers[:1], plan, adapter)


def test_plan_json_round_trip_and_missing_adapter(tiny, tmp_path):
    bank = _bank(tiny, ["layers-25"])
    result = heal_profile(bank, "layers-25", _blocks(), tmp_path, HealConfig(steps=1, rank=2, batch=2, save_every=100))
    path = _healed(bank, "layers-25", result.adapter_dir).save(tmp_path / "p.json")
    plan = PruningPlan.load(path)
    stored = json.loads(path.read_text())["meta"]["adapter"]  # relative to the plan's folder: the pair can move
    assert not pathlib.Path(stored).is_absolute()
    assert (path.parent / stored).resolve() == pathlib.Path(result.adapter_dir).resolve()
    bank.add(plan)
    plan.name, plan.meta["adapter"] = "gone", str(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="not found"):
        bank.add(plan)
    with pytest.raises(CheckpointError):
        resolve_adapter("relative-and-absent")


def test_bad_healing_settings_are_one_line_errors():
    with pytest.raises(InputError):
        HealConfig(method="dora").check()
    with pytest.raises(InputError):
        HealConfig(targets=["lm_head"]).check()


@pytest.mark.parametrize("broken", ["bitsandbytes", "bitsandbytes.nn"])
def test_qlora_check_names_lora_where_bitsandbytes_cannot_run(monkeypatch, broken):
    """Where NF4 layers cannot be imported or run, the check is one line naming the way out."""
    import sys

    from casrap.errors import UnsupportedModelError
    from casrap.heal.train import check_qlora

    try:  # load the real modules first, so that the monkeypatch puts them back afterwards
        import bitsandbytes.nn  # noqa: F401
    except Exception:  # noqa: BLE001 - absent or broken here: the check must refuse all the same
        pass
    monkeypatch.setitem(sys.modules, broken, None)  # `import bitsandbytes[.nn]` raises ImportError
    with pytest.raises(UnsupportedModelError, match="--method lora") as err:
        check_qlora()
    assert "\n" not in str(err.value) and "bitsandbytes" in str(err.value)


def test_qlora_check_passes_only_where_an_nf4_layer_computes():
    """The check is not vacuous: when it passes, a bitsandbytes NF4 layer runs a forward pass here."""
    from casrap.errors import UnsupportedModelError
    from casrap.heal.train import check_qlora

    try:
        check_qlora()
    except UnsupportedModelError:
        pytest.skip("bitsandbytes NF4 does not run here (the one-line refusal is tested above)")
    from bitsandbytes.nn import Linear4bit

    layer = Linear4bit(64, 32, bias=False, quant_type="nf4", compute_dtype=torch.float32)
    layer.load_state_dict({"weight": torch.randn(32, 64)}, strict=False)
    out = layer.to("cuda" if torch.cuda.is_available() else "cpu")(torch.randn(2, 64, device=layer.weight.device))
    assert out.shape == (2, 32) and torch.isfinite(out).all()


def test_qlora_heals_on_an_nf4_base_where_bitsandbytes_runs(tiny, tmp_path):
    from casrap.errors import UnsupportedModelError
    from casrap.heal.train import check_qlora

    try:
        check_qlora()
    except UnsupportedModelError:
        pytest.skip("bitsandbytes NF4 does not run here")
    bank = _bank(tiny, ["ffn-25"])
    result = heal_profile(bank, "ffn-25", _blocks(), tmp_path, HealConfig(method="qlora", steps=2, rank=2, batch=2, save_every=100))
    bank.add(_healed(bank, "ffn-25", result.adapter_dir))  # merged into the float base
    assert bank.memory_overhead_bytes("ffn-25+heal") > 0


def test_heal_cli_writes_a_plan_every_command_accepts(tmp_path):
    """casrap heal on the tiny model, then the healed plan in bench and export (merged and not)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "OMP_NUM_THREADS": "1"}

    def run(*args):
        proc = subprocess.run([sys.executable, "-m", "casrap.cli", *args], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    data = json.loads(run("heal", "ffn-25", "-m", "tiny-random-llama", "--steps", "2", "--rank", "2", "--batch", "2",
                          "--samples", "4", "--continuations", "2", "--select", "lr=1e-2,1e-3", "--output", "out", "--json"))
    plan = data["plan"]
    assert plan.endswith("ffn-25+heal.json") and set(data["quality"]["test"]) == {"none", "ffn-25", "ffn-25+heal"}
    assert set(data["gap_recovered"]) == {"validation", "test"} and data["wall_s"] > 0
    assert data["targets"] == ["gate_proj", "up_proj", "down_proj"]  # an FFN cut adapts the MLPs only
    # the sweep kept the candidate with the lower validation perplexity, and its adapter
    assert [c["lr"] for c in data["candidates"]] == [1e-2, 1e-3]
    assert data["lr"] == min(data["candidates"], key=lambda c: c["validation_ppl"])["lr"]
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    assert PruningPlan.load(tmp_path / "out" / "ffn-25+heal.json").meta["healed_from"] == "ffn-25"
    bench = json.loads(run("bench", "-m", "tiny-random-llama", "-p", "ffn-25", "-p", plan, "--tokens", "2", "--pairs", "1",
                           "--corpus", "offline", "--ppl-max-tokens", "100", "--json"))
    assert [p["name"] for p in bench["profiles"]] == ["none", "ffn-25", "ffn-25+heal"]
    run("export", plan, "merged", "-m", "tiny-random-llama")
    run("export", plan, "unmerged", "-m", "tiny-random-llama", "--no-merge")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    bare = AutoModelForCausalLM.from_pretrained(tmp_path / "unmerged")
    unmerged = PeftModel.from_pretrained(bare, str(tmp_path / "unmerged" / "adapter")).eval()
    torch.testing.assert_close(_logits(merged), _logits(unmerged), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("train_reordered", [False, True])
def test_adapter_merges_the_same_into_a_reordered_base(tmp_path, train_reordered):
    """Zero-copy contract: adapters are stored in plan order, so a healed plan computes the same
    function whether or not the base model was reordered for zero-copy profiles, either way round."""
    from casrap.models.tiny import tiny_llama

    def bank_for(reordered):
        lm = tiny_llama()
        bank = ProfileBank(lm.model, "tiny")
        imp = weight_norm_importance(lm.model)
        if reordered:
            bank.reorder(imp)
        for spec in ("ffn-25", "heads-50"):
            plan = build_plan(spec, imp, describe(lm.model), structural=True)
            plan.fingerprint = bank.fingerprint
            bank.add(plan)
        return lm, bank

    lm, bank = bank_for(train_reordered)
    plans = []
    for spec in ("ffn-25", "heads-50"):
        result = heal_profile(bank, spec, _blocks(), tmp_path / spec, HealConfig(steps=3, rank=2, batch=2, lr=1e-2, save_every=100))
        plans.append(_healed(bank, spec, result.adapter_dir))
        bank.add(plans[-1])
    other_lm, other = bank_for(not train_reordered)
    for plan in plans:
        other.add(PruningPlan.from_dict(plan.to_dict()))
        with bank.using(plan.name):
            expected = _logits(lm.model)
        with other.using(plan.name):
            torch.testing.assert_close(_logits(other_lm.model), expected, atol=1e-4, rtol=1e-4)


def test_topk_loss_is_the_kl_of_the_coarsened_distributions():
    """With k = vocabulary it is the full KL; with small k a lower bound; zero at equality."""
    import torch.nn.functional as F

    from casrap.heal.train import topk_distill_loss

    torch.manual_seed(0)
    teacher, student = torch.randn(2, 5, 40) * 3, torch.randn(2, 5, 40)
    logp = F.log_softmax(teacher, -1)
    full = distill_loss(student, teacher, None, 0.0).item() * 1  # batchmean over 10 positions
    every = logp.topk(40, -1)
    torch.testing.assert_close(topk_distill_loss(student, every.values, every.indices).item(), full, atol=1e-4, rtol=1e-4)
    few = logp.topk(4, -1)
    assert 0 < topk_distill_loss(student, few.values, few.indices).item() < full
    assert abs(topk_distill_loss(teacher, few.values, few.indices).item()) < 1e-5


def test_teacher_targets_are_cached_per_model_and_text(tiny, casrap_home):
    from casrap.heal.data import teacher_path, teacher_targets

    blocks = _blocks(n=3, length=8)
    first = teacher_targets(tiny.model, blocks, "tiny-key", k=5)
    assert first.path == teacher_path("tiny-key", blocks, 5) and first.path.is_file()
    assert first.logprobs.shape == (3, 8, 5) and first.indices.dtype == torch.int32

    class Broken(torch.nn.Module):  # a cache hit never runs the model
        def parameters(self):
            return tiny.model.parameters()

        def forward(self, *args, **kwargs):
            raise AssertionError("teacher ran despite the cache")

    again = teacher_targets(Broken(), blocks, "tiny-key", k=5)
    assert torch.equal(again.indices, first.indices)
    assert teacher_path("tiny-key", _blocks(n=3, length=8, seed=1), 5) != first.path
    assert teacher_path("other-model", blocks, 5) != first.path


def test_cached_teacher_heals_and_targets_follow_the_profile_kind(tiny, tmp_path):
    from casrap.heal.data import teacher_targets
    from casrap.heal.train import MLP, targets_for_plan

    bank = _bank(tiny, ["ffn-25", "layers-50"])
    assert targets_for_plan(bank.profile("ffn-25").plan) == MLP
    assert set(targets_for_plan(bank.profile("layers-50").plan)) > set(MLP)
    blocks = _blocks()
    teacher = teacher_targets(tiny.model, blocks, "tiny", k=32, cache=False)
    with torch.no_grad():
        reference = tiny.model(blocks, use_cache=False).logits
        with bank.using("ffn-25"):
            before = distill_loss(tiny.model(blocks, use_cache=False).logits, reference, blocks, 0.0).item()
    result = heal_profile(bank, "ffn-25", blocks, tmp_path, HealConfig(steps=12, rank=4, lr=1e-2, batch=4, save_every=100),
                          teacher_targets=teacher)
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == set(MLP)  # an FFN cut: MLP projections only
    healed = _healed(bank, "ffn-25", result.adapter_dir)
    bank.add(healed)
    with torch.no_grad(), bank.using(healed.name):
        after = distill_loss(tiny.model(blocks, use_cache=False).logits, reference, blocks, 0.0).item()
    assert after < before


def test_select_grid_and_continuation_openings():
    from casrap.data.calibration import calibration_corpus
    from casrap.heal.data import continuation_prefixes
    from casrap.heal.evaluate import parse_select

    assert parse_select("lr=1e-3,3e-3; steps=50,100") == {"lr": [1e-3, 3e-3], "steps": [50.0, 100.0]}
    assert parse_select(None) == {}
    for bad in ("lr", "rank=4", "lr=a", "steps=0"):
        with pytest.raises(InputError):
            parse_select(bad)
    paragraphs = calibration_corpus().paragraphs()
    openings = continuation_prefixes(paragraphs, 40)
    assert len(openings) == 40 and len(set(openings)) > 16  # more contexts than paragraph openings
    text = " ".join(" ".join(p.split()) for p in paragraphs)
    assert all(o in text for o in openings)  # calibration text only


def test_a_resume_checkpoint_is_read_without_running_code(tmp_path):
    """Resuming uses torch.load(weights_only=True): a checkpoint holding an arbitrary object is
    ignored (healing starts over), a plain one is read."""
    from casrap.heal.train import _read_checkpoint

    torch.save({"step": 3, "losses": [1.0, 0.5], "lora": {"w": torch.ones(2)}, "settings": {"targets": ["q_proj"]}}, tmp_path / "plain.pt")
    assert _read_checkpoint(tmp_path / "plain.pt")["step"] == 3
    torch.save({"step": 3, "payload": _Payload()}, tmp_path / "object.pt")
    assert _read_checkpoint(tmp_path / "object.pt") is None


class _Payload:
    """Stands for any pickled object a checkpoint file should not be able to carry."""


def test_heal_writes_a_relative_pinned_adapter_path_and_the_folder_moves(tiny, tmp_path):
    import shutil

    from casrap.heal.runner import heal
    from casrap.profiles.adapter import DIGEST_KEY, adapter_digest, plan_adapter_path

    bank = _bank(tiny, ["layers-25"])
    cfg = HealConfig(steps=1, rank=2, batch=2, samples=4, continuations=2, sample_tokens=8, save_every=100)
    report = heal(tiny, bank, "layers-25", cfg, tmp_path / "out", evaluate=False)
    saved = json.loads(report.plan_path.read_text())
    assert saved["meta"]["adapter"] == "adapter"
    assert saved["meta"][DIGEST_KEY] == adapter_digest(tmp_path / "out" / "adapter")
    shutil.move(str(tmp_path / "out"), str(tmp_path / "moved"))
    plan = PruningPlan.load(tmp_path / "moved" / report.plan_path.name)
    assert plan_adapter_path(plan) == tmp_path / "moved" / "adapter"
    bank.add(plan)


def test_sampling_resumes_from_its_partial_file(tiny, tmp_path):
    """An interrupted sampling run continues after its last batch and ends with the
    samples an uninterrupted run gives (each batch has its own seed)."""
    from casrap.heal.data import sample_answers

    prompts = [f"prompt number {i}" for i in range(6)]
    whole = sample_answers(tiny.model, tiny.tokenizer, prompts, new_tokens=4, batch=2, seed=3, chat=False)
    partial = tmp_path / "samples.partial"
    calls = []

    def stop_after_two(done, total):
        calls.append(done)
        if done == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sample_answers(tiny.model, tiny.tokenizer, prompts, new_tokens=4, batch=2, seed=3, chat=False, partial=partial, progress=stop_after_two)
    assert len(json.loads(partial.read_text())["answers"]) == 4
    resumed = sample_answers(tiny.model, tiny.tokenizer, prompts, new_tokens=4, batch=2, seed=3, chat=False, partial=partial,
                             progress=lambda done, total: calls.append(done))
    assert calls == [2, 4, 6] and resumed == whole


def test_a_shipped_healed_plan_is_added_for_comparison(tiny, tmp_path, monkeypatch):
    """The adapter already shipped for a profile is evaluated beside the new candidates
    (so --ship replaces it only when the new one is better on validation); a plan that
    ships for another model is skipped."""
    from casrap.heal import evaluate
    from casrap.profiles import shipped

    bank = _bank(tiny, ["layers-25"])
    result = heal_profile(bank, "layers-25", _blocks(), tmp_path, HealConfig(steps=1, rank=2, batch=2, save_every=100))
    healed = _healed(bank, "layers-25", result.adapter_dir)
    monkeypatch.setattr(shipped, "is_shipped", lambda name: name == "layers-25+heal")
    monkeypatch.setattr(shipped, "load_shipped", lambda name, fingerprint=None, spec="": PruningPlan.from_dict(healed.to_dict()))
    assert evaluate._shipped_healed(bank, "layers-25+heal") == "shipped:layers-25+heal"
    assert "shipped:layers-25+heal" in bank.names
    assert evaluate._shipped_healed(bank, "ffn-25+heal") is None

    def other_model(name, fingerprint=None, spec=""):
        raise CheckpointError("made for another model")

    monkeypatch.setattr(shipped, "load_shipped", other_model)
    assert evaluate._shipped_healed(bank, "layers-25+heal") is None
