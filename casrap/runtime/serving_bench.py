"""A serving benchmark in the terms users already know: ``casrap loadtest --url --rate/--concurrency``.

Drives any OpenAI-compatible server (``casrap serve``, vLLM, ...) with streaming chat
requests, arriving as a Poisson process at ``rate`` requests per second, or kept at
``concurrency`` in flight (both: Poisson arrivals capped at that concurrency, as vLLM's
``--max-concurrency``; neither: one at a time, GuideLLM's ``synchronous``). It reports
the metrics of vLLM's ``benchmark_serving`` under their names, and the same run under
GuideLLM's names, so a casrap figure can be set next to theirs:

====================  ==========================================  ==================================
vLLM name             definition (per request, then aggregated)    GuideLLM name
====================  ==========================================  ==================================
``ttft``              send -> first chunk (of any kind)            ``time_to_first_token_ms``
``tpot``              (end-to-end - TTFT) / (output tokens - 1)     ``inter_token_latency_ms``
``itl``               gap between consecutive chunks               (none: GuideLLM's ITL is vLLM's TPOT)
``e2el``              send -> end of the stream                    ``request_latency`` (seconds)
(none)                end-to-end / output tokens                   ``time_per_output_token_ms``
====================  ==========================================  ==================================

Chunks are those carrying ``choices`` (the usage chunk does not count), stamped as vLLM's
``benchmark_serving`` stamps them: the first one, whatever it holds (a role-only chunk
too), ends the TTFT, and every later one adds a gap to the ITL. Output tokens are the
server's ``usage`` (``stream_options.include_usage``) when it sends one, else the number
of content chunks. Goodput is the rate of requests meeting every SLO given (vLLM's
``--goodput``). Only the client's clock is used: the figures include the network and the
server's queue, as a user sees them.

:func:`run_serving_sweep` runs the same prompts at several concurrencies (or rates), one
level after the other, and sets each level's throughput against the first level's, and
each answer's text against the same prompt's answer there (greedy answers should not
change with the load).
"""

from __future__ import annotations

import asyncio
import csv
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from casrap.errors import InputError

PERCENTILES = (50, 90, 99)


@dataclass
class ServingBenchConfig:
    url: str  # base URL ending in /v1
    prompts: list[str]
    max_tokens: int = 64
    rate: float | None = None  # requests per second (Poisson arrivals)
    concurrency: int | None = None  # most requests in flight
    model: str | None = None  # default: the server's first model
    api_key: str | None = None
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    slo_e2el_ms: float | None = None
    seed: int = 0
    timeout_s: float = 600.0
    extra_body: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if not self.prompts:
            raise InputError("no prompts to send")
        if self.rate is not None and not self.rate > 0:
            raise InputError(f"--rate must be positive, got {self.rate}")
        if self.concurrency is not None and self.concurrency < 1:
            raise InputError(f"--concurrency must be at least 1, got {self.concurrency}")
        if self.max_tokens < 1:
            raise InputError(f"max tokens must be at least 1, got {self.max_tokens}")


