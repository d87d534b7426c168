"""Runtime: policy bundles, the router's decision path, AdaptiveLM, ``casrap generate`` (tiny model)."""

from __future__ import annotations

import json
import shutil
import threading

import pytest
import torch
from runtime_helpers import TINY_PROFILES, BudgetPolicy, ConcurrencyProbe, make_tiny_bundle, tiny_bank

from casrap.errors import CheckpointError, InputError
from casrap.runtime.adaptive import AdaptiveLM
from casrap.decide.defaults import RuntimeDefaults
from casrap.runtime.bundle import load_bundle
from casrap.decide.latency_model import LatencyFit, UnloadedLatencyModel
from casrap.decide.observation import OBSERVATION_FEATURES
from casrap.decide.slowdown import SlowdownTracker, slowdown_feature

TARGET = OBSERVATION_FEATURES.index("latency_target")
from casrap.decide.router import Router
from casrap.telemetry import FakeTelemetry

PROMPT = "What is the capital of France?"


@pytest.fixture()
def bundle_dir(tiny, tmp_path):
    return make_tiny_bundle(tiny, tmp_path / "bundle")[0]


def _adaptive(lm, policy=None, defaults=None):
    bank = tiny_bank(lm)
    policy = policy or BudgetPolicy(len(bank.names))
    router = Router(bank, lm.tokenizer, policy, defaults or RuntimeDefaults(max_new_tokens=6), telemetry=FakeTelemetry(0))
    return AdaptiveLM(router, lm.tokenizer, "tiny-random-llama"), policy


# ------------------------------------------------------------------- bundles
def test_bundle_rebuilds_the_exact_plans_and_outputs(tiny, tmp_path):
    path, original = make_tiny_bundle(tiny, tmp_path / "b")
    checked = load_bundle(path)
    assert checked.actions == list(TINY_PROFILES)
    for plan in checked.plans:
        assert plan.to_dict() == original.profile(plan.name).plan.to_dict()
    # a second, fresh model with the same weights: the bundle's bank runs exactly what the original ran
    from casrap.models.tiny import tiny_llama

    other = tiny_llama()
    bank = checked.build_bank(other.model)
    ids = tiny.tokenizer(PROMPT, return_tensors="pt").input_ids
    for name in TINY_PROFILES:
        with original.using(name), bank.using(name):
            torch.testing.assert_close(other.model(ids).logits, tiny.model(ids).logits, rtol=0, atol=0)


def test_bundle_refuses_another_model(bundle_dir):
    from casrap.models.tiny import tiny_llama

    with pytest.raises(CheckpointError, match="fingerprint") as err:
        AdaptiveLM.load(bundle_dir, model=tiny_llama(seed=1), telemetry=FakeTelemetry(0))
    assert "\n" not in str(err.value)


def test_bundle_refuses_a_policy_with_other_actions(tiny, bundle_dir, tmp_path):
    smaller, _ = make_tiny_bundle(tiny, tmp_path / "two", profiles=("none", "layers-25"))
    shutil.copyfile(smaller / "policy.zip", bundle_dir / "policy.zip")
    with pytest.raises(CheckpointError, match="2 actions"):
        load_bundle(bundle_dir).load_policy()


def test_bundle_refuses_other_observation_spec_and_tampered_plans(bundle_dir):
    manifest = json.loads((bundle_dir / "bundle.json").read_text())
    features = list(manifest["observation"]["features"])
    manifest["observation"]["features"] = features[:-1]
    (bundle_dir / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="observation spec"):
        load_bundle(bundle_dir)
    manifest["observation"]["features"] = features
    manifest["actions"] = list(reversed(manifest["actions"]))
    (bundle_dir / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="differ from actions"):
        load_bundle(bundle_dir)


def test_missing_bundle_is_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="no policy bundle"):
        load_bundle(tmp_path / "nothing")


