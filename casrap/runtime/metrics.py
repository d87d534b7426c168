"""Prometheus metrics of the server, all ``casrap_``-prefixed, in a registry per app.

A registry per app (not prometheus-client's global one) so that several servers in
one process (tests) do not collide and each ``/metrics`` shows only its own requests.
Labels are bounded: a request's ``endpoint`` is the template of the route it matched
(``/v1/models/{model}``), or ``other`` for any path no route serves, so requests to
random paths (which need no key to reach the 404) cannot grow memory or ``/metrics``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.routing import compile_path

from casrap.runtime.adaptive import GenerationRecord

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
OTHER = "other"


class ServerMetrics:
    """Requests, decisions per profile, latency histograms, targets met, queue, refusals and cancellations."""

    def __init__(self, queue_length: Callable[[], float] | None = None, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("casrap_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=r)
        self.decisions = Counter("casrap_decisions", "Profile decisions by profile", ["profile"], registry=r)
        self.latency = Histogram("casrap_request_latency_seconds", "Request latency once on the bank (decision + switch + generation)",
                                 ["profile"], buckets=LATENCY_BUCKETS, registry=r)
        self.total = Histogram("casrap_request_total_seconds", "Request latency including the queue wait",
                               buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("casrap_ttft_seconds", "Time to first token", buckets=LATENCY_BUCKETS, registry=r)
        self.decision = Histogram("casrap_decision_seconds", "Telemetry + prompt analysis + policy + switch",
                                  buckets=FAST_BUCKETS, registry=r)
        self.queue_wait = Histogram("casrap_queue_wait_seconds", "Time waiting for the bank", buckets=LATENCY_BUCKETS, registry=r)
        self.targets = Counter("casrap_targets", "Requests with a latency target, by whether it was met", ["met"], registry=r)
        self.tokens = Counter("casrap_generated_tokens", "Completion tokens generated", registry=r)
        self.queue = Gauge("casrap_queue_length", "Requests admitted and waiting for the bank", registry=r)
        self.rejected = Counter("casrap_rejected", "Requests refused before queueing, by reason (queue_full)", ["reason"], registry=r)
        self.cancelled = Counter("casrap_cancelled", "Requests stopped early, by stage (queued, running) and reason (cancelled: "
                                 "client gone; timeout: request timeout)", ["stage", "reason"], registry=r)
        if queue_length is not None:
            self.queue.set_function(queue_length)
        self._routes: list[tuple[re.Pattern[str], str]] = []

    def use_routes(self, templates: Iterable[str]) -> None:
        """The route templates (``/v1/models/{model:path}``) that :meth:`endpoint` maps paths onto."""
        for template in templates:
            regex, label, _ = compile_path(template)
            self._routes.append((regex, label))

    def endpoint(self, path: str) -> str:
        """The ``endpoint`` label of a request path: its route's template, else ``other``."""
        for regex, label in self._routes:
            if regex.match(path):
                return label
        return OTHER

    def record(self, rec: GenerationRecord) -> None:
        self.decisions.labels(rec.profile).inc()
        self.latency.labels(rec.profile).observe(rec.latency_s)
        self.total.observe(rec.total_s)
        self.ttft.observe(rec.ttft_s)
        self.decision.observe(rec.decision_s + rec.switch_s)
        self.queue_wait.observe(rec.queue_wait_s)
        self.tokens.inc(rec.completion_tokens)
        if rec.target_met is not None:
            self.targets.labels("true" if rec.target_met else "false").inc()
