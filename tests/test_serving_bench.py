"""``casrap loadtest --url --rate/--concurrency``: the serving benchmark against a tiny-model server."""

from __future__ import annotations

import json

import pytest
from server_helpers import running, tiny_adaptive

from casrap.errors import InputError
from casrap.runtime.protocol import Limits
from casrap.runtime.server import create_app
from casrap.runtime.serving_bench import RequestTiming, ServingBenchConfig, ServingBenchResult, load_prompt_file, run_serving_bench

PROMPTS = ["Once upon a time", "Tell me about the sea.", "What is a cat?", "Write a poem about rain."]


@pytest.fixture(scope="module")
def server():
    adaptive = tiny_adaptive(max_new_tokens=8)
    with running(create_app(adaptive, limits=Limits(api_key="k"))) as url:
        yield url, adaptive


def test_concurrency_run_reports_vllm_and_guidellm_metrics(server):
    url, _ = server
    result = run_serving_bench(ServingBenchConfig(url=f"{url}/v1", prompts=PROMPTS, max_tokens=6, concurrency=2, api_key="k",
                                                  slo_ttft_ms=1e9, slo_e2el_ms=1e-6))
    v = result.vllm()
    assert v["completed"] == 4 and v["failed"] == 0
    assert 0 < v["mean_ttft_ms"] <= v["mean_e2el_ms"] and v["p99_e2el_ms"] >= v["median_e2el_ms"]
    assert v["total_output_tokens"] == sum(r.output_tokens for r in result.requests) and v["total_input_tokens"] > 0
    assert v["request_goodput"] == 0.0  # an end-to-end SLO of 1 ns is never met
    assert v["request_throughput"] == pytest.approx(4 / result.duration_s)
    g = result.guidellm()
    assert g["time_to_first_token_ms"]["mean"] == pytest.approx(v["mean_ttft_ms"])
    assert g["inter_token_latency_ms"]["mean"] == pytest.approx(v["mean_tpot_ms"])  # GuideLLM's ITL is vLLM's TPOT
    assert all(r.profile for r in result.requests)  # casrap's X-Casrap-Profile header is kept
    json.dumps(result.to_dict(), allow_nan=False)


def test_poisson_arrivals_and_failures_are_reported_not_raised(server):
    url, _ = server
    result = run_serving_bench(ServingBenchConfig(url=f"{url}/v1", prompts=PROMPTS[:3], max_tokens=4, rate=50.0, api_key="k", seed=3))
    sent = [r.sent_s for r in sorted(result.requests, key=lambda r: r.index)]
    assert result.vllm()["completed"] == 3 and sent == sorted(sent) and sent[-1] > 0
    refused = run_serving_bench(ServingBenchConfig(url=f"{url}/v1", prompts=PROMPTS[:2], max_tokens=2000, concurrency=1, api_key="k",
                                                   model="tiny-random-llama"))
    assert refused.vllm()["failed"] == 2 and all(r.status == 400 and "cap" in r.error for r in refused.requests)
    with pytest.raises(InputError, match="401"):
        run_serving_bench(ServingBenchConfig(url=f"{url}/v1", prompts=PROMPTS, concurrency=1, api_key="wrong"))


def test_percentiles_and_tpot_definitions():
    timing = RequestTiming(0, 0.0, True, 200, ttft_s=0.1, e2el_s=1.1, output_tokens=11, itl_s=[0.1] * 10)
    assert timing.tpot_s == pytest.approx(0.1)
    result = ServingBenchResult({"slo_ttft_ms": 150.0, "slo_tpot_ms": None, "slo_e2el_ms": None}, 2.0,
                                [timing, RequestTiming(1, 0.5, True, 200, ttft_s=0.2, e2el_s=0.2, output_tokens=1)])
    v = result.vllm()
    assert v["median_ttft_ms"] == pytest.approx(150.0) and v["p99_ttft_ms"] == pytest.approx(199.0)
    assert v["request_goodput"] == pytest.approx(0.5)  # one of two met the 150 ms TTFT SLO, over 2 s
    assert v["mean_tpot_ms"] == pytest.approx(100.0)  # a one-token answer has no TPOT


def test_prompt_files_and_bad_settings(tmp_path):
    csv = tmp_path / "p.csv"
    csv.write_text("id,prompt\n1,Name a colour.\n2,\"Say, hello.\"\n")
    assert load_prompt_file(csv) == ["Name a colour.", "Say, hello."]
    lines = tmp_path / "p.txt"
    lines.write_text("one\n\ntwo\n")
    assert load_prompt_file(lines) == ["one", "two"]
    with pytest.raises(InputError):
        run_serving_bench(ServingBenchConfig(url="http://127.0.0.1:9/v1", prompts=PROMPTS, rate=0.0))