# -------------------------------------------------------------------- router
def test_budget_feature_follows_target_queue_and_wait(tiny):
    adaptive, _ = _adaptive(tiny)
    router = adaptive.router
    router._unloaded = UnloadedLatencyModel(LatencyFit(0.1, 0.0, 0.1, 0.0))  # 10 new tokens predicted at 1.0 s unloaded
    router.telemetry = FakeTelemetry(5)  # whatever the load reads, the target is normalised by the *unloaded* prediction
    ample = router.decide(PROMPT, 10, 10, target_s=2.0)  # ratio 2
    assert ample.budget_ratio == pytest.approx(2.0) and ample.profile == "none"
    tight = router.decide(PROMPT, 10, 10, target_s=0.5)
    assert tight.budget_ratio == pytest.approx(0.5) and tight.profile == TINY_PROFILES[-1]
    queued = router.decide(PROMPT, 10, 10, target_s=2.0, queue_length=2, waited_s=0.5)
    assert queued.budget_ratio == pytest.approx(1.5 / 2.0)  # (2.0 - 0.5) / (1 + 0.5 * 2) / 1.0
    default = router.decide(PROMPT, 10, 10)
    assert default.budget_ratio == router.defaults.budget_ratio and default.rule == "no-target"
    router.defaults.full_when_ample = False  # asked, the policy sees the default ratio in the target slot
    asked = router.decide(PROMPT, 10, 10)
    assert asked.observation[TARGET] == pytest.approx(min(1.0, router.defaults.budget_ratio / 4))


class _Always:
    """A policy that always answers with one action (to see when the Router asks it at all)."""

    def __init__(self, action: int) -> None:
        self.action, self.calls = action, 0

    def predict(self, obs, deterministic=True):
        self.calls += 1
        return self.action, None


def test_full_model_answers_without_policy_when_budget_is_ample_and_machine_idle(tiny):
    adaptive, _ = _adaptive(tiny)
    router = adaptive.router
    router.policy = _Always(len(router.actions) - 1)  # a policy that would always prune
    router._unloaded = UnloadedLatencyModel(LatencyFit(0.1, 0.0, 0.1, 0.0))
    router.telemetry = FakeTelemetry(5)
    router.slowdown.observe("none", router.slowdown.unloaded_step_s, now=router.clock())  # measured: unloaded speed
    no_target = router.decide(PROMPT, 10, 10)
    assert no_target.profile == "none" and no_target.rule == "no-target" and router.policy.calls == 0
    far_above = router.decide(PROMPT, 10, 10, target_s=100.0)  # 100x the unloaded estimate, past the trained range
    assert far_above.profile == "none" and far_above.rule == "ample-budget"
    at_edge = router.decide(PROMPT, 10, 10, target_s=1.0)  # exactly the unloaded estimate
    assert at_edge.profile == "none" and at_edge.rule == "ample-budget" and router.policy.calls == 0
    tight = router.decide(PROMPT, 10, 10, target_s=0.5)
    assert tight.rule == "" and tight.profile == router.actions[-1] and router.policy.calls == 1
    router.slowdown.observe("none", 3 * router.slowdown.unloaded_step_s, now=router.clock(), reset=True)  # casrap runs 3x slow
    loaded = router.decide(PROMPT, 10, 10, target_s=2.0)  # ample only if the machine were idle: the policy decides
    assert loaded.rule == "" and router.policy.calls == 2
    router.defaults.full_when_ample = False
    router.decide(PROMPT, 10, 10)
    assert router.policy.calls == 3


def test_router_sets_threads_from_telemetry_for_policy_and_fixed_decisions(tiny):
    import torch

    from casrap.telemetry.threads import ThreadPolicy

    adaptive, _ = _adaptive(tiny)
    router = adaptive.router
    router._unloaded = UnloadedLatencyModel(LatencyFit(0.1, 0.0, 0.1, 0.0))
    router.threads = ThreadPolicy(machine_cores=4, available=4)
    before = torch.get_num_threads()
    try:
        router.telemetry = _Reading(other_cpu_util=50.0)  # two of four cores busy elsewhere
        d = router.decide(PROMPT, 10, 10, target_s=0.5)
        assert d.threads == 2 == torch.get_num_threads()
        assert d.observation[OBSERVATION_FEATURES.index("threads")] == pytest.approx(0.5)
        router.telemetry = _Reading(other_cpu_util=0.0)
        ids = adaptive.encode(PROMPT, 4)
        fixed = router.fixed_decision("none", ids, 4)
        assert fixed.threads == 4 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


