"""Per-request generation options on the tiny model: stop strings, seeds, penalties, logprobs,
cancellation, end ids; the FIFO bank gate; request validation; prompt-feature text."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from casrap.decide.generation import Cancellation, StreamPiece, end_ids, generate_timed, model_sampling_defaults
from casrap.runtime.adaptive import AdaptiveLM
from casrap.runtime.protocol import ApiError, ChatRequest, Limits, validate
from casrap.runtime.queueing import FifoGate


@pytest.fixture(scope="module")
def tiny():
    from casrap.models.tiny import tiny_llama

    return tiny_llama()


def _ids(tiny, text: str = "Once upon a time") -> torch.Tensor:
    return tiny.tokenizer(text, return_tensors="pt").input_ids


def _clean_stop(text: str) -> str:
    return next(text[i:i + 2] for i in range(2, len(text) - 2) if "\ufffd" not in text[i - 1:i + 3])


def test_stop_string_cuts_text_and_stream_never_shows_it(tiny):
    full = generate_timed(tiny.model, tiny.tokenizer, _ids(tiny), 24, ignore_eos=True)
    stop = _clean_stop(full.text)
    pieces: list[str] = []
    out = generate_timed(tiny.model, tiny.tokenizer, _ids(tiny), 24, ignore_eos=True, stop=[stop], on_text=pieces.append)
    assert out.text == full.text[: full.text.index(stop)] and out.finish_reason == "stop" and out.stop == stop
    assert "".join(pieces) == out.text  # the held-back prefix of the stop string was never streamed
    assert len(out.token_ids) < len(full.token_ids)


def test_seed_is_per_request_and_leaves_the_global_rng_alone(tiny):
    kwargs = dict(do_sample=True, temperature=1.0, top_k=40, top_p=0.95)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = generate_timed(tiny.model, tiny.tokenizer, _ids(tiny), 16, seed=5, **kwargs)
    assert torch.equal(torch.get_rng_state(), before)
    b = generate_timed(tiny.model, tiny.tokenizer, _ids(tiny), 16, seed=5, **kwargs)
    c = generate_timed(tiny.model, tiny.tokenizer, _ids(tiny), 16, seed=6, **kwargs)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids


def test_penalties_and_logit_bias_change_what_is_generated(tiny):
    greedy = generate_timed(tiny.model, tiny.tokenizer, _ids(tiny), 16, ignore_eos=True)
    penalised = generate_timed(tiny.model, tiny.tokenizer, _ids(tiny), 16, ignore_eos=True, frequency_penalty=2.0, presence_penalty=2.0)
    assert len(set(penalised.token_ids)) >= len(set(greedy.token_ids)) and penalised.token_ids != greedy.token_ids
    forced = generate_timed(tiny.model, tiny.tokenizer, _ids(tiny), 4, ignore_eos=True, logit_bias={42: 100.0})
    assert forced.token_ids == [42] * 4


def test_logprobs_are_the_raw_distribution(tiny):
    out = generate_timed(tiny.model, tiny.tokenizer, _ids(tiny), 3, ignore_eos=True, logprobs=2)
    assert out.logprobs is not None and [e.token_id for e in out.logprobs] == out.token_ids
    ids = _ids(tiny)
    with torch.inference_mode():
        first = torch.log_softmax(tiny.model(ids).logits[0, -1].float(), -1)
    assert out.logprobs[0].logprob == pytest.approx(float(first[out.token_ids[0]]), abs=1e-4)
    assert [t[0] for t in out.logprobs[0].top] == first.topk(2).indices.tolist()


def test_cancel_stops_after_the_current_token(tiny):
    cancel = Cancellation()
    seen: list[int] = []

    def step(piece: StreamPiece) -> None:
        seen.append(piece.tokens)
        if piece.tokens == 3:
            cancel.cancel()

    out = generate_timed(tiny.model, tiny.tokenizer, _ids(tiny), 200, ignore_eos=True, cancel=cancel, on_step=step)
    assert out.finish_reason == "cancelled" and len(out.token_ids) == 3 and out.cancel_to_stop_s is not None
    deadline = Cancellation(timeout_s=1e-9)
    time.sleep(0.01)
    timed = generate_timed(tiny.model, tiny.tokenizer, _ids(tiny), 200, ignore_eos=True, cancel=deadline)
    assert timed.finish_reason == "timeout" and len(timed.token_ids) == 1


def test_every_end_id_of_the_generation_config_stops(tiny):
    model, tok = tiny.model, tiny.tokenizer
    free = generate_timed(model, tok, _ids(tiny), 12, ignore_eos=True)
    second = free.token_ids[2]
    old = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tok.eos_token_id, second]  # e.g. Llama-3's <|eot_id|>
    try:
        assert end_ids(model, tok) == [tok.eos_token_id, second]
        out = generate_timed(model, tok, _ids(tiny), 12)
        assert out.finish_reason == "stop" and out.token_ids == free.token_ids[:2]
    finally:
        model.generation_config.eos_token_id = old


def test_sampling_defaults_come_from_the_generation_config_only_when_the_request_is_silent(tiny):
    model = tiny.model
    config = model.generation_config
    saved = (config.do_sample, config.temperature, config.top_p, config.top_k)
    config.do_sample, config.temperature, config.top_p, config.top_k = True, 0.6, 0.9, 20
    try:
        defaults = model_sampling_defaults(model)
        assert defaults == {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 20}
    finally:
        config.do_sample, config.temperature, config.top_p, config.top_k = saved
    limits = Limits()
    silent = ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}])
    assert validate(silent, limits, ["none"], 100, defaults, 8).sampling == defaults
    greedy = ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}], temperature=0)
    assert validate(greedy, limits, ["none"], 100, defaults, 8).sampling == {}
    top_p = ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}], top_p=0.5)
    assert validate(top_p, limits, ["none"], 100, {}, 8).sampling == {"do_sample": True, "temperature": 1.0, "top_p": 0.5, "top_k": 0}


def test_debug_extensions_and_caps_are_refused_by_default():
    req = ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}], ignore_eos=True)
    with pytest.raises(ApiError) as err:
        validate(req, Limits(), ["none"], 100, {}, 8)
    assert err.value.param == "ignore_eos"
    assert validate(req, Limits(allow_debug_extensions=True), ["none"], 100, {}, 8).ignore_eos
    big = ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2000)
    with pytest.raises(ApiError, match="cap"):
        validate(big, Limits(max_tokens_cap=1024), ["none"], 100, {}, 8)


def test_gate_serves_in_arrival_order_and_lets_cancelled_waiters_go():
    gate = FifoGate()
    gate.acquire(tag="holder")
    order: list[int] = []
    cancels = {i: Cancellation() for i in range(6)}

    def wait(i: int) -> None:
        if gate.acquire(cancels[i], tag=i):
            order.append(i)
            gate.release(tag=i)

    threads = []
    for i in range(6):
        threads.append(threading.Thread(target=wait, args=(i,)))
        threads[-1].start()
        while gate.waiting < i + 1:  # arrivals are ordered
            time.sleep(0.001)
    cancels[2].cancel()
    while gate.waiting > 5:
        time.sleep(0.001)
    gate.release(tag="holder")
    for t in threads:
        t.join(10)
    assert order == [0, 1, 3, 4, 5]
    kinds = [e.kind for e in gate.log]
    assert kinds == ["acquire", "release"] * 6


def test_prompt_features_read_the_last_user_message():
    messages = [{"role": "system", "content": "You are a long fixed system prompt. " * 20},
                {"role": "user", "content": "first question"}, {"role": "assistant", "content": "an answer"},
                {"role": "user", "content": "What is the capital of France?"}]
    assert AdaptiveLM.prompt_text(messages) == "What is the capital of France?"
    assert AdaptiveLM.prompt_text([{"role": "system", "content": "only a system prompt"}]) == "only a system prompt"
    assert AdaptiveLM.prompt_text("plain") == "plain"


def test_compressed_kv_profiles_still_stream_through_adaptive(tiny):
    from runtime_helpers import BudgetPolicy, tiny_bank

    from casrap.decide.defaults import RuntimeDefaults
    from casrap.decide.latency_model import LatencyFit, UnloadedLatencyModel
    from casrap.decide.router import Router
    from casrap.telemetry import FakeTelemetry

    bank = tiny_bank(tiny, ("none", "kv-50"))
    router = Router(bank, tiny.tokenizer, BudgetPolicy(2), RuntimeDefaults(max_new_tokens=6), telemetry=FakeTelemetry(0),
                    unloaded=UnloadedLatencyModel(LatencyFit(0.0, 0.0, 0.1, 0.0)))
    lm = AdaptiveLM(router, tiny.tokenizer, "tiny")
    plain = lm.generate("Once upon a time", 6, profile="kv-50", ignore_eos=True)
    streamed = lm.submit("Once upon a time", 6, profile="kv-50", ignore_eos=True)
    text = "".join(streamed)
    assert streamed.record.profile == "kv-50" and text == plain.text and streamed.record.completion_tokens == 6
