"""``GET /metrics``: what an operator scrapes, in Prometheus' text format (prometheus-client).

Each app has its own :class:`~prometheus_client.CollectorRegistry` (several apps in one
process, as in the tests, never share counters). What is counted:

- ``guardrail_requests_total{endpoint, status}``: every HTTP response, the gate's refusals
  included (counted by :class:`RequestCounter`, the outermost middleware);
- from the events of every answer (on the worker, as they are made):
  ``guardrail_checks_total{stage}``, ``guardrail_interventions_total{action, stage}`` (the
  stage of the check that acted: ``query``, ``prefill`` or ``answer``), ``guardrail_answers_total{finish_reason}``,
  ``guardrail_tokens_generated_total`` (sampled tokens; the guard's written text is not counted),
  ``guardrail_time_to_first_token_seconds`` (from the request reaching the queue to its first
  token, waiting included) and ``guardrail_token_latency_seconds`` (between a stream's tokens);
- ``guardrail_moderation_inputs_total`` and ``guardrail_moderation_flagged_total``;
- gauges read at scrape time: ``guardrail_queue_depth``, ``guardrail_busy_slots``,
  ``guardrail_slots`` and ``guardrail_kv_cells`` (the KV budget all slots share).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from guardrail.runtime.events import CheckEvent, DoneEvent, Event, InterventionEvent, TokenEvent

#: the endpoints requests are counted under (anything else is ``other``: paths never become labels)
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/moderations", "/v1/models", "/health", "/metrics",
             "/docs", "/openapi.json")
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


def endpoint_of(path: str) -> str:
    if path in ENDPOINTS:
        return path
    return "/v1/models/{model_id}" if path.startswith("/v1/models/") else "other"


class Metrics:
    """The server's counters, histograms and gauges, in a registry of their own."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("guardrail_requests", "HTTP responses, by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.checks = Counter("guardrail_checks", "Checks run, by stage (query check, prefill check, answer check)", ["stage"],
                              registry=r)
        self.interventions = Counter("guardrail_interventions", "Answers the guard ended, by action and by the "
                                     "stage of the check that acted", ["action", "stage"], registry=r)
        self.answers = Counter("guardrail_answers", "Answers finished, by finish reason", ["finish_reason"],
                               registry=r)
        self.tokens = Counter("guardrail_tokens_generated", "Answer tokens sampled from the model", registry=r)
        self.moderation_inputs = Counter("guardrail_moderation_inputs", "Texts scored by /v1/moderations",
                                         registry=r)
        self.moderation_flagged = Counter("guardrail_moderation_flagged", "Moderation inputs flagged harmful",
                                          registry=r)
        self.ttft = Histogram("guardrail_time_to_first_token_seconds", "From a request reaching the queue to its "
                              "first token (waiting for a slot included)", buckets=TTFT_BUCKETS, registry=r)
        self.token_latency = Histogram("guardrail_token_latency_seconds", "Time between an answer's tokens",
                                       buckets=TOKEN_BUCKETS, registry=r)
        self.queue_depth = Gauge("guardrail_queue_depth", "Requests waiting for a slot", registry=r)
        self.busy_slots = Gauge("guardrail_busy_slots", "Slots running a request", registry=r)
        self.slots = Gauge("guardrail_slots", "Slots: requests the guard serves at once (--parallel)", registry=r)
        self.kv_cells = Gauge("guardrail_kv_cells", "KV cells (tokens) all slots share: the context", registry=r)

    def bind(self, *, waiting: Callable[[], int], busy: Callable[[], int], slots: int, kv_cells: int) -> None:
        """The gauges read the runner's state when scraped."""
        self.queue_depth.set_function(lambda: float(waiting()))
        self.busy_slots.set_function(lambda: float(busy()))
        self.slots.set(slots)
        self.kv_cells.set(kv_cells)

    def watch(self, since: float) -> Callable[[Event], None]:
        """An observer of one answer's events; ``since``: when its request reached the queue
        (``time.perf_counter``)."""
        last: list[float] = []
        stage = ["query"]

        def observe(event: Event) -> None:
            if isinstance(event, TokenEvent):
                now = time.perf_counter()
                if last:
                    self.token_latency.observe(now - last[0])
                    last[0] = now
                else:
                    self.ttft.observe(now - since)
                    last.append(now)
                if not event.forced:
                    self.tokens.inc()
            elif isinstance(event, CheckEvent):
                stage[0] = event.stage
                self.checks.labels(event.stage).inc()
            elif isinstance(event, InterventionEvent):
                self.interventions.labels(event.action, stage[0]).inc()
            elif isinstance(event, DoneEvent):
                self.answers.labels(event.finish_reason).inc()
        return observe

    def moderated(self, flagged: bool) -> None:
        self.moderation_inputs.inc()
        if flagged:
            self.moderation_flagged.inc()

    def exposition(self) -> tuple[bytes, str]:
        """The text format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestCounter:
    """Pure ASGI: counts each response by endpoint and status as its head is sent (streams untouched)."""

    def __init__(self, app: Any, *, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = endpoint_of(str(scope.get("path", "")))

        async def counted(message: Any) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)
