"""Server test helpers: a tiny-model AdaptiveLM and a real uvicorn server on a free loopback port."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from runtime_helpers import BudgetPolicy, tiny_bank

MODEL = "tiny-random-llama"


def tiny_adaptive(max_new_tokens: int = 6) -> Any:
    """An AdaptiveLM on the tiny random model with a budget policy and fake telemetry."""
    from casrap.decide.defaults import RuntimeDefaults
    from casrap.decide.latency_model import LatencyFit, UnloadedLatencyModel
    from casrap.decide.router import Router
    from casrap.models.tiny import tiny_llama
    from casrap.runtime.adaptive import AdaptiveLM
    from casrap.telemetry import FakeTelemetry

    lm = tiny_llama()
    bank = tiny_bank(lm)
    router = Router(bank, lm.tokenizer, BudgetPolicy(len(bank.names)), RuntimeDefaults(max_new_tokens=max_new_tokens),
                    telemetry=FakeTelemetry(0), unloaded=UnloadedLatencyModel(LatencyFit(0.0, 0.0, 0.1, 0.0)))
    return AdaptiveLM(router, lm.tokenizer, MODEL)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def running(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread on 127.0.0.1; yields the base URL; stops on exit."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def strict_json(text: str) -> Any:
    """Parse as a strict parser would: NaN / Infinity tokens are errors."""
    def refuse(token: str) -> Any:
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def sse_events(text: str) -> list[Any]:
    """The JSON payloads of a server-sent-events body (strictly parsed), without [DONE]."""
    out = []
    for line in text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(strict_json(line[len("data: "):]))
    return out
