"""The serving logic behind ``casrap serve``'s OpenAI routes: admission, a request's life, error shaping.

Split as vLLM's ``entrypoints/openai`` are: :mod:`casrap.runtime.protocol` holds the wire
models and their validation, :class:`OpenAIServing` here owns every request from
admission to its last byte, and :mod:`casrap.runtime.server` holds the thin FastAPI
routes. The model is reached only through :meth:`AdaptiveLM.submit` and the
:class:`GenerationStream` it returns (a worker thread per request does the tokenising,
templating, waiting for the bank and generating, and notifies the event loop).

A request's life: admitted (or 429) -> submitted -> decided (or failed: an error body)
-> its pieces drained whenever the worker notifies -> answered (a JSON body, or
server-sent events) -> :meth:`_Flight.close`. ``close`` is the one way out, whatever
ended the request (answer sent, client gone, error, cancellation): it stops watching the
client, cancels a request that still runs, and once the worker lets go of the model
records what the request cost, counts its cancellation, or logs an error no client saw,
exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from casrap.decide.generation import Cancellation, StreamPiece, model_sampling_defaults
from casrap.errors import CasrapError
from casrap.runtime.adaptive import AdaptiveLM, GenerationStream, RequestCancelled
from casrap.runtime.guard import StrictJSONResponse, error_response
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

try:  # transformers renders chat templates with jinja2; a template's raise_exception is a TemplateError
    from jinja2.exceptions import TemplateError, TemplateSyntaxError
except ImportError:  # pragma: no cover - jinja2 comes with transformers' chat templates
    TemplateError = TemplateSyntaxError = type("_NoTemplateError", (Exception,), {})  # type: ignore[assignment,misc]

log = logging.getLogger(__name__)
PROFILE_HEADER = "X-Casrap-Profile"
FINISH = {"stop": "stop", "length": "length", "timeout": "length", "cancelled": "length"}
STATUS_TEXT = {400: "bad request", 401: "unauthorized", 404: "not found", 405: "method not allowed", 413: "request body too large",
               422: "unprocessable request", 429: "too many requests", 500: "internal server error", 503: "service unavailable"}


class Bridge:
    """Wakes the event loop from the worker thread: ``notify`` is thread-safe, ``wait`` is awaited.

    Every waiter gets its own future, so two coroutines waiting on one request (the
    handler and, once the client left, the task that settles it) never steal each
    other's wake-up; a spurious wake-up is harmless, since every loop re-checks the stream.
    """

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._waiting: list[asyncio.Future[None]] = []

    def notify(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self.wake)
        except RuntimeError:  # loop closed: nobody is listening any more
            pass

    def wake(self) -> None:
        waiting, self._waiting = self._waiting, []
        for future in waiting:
            if not future.done():
                future.set_result(None)

    async def wait(self) -> None:
        future = self.loop.create_future()
        self._waiting.append(future)
        await future


class Admission:
    """Requests admitted but not yet on the bank (``pending``), and those on it (``running``).

    Beyond ``max_queue`` waiting requests the answer is 429 with ``Retry-After``.
    ``max_queue`` 0 keeps no queue: a request is admitted only when nothing is pending or
    running and the bank is free (``busy``), so one runs and the others are refused.
    """

    def __init__(self, max_queue: int, busy: Callable[[], bool] = lambda: False) -> None:
        self.max_queue, self.busy = max_queue, busy
        self.pending = self.running = self.peak = 0
        self.mean_latency_s = 1.0

    def admit(self) -> None:
        if self.pending >= self.max_queue and (self.pending or self.running or self.busy()):
            retry = max(1, math.ceil(self.mean_latency_s * (self.pending + 1)))
            what = (f"the server's queue is full ({self.max_queue} requests waiting)" if self.max_queue
                    else "the server is busy and keeps no queue (--max-queue 0)")
            raise ApiError(429, f"{what}; retry later", code="queue_full", kind="rate_limit_error",
                           headers={"Retry-After": str(retry)})
        self.pending += 1
        self.peak = max(self.peak, self.pending)

    def started(self) -> None:
        self.pending -= 1
        self.running += 1

    def finished(self) -> None:
        self.running -= 1

    def observe(self, latency_s: float) -> None:
        self.mean_latency_s = 0.8 * self.mean_latency_s + 0.2 * latency_s


class _Flight:
    """One admitted request on its way through the server; :meth:`close` is the only way out."""

    def __init__(self, serving: OpenAIServing, stream: GenerationStream, bridge: Bridge, receive: Any) -> None:
        self.serving, self.stream, self.bridge = serving, stream, bridge
        self.started = self.closed = self.reported = False
        self.watcher = asyncio.get_running_loop().create_task(self._watch(receive))

    async def _watch(self, receive: Any) -> None:
        """The client went away (plain or streaming, queued or running): the request ends."""
        while (await receive())["type"] != "http.disconnect":
            pass
        self.close()

    def _start(self) -> None:
        if not self.started:
            self.started = True
            self.serving.admission.started()

    async def decided(self) -> None:
        """Wait for the profile choice; raise the request's error (or 499: client gone) when there is none."""
        while not self.stream.decided.is_set() and not self.closed:
            await self.bridge.wait()
        self._start()
        if self.closed and self.stream.decision is None:
            raise ApiError(499, "client closed the request", code="cancelled")
        if self.stream.decision is None:
            raise self.failure()

    async def updates(self) -> AsyncIterator[list[StreamPiece]]:
        """The pieces generated since the last update, until the stream ends or the client leaves."""
        while not self.closed:
            pieces = self.stream.drain()
            if pieces:
                yield pieces
            if self.stream.finished:
                return
            await self.bridge.wait()

    def failure(self) -> ApiError:
        """The request's error as the client sees it (logged when it is the server's fault)."""
        self.reported = True
        return self.serving.failure(self.stream.error)

    def close(self) -> None:
        """End the request, whatever ended it; idempotent. Settles now if the worker is done, else once it is."""
        if self.closed:
            return
        self.closed = True
        self.watcher.cancel()
        self._start()
        self.bridge.wake()  # a handler waiting on this request sees that it is closed
        self.stream.drain()
        if self.stream.finished:
            self.serving.settle(self)
            return
        self.stream.cancel()
        self.serving.spawn(self._settle_later())

    async def _settle_later(self) -> None:
        while not self.stream.finished:
            self.stream.drain()
            if not self.stream.finished:
                await self.bridge.wait()
        self.serving.settle(self)


