"""The OpenAI-compatible HTTP app behind ``casrap serve`` (FastAPI; uvicorn runs it).

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (plain, or
``stream: true`` as server-sent events in OpenAI's chunk format, ending with
``data: [DONE]``), ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health``,
``GET /metrics`` (Prometheus).

casrap additions: a request may carry ``latency_target_ms``; with
``--allow-debug-extensions`` also ``profile`` (force one, for baselines) and
``ignore_eos`` (fixed length, for timing). Every answer names the chosen profile in an
``X-Casrap-Profile`` header and a ``casrap`` object (the :class:`GenerationRecord`,
plus ``warnings``) in the body (in the first and the last chunk when streaming).

Holding up under real clients:

- the event loop only parses JSON and moves bytes: tokenising, templating, waiting for
  the bank and generating happen in a worker thread per admitted request
  (:meth:`AdaptiveLM.submit`), which reports back through ``call_soon_threadsafe``; no
  thread pool to exhaust, so ``/health`` and ``/metrics`` answer while clients stream;
- requests get the bank first come, first served; beyond ``max_queue`` waiting requests
  the answer is 429 with ``Retry-After``; a client that disconnects (plain or
  streaming, queued or running) cancels its request, which frees the model within one
  decode step; ``request_timeout_s`` bounds a request's whole life;
- every error, mid-stream ones included, is OpenAI's ``{"error": {...}}`` body without
  internals, and every JSON written is strict (see :mod:`casrap.runtime.protocol`);
- bodies above ``max_body_bytes`` get 413 before they are parsed; with an API key every
  route but ``/health`` needs ``Authorization: Bearer KEY``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from casrap.decide.generation import Cancellation, StreamPiece, model_sampling_defaults
from casrap.errors import CasrapError
from casrap.runtime.adaptive import AdaptiveLM, GenerationStream, RequestCancelled
from casrap.runtime.guard import Guard, StrictJSONResponse, error_response
from casrap.runtime.metrics import ServerMetrics
from casrap.runtime.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    Limits,
    Options,
    chat_logprobs,
    code_for,
    completion_logprobs,
    error_body,
    strict_dumps,
    validate,
)

log = logging.getLogger(__name__)
PROFILE_HEADER = "X-Casrap-Profile"
FINISH = {"stop": "stop", "length": "length", "timeout": "length", "cancelled": "length"}
STATUS_TEXT = {400: "bad request", 401: "unauthorized", 404: "not found", 405: "method not allowed", 413: "request body too large",
               422: "unprocessable request", 429: "too many requests", 500: "internal server error", 503: "service unavailable"}


class _Bridge:
    """Wakes the event loop from the worker thread: ``notify`` is thread-safe, ``wait`` is awaited."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.event = asyncio.Event()

    def notify(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self.event.set)
        except RuntimeError:  # loop closed: nobody is listening any more
            pass

    async def wait(self) -> None:
        await self.event.wait()
        self.event.clear()