class _Reading:
    """Telemetry that always reads the same (only what the thread rule looks at)."""

    def __init__(self, other_cpu_util: float, run_queue: float = 0.0) -> None:
        from casrap.telemetry.live import TelemetryReading

        self.reading = TelemetryReading(cpu_util=0.0, mem_available_gb=8.0, gpu_util=0.0, vram_free_gb=0.0, battery=100.0,
                                        mem_total_gb=16.0, vram_total_gb=0.0, other_cpu_util=other_cpu_util,
                                        run_queue=run_queue, mem_pressure=0.0, on_battery=0.0)

    def read(self):
        return self.reading


def test_router_observation_is_the_envs(tiny):
    """The router feeds the policy the same vector the environment would build."""
    from casrap.decide.analysis import PromptAnalyzer
    from casrap.decide.observation import observation_vector

    adaptive, policy = _adaptive(tiny)
    adaptive.router._unloaded = UnloadedLatencyModel(LatencyFit(0.1, 0.0, 0.1, 0.0))
    adaptive.router.telemetry = FakeTelemetry(3)
    adaptive.router.defaults.full_when_ample = False  # always ask the policy
    decision = adaptive.choose(PROMPT, max_new_tokens=10, latency_target_s=1.0)
    r = FakeTelemetry(3).read()
    f = PromptAnalyzer(tiny.model, tiny.tokenizer, max_tokens=64).analyze(PROMPT)
    share = decision.threads / adaptive.router.threads.available
    expected = observation_vector(r, decision.prompt_tokens, f.ppl, 1.0, slowdown=decision.slowdown, thread_share=share)
    assert decision.prompt_tokens > f.tokens  # the token feature counts the templated prompt, the analysis reads the text
    assert policy.seen[-1].tolist() == pytest.approx(expected.tolist(), abs=1e-4)  # budget less the (tiny) queue wait


def test_slowdown_normalises_each_profile_by_its_unloaded_speed_and_smooths():
    tracker = SlowdownTracker(unloaded_step_s=0.1, speed={"fast": 2.0}, alpha=0.5)
    assert tracker.is_stale(0.0)
    assert tracker.observe("fast", 0.05, now=1.0) == pytest.approx(1.0)  # a 2x profile at 0.05 s/step is unloaded speed
    assert tracker.observe("none", 0.3, now=2.0) == pytest.approx(2.0)  # 3x slow, averaged with the 1x before
    assert tracker.observe("none", 0.4, now=3.0, reset=True) == pytest.approx(4.0)  # a probe replaces the average
    assert not tracker.is_stale(3.0 + tracker.stale_after_s - 1) and tracker.is_stale(3.0 + tracker.stale_after_s + 1)
    assert slowdown_feature(1.0) == 0.0 and slowdown_feature(4.0) == pytest.approx(0.5) and slowdown_feature(1e6) == 1.0


# ---------------------------------------------------------------- AdaptiveLM
def test_generate_records_profile_and_restores_full_model(tiny):
    adaptive, _ = _adaptive(tiny)
    adaptive.router._unloaded = UnloadedLatencyModel(LatencyFit(10.0, 0.0, 10.0, 0.0))  # any target is tight
    result = adaptive.generate(PROMPT, max_new_tokens=5, latency_target_s=1.0)
    rec = result.record
    assert rec.profile == TINY_PROFILES[-1]
    assert rec.completion_tokens == len(result.token_ids) <= 5
    assert rec.target_met is not None and rec.latency_s >= rec.generation_s
    assert adaptive.router.bank.active == "none"
    assert len(tiny.model.model.layers) == 4


def test_forced_profile_output_matches_the_bank(tiny):
    adaptive, _ = _adaptive(tiny)
    result = adaptive.generate(PROMPT, max_new_tokens=6, profile="layers-25", ignore_eos=True)
    ids = adaptive.encode(PROMPT, 6)
    with adaptive.router.bank.using("layers-25"):
        expected = tiny.model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, eos_token_id=None,
                                       pad_token_id=tiny.tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
    assert result.token_ids == expected and result.record.profile == "layers-25"


