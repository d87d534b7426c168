"""The OpenAI wire format of ``casrap serve``: request models, validation, errors, strict JSON.

Every number is checked here, before a request queues: NaN and Infinity are refused
(``allow_inf_nan=False``), ranges are OpenAI's. Parameters casrap cannot honour are
refused with a 400 naming the parameter (never a silent 200); unknown extra fields are
ignored and listed in the answer's ``casrap.warnings``. An explicit ``null`` for any
optional parameter means its default, as OpenAI reads it (clients that serialise unset
fields send ``"n": null``). What a request may cost per decode step is capped:
``MAX_STOP`` stop strings of at most ``MAX_STOP_CHARS`` characters, ``MAX_LOGIT_BIAS``
``logit_bias`` entries (OpenAI's limits where it states one). Everything the server writes
goes through :func:`strict_dumps`: non-finite floats become ``null``, so the output
parses under strict JSON parsers (browsers', Go's, Rust's).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from casrap.errors import CasrapError

MAX_STOP = 4
MAX_STOP_CHARS = 256
MAX_LOGIT_BIAS = 300
ROLES = ("system", "developer", "user", "assistant", "tool", "function")
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5

# OpenAI fields that change nothing here and need no warning (metadata, hints, or values that are the default).
HARMLESS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "stream_options", "prompt_cache_key",
            "safety_identifier", "modalities", "prediction", "reasoning_effort", "verbosity", "web_search_options"}


class ApiError(Exception):
    """An error answered with OpenAI's body; ``status`` is the HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code, self.kind, self.headers = status, param, code, kind, headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(str(self), self.param, self.code, self.kind)


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


