"""``casrap serve`` under hostile or sloppy clients: bounded metric labels, per-request caps, ``null`` fields,
chat-template errors, ``--max-queue 0``, errors nobody saw; and the per-step cost of stop strings and ``logit_bias``.

A real uvicorn server on 127.0.0.1 with the tiny model; the generation-level checks call
:func:`casrap.decide.generation.generate_timed` and its processors directly.
"""

from __future__ import annotations

import copy
import logging
import time
import uuid
from types import SimpleNamespace

import httpx
import pytest
import torch
from server_helpers import MODEL, running, sse_events, strict_json, tiny_adaptive

from casrap.runtime.protocol import MAX_LOGIT_BIAS, MAX_STOP_CHARS, Limits
from casrap.runtime.server import create_app

HI = [{"role": "user", "content": "Once upon a time"}]
ALTERNATE = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
             "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
             "{{ m['content'] }}\n{% endfor %}")


@pytest.fixture(scope="module")
def server():
    adaptive = tiny_adaptive(max_new_tokens=6)
    adaptive.tokenizer = copy.deepcopy(adaptive.tokenizer)  # the tiny tokenizer is shared (cached): template on a copy
    adaptive.tokenizer.chat_template = ALTERNATE
    app = create_app(adaptive, limits=Limits(max_tokens_cap=64))
    with running(app) as url:
        yield url, adaptive, app


def _post(url: str, body: dict, path: str = "/v1/chat/completions") -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=60)


def test_random_paths_leave_metrics_the_same_size(server):
    url, _, _ = server
    with httpx.Client(base_url=url, timeout=30) as client:
        for path in ("/warm-up", "/v1/models/warm-up"):  # the "other" and the model-route series exist from here on
            client.get(path)
        before = client.get("/metrics").text.count("\n")
        for i in range(500):
            path = f"/{uuid.uuid4().hex}" if i % 3 else f"/v1/models/{uuid.uuid4().hex}"
            response = client.post(path) if i % 5 == 0 else client.get(path)
            assert response.status_code in (404, 405)
        text = client.get("/metrics").text
    assert abs(text.count("\n") - before) <= 3
    assert 'casrap_requests_total{endpoint="other",status="404"}' in text
    assert 'casrap_requests_total{endpoint="/v1/models/{model}",status="404"}' in text