@dataclass
class _Answer:
    """What every chunk or body of one answer shares."""

    rid: str
    chat: bool
    opts: Options
    endpoint: str
    model_id: str
    system: str
    created: int
    offset: int = 0  # characters of text streamed so far (completions' text_offset)

    @property
    def object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def logprobs(self, entries: list[Any] | None, offset: int = 0) -> dict[str, Any] | None:
        if self.opts.logprobs is None or entries is None:
            return None
        return chat_logprobs(entries) if self.chat else completion_logprobs(entries, offset)

    def event(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        data = {"id": self.rid, "object": self.object, "created": self.created, "model": self.model_id,
                "system_fingerprint": self.system, "choices": choices, **extra}
        if self.opts.include_usage:
            data.setdefault("usage", None)
        return f"data: {strict_dumps(data)}\n\n"

    def chunk(self, piece: StreamPiece | None, finish: str | None = None, first: bool = False, **extra: Any) -> str:
        text = piece.text if piece is not None else None
        logprobs = self.logprobs(piece.logprobs, self.offset) if piece is not None else None
        self.offset += len(text or "")
        if self.chat:
            delta: dict[str, Any] = {} if text is None else {"content": text}
            if first:
                delta["role"] = "assistant"
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": logprobs}
        return self.event([choice], **extra)


class OpenAIServing:
    """Owns admission, every request's lifecycle and the shape of every error of one served ``AdaptiveLM``."""

    def __init__(self, lm: AdaptiveLM, model_id: str | None = None, metrics: ServerMetrics | None = None,
                 limits: Limits | None = None) -> None:
        self.lm = lm
        self.model_id = model_id or lm.model_name or "casrap"
        self.limits = limits or Limits()
        self.admission = Admission(self.limits.max_queue, busy=lambda: bool(lm.busy))
        self.metrics = metrics or ServerMetrics(queue_length=lambda: self.admission.pending)
        self.created = int(time.time())
        model = lm.router.bank.model
        self.model_defaults = model_sampling_defaults(model)
        self.vocab = int(getattr(model.config, "vocab_size", 0) or len(lm.tokenizer))
        self.fingerprint = (lm.bundle.fingerprint if lm.bundle is not None else "none").replace("/", "-")
        self._background: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ answers
    async def chat(self, request: Request, req: ChatRequest) -> Response:
        if not req.messages:
            raise ApiError(400, "messages must hold at least one message", "messages")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        return await self._respond(request, "/v1/chat/completions", req, messages, chat=True)

    async def completion(self, request: Request, req: CompletionRequest) -> Response:
        prompt = req.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(400, "give exactly one prompt", "prompt")
            prompt = prompt[0]
        if req.max_tokens is None:
            req.max_tokens = 16  # OpenAI's default for completions
        return await self._respond(request, "/v1/completions", req, prompt, chat=False)

    async def _respond(self, request: Request, endpoint: str, req: ChatRequest | CompletionRequest, prompt: Any,
                       chat: bool) -> Response:
        if req.model not in {self.model_id, "casrap"}:
            raise ApiError(400, f"unknown model {req.model!r}; this server serves {self.model_id!r}", "model", "model_not_found")
        opts = validate(req, self.limits, self.lm.profiles, self.vocab, self.model_defaults, self.lm.defaults.max_new_tokens)
        self.admission.admit()
        bridge = Bridge()
        stream = self.lm.submit(prompt, opts.max_tokens, opts.target_s, ignore_eos=opts.ignore_eos, profile=opts.profile,
                                raw=not chat, cancel=Cancellation(self.limits.request_timeout_s), notify=bridge.notify,
                                pieces=bool(req.stream), **opts.sampling)
        flight = _Flight(self, stream, bridge, request.receive)
        try:
            await flight.decided()
        except BaseException:
            flight.close()
            raise
        assert stream.decision is not None
        answer = _Answer(("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], chat, opts, endpoint, self.model_id,
                         self._system(stream.decision.profile), int(time.time()))
        if not req.stream:
            try:
                return await self._plain(flight, answer)
            finally:
                flight.close()
        return StreamingResponse(self._events(flight, answer), media_type="text/event-stream",
                                 headers={PROFILE_HEADER: stream.decision.profile, "Cache-Control": "no-cache"})

    async def _plain(self, flight: _Flight, answer: _Answer) -> Response:
        async for _ in flight.updates():
            pass
        stream = flight.stream
        if flight.closed and not stream.finished:
            raise ApiError(499, "client closed the request", code="cancelled")
        if stream.result is None:
            raise flight.failure()
        result, rec = stream.result, stream.result.record
        choice: dict[str, Any] = {"index": 0, "finish_reason": FINISH.get(rec.finish_reason, "stop"),
                                  "logprobs": answer.logprobs(result.logprobs)}
        if answer.chat:
            choice["message"] = {"role": "assistant", "content": result.text}
        else:
            choice["text"] = result.text
        body = {"id": answer.rid, "object": "chat.completion" if answer.chat else "text_completion", "created": answer.created,
                "model": self.model_id, "system_fingerprint": self._system(rec.profile), "choices": [choice],
                "usage": self._usage(stream), "casrap": self._casrap(stream, answer.opts)}
        self.count(answer.endpoint, 200)
        return StrictJSONResponse(body, headers={PROFILE_HEADER: rec.profile})

    async def _events(self, flight: _Flight, answer: _Answer) -> AsyncIterator[str]:
        """Server-sent events: the role chunk once the first token exists (as vLLM sends it), text, the end."""
        stream, status, opened = flight.stream, "200", False
        try:
            async for pieces in flight.updates():
                if not opened:
                    opened = True
                    yield answer.chunk(StreamPiece("", 0), first=True, casrap=self._casrap(stream, answer.opts))
                for piece in pieces:
                    if piece.text or piece.logprobs:
                        yield answer.chunk(piece)
            if flight.closed and not stream.finished:
                status = "cancelled"
                return
            if not opened:
                yield answer.chunk(StreamPiece("", 0), first=True, casrap=self._casrap(stream, answer.opts))
            if stream.result is None:
                raise flight.failure()
            finish = FINISH.get(stream.result.record.finish_reason, "stop")
            yield answer.chunk(None, finish, casrap=self._casrap(stream, answer.opts))
            if answer.opts.include_usage:
                yield answer.event([], usage=self._usage(stream))
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
            yield f"data: {strict_dumps(error_body(message, code=api.code if api else None, kind=api.kind if api else 'server_error'))}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            flight.close()
            self.count(answer.endpoint, status)

    # --------------------------------------------------------------- lifecycle
    def settle(self, flight: _Flight) -> None:
        """Called once per request, when its worker has let go: record its cost, or account for how it ended."""
        self.admission.finished()
        stream = flight.stream
        rec = stream.record
        if rec is not None:
            self.metrics.record(rec)
            self.admission.observe(rec.latency_s)
            if rec.finish_reason in ("cancelled", "timeout"):
                self.metrics.cancelled.labels("running", rec.finish_reason).inc()
            return
        error = stream.error
        if isinstance(error, RequestCancelled):
            self.metrics.cancelled.labels("queued", error.reason).inc()
        elif error is not None and not flight.reported:
            if isinstance(error, (CasrapError, ApiError)) or self._template_error(error):
                log.info("request refused after its client left: %s", error)
            else:
                log.error("request failed after its client left", exc_info=error)

    def spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @staticmethod
    def _template_error(error: BaseException | None) -> bool:
        """A chat template refusing the messages (roles that do not alternate, ...): the client's error, not ours."""
        return isinstance(error, TemplateError) and not isinstance(error, TemplateSyntaxError)

    def failure(self, error: BaseException | None) -> ApiError:
        """What a request that failed in the worker (before or during generation) answers."""
        if isinstance(error, RequestCancelled):
            if error.reason == "timeout":
                return ApiError(503, f"no answer within this server's request timeout of {self.limits.request_timeout_s} s",
                                code="timeout", kind="server_error", headers={"Retry-After": "1"})
            return ApiError(499, "client closed the request", code="cancelled")
        if isinstance(error, CasrapError):
            return ApiError(400, str(error), code=code_for(error))
        if isinstance(error, ApiError):
            return error
        if self._template_error(error):
            return ApiError(400, f"the model's chat template refused these messages: {error}", "messages", "invalid_messages")
        log.error("request failed", exc_info=error)
        return ApiError(500, "internal server error", kind="server_error")

    # ------------------------------------------------------------------ pieces
    def _system(self, profile: str) -> str:
        return f"casrap-{self.fingerprint}-{profile}"

    def _casrap(self, stream: GenerationStream, opts: Options) -> dict[str, Any]:
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
            warnings.append(f"stopped at the server's request timeout of {self.limits.request_timeout_s} s")
        if rec is not None and rec.target_expired:
            warnings.append("the latency target passed while the request was queued: the fastest profile answered")
        return data | {"warnings": warnings}

    @staticmethod
    def _usage(stream: GenerationStream) -> dict[str, int]:
        rec = stream.record
        assert rec is not None
        return {"prompt_tokens": rec.prompt_tokens, "completion_tokens": rec.completion_tokens,
                "total_tokens": rec.prompt_tokens + rec.completion_tokens}

    # -------------------------------------------------------- the other routes
    def count(self, path: str, status: int | str) -> None:
        """One request in ``casrap_requests_total``, labelled by its route template (bounded), never the raw path."""
        self.metrics.requests.labels(self.metrics.endpoint(path), str(status)).inc()

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "casrap"}

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.model_id, "profiles": self.lm.profiles, "queue_length": self.admission.pending,
                "running": self.lm.busy}

    # ------------------------------------------------------------------ errors
    async def error(self, request: Request, exc: Exception) -> Response:
        """Every failure as OpenAI's ``{"error": {...}}`` body, counted under its route; no internals."""
        path = request.url.path
        if isinstance(exc, ApiError):
            self.count(path, exc.status)
            if exc.status == 429:
                self.metrics.rejected.labels("queue_full").inc()
            return error_response(exc.status, str(exc), exc.param, exc.code, exc.kind, exc.headers)
        if isinstance(exc, RequestValidationError):
            first = exc.errors()[0] if exc.errors() else {}
            loc = [str(x) for x in first.get("loc", []) if x != "body"]
            self.count(path, 400)
            return error_response(400, f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}", loc[0] if loc else None)
        if isinstance(exc, StarletteHTTPException):
            self.count(path, exc.status_code)
            message = STATUS_TEXT.get(exc.status_code, "error")
            if exc.status_code == 404:
                message = f"no route {request.method} {path}"
            elif exc.status_code == 405:
                message = f"method {request.method} is not allowed on {path}"
            return error_response(exc.status_code, message, headers=dict(exc.headers or {}))
        if isinstance(exc, CasrapError):
            self.count(path, 400)
            return error_response(400, str(exc), code=code_for(exc))
        log.exception("internal error on %s", path, exc_info=exc)
        self.count(path, 500)
        return error_response(500, "internal server error")


__all__ = ["FINISH", "PROFILE_HEADER", "Admission", "Bridge", "OpenAIServing"]
