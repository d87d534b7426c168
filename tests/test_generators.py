"""One generation contract: every profile kind's generator honours the same request options, or the Router masks it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from casrap.decide.generation import Cancellation, generate_timed
from casrap.decide.generators import COMPRESSED_KV, DENSE, PROMPT_LOOKUP, generator_for, requested
from casrap.decide.kv_generation import generate_timed_kv
from casrap.decide.latency_model import LatencyFit, UnloadedLatencyModel
from casrap.decide.router import Router
from casrap.errors import InputError
from casrap.models.architecture import describe
from casrap.profiles.bank import ProfileBank
from casrap.profiles.catalogue import FULL, build_plan, parse_spec
from casrap.telemetry import FakeTelemetry

REPEATING = "the cat sat on the mat and the cat sat on the mat and the cat sat on the mat " * 3


def _bank(lm, specs=("pld-4",)):
    """A bank of importance-free kinds (no calibration needed)."""
    bank = ProfileBank(lm.model, base_model="tiny")
    for spec in specs:
        bank.add(build_plan(spec, None, describe(lm.model), base_model="tiny"))
    return bank


def _ids(lm, text=REPEATING):
    return lm.tokenizer(text, return_tensors="pt").input_ids


def test_pld_spec_parses_and_builds_a_full_model_plan(tiny):
    assert parse_spec("pld-10") == ("pld", 10.0)
    with pytest.raises(InputError):
        parse_spec("pld-0")
    bank = _bank(tiny, ("pld-4", "kv-50"))
    assert bank.profile("pld-4").layers is bank.profile(FULL).layers  # the full model's own weights
    assert generator_for(bank.profile("pld-4").plan).kind == PROMPT_LOOKUP
    assert generator_for(bank.profile("kv-50").plan).kind == COMPRESSED_KV
    assert generator_for(bank.profile(FULL).plan).kind == DENSE


@pytest.mark.skipif(int(__import__("transformers").__version__.split(".")[0]) < 5,
                    reason="transformers < 5: prompt lookup needs an EOS id, and the tiny random model has none")
def test_pld_greedy_answer_equals_the_dense_greedy_answer(tiny):
    bank = _bank(tiny)
    router = Router(bank, tiny.tokenizer, None, telemetry=FakeTelemetry(0), probe=False)
    ids = _ids(tiny)
    dense = router.run(router.fixed_decision(FULL, ids, 24), ids, 24, ignore_eos=True).output
    steps: list[float] = []
    router.governor.step = steps.append  # the thread governor's hook: once per forward pass
    lookup = router.run(router.fixed_decision("pld-4", ids, 24), ids, 24, ignore_eos=True).output
    assert lookup.token_ids == dense.token_ids and lookup.text == dense.text
    assert len(steps) == len(lookup.decode_steps_s) >= 1
    assert len(lookup.decode_steps_s) < len(dense.decode_steps_s)  # drafts were accepted: fewer passes than tokens
    assert bank.active == FULL


def test_pld_refuses_logprobs_before_anything_runs(tiny):
    bank = _bank(tiny)
    router = Router(bank, tiny.tokenizer, None, telemetry=FakeTelemetry(0), probe=False)
    ids = _ids(tiny)
    with pytest.raises(InputError, match="does not support logprobs"):
        router.run(router.fixed_decision("pld-4", ids, 4), ids, 4, logprobs=0)
    assert bank.active == FULL
    assert router.allowed({"logprobs": 0}) == [True, False]
    assert router.allowed({"logprobs": None, "stop": []}) == [True, True]  # options left at their defaults ask for nothing
    assert requested({"logprobs": 0, "temperature": 1.0, "stop": [], "seed": 3}) == {"logprobs", "seed"}


def test_compressed_kv_request_is_cancelled_within_one_decode_step(tiny):
    ids = _ids(tiny, "hello world " * 40)
    cancel = Cancellation()
    seen: list[int] = []

    def on_step(piece):
        seen.append(piece.tokens)
        if piece.tokens == 3:
            cancel.cancel()

    out = generate_timed_kv(tiny.model, tiny.tokenizer, ids, 20, keep_ratio=0.5, ignore_eos=True, cancel=cancel, on_step=on_step)
    assert out.finish_reason == "cancelled" and len(out.token_ids) == 3 and out.cancel_to_stop_s is not None
    assert seen[:3] == [1, 2, 3]


def test_compressed_kv_request_stops_on_every_end_id_of_the_generation_config(tiny):
    ids = _ids(tiny, "hello world " * 40)
    free = generate_timed_kv(tiny.model, tiny.tokenizer, ids, 8, keep_ratio=0.5, ignore_eos=True).token_ids
    config = tiny.model.generation_config
    saved = config.eos_token_id
    try:
        for k in range(1, 8):
            if free[k] in free[:k]:
                continue  # an end id seen earlier would stop earlier
            unused = next(t for t in range(int(tiny.model.config.vocab_size)) if t not in free)
            for ends in ([unused, free[k]], [free[k], unused]):  # first or later in the list: both end the turn
                config.eos_token_id = ends
                out = generate_timed_kv(tiny.model, tiny.tokenizer, ids, 8, keep_ratio=0.5)
                assert out.token_ids == free[:k] and out.finish_reason == "stop"
                assert len(out.decode_steps_s) == k  # it stopped at the end id, not at max_new_tokens
    finally:
        config.eos_token_id = saved


def test_compressed_kv_honours_logprobs_and_seeded_sampling(tiny):
    ids = _ids(tiny, "hello world " * 40)
    out = generate_timed_kv(tiny.model, tiny.tokenizer, ids, 5, keep_ratio=0.5, ignore_eos=True, logprobs=2)
    assert out.logprobs is not None and len(out.logprobs) == 5 and all(len(t.top) == 2 for t in out.logprobs)
    assert [t.token_id for t in out.logprobs] == out.token_ids
    a = generate_timed_kv(tiny.model, tiny.tokenizer, ids, 6, keep_ratio=0.5, ignore_eos=True, do_sample=True, seed=7)
    b = generate_timed_kv(tiny.model, tiny.tokenizer, ids, 6, keep_ratio=0.5, ignore_eos=True, do_sample=True, seed=7)
    assert a.token_ids == b.token_ids


def test_compressed_kv_at_keep_one_gives_the_dense_tokens_with_every_option(tiny):
    ids = _ids(tiny, "hello world " * 10)
    options = {"presence_penalty": 0.5, "logit_bias": {5: 2.0}}
    dense = generate_timed(tiny.model, tiny.tokenizer, ids, 6, ignore_eos=True, **options)
    kept = generate_timed_kv(tiny.model, tiny.tokenizer, ids, 6, keep_ratio=1.0, ignore_eos=True, **options)
    assert kept.token_ids == dense.token_ids


class _Always:
    """A policy that always picks one action."""

    def __init__(self, action: int) -> None:
        self.action = action

    def predict(self, obs, deterministic=True):
        return self.action, None


class _QPolicy(_Always):
    """A DQN-shaped policy: ``q_net`` and ``policy.obs_to_tensor``, Q-values fixed per action."""

    def __init__(self, action: int, q: list[float]) -> None:
        super().__init__(action)
        self.q_net = lambda tensor: torch.tensor([q])
        self.policy = type("Inner", (), {"obs_to_tensor": staticmethod(lambda obs: (torch.as_tensor(obs)[None], True))})()


def _tight_router(bank, lm, policy):
    """A router for which every target is tight: the policy decides (no full-model rule)."""
    return Router(bank, lm.tokenizer, policy, telemetry=FakeTelemetry(0), probe=False,
                  unloaded=UnloadedLatencyModel(LatencyFit(10.0, 0.0, 10.0, 0.0)))


def test_masking_replaces_a_disallowed_choice_by_the_nearest_allowed_faster_profile(tiny):
    bank = _bank(tiny, ("pld-4",))
    router = _tight_router(bank, tiny, _Always(bank.names.index("pld-4")))
    ids = _ids(tiny, "hello there")
    free = router.decide("hello there", int(ids.shape[-1]), 4, target_s=1.0)
    assert free.profile == "pld-4" and free.masked_from == ""
    masked = router.decide("hello there", int(ids.shape[-1]), 4, target_s=1.0, options={"logprobs": 0})
    assert masked.masked_from == "pld-4" and masked.profile == FULL  # same speed as pld-4's weights: the nearest
    routed = router.run(masked, ids, 4, logprobs=0)
    assert routed.output.logprobs is not None and len(routed.output.logprobs) == len(routed.output.token_ids)


def test_masking_uses_the_policys_q_values_when_it_has_them(tiny):
    bank = _bank(tiny, ("pld-4", "kv-50"))
    q = [0.1, 5.0, 0.7]  # pld-4 best, then kv-50
    router = _tight_router(bank, tiny, _QPolicy(bank.names.index("pld-4"), q))
    decision = router.decide("hello there", 3, 4, target_s=1.0, options={"logprobs": 1})
    assert decision.masked_from == "pld-4" and decision.profile == "kv-50"


def test_replace_disallowed_falls_back_to_the_fastest_allowed_when_none_is_faster(tiny):
    bank = _bank(tiny, ("pld-4",))
    router = _tight_router(bank, tiny, None)
    router.defaults.profile_speed = {FULL: 1.0, "pld-4": 2.0}
    assert router.replace_disallowed(1, [True, False], np.zeros(0)) == 0


def test_router_timing_reads_the_routers_per_token_clock(tiny):
    from casrap.bench import router_timing

    ticks = iter(range(100000))
    bank = ProfileBank(tiny.model, base_model="tiny")
    timing = router_timing(bank, tiny.tokenizer, torch.tensor([[1, 2, 3]]), new_tokens=5, repetitions=3, warmup=1,
                           clock=lambda: float(next(ticks)))
    assert timing.new_tokens == 5 and timing.repetitions == 3
    assert timing.ttft_s >= 1.0 and timing.total_s > timing.ttft_s  # the fake clock advances once per reading
    assert timing.decode_ms_per_token > 0 and timing.decode_ms_per_token % 1000 == 0  # whole ticks between tokens
    with pytest.raises(InputError, match="at least 2 new tokens"):
        router_timing(bank, tiny.tokenizer, torch.tensor([[1, 2, 3]]), new_tokens=1)