@pytest.mark.parametrize("extra,param", [
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": "x" * (MAX_STOP_CHARS + 1)}, "stop"),
    ({"logit_bias": {str(i): 1.0 for i in range(MAX_LOGIT_BIAS + 1)}}, "logit_bias"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
])
def test_caps_and_unknown_roles_are_named_400s(server, extra, param):
    url, _, _ = server
    response = _post(url, {"model": MODEL, "messages": HI, "max_tokens": 2, **extra})
    assert response.status_code == 400, response.text
    error = strict_json(response.text)["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_largest_allowed_stop_and_logit_bias_are_served(server):
    url, _, _ = server
    body = {"model": MODEL, "messages": HI, "max_tokens": 3, "stop": ["y" * MAX_STOP_CHARS] * 4,
            "logit_bias": {str(i): -1.0 for i in range(MAX_LOGIT_BIAS)}}
    assert _post(url, body).status_code == 200


def test_a_chat_template_refusing_the_messages_is_a_400_naming_messages(server):
    url, _, _ = server
    twice = [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]
    for stream in (False, True):
        response = _post(url, {"model": MODEL, "messages": twice, "max_tokens": 2, "stream": stream})
        assert response.status_code == 400, response.text
        error = strict_json(response.text)["error"]
        assert error["param"] == "messages" and "alternate" in error["message"]
    assert _post(url, {"model": MODEL, "messages": HI, "max_tokens": 2}).status_code == 200


def test_explicit_nulls_mean_the_defaults(server):
    url, _, _ = server
    nulls = {"n": None, "stream": None, "presence_penalty": None, "frequency_penalty": None, "temperature": None, "top_p": None,
             "stop": None, "seed": None, "logit_bias": None, "max_tokens": 3, "user": None}
    chat = _post(url, {"model": MODEL, "messages": HI, **nulls, "logprobs": None, "top_logprobs": None, "stream_options": None,
                       "tools": None, "tool_choice": None, "response_format": None, "max_completion_tokens": None})
    assert chat.status_code == 200, chat.text
    assert strict_json(chat.text)["choices"][0]["logprobs"] is None
    done = _post(url, {"model": MODEL, "prompt": "Once upon a time", **nulls, "logprobs": None, "echo": None, "best_of": None,
                       "suffix": None}, path="/v1/completions")
    assert done.status_code == 200, done.text
    streamed = _post(url, {"model": MODEL, "messages": HI, "max_tokens": 2, "stream": True, "stream_options": {"include_usage": None}})
    assert streamed.status_code == 200 and sse_events(streamed.text)[-1]["choices"]
    assert _post(url, {"model": None, "messages": HI}).status_code == 400  # a required field stays required


def _wait(condition, seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_max_queue_zero_runs_one_and_refuses_the_rest():
    adaptive = tiny_adaptive()
    app = create_app(adaptive, limits=Limits(max_queue=0, allow_debug_extensions=True, max_tokens_cap=4000))
    body = {"model": MODEL, "messages": HI, "max_tokens": 4000, "ignore_eos": True, "stream": True}
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as long_one:  # idle: admitted, and it runs
            assert long_one.status_code == 200
            lines = long_one.iter_lines()
            assert any('"content"' in line for line in lines)
            refused = client.post("/v1/chat/completions", json={"model": MODEL, "messages": HI, "max_tokens": 2})
            assert refused.status_code == 429 and strict_json(refused.text)["error"]["code"] == "queue_full"
            assert int(refused.headers["retry-after"]) >= 1
        admission = app.state.admission  # the long one's client left: it stops, and the model is free again
        assert _wait(lambda: admission.running == 0 and admission.pending == 0 and not adaptive.busy)
        assert client.post("/v1/chat/completions", json={"model": MODEL, "messages": HI, "max_tokens": 2}).status_code == 200


def test_a_worker_error_after_the_client_left_is_logged(caplog, monkeypatch):
    from casrap.decide.generation import StreamPiece
    from casrap.runtime.adaptive import GenerationStream

    adaptive = tiny_adaptive()

    def failing_submit(prompt, max_new_tokens=None, latency_target_s=None, *, cancel=None, notify=None, **_):
        def run(on_step, on_decision):
            on_decision(SimpleNamespace(profile="none", decision_s=0.0, waited_s=0.0, queue_length=0, budget_ratio=1.0))
            on_step(StreamPiece("hello", 1))
            _wait(cancel.is_set, 20)
            raise RuntimeError("the worker broke after its client left")

        return GenerationStream(run, cancel, notify)

    monkeypatch.setattr(adaptive, "submit", failing_submit)
    caplog.set_level(logging.INFO, logger="casrap.runtime.serving")
    body = {"model": MODEL, "messages": HI, "max_tokens": 8, "stream": True}
    with running(create_app(adaptive)) as url, httpx.Client(base_url=url, timeout=60) as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            assert any("hello" in line for line in response.iter_lines())
        assert _wait(lambda: any(r.exc_info and "broke after its client left" in str(r.exc_info[1]) for r in caplog.records))
    record = next(r for r in caplog.records if r.exc_info)
    assert record.levelno == logging.ERROR and "client left" in record.getMessage()


# ------------------------------------------------------------------ per-step costs in generation
class _CountCalls(torch.overrides.TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def test_logit_bias_is_applied_in_a_constant_number_of_tensor_ops():
    from casrap.decide.generation import _Penalties

    vocab = 320
    bias = {i: 0.25 * (i % 9) - 1.0 for i in range(0, 2 * MAX_LOGIT_BIAS, 2)} | {10_000: 5.0}  # the last is outside the vocab
    processor = _Penalties(3, 0.0, 0.0, bias)
    ids = torch.tensor([[1, 2, 3, 4]])
    scores = torch.randn(2, vocab)
    processor(ids.expand(2, -1), scores)  # first call prepares the tensors for this device and vocabulary
    with _CountCalls() as counter:
        out = processor(ids.expand(2, -1), scores)
    assert counter.calls < 20  # a Python loop over 300 entries would be ~900 tensor ops per step
    expected = scores.clone()
    for token, value in bias.items():
        if token < vocab:
            expected[:, token] += value
    torch.testing.assert_close(out, expected)


def test_stop_strings_are_searched_only_in_new_text(monkeypatch):
    from casrap.decide import generation
    from casrap.models.tiny import tiny_llama

    lm = tiny_llama()
    ids = lm.tokenizer("Once upon a time", return_tensors="pt").input_ids
    full = generation.generate_timed(lm.model, lm.tokenizer, ids, 64, ignore_eos=True).text
    clean = [i for i in range(len(full) // 2, len(full) - 5) if "\ufffd" not in full[i - 1:i + 6]]
    stop = full[clean[0]:clean[0] + 5]
    searched: list[int] = []
    original = generation._find_stop

    def counting(text, stops, new_from=0):
        searched.append(len(text) - max(0, new_from - max(len(s) for s in stops) + 1))
        return original(text, stops, new_from)

    monkeypatch.setattr(generation, "_find_stop", counting)
    never = generation.generate_timed(lm.model, lm.tokenizer, ids, 64, ignore_eos=True, stop=["\x00never\x00"])
    assert never.text == full and len(searched) >= 60
    assert sum(searched) <= 2 * len(full) + 8 * len(searched)  # linear in the text; a full search per step is quadratic
    cut = generation.generate_timed(lm.model, lm.tokenizer, ids, 64, ignore_eos=True, stop=["\x00never\x00", stop])
    assert cut.text == full[: full.index(stop)] and cut.stop == stop and cut.finish_reason == "stop"