def test_stream_yields_the_same_text_as_plain(tiny):
    adaptive, _ = _adaptive(tiny)
    plain = adaptive.generate(PROMPT, max_new_tokens=8, ignore_eos=True)
    stream = adaptive.generate(PROMPT, max_new_tokens=8, ignore_eos=True, stream=True)
    pieces = list(stream)
    assert "".join(pieces) == plain.text
    assert stream.record.profile == plain.record.profile


def test_one_request_at_a_time_on_the_bank_without_batching(tiny):
    from casrap.decide.batching import BatchConfig

    adaptive, _ = _adaptive(tiny)
    adaptive = AdaptiveLM(adaptive.router, tiny.tokenizer, "tiny-random-llama", batching=BatchConfig(max_batch=1))
    probe = ConcurrencyProbe(adaptive.router)
    results = []
    threads = [threading.Thread(target=lambda: results.append(adaptive.generate(PROMPT, max_new_tokens=4))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and probe.peak == 1
    assert adaptive.queue_length == 0


@pytest.mark.parametrize("prompt,tokens,match", [("   ", 4, "empty"), ([], 4, "empty"), (PROMPT, 0, "at least 1"),
                                                   ("word " * 5000, 4, "context window")])
def test_bad_requests_are_one_line_input_errors(tiny, prompt, tokens, match):
    adaptive, _ = _adaptive(tiny)
    with pytest.raises(InputError, match=match):
        adaptive.generate(prompt, max_new_tokens=tokens)


def test_chat_messages_use_the_chat_template(tiny):
    adaptive, _ = _adaptive(tiny)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]
    ids = adaptive.encode(messages, 4)
    expected = tiny.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    expected = expected if torch.is_tensor(expected) else expected["input_ids"]  # a tensor before transformers 5
    assert ids.shape[-1] == expected.shape[-1]


# ----------------------------------------------------------------------- CLI
def test_cli_generate_json_with_a_bundle(bundle_dir):
    from typer.testing import CliRunner

    from casrap.cli import app

    result = CliRunner().invoke(app, ["generate", PROMPT, "--bundle", str(bundle_dir), "--model", "tiny-random-llama",
                                      "--max-new-tokens", "4", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["casrap"]["profile"] in TINY_PROFILES and data["casrap"]["completion_tokens"] <= 4


def test_cli_generate_mismatch_is_one_line(tmp_path, bundle_dir):
    import subprocess
    import sys

    manifest = json.loads((bundle_dir / "bundle.json").read_text())
    manifest["model"]["fingerprint"] = "llama-4L-000000000000"
    for f in manifest["plans"]:
        plan = json.loads((bundle_dir / f).read_text())
        plan["fingerprint"] = "llama-4L-000000000000"
        (bundle_dir / f).write_text(json.dumps(plan))
    (bundle_dir / "bundle.json").write_text(json.dumps(manifest))
    proc = subprocess.run([sys.executable, "-m", "casrap.cli", "generate", PROMPT, "--bundle", str(bundle_dir), "--model",
                           "tiny-random-llama"], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "fingerprint" in proc.stderr


# ------------------------------------------------------------------ loadtest
def test_loadtest_in_process_compares_policy_full_and_statics(tiny):
    from casrap.runtime.loadtest import POLICY, LoadTestConfig, run_loadtest

    adaptive, _ = _adaptive(tiny)
    streamed = []
    result = run_loadtest(adaptive, LoadTestConfig(prompts=2, max_new_tokens=3, background_load=0.0), on_request=streamed.append)
    assert streamed == result.requests  # each request reaches the caller as it is measured
    assert [r.name for r in result.rows] == [POLICY, *TINY_PROFILES]
    assert all(r.n == 2 for r in result.rows)
    assert result.row("none").mean_kl == 0.0
    for name in TINY_PROFILES:
        assert result.row(name).profiles == {name: 2}
        assert all(r["overhead_s"] >= 0 for r in result.requests if r["runner"] == name)  # the switch only
    assert result.row(POLICY).overhead_share > 0.0
    policy_requests = [r for r in result.requests if r["runner"] == POLICY]
    static_kl = {(r["prompt_id"], r["runner"]): r["kl"] for r in result.requests if r["runner"] != POLICY}
    assert all(r["kl"] == static_kl[(r["prompt_id"], r["profile"])] for r in policy_requests)
    assert any("targets" in note for note in result.notes)


def test_layer_plans_restored_exactly_as_recorded(tiny):
    from casrap.runtime.provenance import rebuild_with, recorded_layer_plans

    bank = tiny_bank(tiny)
    built = bank.profile("layers-25").plan.skip_layers
    other = [i for i in range(4) if i not in built][:1]
    restored = recorded_layer_plans(bank, {"layers-25": f"1/4 layers skipped: {other}", "ffn-25": "whatever"})
    assert list(restored) == ["layers-25"] and restored["layers-25"].skip_layers == other
    fresh = rebuild_with(bank, restored)
    assert fresh.names == bank.names and fresh.profile("layers-25").plan.skip_layers == other
    assert recorded_layer_plans(fresh, {"layers-25": f"1/4 layers skipped: {other}"}) == {}


def test_cli_bundle_packages_a_checkpoint_and_generate_streams(tmp_path):
    from runtime_helpers import SpacesEnv
    from typer.testing import CliRunner

    from casrap.agents.double_dqn import DoubleDQN
    from casrap.cli import app

    checkpoint = tmp_path / "policy.zip"
    DoubleDQN("MlpPolicy", SpacesEnv(3), seed=0, device="cpu", buffer_size=10).save(str(checkpoint))
    checkpoint.with_suffix(".state.json").write_text(json.dumps({"profiles": list(TINY_PROFILES), "reward": "slo"}))
    runner = CliRunner()
    made = runner.invoke(app, ["bundle", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "b"), "--model", "tiny-random-llama", "--json"])
    assert made.exit_code == 0, made.output
    checked = load_bundle(tmp_path / "b")
    assert checked.actions == list(TINY_PROFILES) and checked.manifest["reward"] == {"reward": "slo"}
    streamed = runner.invoke(app, ["generate", PROMPT, "--bundle", str(tmp_path / "b"), "--model", "tiny-random-llama", "-n", "3", "--stream"])
    assert streamed.exit_code == 0, streamed.output
    assert "profile " in streamed.output


def test_live_train_writes_a_bundle_that_runs(tiny, tmp_path):
    from typer.testing import CliRunner

    from casrap.cli import app
    from casrap.runtime.bundle import bundle_dir_for

    checkpoint = tmp_path / "policy.zip"
    result = CliRunner().invoke(app, ["train", "--model", "tiny-random-llama", "--episodes", "2", "--max-new-tokens", "2",
                                      "-p", "none", "-p", "layers-25", "--checkpoint", str(checkpoint),
                                      "--reports", str(tmp_path / "reports"), "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["bundle"] == str(bundle_dir_for(checkpoint))
    adaptive = AdaptiveLM.load(bundle_dir_for(checkpoint), model=tiny, telemetry=FakeTelemetry(0), warmup_tokens=0)
    assert adaptive.profiles == ["none", "layers-25"]
    assert adaptive.generate(PROMPT, max_new_tokens=2).record.profile in adaptive.profiles


def test_kv_compression_profiles_generate_through_the_router(tiny):
    from casrap.decide.router import Router
    from casrap.profiles.factory import build_bank

    bank = build_bank(tiny.model, ["none", "kv-50"], base_model="tiny", tokenizer=tiny.tokenizer)
    router = Router(bank, tiny.tokenizer, None, telemetry=FakeTelemetry(0), unloaded=UnloadedLatencyModel(LatencyFit(0.01, 0.0, 0.001, 0.0)))
    ids = tiny.tokenizer("hello world " * 40, return_tensors="pt").input_ids
    full = router.run(router.fixed_decision("none", ids, 5), ids, 5, ignore_eos=True).output
    kept = router.run(router.fixed_decision("kv-50", ids, 5), ids, 5, ignore_eos=True).output
    assert len(kept.token_ids) == 5 and len(kept.decode_steps_s) == 4 and kept.ttft_s > 0
    assert kept.token_ids != full.token_ids  # half the prompt's cache is gone: a different model of the text
    assert bank.active == "none"
    text = kept.text
    stop = text[len(text) // 2: len(text) // 2 + 2] if len(text) > 3 else text
    stopped = router.run(router.fixed_decision("kv-50", ids, 5), ids, 5, ignore_eos=True, stop=[stop]).output
    assert stopped.finish_reason == "stop" and stop not in stopped.text  # the compressed-KV path honours stop strings


class _Switching:
    """Telemetry whose other-process load turns on after ``after`` reads (mid-request)."""

    def __init__(self, after: int) -> None:
        self.after, self.reads = after, 0

    def read(self):
        self.reads += 1
        return _Reading(other_cpu_util=50.0 if self.reads > self.after else 0.0).reading


def test_the_router_governs_threads_during_a_request_and_reports_the_changes(tiny):
    from casrap.telemetry.threads import GovernorConfig, ThreadPolicy

    bank = tiny_bank(tiny)
    before = torch.get_num_threads()
    router = Router(bank, tiny.tokenizer, None, telemetry=_Switching(after=2), threads=ThreadPolicy(machine_cores=2, available=2),
                    unloaded=UnloadedLatencyModel(LatencyFit(0.01, 0.0, 0.001, 0.0)), probe=False,
                    governor=GovernorConfig(check_every=2, slow_factor=1e9))
    try:
        ids = tiny.tokenizer(PROMPT, return_tensors="pt").input_ids
        decision = router.fixed_decision("none", ids, 8)  # read 1: idle -> two threads
        assert decision.threads == 2
        routed = router.run(decision, ids, 8, ignore_eos=True)  # read 2 at step 2 idle, read 3 at step 4 busy
        assert [(c.before, c.after, c.reason) for c in routed.thread_changes] == [(2, 1, "telemetry")]
        assert routed.thread_changes[0].step == 3 and torch.get_num_threads() == 1
        assert len(routed.output.token_ids) == 8
    finally:
        torch.set_num_threads(before)


def test_a_rule_decision_skips_the_prompt_analysis_and_the_policy(tiny):
    adaptive, policy = _adaptive(tiny)
    router = adaptive.router
    analysed = []
    original = router.analyzer.analyze
    router.analyzer.analyze = lambda text, ids=None: analysed.append(text) or original(text, ids)
    decision = router.decide(PROMPT, 10, 10, target_s=None)
    assert decision.rule == "no-target" and decision.profile == "none"
    assert analysed == [] and decision.analysis_s == 0 and decision.observation == []
    assert router._slowdown is None  # no probe, no latency model measured for a request without a target
    router._unloaded = UnloadedLatencyModel(LatencyFit(0.1, 0.0, 0.1, 0.0))
    router.defaults.full_when_ample = False
    asked = router.decide(PROMPT, 10, 10, target_s=0.5)
    assert analysed == [PROMPT] and asked.rule == "" and len(asked.observation) == len(OBSERVATION_FEATURES)


# ------------------------------------------------------- one generation contract
def test_adaptive_masks_a_prompt_lookup_choice_for_a_logprobs_request_before_generating(tiny):
    from casrap.models.architecture import describe
    from casrap.profiles.bank import ProfileBank
    from casrap.profiles.catalogue import build_plan

    bank = ProfileBank(tiny.model, base_model="tiny")
    bank.add(build_plan("pld-4", None, describe(tiny.model), base_model="tiny"))
    picks = BudgetPolicy(len(bank.names), threshold=2.0)  # always the last action: pld-4
    router = Router(bank, tiny.tokenizer, picks, RuntimeDefaults(max_new_tokens=4), telemetry=FakeTelemetry(0), probe=False,
                    unloaded=UnloadedLatencyModel(LatencyFit(10.0, 0.0, 10.0, 0.0)))  # every target is tight
    adaptive = AdaptiveLM(router, tiny.tokenizer, "tiny-random-llama")
    plain = adaptive.generate(PROMPT, max_new_tokens=4, latency_target_s=1.0)
    assert plain.record.profile == "pld-4"
    with_logprobs = adaptive.generate(PROMPT, max_new_tokens=4, latency_target_s=1.0, logprobs=0)  # pld cannot: masked
    assert with_logprobs.record.profile == "none" and with_logprobs.logprobs is not None
    assert len(with_logprobs.logprobs) == len(with_logprobs.token_ids)
