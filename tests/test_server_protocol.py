"""``casrap serve`` speaks OpenAI's protocol as clients use it: parameters, errors, limits, keys.

Driven by the official ``openai`` client (and ``langchain-openai`` where installed)
against a real uvicorn server on 127.0.0.1 with the tiny model. Every body the server
writes is parsed with a strict JSON parser.
"""

from __future__ import annotations

import socket
import time

import httpx
import openai
import pytest
from server_helpers import MODEL, running, sse_events, strict_json, tiny_adaptive

from casrap.runtime.protocol import Limits
from casrap.runtime.server import PROFILE_HEADER, create_app

KEY = "test-key-123"
HI = [{"role": "user", "content": "Once upon a time"}]


def _stop_from(text: str) -> str:
    """Two characters from inside ``text`` (away from split multi-byte characters) to use as a stop string."""
    return next(text[i:i + 2] for i in range(2, len(text) - 2) if "\ufffd" not in text[i - 1:i + 3])


@pytest.fixture(scope="module")
def server():
    adaptive = tiny_adaptive(max_new_tokens=8)
    with running(create_app(adaptive, limits=Limits(max_tokens_cap=64, max_body_bytes=20_000))) as url:
        yield url, adaptive


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0, timeout=120)


def test_stop_strings_end_the_answer_before_them(client):
    full = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=24, temperature=0)
    text = full.choices[0].message.content
    assert len(text) > 8
    stop = _stop_from(text)
    cut = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=24, temperature=0, stop=[stop, "zzzz"])
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=24, temperature=0, stop=stop, stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text[: text.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seed_reproduces_sampling_per_request(client):
    def ask(seed: int) -> str:
        return client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=1.0,
                                         seed=seed).choices[0].text

    assert ask(7) == ask(7)
    assert len({ask(s) for s in (1, 2, 3, 4)}) > 1  # different seeds sample differently


def test_top_p_alone_samples(client):
    texts = {client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, top_p=0.99, seed=s).choices[0].text
             for s in range(4)}
    assert len(texts) > 1  # top_p without temperature is not ignored (greedy would give one text)


def test_logprobs_chat_and_completions_shapes(client):
    chat = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=4, logprobs=True, top_logprobs=3, temperature=0)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob >= item.logprob  # greedy: the chosen token is the most likely
    done = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4, logprobs=2, temperature=0)
    lp = done.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert all(len(top) <= 2 for top in lp.top_logprobs)
    chunks = list(client.chat.completions.create(model=MODEL, messages=HI, max_tokens=4, logprobs=True, stream=True, temperature=0))
    streamed = [i for c in chunks if c.choices and c.choices[0].logprobs for i in c.choices[0].logprobs.content]
    assert [i.token for i in streamed] == [i.token for i in content]


def test_include_usage_sends_a_final_usage_chunk(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=HI, max_tokens=3, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(client.chat.completions.create(model=MODEL, messages=HI, max_tokens=3, stream=True))
    assert all(c.choices for c in plain)  # no usage chunk unless asked


def test_system_fingerprint_and_model_lookup(server, client):
    answer = client.chat.completions.with_raw_response.create(model=MODEL, messages=HI, max_tokens=2)
    parsed = answer.parse()
    assert parsed.system_fingerprint.endswith(answer.headers[PROFILE_HEADER])
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-4o")
    assert err.value.body["code"] == "model_not_found"


@pytest.mark.parametrize("kwargs,param", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"n": 2}, "n"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"temperature": 3.5}, "temperature"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"max_tokens": 65}, "max_tokens"),
    ({"logit_bias": {"999999": 5}}, "logit_bias"),
    ({"extra_body": {"ignore_eos": True}}, "ignore_eos"),
    ({"extra_body": {"profile": "none"}}, "profile"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]}, "messages"),
])
def test_parameters_it_cannot_honour_are_named_400s(client, kwargs, param):
    request = {"model": MODEL, "messages": HI, "max_tokens": 3, **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**request)
    assert err.value.body["param"] == param and err.value.body["type"] == "invalid_request_error"


def test_unknown_fields_are_listed_as_warnings(client):
    answer = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2, user="u1",
                                            extra_body={"frobnicate": 1, "presence_penalty": 0.5, "logit_bias": {"3": -100}})
    warnings = answer.model_extra["casrap"]["warnings"]
    assert warnings == ["ignored unknown field 'frobnicate'"]


