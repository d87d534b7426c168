"""The ASGI layer in front of the app: API key, body-size limit, strict JSON responses.

Kept outside FastAPI's routing on purpose: a request with a wrong key or an oversized
body is answered before any JSON is parsed, so it costs the event loop nothing.
"""

from __future__ import annotations

import hmac
from typing import Any

from fastapi.responses import JSONResponse, Response

from casrap.runtime.metrics import ServerMetrics
from casrap.runtime.protocol import Limits, error_body, strict_dumps


class StrictJSONResponse(JSONResponse):
    """JSON that strict parsers accept: NaN / Infinity become null."""

    def render(self, content: Any) -> bytes:
        return strict_dumps(content).encode("utf-8")


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                    kind: str | None = None, headers: dict[str, str] | None = None) -> StrictJSONResponse:
    kind = kind or ("server_error" if status >= 500 else "invalid_request_error")
    return StrictJSONResponse(error_body(message, param, code, kind), status_code=status, headers=headers)


class Guard:
    """ASGI middleware: API key on every route but ``/health``, and the body-size limit (413).

    The body is read here, up to the limit, before FastAPI parses anything: a multi-MB
    body costs the event loop a copy, not a JSON parse.
    """

    def __init__(self, app: Any, limits: Limits, metrics: ServerMetrics) -> None:
        self.app, self.limits, self.metrics = app, limits, metrics

    async def _refuse(self, send: Any, scope: dict[str, Any], response: Response, status: int) -> None:
        self.metrics.requests.labels(self.metrics.endpoint(scope.get("path", "")), str(status)).inc()
        await response(scope, self._empty_receive, send)

    @staticmethod
    async def _empty_receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        key = self.limits.api_key
        if key and scope.get("path") != "/health":
            given = headers.get("authorization", "")
            expected = f"Bearer {key}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                await self._refuse(send, scope, error_response(401, "missing or invalid API key (Authorization: Bearer KEY)",
                                                                code="invalid_api_key"), 401)
                return
        limit = self.limits.max_body_bytes
        too_large = error_response(413, f"request body above this server's limit of {limit} bytes", code="request_too_large")
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(send, scope, too_large, 413)
            return
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = bool(message.get("more_body", False))
            if len(body) > limit:
                await self._refuse(send, scope, too_large, 413)
                return
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


__all__ = ["Guard", "StrictJSONResponse", "error_response"]
