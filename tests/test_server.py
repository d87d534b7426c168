"""``casrap serve``: the official ``openai`` client against a uvicorn server on 127.0.0.1 (tiny model)."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest
from runtime_helpers import TINY_PROFILES, ConcurrencyProbe
from server_helpers import MODEL, running, tiny_adaptive

from casrap.runtime.protocol import Limits
from casrap.runtime.server import PROFILE_HEADER, create_app


@pytest.fixture(scope="module")
def server():
    """A real uvicorn server in a thread, on a free port of 127.0.0.1 (debug extensions on: loadtest forces profiles)."""
    adaptive = tiny_adaptive()
    with running(create_app(adaptive, limits=Limits(allow_debug_extensions=True))) as url:
        yield url, adaptive


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0, timeout=120)


def test_chat_completion_names_its_profile(client):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=5,
        extra_body={"latency_target_ms": 60_000},
    )
    completion = raw.parse()
    profile = raw.headers[PROFILE_HEADER]
    assert profile == "none"  # an ample target: the budget policy keeps the full model
    assert completion.choices[0].message.role == "assistant"
    assert isinstance(completion.choices[0].message.content, str)
    assert completion.usage.completion_tokens <= 5
    extra = completion.model_extra["casrap"]
    assert extra["profile"] == profile and extra["target_met"] is True


def test_tight_target_picks_the_fast_profile_streaming(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=6, stream=True,
        extra_body={"latency_target_ms": 1},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in {"stop", "length"}
    assert chunks[0].model_extra["casrap"]["profile"] == TINY_PROFILES[-1]
    final = chunks[-1].model_extra["casrap"]
    assert final["profile"] == TINY_PROFILES[-1] and final["target_met"] is False
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert final["completion_tokens"] >= 1 and isinstance(text, str)


def test_completions_plain_and_streaming(client):
    plain = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4)
    assert plain.object == "text_completion" and plain.model_extra["casrap"]["completion_tokens"] <= 4
    pieces = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == plain.choices[0].text  # greedy: same text either way


@pytest.mark.parametrize("kwargs,param", [
    ({"messages": []}, "messages"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"model": "gpt-4o"}, "model"),
    ({"messages": [{"role": "user", "content": "word " * 5000}]}, None),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(client, kwargs, param):
    request = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**request)
    assert err.value.status_code == 400
    body = err.value.body
    assert body["type"] == "invalid_request_error" and body["message"]
    if param:
        assert body["param"] == param
    assert client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2).choices


def test_models_health_and_metrics(server, client):
    url, adaptive = server
    assert [m.id for m in client.models.list()] == [MODEL]
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["profiles"] == list(TINY_PROFILES) and health["queue_length"] == 0
    metrics = httpx.get(f"{url}/metrics").text
    assert 'casrap_requests_total{endpoint="/v1/chat/completions",status="200"}' in metrics
    assert "casrap_decisions_total{profile=" in metrics
    assert "casrap_request_latency_seconds_bucket" in metrics and "casrap_queue_length 0.0" in metrics
    assert adaptive.router.bank.active == "none"


def test_concurrent_requests_queue_on_the_bank(server, client):
    url, adaptive = server
    probe = ConcurrencyProbe(adaptive.router)
    results: list = []

    def ask() -> None:
        raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        results.append(raw.parse().model_extra["casrap"])

    threads = [threading.Thread(target=ask) for _ in range(3)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        probe.restore()
    assert len(results) == 3 and probe.peak <= 1  # never two Router runs at once (batched requests share one engine)
    metrics = httpx.get(f"{url}/metrics").text
    assert "casrap_queue_wait_seconds_count" in metrics


def test_loadtest_against_the_server_url(server):
    from casrap.runtime.loadtest import POLICY, LoadTestConfig, run_loadtest

    url, adaptive = server
    result = run_loadtest(adaptive, LoadTestConfig(prompts=1, max_new_tokens=3, background_load=0.0, static=["none", "ffn-25"], url=f"{url}/v1"))
    assert [r.name for r in result.rows] == [POLICY, "none", "ffn-25"]
    assert result.row("ffn-25").profiles == {"ffn-25": 1}
    assert result.row("none").mean_kl == 0.0
