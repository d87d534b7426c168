"""Continuous batching: rows join and leave between decode steps and answer as they would alone (tiny models)."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from runtime_helpers import BudgetPolicy, tiny_bank

from casrap.decide.batching import BatchConfig, DecodeBatch, SequenceRequest
from casrap.decide.defaults import RuntimeDefaults
from casrap.decide.generation import Cancellation, generate_timed
from casrap.decide.latency_model import LatencyFit, UnloadedLatencyModel
from casrap.decide.router import Router
from casrap.errors import InputError
from casrap.runtime.adaptive import AdaptiveLM, RequestCancelled
from casrap.telemetry import FakeTelemetry

PROMPTS = ["Hi", "The quick brown fox jumps over the lazy dog and keeps running", "Once upon a time",
           "In the beginning there was a long and winding road through the"]


def _ids(lm, text):
    return lm.tokenizer(text, return_tensors="pt").input_ids


def _run_staggered(lm, requests, joins):
    """Admit requests[k] before decode step joins[k]; returns the rows in request order."""
    batch, rows, step = DecodeBatch(lm.model, lm.tokenizer), [None] * len(requests), 0
    pending = sorted(range(len(requests)), key=lambda k: joins[k])
    while pending or batch.size:
        while pending and joins[pending[0]] <= step:
            k = pending.pop(0)
            rows[k] = batch.admit(requests[k])
        batch.step()
        step += 1
    return rows


GREEDY_PROFILES = ("none", "layers-25", "heads-25", "ffn-25", "kvheads-50")


@pytest.mark.parametrize("seed,attn,profiles", [(0, "sdpa", GREEDY_PROFILES), (1, "sdpa", ("none", "layers-25")),
                                                 (2, "eager", ("none", "kvheads-50"))])
def test_greedy_rows_answer_as_alone_with_staggered_joins(seed, attn, profiles):
    """4 prompts of different lengths, alone and joining at steps 0, 0, 3, 5, on every kind of profile."""
    from casrap.models.tiny import tiny_llama

    from casrap.profiles.factory import build_bank
    from casrap.pruners.importance import weight_norm_importance

    lm = tiny_llama(seed=seed, attn_implementation=attn)  # weight-norm importance: no calibration run (quality is not tested)
    bank = build_bank(lm.model, profiles, base_model="tiny", importance=weight_norm_importance(lm.model))
    ids = [_ids(lm, p) for p in PROMPTS]
    for profile in profiles:
        with bank.using(profile):
            alone = [generate_timed(lm.model, lm.tokenizer, i, 10 + k, ignore_eos=True).token_ids for k, i in enumerate(ids)]
            rows = _run_staggered(lm, [SequenceRequest(i, 10 + k, True) for k, i in enumerate(ids)], [0, 0, 3, 5])
        assert [r.output().token_ids for r in rows] == alone, profile
        assert max(r.peak_batch for r in rows) >= 3


def test_sampling_penalties_bias_logprobs_and_stop_per_row(tiny):
    ids = [_ids(tiny, p) for p in PROMPTS]
    opts = [dict(do_sample=True, temperature=0.8, top_k=20, seed=7), dict(presence_penalty=1.5, frequency_penalty=0.5),
            dict(logit_bias={5: 4.0, 9: -100.0}, logprobs=3), dict(do_sample=True, top_p=0.9, seed=11, logprobs=0)]
    alone = [generate_timed(tiny.model, tiny.tokenizer, i, 12, ignore_eos=True, **o) for i, o in zip(ids, opts)]
    rows = _run_staggered(tiny, [SequenceRequest(i, 12, True, o) for i, o in zip(ids, opts)], [0, 1, 1, 4])
    for a, row in zip(alone, rows):
        out = row.output()
        assert out.token_ids == a.token_ids
        assert (out.logprobs is None) == (a.logprobs is None)
        for x, y in zip(out.logprobs or [], a.logprobs or []):
            assert x.token_id == y.token_id and abs(x.logprob - y.logprob) < 1e-4 and len(x.top) == len(y.top)
    # a stop string taken from the greedy answer ends that row (cut before it) and no other
    greedy = generate_timed(tiny.model, tiny.tokenizer, ids[1], 12, ignore_eos=True)
    stop = greedy.text[len(greedy.text) // 2:][:2]
    solo = generate_timed(tiny.model, tiny.tokenizer, ids[1], 12, ignore_eos=True, stop=[stop])
    pieces: list[str] = []
    rows = _run_staggered(tiny, [SequenceRequest(ids[0], 12, True),
                                 SequenceRequest(ids[1], 12, True, dict(stop=[stop], on_step=lambda p: pieces.append(p.text)))],
                          [0, 2])
    out = rows[1].output()
    assert out.text == solo.text and out.stop == stop and out.finish_reason == "stop" and "".join(pieces) == solo.text
    assert len(rows[0].output().token_ids) == 12


def test_end_ids_stop_a_row_and_length_stops_the_rest(tiny):
    eos = tiny.tokenizer.eos_token_id
    ids = [_ids(tiny, p) for p in PROMPTS[:2]]
    rows = _run_staggered(tiny, [SequenceRequest(ids[0], 6, options=dict(logit_bias={eos: 50.0})), SequenceRequest(ids[1], 6)], [0, 0])
    first, second = rows[0].output(), rows[1].output()
    assert first.token_ids == [] and first.finish_reason == "stop"
    assert second.token_ids == generate_timed(tiny.model, tiny.tokenizer, ids[1], 6).token_ids


def test_a_cancelled_row_leaves_within_one_step(tiny):
    cancel = Cancellation()
    ids = [_ids(tiny, p) for p in PROMPTS[:2]]
    batch = DecodeBatch(tiny.model, tiny.tokenizer)
    keep = batch.admit(SequenceRequest(ids[0], 20, True))
    gone = batch.admit(SequenceRequest(ids[1], 20, True, dict(cancel=cancel)))
    batch.step()
    cancel.cancel()
    finished = batch.step()
    assert finished == [gone] and batch.size == 1
    out = gone.output()
    assert out.finish_reason == "cancelled" and len(out.token_ids) == 3 and out.cancel_to_stop_s is not None
    while batch.size:
        batch.step()
    assert keep.output().token_ids == generate_timed(tiny.model, tiny.tokenizer, ids[0], 20, ignore_eos=True).token_ids


def test_batch_config_refuses_bad_values():
    with pytest.raises(InputError, match="max_batch"):
        BatchConfig(max_batch=0)
    with pytest.raises(InputError, match="batch_mode"):
        BatchConfig(batch_mode="sometimes")


# ------------------------------------------------------------------ AdaptiveLM
def _lm(tiny, profiles=("none", "layers-25", "ffn-25"), **batching):
    bank = tiny_bank(tiny, profiles)
    router = Router(bank, tiny.tokenizer, BudgetPolicy(len(bank.names)), RuntimeDefaults(max_new_tokens=6),
                    telemetry=FakeTelemetry(0), unloaded=UnloadedLatencyModel(LatencyFit(0.0, 0.0, 0.1, 0.0)))
    steps: list[tuple[str, int, float]] = []
    lm = AdaptiveLM(router, tiny.tokenizer, "tiny", batching=BatchConfig(**batching) if batching else None,
                    on_step=lambda s: steps.append((bank.active, lm._engine.running, s)))
    return lm, steps


def _concurrently(lm, calls):
    """Start every call while the bank is held, so that all of them wait; release; return results in order."""
    out: list = [None] * len(calls)

    def go(k):
        try:
            out[k] = calls[k]()
        except BaseException as err:  # noqa: BLE001
            out[k] = err

    threads = [threading.Thread(target=go, args=(k,)) for k in range(len(calls))]
    lm._gate.acquire()
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while lm.queue_length < len(calls) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert lm.queue_length == len(calls), out
    finally:
        lm._gate.release()
    for t in threads:
        t.join(60)
    return out


def test_concurrent_requests_share_steps_and_answer_as_alone(tiny):
    lm, steps = _lm(tiny)
    serial = AdaptiveLM(lm.router, tiny.tokenizer, "tiny", batching=BatchConfig(max_batch=1))
    alone = [serial.generate(p, max_new_tokens=8, ignore_eos=True) for p in PROMPTS]
    both = _concurrently(lm, [lambda p=p: lm.generate(p, max_new_tokens=8, ignore_eos=True) for p in PROMPTS])
    assert [g.token_ids for g in both] == [g.token_ids for g in alone]
    assert lm._engine.peak == 4 and max(n for _, n, _ in steps) == 4
    assert all(isinstance(s, float) and s > 0 for _, _, s in steps)
    assert sorted(g.record.queue_length for g in both) == [0, 1, 2, 3]  # the queue still enters each budget
    rec = both[0].record
    assert rec.completion_tokens == 8 and rec.ttft_s > 0 and rec.total_s >= rec.latency_s >= rec.generation_s
    assert lm.queue_length == 0 and lm.router.bank.active == "none"
    deadline = time.monotonic() + 10
    while lm.busy and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not lm.busy  # the engine gave the bank back when it drained


def test_grouping_runs_one_profile_at_a_time(tiny):
    lm, steps = _lm(tiny)
    calls = [lambda: lm.generate(PROMPTS[0], max_new_tokens=5, ignore_eos=True, profile="none"),
             lambda: lm.generate(PROMPTS[1], max_new_tokens=5, ignore_eos=True, profile="layers-25"),
             lambda: lm.generate(PROMPTS[2], max_new_tokens=5, ignore_eos=True, profile="none")]
    out = _concurrently(lm, calls)
    assert [g.record.profile for g in out] == ["none", "layers-25", "none"]
    profiles = [p for p, _, _ in steps]
    runs = [p for k, p in enumerate(profiles) if k == 0 or profiles[k - 1] != p]
    assert sorted(runs) in (["layers-25", "none"], ["layers-25", "none", "none"])  # one profile at a time, each batch whole
    assert max(n for p, n, _ in steps if p == "layers-25") == 1 and max(n for p, n, _ in steps if p == "none") <= 2
    with lm.router.bank.using("layers-25"):
        assert out[1].token_ids == generate_timed(tiny.model, tiny.tokenizer, lm.encode(PROMPTS[1], 5), 5,
                                                  ignore_eos=True).token_ids


def test_batch_mode_lets_joiners_take_the_batch_profile(tiny):
    lm, _ = _lm(tiny, batch_mode="batch")
    calls = [lambda: lm.generate(PROMPTS[0], max_new_tokens=4), lambda: lm.generate(PROMPTS[1], max_new_tokens=4,
                                                                                   latency_target_s=1e-6)]
    first, second = _concurrently(lm, calls)  # whichever arrives first decides for both
    assert first.record.profile == second.record.profile
    group, _ = _lm(tiny)
    calls = [lambda: group.generate(PROMPTS[0], max_new_tokens=4),
             lambda: group.generate(PROMPTS[1], max_new_tokens=4, latency_target_s=1e-6)]
    first, second = _concurrently(group, calls)  # same requests, grouped: each its own choice
    assert first.record.profile == "none" and second.record.target_expired
    assert second.record.profile == group.fastest_profile != "none"


def test_queued_batched_request_leaves_the_line_and_running_one_stops(tiny):
    lm, _ = _lm(tiny)
    cancel = Cancellation()
    lm._gate.acquire()
    try:
        stream = lm.generate(PROMPTS[0], max_new_tokens=4, stream=True, cancel=cancel)
        deadline = time.monotonic() + 10
        while lm.queue_length < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        cancel.cancel()
        with pytest.raises(RequestCancelled):
            list(stream)
        assert lm.queue_length == 0
    finally:
        lm._gate.release()
    running = Cancellation()
    pieces: list[int] = []

    def on_piece(piece):
        pieces.append(piece.tokens)
        if piece.tokens == 3:
            running.cancel()

    stream = lm.submit(PROMPTS[1], max_new_tokens=500, ignore_eos=True, cancel=running)
    other = lm.submit(PROMPTS[2], max_new_tokens=8, ignore_eos=True)
    deadline = time.monotonic() + 60
    while not running.is_set() and time.monotonic() < deadline:  # cancel from the consumer once 3 tokens streamed
        for piece in stream.drain():
            on_piece(piece)
        time.sleep(0.001)
    list(stream), list(other)
    assert stream.record.finish_reason == "cancelled" and stream.record.completion_tokens < 500
    assert other.record.completion_tokens == 8


def test_compressed_kv_profiles_run_alone_through_the_router(tiny):
    lm, _ = _lm(tiny, profiles=("none", "kv-50"))
    serial = AdaptiveLM(lm.router, tiny.tokenizer, "tiny", batching=BatchConfig(max_batch=1))
    prompt = "hello world " * 20
    expected = serial.generate(prompt, max_new_tokens=5, ignore_eos=True, profile="kv-50").token_ids
    out = _concurrently(lm, [lambda: lm.generate(prompt, max_new_tokens=5, ignore_eos=True, profile="kv-50"),
                             lambda: lm.generate(prompt, max_new_tokens=5, ignore_eos=True, profile="kv-50")])
    assert [g.token_ids for g in out] == [expected, expected] and lm._engine.peak == 0


def test_step_hook_accepts_an_object_with_step(tiny):
    class Governor:
        def __init__(self):
            self.seen: list[float] = []

        def step(self, step_s: float) -> None:
            self.seen.append(step_s)

    bank = tiny_bank(tiny, ("none",))
    router = Router(bank, tiny.tokenizer, BudgetPolicy(1), RuntimeDefaults(max_new_tokens=6), telemetry=FakeTelemetry(0))
    governor = Governor()
    lm = AdaptiveLM(router, tiny.tokenizer, "tiny", on_step=governor)
    lm.generate(PROMPTS[0], max_new_tokens=5, ignore_eos=True)
    assert len(governor.seen) == 4 and all(s > 0 for s in governor.seen)  # 5 tokens: prefill + 4 decode steps
    assert torch.is_tensor(lm.encode(PROMPTS[0], 2))


@pytest.mark.embedded
def test_embedded_batched_greedy_answers_equal_solo_ones(embedded):
    """SmolLM2 (GQA, 30 layers), chat prompts of different lengths joining at different steps: same tokens as alone."""
    tok = embedded.tokenizer
    texts = ["What is the capital of France?", "Name three colours.",
             "Explain in one sentence why the sky looks blue during the day."]
    ids = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, return_tensors="pt")
           for t in texts]
    ids = [i if torch.is_tensor(i) else i["input_ids"] for i in ids]
    alone = [generate_timed(embedded.model, tok, i, 12).token_ids for i in ids]
    rows = _run_staggered(embedded, [SequenceRequest(i, 12) for i in ids], [0, 2, 4])
    assert [r.output().token_ids for r in rows] == alone