async def _watch_disconnect(receive: Any, stream: GenerationStream) -> None:
    """Cancel the request when its client goes away (plain or streaming, queued or running)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            if not stream.finished:
                stream.cancel()
            return


class _Admission:
    """Requests admitted but not yet on the bank; refuses beyond ``max_queue`` (429)."""

    def __init__(self, max_queue: int) -> None:
        self.max_queue, self.pending, self.peak = max_queue, 0, 0
        self.mean_latency_s = 1.0

    def admit(self) -> None:
        if self.pending >= self.max_queue:
            retry = max(1, math.ceil(self.mean_latency_s * (self.pending + 1)))
            raise ApiError(429, f"the server's queue is full ({self.max_queue} requests waiting); retry later",
                           code="queue_full", kind="rate_limit_error", headers={"Retry-After": str(retry)})
        self.pending += 1
        self.peak = max(self.peak, self.pending)

    def started(self) -> None:
        self.pending -= 1

    def observe(self, latency_s: float) -> None:
        self.mean_latency_s = 0.8 * self.mean_latency_s + 0.2 * latency_s


def create_app(lm: AdaptiveLM, model_id: str | None = None, metrics: ServerMetrics | None = None,
               limits: Limits | None = None) -> FastAPI:
    """The app serving ``lm`` under the OpenAI model id ``model_id`` (default: the model's spec)."""
    model_id = model_id or lm.model_name or "casrap"
    limits = limits or Limits()
    admission = _Admission(limits.max_queue)
    metrics = metrics or ServerMetrics(queue_length=lambda: admission.pending)
    created = int(time.time())
    app = FastAPI(title="casrap", version="1", default_response_class=StrictJSONResponse, openapi_url=None)
    app.state.lm, app.state.metrics, app.state.limits, app.state.admission = lm, metrics, limits, admission
    model = lm.router.bank.model
    model_defaults = model_sampling_defaults(model)
    vocab = int(getattr(model.config, "vocab_size", 0) or len(lm.tokenizer))
    fingerprint = (lm.bundle.fingerprint if lm.bundle is not None else "none").replace("/", "-")

    def count(path: str, status: int | str) -> None:
        metrics.requests.labels(path, str(status)).inc()

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError) -> Response:
        count(request.url.path, exc.status)
        if exc.status == 429:
            metrics.rejected.labels("queue_full").inc()
        return error_response(exc.status, str(exc), exc.param, exc.code, exc.kind, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in first.get("loc", []) if x != "body"]
        message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}"
        param = loc[0] if loc else None
        count(request.url.path, 400)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        count(request.url.path, exc.status_code)
        message = STATUS_TEXT.get(exc.status_code, "error")
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        return error_response(exc.status_code, message, headers=dict(exc.headers or {}))

    @app.exception_handler(CasrapError)
    async def _casrap(request: Request, exc: CasrapError) -> Response:
        count(request.url.path, 400)
        return error_response(400, str(exc), code=code_for(exc))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> Response:
        log.exception("internal error on %s", request.url.path)
        count(request.url.path, 500)
        return error_response(500, "internal server error")

    def fingerprint_of(profile: str) -> str:
        return f"casrap-{fingerprint}-{profile}"

    async def respond(request: Request, endpoint: str, req: ChatRequest | CompletionRequest, prompt: Any, chat: bool) -> Response:
        if req.model not in {model_id, "casrap"}:
            raise ApiError(400, f"unknown model {req.model!r}; this server serves {model_id!r}", "model", "model_not_found")
        opts = validate(req, limits, lm.profiles, vocab, model_defaults, lm.defaults.max_new_tokens)
        admission.admit()
        started = False

        def on_start() -> None:
            nonlocal started
            if not started:
                started = True
                admission.started()

        bridge = _Bridge()
        cancel = Cancellation(limits.request_timeout_s)
        stream = lm.submit(prompt, opts.max_tokens, opts.target_s, ignore_eos=opts.ignore_eos, profile=opts.profile,
                           raw=not chat, cancel=cancel, notify=bridge.notify, pieces=req.stream, **opts.sampling)
        watcher = asyncio.create_task(_watch_disconnect(request.receive, stream))
        try:
            while not stream.decided.is_set():
                await bridge.wait()
        except BaseException:
            watcher.cancel()
            abandon(stream, bridge)
            on_start()
            raise
        on_start()
        if stream.decision is None:
            watcher.cancel()
            raise _failure(stream.error)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if not req.stream:
            return await _collect(stream, bridge, watcher, rid, chat, opts, endpoint)
        return StreamingResponse(_events(stream, bridge, watcher, rid, chat, opts, endpoint), media_type="text/event-stream",
                                 headers={PROFILE_HEADER: stream.decision.profile, "Cache-Control": "no-cache"})

    def _failure(error: BaseException | None) -> Exception:
        if isinstance(error, RequestCancelled):
            metrics.cancelled.labels("queued", error.reason).inc()
            if error.reason == "timeout":
                return ApiError(503, f"no answer within this server's request timeout of {limits.request_timeout_s} s",
                                code="timeout", kind="server_error", headers={"Retry-After": "1"})
            return ApiError(499, "client closed the request", code="cancelled")
        if isinstance(error, CasrapError):
            return ApiError(400, str(error), code=code_for(error))
        if isinstance(error, ApiError):
            return error
        log.error("request failed before generation", exc_info=error)
        return ApiError(500, "internal server error", kind="server_error")

    def casrap_object(stream: GenerationStream, opts: Options) -> dict[str, Any]:
        rec = stream.record
        data: dict[str, Any]
        if rec is not None:
            data = rec.to_dict()
        else:
            d = stream.decision
            data = {"profile": d.profile, "decision_s": d.decision_s, "queue_wait_s": d.waited_s, "queue_length": d.queue_length,
                    "budget_ratio": d.budget_ratio} if d else {}
        warnings = list(opts.warnings)
        if rec is not None and rec.finish_reason == "timeout":
            warnings.append(f"stopped at the server's request timeout of {limits.request_timeout_s} s")
        if rec is not None and rec.target_expired:
            warnings.append("the latency target passed while the request was queued: the fastest profile answered")
        return data | {"warnings": warnings}

    def usage(stream: GenerationStream) -> dict[str, int]:
        rec = stream.record
        assert rec is not None
        return {"prompt_tokens": rec.prompt_tokens, "completion_tokens": rec.completion_tokens,
                "total_tokens": rec.prompt_tokens + rec.completion_tokens}

    def finish_record(stream: GenerationStream) -> None:
        rec = stream.record
        assert rec is not None
        metrics.record(rec)
        admission.observe(rec.latency_s)
        if rec.finish_reason in ("cancelled", "timeout"):
            metrics.cancelled.labels("running", rec.finish_reason).inc()

    background: set[asyncio.Task[Any]] = set()

    def abandon(stream: GenerationStream, bridge: _Bridge) -> None:
        """The client is gone: stop the request, and record what it cost once the worker lets go."""
        stream.cancel()

        async def settle() -> None:
            while not stream.finished:
                stream.drain()
                if not stream.finished:
                    await bridge.wait()
            if stream.record is not None:
                finish_record(stream)

        task = asyncio.get_running_loop().create_task(settle())
        background.add(task)
        task.add_done_callback(background.discard)

    async def _collect(stream: GenerationStream, bridge: _Bridge, watcher: asyncio.Task[Any], rid: str, chat: bool,
                       opts: Options, endpoint: str) -> Response:
        try:
            while True:
                stream.drain()
                if stream.finished:
                    break
                await bridge.wait()
        finally:
            watcher.cancel()
            if not stream.finished:
                abandon(stream, bridge)
        if stream.result is None:
            raise _failure(stream.error)
        finish_record(stream)
        result, rec = stream.result, stream.record
        assert rec is not None
        logprobs = None
        if opts.logprobs is not None and result.logprobs is not None:
            logprobs = chat_logprobs(result.logprobs) if chat else completion_logprobs(result.logprobs, 0)
        choice: dict[str, Any] = {"index": 0, "finish_reason": FINISH.get(rec.finish_reason, "stop"), "logprobs": logprobs}
        if chat:
            choice["message"] = {"role": "assistant", "content": result.text}
        else:
            choice["text"] = result.text
        body = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": model_id, "system_fingerprint": fingerprint_of(rec.profile), "choices": [choice],
                "usage": usage(stream), "casrap": casrap_object(stream, opts)}
        count(endpoint, 200)
        return StrictJSONResponse(body, headers={PROFILE_HEADER: rec.profile})

    async def _events(stream: GenerationStream, bridge: _Bridge, watcher: asyncio.Task[Any], rid: str, chat: bool,
                      opts: Options, endpoint: str) -> AsyncIterator[str]:
        now = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        assert stream.decision is not None
        system = fingerprint_of(stream.decision.profile)
        offset = 0

        def chunk(piece: StreamPiece | None, finish: str | None = None, first: bool = False,
                  extra: dict[str, Any] | None = None) -> str:
            nonlocal offset
            text = piece.text if piece is not None else None
            logprobs = None
            if piece is not None and opts.logprobs is not None:
                logprobs = chat_logprobs(piece.logprobs) if chat else completion_logprobs(piece.logprobs, offset)
            if text:
                offset += len(text)
            if chat:
                delta: dict[str, Any] = {} if text is None else {"content": text}
                if first:
                    delta["role"] = "assistant"
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": logprobs}
            data = {"id": rid, "object": obj, "created": now, "model": model_id, "system_fingerprint": system,
                    "choices": [choice], **(extra or {})}
            if opts.include_usage:
                data.setdefault("usage", None)
            return f"data: {strict_dumps(data)}\n\n"

        status = "200"
        try:
            yield chunk(StreamPiece("", 0), first=True, extra={"casrap": casrap_object(stream, opts)})
            while True:
                for piece in stream.drain():
                    if piece.text or piece.logprobs:
                        yield chunk(piece)
                if stream.finished:
                    break
                await bridge.wait()
            if stream.result is None:
                raise _failure(stream.error)
            finish_record(stream)
            rec = stream.record
            assert rec is not None
            yield chunk(None, FINISH.get(rec.finish_reason, "stop"), extra={"casrap": casrap_object(stream, opts)})
            if opts.include_usage:
                data = {"id": rid, "object": obj, "created": now, "model": model_id, "system_fingerprint": system,
                        "choices": [], "usage": usage(stream)}
                yield f"data: {strict_dumps(data)}\n\n"
            yield "data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            status = "cancelled"
            raise
        except Exception as err:  # noqa: BLE001 - headers are sent: report in-band, keep serving
            api = err if isinstance(err, ApiError) else None
            if api is None:
                log.exception("stream failed")
            status = str(api.status) if api else "500"
            message = str(api) if api else "internal server error during generation"
            kind = api.kind if api else "server_error"
            yield f"data: {strict_dumps(error_body(message, code=api.code if api else None, kind=kind))}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            watcher.cancel()
            if not stream.finished:
                abandon(stream, bridge)
            count(endpoint, status)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, req: ChatRequest) -> Response:
        if not req.messages:
            raise ApiError(400, "messages must hold at least one message", "messages")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        return await respond(request, "/v1/chat/completions", req, messages, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request, req: CompletionRequest) -> Response:
        prompt = req.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(400, "give exactly one prompt", "prompt")
            prompt = prompt[0]
        if req.max_tokens is None:
            req.max_tokens = 16  # OpenAI's default for completions
        return await respond(request, "/v1/completions", req, prompt, chat=False)

    def model_card() -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "casrap"}

    @app.get("/v1/models")
    async def models() -> Response:
        count("/v1/models", 200)
        return StrictJSONResponse({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{name:path}")
    async def model_info(name: str) -> Response:
        if name not in {model_id, "casrap"}:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {model_id!r}", "model", "model_not_found")
        count("/v1/models/{id}", 200)
        return StrictJSONResponse(model_card())

    @app.get("/health")
    async def health() -> Response:
        return StrictJSONResponse({"status": "ok", "model": model_id, "profiles": lm.profiles, "queue_length": admission.pending,
                                   "running": lm.busy})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(Guard, limits=limits, metrics=metrics)
    return app


__all__ = ["PROFILE_HEADER", "Limits", "create_app", "error_body"]