@dataclass
class RequestTiming:
    """One request as the client saw it (seconds since the run started / durations in seconds)."""

    index: int
    sent_s: float
    success: bool
    status: int
    error: str = ""
    ttft_s: float = 0.0
    e2el_s: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)
    profile: str = ""
    text: str = ""  # the generated text (vLLM's generated_text)

    @property
    def tpot_s(self) -> float | None:
        return (self.e2el_s - self.ttft_s) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def load_prompt_file(path: Path) -> list[str]:
    """Prompts from a CSV (a ``prompt`` column, else the first), JSONL (``prompt`` key) or text file (one per line)."""
    if not path.is_file():
        raise InputError(f"no prompt file at {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        if not rows:
            return []
        column = "prompt" if "prompt" in rows[0] else next(iter(rows[0]))
        return [str(r[column]) for r in rows if str(r[column] or "").strip()]
    if path.suffix == ".jsonl":
        return [str(json.loads(line)["prompt"]) for line in text.splitlines() if line.strip()]
    return [line for line in text.splitlines() if line.strip()]


def _stats(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "median": 0.0, "std": 0.0, **{f"p{p}": 0.0 for p in PERCENTILES}}
    ordered = sorted(v * scale for v in values)

    def pct(p: float) -> float:  # linear interpolation, as numpy.percentile
        k = (len(ordered) - 1) * p / 100.0
        lo = int(k)
        hi = min(lo + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)

    return {"mean": statistics.fmean(ordered), "median": pct(50), "std": statistics.pstdev(ordered),
            **{f"p{p}": pct(p) for p in PERCENTILES}}


@dataclass
class ServingBenchResult:
    config: dict[str, Any]
    duration_s: float
    requests: list[RequestTiming]

    @property
    def ok(self) -> list[RequestTiming]:
        return [r for r in self.requests if r.success]

    def meets_slo(self, r: RequestTiming) -> bool:
        c = self.config
        tpot = r.tpot_s
        return ((c["slo_ttft_ms"] is None or 1000 * r.ttft_s <= c["slo_ttft_ms"])
                and (c["slo_tpot_ms"] is None or tpot is None or 1000 * tpot <= c["slo_tpot_ms"])
                and (c["slo_e2el_ms"] is None or 1000 * r.e2el_s <= c["slo_e2el_ms"]))

    def vllm(self) -> dict[str, Any]:
        """The run under vLLM ``benchmark_serving``'s names (``mean_ttft_ms``, ``p99_itl_ms``, ...)."""
        ok, d = self.ok, max(self.duration_s, 1e-9)
        out_tokens = sum(r.output_tokens for r in ok)
        in_tokens = sum(r.prompt_tokens for r in ok)
        data: dict[str, Any] = {
            "completed": len(ok), "failed": len(self.requests) - len(ok), "duration": self.duration_s,
            "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
            "request_throughput": len(ok) / d, "output_throughput": out_tokens / d,
            "total_token_throughput": (in_tokens + out_tokens) / d,
            "max_concurrency": self.config.get("concurrency"), "request_rate": self.config.get("rate"),
        }
        if any(self.config[k] is not None for k in ("slo_ttft_ms", "slo_tpot_ms", "slo_e2el_ms")):
            data["request_goodput"] = sum(1 for r in ok if self.meets_slo(r)) / d
        series = {"ttft": [r.ttft_s for r in ok], "tpot": [t for r in ok if (t := r.tpot_s) is not None],
                  "itl": [g for r in ok for g in r.itl_s], "e2el": [r.e2el_s for r in ok]}
        for name, values in series.items():
            for stat, value in _stats(values).items():
                data[f"{stat}_{name}_ms"] = value
        return data

    def guidellm(self) -> dict[str, Any]:
        """The same run under GuideLLM's metric names (successful requests; ``mean``, ``median``, ``p90``, ``p99``)."""
        ok, d = self.ok, max(self.duration_s, 1e-9)
        per_token = [r.e2el_s / r.output_tokens for r in ok if r.output_tokens]
        keep = ("mean", "median", "p90", "p99")

        def pick(values: list[float], scale: float = 1000.0) -> dict[str, float]:
            return {k: v for k, v in _stats(values, scale).items() if k in keep}

        return {
            "requests_per_second": len(ok) / d,
            "output_tokens_per_second": sum(r.output_tokens for r in ok) / d,
            "request_latency": pick([r.e2el_s for r in ok], 1.0),
            "time_to_first_token_ms": pick([r.ttft_s for r in ok]),
            "inter_token_latency_ms": pick([t for r in ok if (t := r.tpot_s) is not None]),
            "time_per_output_token_ms": pick(per_token),
        }

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "vllm": self.vllm(), "guidellm": self.guidellm(),
                "requests": [asdict(r) for r in self.requests]}


async def _one(client: Any, config: ServingBenchConfig, model: str, index: int, prompt: str, t0: float) -> RequestTiming:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": config.max_tokens,
            "stream": True, "stream_options": {"include_usage": True}, **config.extra_body}
    sent = time.perf_counter()
    timing = RequestTiming(index, sent - t0, False, 0)
    stamps: list[float] = []  # every chunk with choices
    content = 0
    pieces: list[str] = []
    usage: dict[str, Any] | None = None
    try:
        async with client.stream("POST", "/chat/completions", json=body) as response:
            timing.status = response.status_code
            timing.profile = response.headers.get("x-casrap-profile", "")
            if response.status_code != 200:
                text = (await response.aread()).decode("utf-8", "replace")
                try:
                    timing.error = str(json.loads(text)["error"]["message"])
                except (ValueError, KeyError, TypeError):
                    timing.error = text[:200]
                return timing
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.perf_counter()
                data = json.loads(line[6:])
                if "error" in data:
                    timing.error = str(data["error"].get("message", "error"))
                    return timing
                if data.get("usage"):
                    usage = data["usage"]
                if data.get("choices"):
                    stamps.append(now)
                for choice in data.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") or choice.get("text")
                    if text:
                        content += 1
                        pieces.append(str(text))
    except Exception as err:  # noqa: BLE001 - a failed request is a result, not a crash
        timing.error = f"{type(err).__name__}: {err}"
        return timing
    end = time.perf_counter()
    timing.success = bool(stamps)
    if not stamps:
        timing.error = "no chunk"
        return timing
    timing.ttft_s, timing.e2el_s = stamps[0] - sent, end - sent
    timing.itl_s = [b - a for a, b in zip(stamps, stamps[1:])]
    timing.text = "".join(pieces)
    timing.output_tokens = int(usage["completion_tokens"]) if usage else content
    timing.prompt_tokens = int(usage["prompt_tokens"]) if usage else 0
    return timing


