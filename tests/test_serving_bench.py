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