def test_cli_loadtest_url_concurrency_json(server, tmp_path):
    from typer.testing import CliRunner

    from casrap.cli import app

    url, _ = server
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt\nName a colour.\nName a fruit.\n")
    result = CliRunner().invoke(app, ["loadtest", "--url", f"{url}/v1", "--concurrency", "1", "--prompts", "3", "--prompts-file",
                                      str(prompts), "-n", "3", "--api-key", "k", "--reports", str(tmp_path / "r"), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout[result.stdout.index("{"):])
    assert data["vllm"]["completed"] == 3 and data["config"]["concurrency"] == 1
    assert (tmp_path / "r" / "serving-1" / "serving.json").is_file()


def _scripted_server(gap_s: float):
    """An OpenAI-shaped stream that sends its role-only chunk, waits ``gap_s``, then two content chunks."""
    import asyncio

    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    app = FastAPI()

    def event(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
        choices = [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]
        return "data: " + json.dumps({"id": "x", "object": "chat.completion.chunk", "choices": choices, "usage": usage}) + "\n\n"

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "scripted", "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat() -> StreamingResponse:
        async def events():
            yield event({"role": "assistant"})
            await asyncio.sleep(gap_s)
            yield event({"content": "a"})
            yield event({"content": "b"}, "stop")
            yield event({}, usage={"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def test_ttft_is_stamped_at_the_first_chunk_of_any_kind_as_vllm_does():
    gap = 1.5
    with running(_scripted_server(gap)) as url:
        result = run_serving_bench(ServingBenchConfig(url=f"{url}/v1", prompts=["hi"], max_tokens=2, concurrency=1))
    timing = result.requests[0]
    assert timing.success and timing.output_tokens == 2 and timing.text == "ab"
    assert timing.ttft_s < timing.e2el_s - gap + 0.5  # the role-only chunk ended the TTFT, before the gap
    assert len(timing.itl_s) == 2 and max(timing.itl_s) >= gap  # every later chunk with choices adds an ITL gap


def test_concurrency_sweep_reports_every_level_against_the_first(server):
    from casrap.runtime.serving_bench import run_serving_sweep

    url, _ = server
    config = ServingBenchConfig(url=f"{url}/v1", prompts=PROMPTS, max_tokens=6, api_key="k")
    sweep = run_serving_sweep(config, concurrencies=[1, 1, 2])
    rows = sweep.summary()
    assert [r["max_concurrency"] for r in rows] == [1, 1, 2] and all(r["completed"] == 4 for r in rows)
    assert rows[0]["output_throughput_vs_first"] == pytest.approx(1.0)
    assert rows[1]["same_text_as_first"] == 1.0  # greedy, one at a time both times: the same answers
    assert 0.0 <= rows[2]["same_text_as_first"] <= 1.0
    assert all(r.text for run in sweep.results for r in run.requests)
    data = sweep.to_dict()
    assert len(data["runs"]) == 3 and data["runs"][2]["vllm"]["max_concurrency"] == 2
    json.dumps(data, allow_nan=False)


def test_level_lists_parse_and_bad_ones_are_one_line_errors():
    from casrap.runtime.serving_bench import parse_levels

    assert parse_levels("1,2, 4,8", int, "--concurrency") == [1, 2, 4, 8]
    assert parse_levels("0.5", float, "--rate") == [0.5] and parse_levels(None, int, "--concurrency") == []
    with pytest.raises(InputError, match="--concurrency"):
        parse_levels("1,two", int, "--concurrency")


def test_cli_loadtest_concurrency_list_writes_a_sweep(server, tmp_path):
    from typer.testing import CliRunner

    from casrap.cli import app

    url, _ = server
    prompts = tmp_path / "p.txt"
    prompts.write_text("Name a colour.\nName a fruit.\n")
    result = CliRunner().invoke(app, ["loadtest", "--url", f"{url}/v1", "--concurrency", "1,2", "--prompts", "2", "--prompts-file",
                                      str(prompts), "-n", "3", "--api-key", "k", "--reports", str(tmp_path / "r"), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout[result.stdout.index("{"):])
    assert [row["max_concurrency"] for row in data["summary"]] == [1, 2] and len(data["runs"]) == 2
    assert {"mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "p90_itl_ms", "request_throughput", "output_throughput"} <= set(data["runs"][1]["vllm"])