async def run_serving_bench_async(config: ServingBenchConfig, progress: Any = None) -> ServingBenchResult:
    import httpx

    config.check()
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    base = config.url.rstrip("/")
    limit = config.concurrency or len(config.prompts)
    limits = httpx.Limits(max_connections=limit + 2, max_keepalive_connections=limit + 2)
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=config.timeout_s, limits=limits) as client:
        model = config.model
        if model is None:
            listed = await client.get("/models")
            if listed.status_code != 200:
                raise InputError(f"{base}/models answered {listed.status_code}: is this an OpenAI-compatible server (and the key right)?")
            model = str(listed.json()["data"][0]["id"])
        gate = asyncio.Semaphore(config.concurrency if config.concurrency else (1 if config.rate is None else len(config.prompts)))
        rng = random.Random(config.seed)
        done = 0

        async def guarded(i: int, prompt: str, t0: float) -> RequestTiming:
            nonlocal done
            async with gate:
                result = await _one(client, config, model, i, prompt, t0)
            done += 1
            if progress is not None:
                progress(done, len(config.prompts))
            return result

        t0 = time.perf_counter()
        tasks = []
        for i, prompt in enumerate(config.prompts):
            tasks.append(asyncio.create_task(guarded(i, prompt, t0)))
            if config.rate is not None and i + 1 < len(config.prompts):
                await asyncio.sleep(rng.expovariate(config.rate))
        timings = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    summary = {k: v for k, v in asdict(config).items() if k not in ("prompts", "api_key")} | {"model": model, "prompts": len(config.prompts)}
    return ServingBenchResult(summary, duration, list(timings))


def run_serving_bench(config: ServingBenchConfig, progress: Any = None) -> ServingBenchResult:
    """Run the benchmark (blocking); see the module docstring for what is measured."""
    return asyncio.run(run_serving_bench_async(config, progress))


def parse_levels(text: str | None, kind: type, name: str) -> list[Any]:
    """``"1,2,4,8"`` -> [1, 2, 4, 8] (``kind`` int or float); None or empty -> []; one-line error otherwise."""
    if not text:
        return []
    try:
        values = [kind(part) for part in str(text).replace(" ", "").split(",") if part]
    except ValueError:
        raise InputError(f"{name} takes a number or a comma-separated list of numbers, got {text!r}") from None
    if not values:
        raise InputError(f"{name} takes a number or a comma-separated list of numbers, got {text!r}")
    return values


SUMMARY = ("completed", "failed", "duration", "request_throughput", "output_throughput", "mean_ttft_ms", "median_ttft_ms",
           "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms", "median_itl_ms", "p99_itl_ms", "median_e2el_ms",
           "p99_e2el_ms")


@dataclass
class ServingSweep:
    """One serving benchmark per load level (concurrency or rate), the same prompts at each."""

    results: list[ServingBenchResult]

    def summary(self) -> list[dict[str, Any]]:
        """Per level: vLLM's headline figures, throughput as a multiple of the first level's, and the share of
        answers whose text is that of the same prompt at the first level (greedy: should be 1.0)."""
        first = self.results[0]
        base = first.vllm()["output_throughput"]
        texts = {r.index: r.text for r in first.ok}
        rows = []
        for result in self.results:
            v = result.vllm()
            row = {"max_concurrency": v["max_concurrency"], "request_rate": v["request_rate"], **{k: v[k] for k in SUMMARY}}
            if "request_goodput" in v:
                row["request_goodput"] = v["request_goodput"]
            row["output_throughput_vs_first"] = v["output_throughput"] / base if base > 0 else None
            paired = [r for r in result.ok if r.index in texts]
            row["same_text_as_first"] = sum(r.text == texts[r.index] for r in paired) / len(paired) if paired else None
            rows.append(row)
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary(), "runs": [r.to_dict() for r in self.results]}


def run_serving_sweep(config: ServingBenchConfig, concurrencies: list[int] | None = None, rates: list[float] | None = None,
                      progress: Any = None) -> ServingSweep:
    """The benchmark at every (rate, concurrency) pair, rates outermost; ``progress(level, levels, done, n)``."""
    levels = [(rate, c) for rate in (rates or [config.rate]) for c in (concurrencies or [config.concurrency])]
    results = []
    for k, (rate, concurrency) in enumerate(levels):
        level = replace(config, rate=rate, concurrency=concurrency)
        tick = (lambda i, n, k=k: progress(k, len(levels), i, n)) if progress is not None else None
        results.append(run_serving_bench(level, progress=tick))
    return ServingSweep(results)


__all__ = ["RequestTiming", "ServingBenchConfig", "ServingBenchResult", "ServingSweep", "load_prompt_file", "parse_levels",
           "run_serving_bench", "run_serving_sweep"]
