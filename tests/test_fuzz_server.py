"""The server fuzzed through its own OpenAPI schema (schemathesis), on the fake guard: whatever a client
sends that the schema describes, no 5xx, and every response is one the schema documents (status code,
content type and body shape)."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")

from fake_guard import FakeGuard  # noqa: E402
from fuzzing import examples  # noqa: E402
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

schema = schemathesis.openapi.from_dict(create_app(FakeGuard(delay=0), make_config(SETTINGS)).openapi())


@pytest.fixture(scope="module")
def server():
    with served(FakeGuard(delay=0, n_ctx=4096), **SETTINGS) as srv:
        yield srv


@schema.parametrize()
@examples(12)
def test_the_server_answers_anything_its_schema_allows_within_its_schema(case, server):
    case.call_and_validate(base_url=server.url, headers=auth(), checks=CHECKS, timeout=30)