@pytest.mark.parametrize("method,path,body,status", [
    ("GET", "/v1/nothing", None, 404),
    ("GET", "/v1/chat/completions", None, 405),
    ("POST", "/v1/chat/completions", '{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400),
    ("POST", "/v1/chat/completions", '{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "latency_target_ms": -Infinity}', 400),
    ("POST", "/v1/chat/completions", '{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "presence_penalty": 1e400}', 400),
    ("POST", "/v1/chat/completions", '{"model": "%s", "messages": [{"role": "user"', 400),
    ("POST", "/v1/completions", '{"model": "%s", "prompt": "' + "x " * 12_000 + '"}', 413),
    ("POST", "/v1/completions", '{"model": "%s", "prompt": "' + "a " * 6_000 + '", "max_tokens": 4}', 400),
])
def test_every_error_is_openai_shaped_strict_json(server, method, path, body, status):
    url, _ = server
    content = (body % MODEL).encode() if body and "%s" in body else (body or "").encode() or None
    response = httpx.request(method, f"{url}{path}", content=content, headers={"content-type": "application/json"})
    assert response.status_code == status
    error = strict_json(response.text)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in error["message"] and "File " not in error["message"]


def test_forced_profile_stream_is_strict_json():
    adaptive = tiny_adaptive()
    with running(create_app(adaptive, limits=Limits(allow_debug_extensions=True))) as url:
        body = {"model": MODEL, "messages": HI, "max_tokens": 3, "stream": True, "profile": "ffn-25"}
        response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        events = sse_events(response.text)  # a forced profile has no budget ratio: null, never NaN
        assert events[0]["casrap"]["budget_ratio"] is None and events[0]["casrap"]["profile"] == "ffn-25"


def test_api_key_guards_every_route_but_health():
    adaptive = tiny_adaptive()
    with running(create_app(adaptive, limits=Limits(api_key=KEY))) as url:
        assert httpx.get(f"{url}/health").status_code == 200
        for path in ("/v1/models", "/metrics"):
            response = httpx.get(f"{url}{path}")
            assert response.status_code == 401 and strict_json(response.text)["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
        assert good.chat.completions.create(model=MODEL, messages=HI, max_tokens=2).choices


def test_request_timeout_while_queued_is_a_503():
    adaptive = tiny_adaptive()
    with running(create_app(adaptive, limits=Limits(request_timeout_s=0.3))) as url:
        adaptive._gate.acquire()
        try:
            response = httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": HI, "max_tokens": 2}, timeout=30)
        finally:
            adaptive._gate.release()
        assert response.status_code == 503 and strict_json(response.text)["error"]["code"] == "timeout"
        assert httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": HI, "max_tokens": 2},
                          timeout=30).status_code == 200


def _send_and_drop(url: str, body: bytes) -> None:
    """Send a request on a raw socket and close it before any answer (a client that gives up)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        sock.sendall(head + body)
        time.sleep(0.3)


def test_queued_and_running_plain_requests_are_cancelled_when_the_client_leaves():
    adaptive = tiny_adaptive()
    app = create_app(adaptive, limits=Limits(allow_debug_extensions=True, max_tokens_cap=4000))
    with running(app) as url:
        body = ('{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4000, "ignore_eos": true}'
                % MODEL).encode()
        adaptive._gate.acquire()
        try:
            _send_and_drop(url, body)  # queued, then gone: leaves the line
            deadline = time.monotonic() + 10
            while 'stage="queued"' not in httpx.get(f"{url}/metrics").text and time.monotonic() < deadline:
                time.sleep(0.02)
            assert adaptive.queue_length == 0
        finally:
            adaptive._gate.release()
        _send_and_drop(url, body)  # running 4,000 tokens, then gone: stops within a decode step
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and 'stage="running"' not in httpx.get(f"{url}/metrics").text:
            time.sleep(0.05)
        metrics = httpx.get(f"{url}/metrics").text
        assert 'casrap_cancelled_total{reason="cancelled",stage="queued"} 1.0' in metrics
        assert 'casrap_cancelled_total{reason="cancelled",stage="running"} 1.0' in metrics
        assert not adaptive.busy


def test_expired_target_is_answered_by_the_fastest_profile():
    adaptive = tiny_adaptive()
    with running(create_app(adaptive)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        adaptive._gate.acquire()
        import threading

        answers: list = []
        thread = threading.Thread(target=lambda: answers.append(client.chat.completions.create(
            model=MODEL, messages=HI, max_tokens=2, extra_body={"latency_target_ms": 50})))
        thread.start()
        time.sleep(0.5)  # the target passes while queued
        adaptive._gate.release()
        thread.join(60)
        extra = answers[0].model_extra["casrap"]
        assert extra["target_expired"] is True and extra["profile"] == adaptive.fastest_profile
        assert extra["target_met"] is False and any("fastest profile" in w for w in extra["warnings"])


def test_langchain_chat_openai_invoke_stream_and_stop(server):
    pytest.importorskip("langchain_openai")
    from langchain_openai import ChatOpenAI

    url, _ = server
    chat = ChatOpenAI(model=MODEL, base_url=f"{url}/v1", api_key="unused", max_tokens=24, temperature=0, max_retries=0)
    full = chat.invoke("Once upon a time").content
    assert isinstance(full, str) and len(full) > 6
    pieces = "".join(str(c.content) for c in chat.stream("Once upon a time"))
    assert pieces == full
    stop = _stop_from(full)
    assert chat.invoke("Once upon a time", stop=[stop]).content == full[: full.index(stop)]
    with_logprobs = ChatOpenAI(model=MODEL, base_url=f"{url}/v1", api_key="unused", max_tokens=4, temperature=0, max_retries=0,
                               logprobs=True).invoke("Once upon a time")
    assert len(with_logprobs.response_metadata["logprobs"]["content"]) == with_logprobs.usage_metadata["output_tokens"]
    counted = ChatOpenAI(model=MODEL, base_url=f"{url}/v1", api_key="unused", max_tokens=4, temperature=0, max_retries=0,
                         stream_usage=True)
    total = None
    for piece in counted.stream("Once upon a time"):  # include_usage: the usage chunk reaches LangChain
        total = piece if total is None else total + piece
    assert total is not None and total.usage_metadata["output_tokens"] >= 1
    seeded = ChatOpenAI(model=MODEL, base_url=f"{url}/v1", api_key="unused", max_tokens=12, temperature=1.0, seed=5, max_retries=0)
    assert seeded.invoke("Once upon a time").content == seeded.invoke("Once upon a time").content


def test_async_openai_client_streams(server):
    import asyncio

    url, _ = server

    async def go() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        results = await asyncio.gather(*[client.chat.completions.create(model=MODEL, messages=HI, max_tokens=4, temperature=0)
                                         for _ in range(3)])
        return [r.choices[0].message.content for r in results]

    texts = asyncio.run(go())
    assert len(set(texts)) == 1  # greedy: the same answer, whatever order the queue served them in
