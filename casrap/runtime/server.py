"""The OpenAI-compatible HTTP app behind ``casrap serve`` (FastAPI; uvicorn runs it).

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (plain, or
``stream: true`` as server-sent events in OpenAI's chunk format, ending with
``data: [DONE]``), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus).

casrap additions: a request may carry ``latency_target_ms``, ``profile`` (force one,
for baselines) and ``ignore_eos`` (fixed length, for timing); every answer names the
chosen profile in an ``X-Casrap-Profile`` header and a ``casrap`` object (the
:class:`GenerationRecord`) in the body (in the first and the last chunk when
streaming). Requests queue for the bank (:class:`AdaptiveLM` holds the lock);
generation runs in worker threads so the event loop keeps answering ``/health`` and
``/metrics`` meanwhile. Bad requests get 400 with OpenAI's error body
(``{"error": {"message", "type", "param", "code"}}``) and the server keeps serving.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from casrap.errors import CasrapError
from casrap.runtime.adaptive import AdaptiveLM, Generation, GenerationRecord, GenerationStream
from casrap.runtime.metrics import ServerMetrics

PROFILE_HEADER = "X-Casrap-Profile"


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # OpenAI content parts: keep the text ones
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = None
    stream: bool = False
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    latency_target_ms: float | None = Field(default=None, description="casrap: end-to-end latency target")
    profile: str | None = Field(default=None, description="casrap: force a profile (baselines, load tests)")
    ignore_eos: bool = Field(default=False, description="generate exactly max_tokens (timing), as in vLLM")


class ChatRequest(_Common):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None


class CompletionRequest(_Common):
    prompt: str | list[str]


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


def error_body(message: str, param: str | None = None, code: str | None = None, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _code_for(err: CasrapError) -> str | None:
    text = str(err)
    return "context_length_exceeded" if "context window" in text else None


def create_app(lm: AdaptiveLM, model_id: str | None = None, metrics: ServerMetrics | None = None) -> FastAPI:
    """The app serving ``lm`` under the OpenAI model id ``model_id`` (default: the model's spec)."""
    model_id = model_id or lm.model_name or "casrap"
    metrics = metrics or ServerMetrics(queue_length=lambda: lm.queue_length)
    created = int(time.time())
    app = FastAPI(title="casrap", version="1")
    app.state.lm, app.state.metrics = lm, metrics

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in first.get("loc", []) if x != "body"]
        message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}"
        metrics.requests.labels(request.url.path, "400").inc()
        return JSONResponse(error_body(message, ".".join(loc) or None), status_code=400)

    @app.exception_handler(BadRequest)
    async def _bad(request: Request, exc: BadRequest) -> JSONResponse:
        metrics.requests.labels(request.url.path, "400").inc()
        return JSONResponse(error_body(str(exc), exc.param, exc.code), status_code=400)

    @app.exception_handler(CasrapError)
    async def _casrap(request: Request, exc: CasrapError) -> JSONResponse:
        metrics.requests.labels(request.url.path, "400").inc()
        return JSONResponse(error_body(str(exc), code=_code_for(exc)), status_code=400)

    def check(req: _Common) -> tuple[int, float | None, dict[str, Any]]:
        if req.model not in {model_id, "casrap"}:
            raise BadRequest(f"unknown model {req.model!r}; this server serves {model_id!r}", "model", "model_not_found")
        limit = getattr(req, "max_completion_tokens", None) or req.max_tokens
        if limit is not None and limit < 1:
            raise BadRequest(f"max_tokens must be at least 1, got {limit}", "max_tokens")
        if req.n != 1:
            raise BadRequest("only n=1 is supported", "n")
        target = req.latency_target_ms
        if target is not None and target <= 0:
            raise BadRequest(f"latency_target_ms must be positive, got {target}", "latency_target_ms")
        if req.profile is not None and req.profile not in lm.profiles:
            raise BadRequest(f"unknown profile {req.profile!r}; have {', '.join(lm.profiles)}", "profile")
        sampling: dict[str, Any] = {}
        if req.temperature is not None and req.temperature < 0:
            raise BadRequest("temperature must be >= 0", "temperature")
        if req.temperature:
            sampling = {"do_sample": True, "temperature": req.temperature, "top_p": req.top_p if req.top_p is not None else 1.0}
        return limit or lm.defaults.max_new_tokens, (target / 1000.0 if target is not None else None), sampling

    def casrap_object(record: GenerationRecord | None, stream: GenerationStream | None = None) -> dict[str, Any]:
        if record is not None:
            return record.to_dict()
        decision = stream.decision if stream else None
        return {"profile": decision.profile, "decision_s": decision.decision_s, "queue_wait_s": decision.waited_s,
                "queue_length": decision.queue_length, "budget_ratio": decision.budget_ratio} if decision else {}

    def usage(rec: GenerationRecord) -> dict[str, int]:
        return {"prompt_tokens": rec.prompt_tokens, "completion_tokens": rec.completion_tokens,
                "total_tokens": rec.prompt_tokens + rec.completion_tokens}

    async def respond(endpoint: str, req: _Common, prompt: Any, raw: bool, chat: bool) -> Response:
        n, target, sampling = check(req)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        now = int(time.time())
        if not req.stream:
            result = await run_in_threadpool(lm.generate, prompt, n, target, False, req.ignore_eos, req.profile, raw, **sampling)
            assert isinstance(result, Generation)
            rec = result.record
            metrics.record(rec)
            metrics.requests.labels(endpoint, "200").inc()
            choice: dict[str, Any] = {"index": 0, "finish_reason": rec.finish_reason, "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": result.text}
            else:
                choice["text"] = result.text
            body = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": now, "model": model_id,
                    "choices": [choice], "usage": usage(rec), "casrap": casrap_object(rec)}
            return JSONResponse(body, headers={PROFILE_HEADER: rec.profile})
        stream = lm.generate(prompt, n, target, True, req.ignore_eos, req.profile, raw, **sampling)
        assert isinstance(stream, GenerationStream)
        decision = await run_in_threadpool(stream.wait_decision)  # headers name the profile: wait for the choice
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, finish: str | None = None, first: bool = False, extra: dict[str, Any] | None = None) -> str:
            if chat:
                d: dict[str, Any] = {} if delta is None else {"content": delta}
                if first:
                    d["role"] = "assistant"
                choice = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
            data = {"id": rid, "object": obj, "created": now, "model": model_id, "choices": [choice], **(extra or {})}
            return f"data: {json.dumps(data)}\n\n"

        def events() -> Iterator[str]:
            status = "200"
            try:
                yield chunk("", first=True, extra={"casrap": casrap_object(None, stream)})
                for piece in stream:
                    yield chunk(piece)
                rec = stream.record
                assert rec is not None
                metrics.record(rec)
                yield chunk(None, rec.finish_reason, extra={"casrap": casrap_object(rec), "usage": usage(rec)})
                yield "data: [DONE]\n\n"
            except Exception as err:  # noqa: BLE001 - headers are sent: report in-band, keep serving
                status = "500"
                yield f"data: {json.dumps(error_body(str(err), kind='server_error'))}\n\n"
            finally:
                metrics.requests.labels(endpoint, status).inc()

        headers = {PROFILE_HEADER: decision.profile if decision else "", "Cache-Control": "no-cache"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest) -> Response:
        if not req.messages:
            raise BadRequest("messages must hold at least one message", "messages")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        return await respond("/v1/chat/completions", req, messages, raw=False, chat=True)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> Response:
        prompt = req.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise BadRequest("give exactly one prompt", "prompt")
            prompt = prompt[0]
        if req.max_tokens is None:
            req.max_tokens = 16  # OpenAI's default for completions
        return await respond("/v1/completions", req, prompt, raw=True, chat=False)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        metrics.requests.labels("/v1/models", "200").inc()
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "casrap"}]}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_id, "profiles": lm.profiles, "queue_length": lm.queue_length}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


__all__ = ["PROFILE_HEADER", "create_app", "error_body"]
