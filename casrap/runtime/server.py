"""The OpenAI-compatible HTTP app behind ``casrap serve`` (FastAPI; uvicorn runs it): thin routes.

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (plain, or
``stream: true`` as server-sent events in OpenAI's chunk format, ending with
``data: [DONE]``), ``GET /v1/models``, ``GET /v1/models/{model}``, ``GET /health``,
``GET /metrics`` (Prometheus).

casrap additions: a request may carry ``latency_target_ms``; with
``--allow-debug-extensions`` also ``profile`` (force one, for baselines) and
``ignore_eos`` (fixed length, for timing). Every answer names the chosen profile in an
``X-Casrap-Profile`` header and a ``casrap`` object (the :class:`GenerationRecord`,
plus ``warnings``) in the body (in the first and the last chunk when streaming).

The parts, as vLLM's ``entrypoints/openai`` splits them: the wire models and their
validation (:mod:`casrap.runtime.protocol`), the :class:`~casrap.runtime.serving.OpenAIServing`
object that owns admission, each request's lifecycle and the shape of every error
(:mod:`casrap.runtime.serving`), the ASGI guard for keys and body size
(:mod:`casrap.runtime.guard`), and the routes here, which only hand over. Holding up
under real clients:

- the event loop only parses JSON and moves bytes: tokenising, templating, waiting for
  the bank and generating happen in a worker thread per admitted request
  (:meth:`AdaptiveLM.submit`), so ``/health`` and ``/metrics`` answer while clients stream;
- requests get the bank first come, first served; beyond ``max_queue`` waiting requests
  the answer is 429 with ``Retry-After`` (``max_queue`` 0: one runs, no queue); a client
  that disconnects (plain or streaming, queued or running) cancels its request, which
  frees the model within one decode step; ``request_timeout_s`` bounds a request's life;
- every error, mid-stream ones included, is OpenAI's ``{"error": {...}}`` body without
  internals, and every JSON written is strict (see :mod:`casrap.runtime.protocol`);
- bodies above ``max_body_bytes`` get 413 before they are parsed; with an API key every
  route but ``/health`` needs ``Authorization: Bearer KEY``; Prometheus labels name route
  templates (``other`` for unknown paths), so no client can grow ``/metrics``.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from casrap.errors import CasrapError
from casrap.runtime.adaptive import AdaptiveLM
from casrap.runtime.guard import Guard, StrictJSONResponse
from casrap.runtime.metrics import ServerMetrics
from casrap.runtime.protocol import ApiError, ChatRequest, CompletionRequest, Limits, error_body
from casrap.runtime.serving import PROFILE_HEADER, OpenAIServing


def create_app(lm: AdaptiveLM, model_id: str | None = None, metrics: ServerMetrics | None = None,
               limits: Limits | None = None) -> FastAPI:
    """The app serving ``lm`` under the OpenAI model id ``model_id`` (default: the model's spec)."""
    serving = OpenAIServing(lm, model_id, metrics, limits)
    app = FastAPI(title="casrap", version="1", default_response_class=StrictJSONResponse, openapi_url=None)
    app.state.serving, app.state.lm, app.state.limits = serving, lm, serving.limits
    app.state.metrics, app.state.admission = serving.metrics, serving.admission
    for kind in (ApiError, RequestValidationError, StarletteHTTPException, CasrapError, Exception):
        app.add_exception_handler(kind, serving.error)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, req: ChatRequest) -> Response:
        return await serving.chat(request, req)

    @app.post("/v1/completions")
    async def completions(request: Request, req: CompletionRequest) -> Response:
        return await serving.completion(request, req)

    @app.get("/v1/models")
    async def models() -> Response:
        serving.count("/v1/models", 200)
        return StrictJSONResponse({"object": "list", "data": [serving.model_card()]})

    @app.get("/v1/models/{model:path}")
    async def model_info(model: str) -> Response:
        if model not in {serving.model_id, "casrap"}:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {serving.model_id!r}", "model",
                           "model_not_found")
        serving.count("/v1/models/{model}", 200)
        return StrictJSONResponse(serving.model_card())

    @app.get("/health")
    async def health() -> Response:
        return StrictJSONResponse(serving.health())

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(serving.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    serving.metrics.use_routes(route.path for route in app.routes if isinstance(route, APIRoute))
    app.add_middleware(Guard, limits=serving.limits, metrics=serving.metrics)
    return app


__all__ = ["PROFILE_HEADER", "Limits", "create_app", "error_body"]
