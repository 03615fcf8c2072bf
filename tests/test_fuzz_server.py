"""The server fuzzed through its own OpenAPI schema (schemathesis), on the fake guard: whatever a client
sends that the schema describes, no 5xx, and every response is one the schema documents (status code,
content type and body shape).

schemathesis is used as a library of hypothesis strategies (its pytest plugin is left off in
pyproject.toml: loading it rewrites its ~400 modules' asserts at every start of pytest)."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")

from fake_guard import FakeGuard  # noqa: E402
from fuzzing import examples  # noqa: E402
from hypothesis import given  # noqa: E402
from serving import API_KEY, auth, served  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from guardrail.serve.app import create_app  # noqa: E402
from guardrail.serve.config import make_config  # noqa: E402

LIMITS = {"max_messages": 8, "max_chars": 2000, "max_inputs": 4}
SETTINGS = {"api_key": API_KEY, "defaults": {"max_tokens": 4}, "limits": LIMITS, "queue_timeout_s": 5.0}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]

SCHEMA = schemathesis.openapi.from_dict(create_app(FakeGuard(delay=0), make_config(SETTINGS)).openapi())
OPERATIONS = {op.label: op for op in (result.ok() for result in SCHEMA.get_all_operations())}


@pytest.fixture(scope="module")
def server():
    with served(FakeGuard(delay=0, n_ctx=4096), **SETTINGS) as srv:
        yield srv


def test_every_route_is_fuzzed():
    assert set(OPERATIONS) == {"GET /health", "GET /metrics", "GET /v1/models", "GET /v1/models/{model_id}",
                               "POST /v1/chat/completions", "POST /v1/completions", "POST /v1/moderations"}


@pytest.mark.parametrize("label", sorted(OPERATIONS))
def test_the_server_answers_anything_its_schema_allows_within_its_schema(server, label):
    @examples(8)
    @given(case=OPERATIONS[label].as_strategy())
    def check(case: schemathesis.Case) -> None:
        case.call_and_validate(base_url=server.url, headers=auth(), checks=CHECKS, timeout=30)

    check()