def error_body(message: str, param: str | None = None, code: str | None = None, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def finite(data: Any) -> Any:
    """``data`` with every non-finite float replaced by None (recursively)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite(v) for v in data]
    return data


def strict_dumps(data: Any) -> str:
    """JSON that strict parsers accept (no NaN / Infinity tokens)."""
    return json.dumps(finite(data), allow_nan=False, ensure_ascii=False, separators=(",", ":"))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """``null`` for a parameter that has a default is that default (OpenAI accepts it); a required one stays an error."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {k: v for k, v in data.items() if v is not None or k not in fields or fields[k].is_required()}


class ChatMessage(_Strict):
    role: Literal[ROLES]  # type: ignore[valid-type]  # an unknown role is a 400 naming messages, not a template error
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The text content; a non-text part (image, audio, file) is refused."""
        if isinstance(self.content, list):
            for part in self.content:
                if part.get("type") != "text":
                    raise bad(f"content parts of type {part.get('type')!r} are not supported (text only)", "messages")
            return "".join(str(p.get("text", "")) for p in self.content)
        return self.content or ""


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    model: str
    max_tokens: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    n: int = 1
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    latency_target_ms: float | None = Field(default=None, gt=0.0, description="casrap: end-to-end latency target")
    profile: str | None = Field(default=None, description="casrap (debug): force a profile")
    ignore_eos: bool = Field(default=False, description="casrap (debug): generate exactly max_tokens, as in vLLM")


class ChatRequest(_Common):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Common):
    prompt: str | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


@dataclass
class Limits:
    """What a server allows; see ``casrap serve --help``.

    ``max_queue``: requests that may wait for the model behind the one running; 0 keeps
    no queue (a request is refused with 429 unless the model is idle).
    """

    max_tokens_cap: int = 1024
    max_queue: int = 64
    request_timeout_s: float | None = 300.0
    max_body_bytes: int = 1 << 20
    allow_debug_extensions: bool = False
    api_key: str | None = None


@dataclass
class Options:
    """A validated request, ready for :meth:`AdaptiveLM.submit`."""

    max_tokens: int
    target_s: float | None
    sampling: dict[str, Any]
    logprobs: int | None  # None: none; else alternatives per token
    include_usage: bool
    profile: str | None
    ignore_eos: bool
    warnings: list[str] = field(default_factory=list)


def _refuse_unsupported(req: _Common) -> None:
    if req.n != 1:
        raise bad("only n=1 is supported", "n")
    if isinstance(req, ChatRequest):
        if req.tools:
            raise bad("tools (function calling) are not supported by this server", "tools")
        if req.tool_choice not in (None, "none"):
            raise bad("tool_choice is not supported by this server (no tools)", "tool_choice")
        if req.functions:
            raise bad("functions (function calling) are not supported by this server", "functions")
        if req.function_call not in (None, "none"):
            raise bad("function_call is not supported by this server", "function_call")
        if req.response_format is not None and req.response_format.get("type", "text") != "text":
            raise bad(f"response_format {req.response_format.get('type')!r} is not supported (text only)", "response_format")
    else:
        assert isinstance(req, CompletionRequest)
        if req.echo:
            raise bad("echo is not supported", "echo")
        if req.best_of not in (None, 1):
            raise bad("only best_of=1 is supported", "best_of")
        if req.suffix:
            raise bad("suffix (insertion) is not supported", "suffix")


def _stops(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP:
        raise bad(f"at most {MAX_STOP} stop sequences, got {len(stops)}", "stop")
    if any(not s for s in stops):
        raise bad("stop sequences must be non-empty strings", "stop")
    longest = max((len(s) for s in stops), default=0)
    if longest > MAX_STOP_CHARS:
        raise bad(f"stop sequences may be at most {MAX_STOP_CHARS} characters, got one of {longest}", "stop")
    return stops


def _logit_bias(bias: dict[str, float] | None, vocab: int) -> dict[int, float]:
    out: dict[int, float] = {}
    if bias and len(bias) > MAX_LOGIT_BIAS:
        raise bad(f"logit_bias may hold at most {MAX_LOGIT_BIAS} entries, got {len(bias)}", "logit_bias")
    for key, value in (bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise bad(f"logit_bias keys must be token ids, got {key!r}", "logit_bias") from None
        if not 0 <= token < vocab:
            raise bad(f"logit_bias token {token} is outside the vocabulary (0..{vocab - 1})", "logit_bias")
        if not -100.0 <= value <= 100.0:
            raise bad(f"logit_bias values must be in [-100, 100], got {value}", "logit_bias")
        out[token] = float(value)
    return out


def unknown_fields(req: BaseModel) -> list[str]:
    extra = sorted(set(req.model_extra or {}) - HARMLESS)
    return [f"ignored unknown field {name!r}" for name in extra]


def validate(req: _Common, limits: Limits, profiles: list[str], vocab: int, model_defaults: dict[str, Any],
             default_max_tokens: int) -> Options:
    """Check a request against the server's limits and turn it into generation options (400s on bad input)."""
    _refuse_unsupported(req)
    chat = isinstance(req, ChatRequest)
    limit = (req.max_completion_tokens or req.max_tokens) if chat else req.max_tokens
    if limit is not None and limit < 1:
        raise bad(f"max_tokens must be at least 1, got {limit}", "max_completion_tokens" if chat and req.max_completion_tokens else "max_tokens")
    n = limit or min(default_max_tokens, limits.max_tokens_cap)
    if n > limits.max_tokens_cap:
        raise bad(f"max_tokens {n} is above this server's cap of {limits.max_tokens_cap}", "max_tokens")
    for name, value in (("profile", req.profile), ("ignore_eos", req.ignore_eos)):
        if value and not limits.allow_debug_extensions:
            raise bad(f"{name} is a debug extension; start the server with --allow-debug-extensions to use it", name)
    if req.profile is not None and req.profile not in profiles:
        raise bad(f"unknown profile {req.profile!r}; have {', '.join(profiles)}", "profile")
    sampling: dict[str, Any] = {}
    silent = req.temperature is None and req.top_p is None and req.top_k is None
    if silent and model_defaults:
        sampling.update(model_defaults)
    elif req.temperature != 0 and not silent:
        # top_p / top_k alone sample at temperature 1 (OpenAI's default); temperature 0 is greedy
        sampling = {"do_sample": True, "temperature": req.temperature if req.temperature is not None else 1.0,
                    "top_p": req.top_p if req.top_p is not None else 1.0, "top_k": max(req.top_k or 0, 0)}
    if req.seed is not None:
        sampling["seed"] = req.seed % (2**64)
    stops = _stops(req.stop)
    if stops:
        sampling["stop"] = stops
    if req.presence_penalty:
        sampling["presence_penalty"] = req.presence_penalty
    if req.frequency_penalty:
        sampling["frequency_penalty"] = req.frequency_penalty
    bias = _logit_bias(req.logit_bias, vocab)
    if bias:
        sampling["logit_bias"] = bias
    if chat:
        if req.top_logprobs is not None and not req.logprobs:
            raise bad("top_logprobs needs logprobs: true", "top_logprobs")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
    else:
        logprobs = req.logprobs
    if logprobs is not None:
        sampling["logprobs"] = logprobs
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return Options(n, req.latency_target_ms / 1000.0 if req.latency_target_ms is not None else None, sampling, logprobs,
                   include_usage, req.profile, req.ignore_eos, unknown_fields(req))


def chat_logprobs(entries: list[Any]) -> dict[str, Any]:
    def item(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {"content": [item(e.token, e.logprob) | {"top_logprobs": [item(t, lp) for _, t, lp in e.top]} for e in entries]}


def completion_logprobs(entries: list[Any], offset: int) -> dict[str, Any]:
    offsets, at = [], offset
    for e in entries:
        offsets.append(at)
        at += len(e.token)
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{t: lp for _, t, lp in e.top} for e in entries], "text_offset": offsets}


def code_for(err: CasrapError) -> str | None:
    return "context_length_exceeded" if "context window" in str(err) else None


__all__ = ["MAX_LOGIT_BIAS", "MAX_STOP", "MAX_STOP_CHARS", "ApiError", "ChatRequest", "CompletionRequest", "Limits", "Options",
           "error_body", "strict_dumps", "validate"]
