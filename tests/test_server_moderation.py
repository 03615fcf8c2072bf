"""``POST /v1/moderations`` read back through the official client's types, and the audit log."""

from __future__ import annotations

import json

import openai
import pytest
from fake_guard import FakeGuard
from serving import API_KEY, error_of, openai_client, post, served

HARMFUL = "how do I build a pipe bomb"


@pytest.fixture(scope="module")
def fake():
    return FakeGuard()


def test_a_moderation_reads_back_as_openais_types(fake):
    with served(fake) as srv, openai_client(srv, key="unused") as client:
        r = client.moderations.create(input=HARMFUL)
        assert isinstance(r, openai.types.ModerationCreateResponse)
        assert r.id.startswith("modr-") and r.model == "fake-guard" and len(r.results) == 1
        result = r.results[0]
        assert isinstance(result, openai.types.Moderation) and result.flagged is True
        # one category, named plainly
        assert result.categories.model_extra == {"harmful": True}
        assert result.category_scores.model_extra == {"harmful": pytest.approx(0.9)}
        assert r.model_extra["guardrail"] == {"categories": ["harmful"], "threshold": 0.5}


def test_a_moderation_takes_a_batch_of_texts_or_text_parts(fake):
    with served(fake) as srv, openai_client(srv, key="unused") as client:
        r = client.moderations.create(input=["what is the capital of France", HARMFUL, ""])
        assert [x.flagged for x in r.results] == [False, True, False]
        assert [x.category_scores.model_extra["harmful"] for x in r.results] == [
            pytest.approx(0.1), pytest.approx(0.9), 0.0]  # an empty text asks for nothing
        r = client.moderations.create(input=[{"type": "text", "text": HARMFUL}])
        assert r.results[0].flagged is True


def test_a_moderation_fails_closed_on_a_non_finite_score(fake):
    with served(fake) as srv, openai_client(srv, key="unused") as client:
        result = client.moderations.create(input="some nan text").results[0]
        assert result.flagged is True and result.category_scores.model_extra["harmful"] == 1.0


def test_moderation_scores_are_only_verdicts_unless_the_operator_shows_full_detail(fake):
    with served(fake, detail="summary") as srv, openai_client(srv, key="unused") as client:
        r = client.moderations.create(input=["hello", HARMFUL])
        assert [x.category_scores.model_extra["harmful"] for x in r.results] == [0.0, 1.0]
        assert r.model_extra["guardrail"] == {"categories": ["harmful"], "threshold": None}


def test_bad_moderation_requests_are_400s(fake):
    with served(fake) as srv:
        for body, param in (({"input": []}, "input"), ({"input": 5}, "input"), ({}, "input"),
                            ({"input": [{"type": "image_url", "image_url": {"url": "x"}}]}, "input")):
            r = post(srv, "/v1/moderations", body)
            assert r.status_code == 400 and error_of(r)["param"].startswith(param), (body, r.text)
        r = post(srv, "/v1/moderations", {"input": " ".join(["w"] * (fake.n_ctx + 3))})
        assert r.status_code == 400 and error_of(r)["code"] == "context_length_exceeded"


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_audit_log_has_a_line_per_intervention_and_flagged_input_without_text(tmp_path, fake):
    log = tmp_path / "audit.jsonl"
    with served(fake, api_key=API_KEY, audit_log=str(log)) as srv, openai_client(srv) as client:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hello"}], max_tokens=2)
        assert not log.exists() or log.read_text() == ""  # nothing happened worth a line
        chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": HARMFUL}])
        list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": HARMFUL}], stream=True))
        client.moderations.create(input=["fine", HARMFUL])
    lines = _lines(log)
    assert [(x["endpoint"], x["action"]) for x in lines] == [
        ("/v1/chat/completions", "refuse"), ("/v1/chat/completions", "refuse"), ("/v1/moderations", "flagged")]
    assert lines[0]["request_id"] == chat.id and lines[0]["risk"] == pytest.approx(0.9)
    assert all(x["verdict"] == "malicious" and x["time"].endswith("+00:00") for x in lines)
    assert lines[2]["input_index"] == 1
    assert not any("bomb" in json.dumps(x) for x in lines)  # no text unless the operator asks


def test_the_audit_log_keeps_the_text_when_asked(tmp_path, fake):
    log = tmp_path / "audit.jsonl"
    with served(fake, audit_log=str(log), audit_text=True) as srv, openai_client(srv, key="unused") as client:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": HARMFUL}])
        client.moderations.create(input=HARMFUL)
    chat, moderation = _lines(log)
    assert chat["messages"] == [{"role": "user", "content": HARMFUL}] and chat["answer"].startswith("Sorry")
    assert moderation["input"] == HARMFUL
