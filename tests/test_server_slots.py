"""``--parallel N``: several requests answered at once, one batch stepped by one worker thread, each
request reading only its own answer; a client that leaves stops only its own; the queue, its 429s and
the KV budget hold per request. On the fake guard's batch (tests/fake_guard.py): no model, fast."""

from __future__ import annotations

import threading

import httpx
from fake_guard import FakeGuard
from serving import API_KEY, auth, error_of, post, served, stream_post, wait_for

from guardrail.measure.serve_bench import sse_chunks


def _user(text):
    return [{"role": "user", "content": text}]


def _health(server):
    return httpx.get(server.url + "/health", headers=auth(), timeout=10).json()


def _text(objects):
    return "".join(o["choices"][0]["delta"].get("content") or "" for o in objects if o.get("choices"))


def test_two_streams_advance_together_and_a_client_that_leaves_stops_only_its_own():
    fake = FakeGuard(delay=0.005, n_ctx=1000, n_parallel=2)
    with served(fake, api_key=API_KEY) as srv:
        got = {"leaver": 0, "stayer": 0}
        result = {}

        def leaver():
            with httpx.stream("POST", srv.url + "/v1/chat/completions", headers=auth(), timeout=30,
                              json={"messages": _user("alpha beta"), "max_tokens": 500, "stream": True}) as r:
                for line in r.iter_lines():
                    got["leaver"] += line.startswith("data:")
                    if got["stayer"] >= 5 and got["leaver"] >= 5:
                        return  # both have streamed: leave mid-answer

        def stayer():
            with httpx.stream("POST", srv.url + "/v1/chat/completions", headers=auth(), timeout=30,
                              json={"messages": _user("gamma delta"), "max_tokens": 120, "stream": True}) as r:
                objects = list(sse_chunks(_counting(r.iter_lines(), got)))
                result.update(objects=objects[:-1], done=objects[-1] is None)

        threads = [threading.Thread(target=leaver), threading.Thread(target=stayer)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert wait_for(lambda: fake.closed_early == 1)
        assert result["done"] and result["objects"][-1]["choices"][0]["finish_reason"] == "length"
        words = _text(result["objects"]).split()
        assert len(words) == 120 and set(words) == {"atled", "ammag"}  # its own answer, whole, nothing of the other's
        assert fake.peak == 2 and fake.overlaps == 0  # they ran in one batch, never as two generations
        assert wait_for(lambda: _health(srv)["busy_slots"] == 0)
        assert fake.active == 0 and fake.closed_early == 1  # only the leaver's answer was stopped


def _counting(lines, got):
    for line in lines:
        got["stayer"] += line.startswith("data:")
        yield line


def test_a_failing_answer_ends_alone():
    fake = FakeGuard(delay=0.005, n_ctx=1000, n_parallel=2)
    with served(fake, api_key=API_KEY) as srv:
        out = {}

        def ask(name, prompt):
            out[name] = stream_post(srv, "/v1/chat/completions", {"messages": _user(prompt), "max_tokens": 40})
        threads = [threading.Thread(target=ask, args=("bad", "explode now")),
                   threading.Thread(target=ask, args=("good", "fine words"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        status, objects, done = out["bad"]
        assert status == 200 and done and objects[-1]["error"]["code"] == "internal_error"
        assert "secret" not in str(objects)
        status, objects, done = out["good"]
        assert status == 200 and done and len(_text(objects).split()) == 40


def test_a_broken_batch_ends_its_answers_with_an_error_and_the_next_request_runs():
    fake = FakeGuard(delay=0.002, n_ctx=1000, n_parallel=2)
    with served(fake, api_key=API_KEY) as srv:
        r = post(srv, "/v1/chat/completions", {"messages": _user("crash please"), "max_tokens": 10})
        assert r.status_code == 500 and error_of(r)["code"] == "internal_error" and "secret" not in r.text
        r = post(srv, "/v1/chat/completions", {"messages": _user("fine words"), "max_tokens": 10})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 10
        assert wait_for(lambda: _health(srv)["busy_slots"] == 0)


def test_the_slots_fill_before_the_queue_and_the_queue_is_bounded():
    fake = FakeGuard(delay=0, n_parallel=2)
    fake.gate.clear()  # every step waits until the test lets it go
    with served(fake, api_key=API_KEY, queue_size=1) as srv:
        holders = [threading.Thread(target=post, args=(srv, "/v1/chat/completions"),
                                    kwargs={"body": {"messages": _user(f"hold {i}"), "max_tokens": 3}, "timeout": 60})
                   for i in range(3)]
        for t in holders[:2]:
            t.start()
        assert wait_for(lambda: _health(srv)["busy_slots"] == 2 and _health(srv)["busy"])
        holders[2].start()
        assert wait_for(lambda: _health(srv)["waiting"] == 1)
        r = post(srv, "/v1/chat/completions", {"messages": _user("one too many")})
        assert r.status_code == 429 and error_of(r)["code"] == "queue_full" and int(r.headers["Retry-After"]) >= 1
        fake.gate.set()
        for t in holders:
            t.join(30)
        health = _health(srv)
        assert health["served"] == 3 and health["refused"] == 1 and health["parallel"] == 2
        assert fake.peak == 2


def test_the_kv_budget_refuses_what_it_cannot_hold_and_queues_what_fits_later():
    fake = FakeGuard(delay=0.002, n_ctx=64, n_parallel=2)
    with served(fake, api_key=API_KEY) as srv:
        assert _health(srv)["kv_cells"] == 64
        r = post(srv, "/v1/chat/completions", {"messages": _user("w " * 70), "max_tokens": 4})
        assert r.status_code == 400
        err = error_of(r)
        assert err["code"] == "context_length_exceeded" and err["param"] == "messages"
        assert "KV budget is 64 tokens, shared by 2 slots" in err["message"]
        r = post(srv, "/v1/completions", {"prompt": "w " * 70, "max_tokens": 4})
        assert r.status_code == 400 and error_of(r)["param"] == "prompt"
        # two answers of 10 + 40 cells each cannot share 64: the second waits for the first, then runs
        out = []
        threads = [threading.Thread(target=lambda i=i: out.append(post(
            srv, "/v1/chat/completions", {"messages": _user(" ".join(["w"] * 10) + f" {i}"), "max_tokens": 40},
            timeout=30))) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert [r.status_code for r in out] == [200, 200]
        assert all(r.json()["usage"]["completion_tokens"] == 40 for r in out)
        assert fake.peak == 1  # never together
        # two that fit run together
        fake.peak = 0
        threads = [threading.Thread(target=post, args=(srv, "/v1/chat/completions"),
                                    kwargs={"body": {"messages": _user(f"short {i}"), "max_tokens": 20}})
                   for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert fake.peak == 2


def test_moderation_scores_beside_running_answers():
    fake = FakeGuard(delay=0.005, n_ctx=1000, n_parallel=2)
    with served(fake, api_key=API_KEY) as srv:
        streaming = threading.Thread(target=stream_post, args=(srv, "/v1/chat/completions",
                                                               {"messages": _user("long one"), "max_tokens": 200}))
        streaming.start()
        assert wait_for(lambda: fake.started == 1)
        r = post(srv, "/v1/moderations", {"input": ["a bomb", "a garden"]})
        assert r.status_code == 200 and [x["flagged"] for x in r.json()["results"]] == [True, False]
        assert fake.active == 1  # the answer was still running
        streaming.join(30)
