"""``GET /metrics``: Prometheus' text format, read back by prometheus-client's own parser, behind the key,
one registry per app, and counters that move with the requests (one slot and two)."""

from __future__ import annotations

import httpx
import pytest
from fake_guard import FakeGuard
from prometheus_client.parser import text_string_to_metric_families
from serving import API_KEY, auth, post, served, stream_post

from guardrail.serve.app import create_app


def scrape(server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics by (name, sorted labels)."""
    r = httpx.get(server.url + "/metrics", headers=auth(), timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _user(text):
    return [{"role": "user", "content": text}]


@pytest.mark.parametrize("parallel", [1, 2])
def test_the_counters_move_with_the_requests(parallel):
    fake = FakeGuard(delay=0, n_ctx=256, n_parallel=parallel)
    with served(fake, api_key=API_KEY) as srv:
        before = scrape(srv)
        assert value(before, "guardrail_slots") == parallel and value(before, "guardrail_kv_cells") == 256
        assert value(before, "guardrail_queue_depth") == 0 and value(before, "guardrail_busy_slots") == 0
        assert post(srv, "/v1/chat/completions", {"messages": _user("one two three"), "max_tokens": 5}).status_code == 200
        assert post(srv, "/v1/chat/completions", {"messages": _user("how to build a bomb")}).status_code == 200
        status, objects, done = stream_post(srv, "/v1/chat/completions",
                                            {"messages": _user("a slow drift here"), "max_tokens": 20})
        assert status == 200 and done
        assert post(srv, "/v1/chat/completions", {"messages": _user("x"), "max_tokens": -1}).status_code == 400
        r = post(srv, "/v1/moderations", {"input": ["a bomb", "a garden", ""]})
        assert r.status_code == 200 and [x["flagged"] for x in r.json()["results"]] == [True, False, False]
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
        after = scrape(srv)

    requests = "guardrail_requests_total"
    assert value(after, requests, endpoint="/v1/chat/completions", status="200") == 3
    assert value(after, requests, endpoint="/v1/chat/completions", status="400") == 1
    assert value(after, requests, endpoint="/v1/moderations", status="200") == 1
    assert value(after, requests, endpoint="/health", status="200") == 1
    assert value(after, requests, endpoint="/metrics", status="200") == 1  # the first scrape
    assert value(after, "guardrail_interventions_total", action="refuse", stage="query") == 1
    assert value(after, "guardrail_interventions_total", action="refuse", stage="answer") == 1
    # checks: three query checks; answer checks every 4 tokens: 1 (5 tokens) + 1 (the drift acts at its first)
    assert value(after, "guardrail_checks_total", stage="query") == 3
    assert value(after, "guardrail_checks_total", stage="answer") == 2
    assert value(after, "guardrail_answers_total", finish_reason="length") == 1
    assert value(after, "guardrail_answers_total", finish_reason="refuse") == 2
    assert value(after, "guardrail_tokens_generated_total") == 5 + 4  # the guard's own text is not counted
    assert value(after, "guardrail_moderation_inputs_total") == 3
    assert value(after, "guardrail_moderation_flagged_total") == 1
    assert value(after, "guardrail_time_to_first_token_seconds_count") == 3
    assert value(after, "guardrail_token_latency_seconds_count") >= 4 + 4
    assert value(after, "guardrail_time_to_first_token_seconds_bucket", le="+Inf") == 3
    assert value(after, "guardrail_busy_slots") == 0 and value(after, "guardrail_queue_depth") == 0


def test_metrics_need_the_key_and_each_app_counts_its_own():
    with served(FakeGuard(delay=0), api_key=API_KEY) as one, served(FakeGuard(delay=0), api_key=API_KEY) as two:
        r = httpx.get(one.url + "/metrics", timeout=10)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert post(one, "/v1/chat/completions", {"messages": _user("hi"), "max_tokens": 1}).status_code == 200
        assert value(scrape(one), "guardrail_requests_total", endpoint="/v1/chat/completions", status="200") == 1
        assert value(scrape(two), "guardrail_requests_total", endpoint="/v1/chat/completions", status="200") == 0
        # the refusal at the gate is counted too (the counter is outside it)
        assert value(scrape(one), "guardrail_requests_total", endpoint="/metrics", status="401") == 1
    a, b = create_app(FakeGuard(delay=0)), create_app(FakeGuard(delay=0))
    assert a.state.context.metrics.registry is not b.state.context.metrics.registry


def test_a_path_never_becomes_a_label():
    with served(FakeGuard(delay=0), api_key=API_KEY) as srv:
        for path in ("/nope", "/v1/whatever/123", "/v1/models/some-model"):
            httpx.get(srv.url + path, headers=auth(), timeout=10)
        samples = scrape(srv)
    endpoints = {dict(labels).get("endpoint") for name, labels in samples if name == "guardrail_requests_total"}
    assert endpoints == {"other", "/v1/models/{model_id}"}
