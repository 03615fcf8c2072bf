"""What an operator relies on when others can reach the server: every bound on a request, the
gate (host, content type, body size), and fairness (a bounded queue, clients that leave, clients
that stop reading). Driven over real HTTP, raw sockets where a client must misbehave.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import openai
import pytest
from fake_guard import FakeGuard
from serving import API_KEY, auth, error_of, openai_client, post, served, wait_for

from guardrail.serve.config import LOOPBACK_HOST_HEADERS

LIMITS = {"max_body_bytes": 4096, "max_messages": 4, "max_chars": 1000, "max_stop": 2, "max_stop_chars": 8,
          "max_inputs": 3}


@pytest.fixture(scope="module")
def fake():
    return FakeGuard(n_ctx=64)


@pytest.fixture(scope="module")
def server(fake):
    with served(fake, api_key=API_KEY, limits=LIMITS, allowed_hosts=LOOPBACK_HOST_HEADERS) as srv:
        yield srv


def _user(text):
    return [{"role": "user", "content": text}]


def _raw(server, request: bytes, *, rcvbuf: int | None = None, read: bool = True, timeout: float = 10) -> bytes:
    """Send raw bytes; the response's bytes (until the server closes or ``timeout``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(timeout)
        sock.connect((server.host, server.port))
        sock.sendall(request)
        if not read:
            return b""
        out = b""
        try:
            while not _complete(out):
                part = sock.recv(65536)
                if not part:
                    break
                out += part
        except TimeoutError:
            pass
        return out


def _complete(reply: bytes) -> bool:
    head, sep, body = reply.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return True


# ---------------------------------------------------------------------------
# bounds: each over its limit is a 400 (or 413) naming the bound


BOUNDS = [
    ("/v1/chat/completions", {"messages": _user("hi") * 5}, "messages", "max_messages"),
    ("/v1/chat/completions", {"messages": _user("x" * 1001)}, "messages", "max_chars"),
    ("/v1/chat/completions", {"messages": _user("a" * 600) + _user("b" * 600)}, "messages", "max_chars"),
    ("/v1/completions", {"prompt": "y" * 1001}, "prompt", "max_chars"),
    ("/v1/chat/completions", {"messages": _user("hi"), "max_tokens": 65}, "max_tokens", "context holds"),
    ("/v1/chat/completions", {"messages": _user("hi"), "max_completion_tokens": 99}, "max_completion_tokens",
     "context holds"),
    ("/v1/chat/completions", {"messages": _user("hi"), "stop": ["a", "b", "c"]}, "stop", "max_stop"),
    ("/v1/completions", {"prompt": "hi", "stop": "123456789"}, "stop.0", "max_stop_chars"),
    ("/v1/moderations", {"input": ["a", "b", "c", "d"]}, "input", "max_inputs"),
    ("/v1/moderations", {"input": "z" * 1001}, "input", "max_chars"),
]


@pytest.mark.parametrize("path,body,param,bound", BOUNDS, ids=[f"{b[3]}-{b[2]}" for b in BOUNDS])
def test_a_request_over_a_bound_is_a_400_naming_it(server, fake, path, body, param, bound):
    started = fake.started + fake.scored
    r = post(server, path, body)
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert err["param"] == param and bound in err["message"]
    assert fake.started + fake.scored == started  # refused before the guard saw it


def test_a_body_over_the_size_limit_is_refused_before_it_is_read(server):
    # the length alone decides: 50 MB announced, a few bytes sent, the answer comes at once
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 50000000\r\n\r\n{\"messages\": [").encode()
    t0 = time.monotonic()
    reply = _raw(server, head)
    assert reply.startswith(b"HTTP/1.1 413") and b"max_body_bytes" in reply and time.monotonic() - t0 < 5
    # a chunked body is counted as it arrives
    chunk = b"x" * 1000
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(6)) + b"0\r\n\r\n"
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    assert _raw(server, head + body).startswith(b"HTTP/1.1 413")
    r = httpx.post(server.url + "/v1/chat/completions", headers=auth(), timeout=10,
                   json={"messages": _user("w " * 2100)})
    assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"


def test_a_body_must_be_sent_as_json(server):
    for headers in ({"Content-Type": "text/plain"}, {"Content-Type": "application/x-www-form-urlencoded"}, {}):
        r = httpx.post(server.url + "/v1/chat/completions", content=b'{"messages": [{"role": "user", "content": "x"}]}',
                       headers={**auth(), **headers}, timeout=10)
        assert r.status_code == 415 and error_of(r)["code"] == "unsupported_media_type", headers
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": _user("hi"), "max_tokens": 1},
                   headers={**auth(), "Content-Type": "application/json; charset=utf-8"}, timeout=10)
    assert r.status_code == 200


def test_a_loopback_server_answers_only_to_its_own_names(server):
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.nip.io"):
        r = httpx.get(server.url + "/health", headers={"Host": host}, timeout=10)
        assert r.status_code == 403 and error_of(r)["code"] == "host_not_allowed", host
    for host in ("localhost", f"localhost:{server.port}", f"127.0.0.1:{server.port}"):
        assert httpx.get(server.url + "/health", headers={"Host": host}, timeout=10).status_code == 200


# ---------------------------------------------------------------------------
# fairness


def _hold(server, prompt="a b c d", max_tokens=40):
    """Start a streamed generation in a thread (its turn is held while it runs: clear the fake's gate first)."""
    def run():
        with httpx.stream("POST", server.url + "/v1/chat/completions", headers=auth(), timeout=60,
                          json={"messages": _user(prompt), "max_tokens": max_tokens, "stream": True}) as r:
            for _ in r.iter_lines():
                pass
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _health(server):
    return httpx.get(server.url + "/health", headers=auth(), timeout=10).json()


def test_a_full_queue_answers_429_with_retry_after():
    fake = FakeGuard(delay=0)
    fake.gate.clear()  # the holder's answer waits until the test lets it go
    with served(fake, api_key=API_KEY, queue_size=1) as srv, openai_client(srv) as client:
        holder = _hold(srv)
        assert wait_for(lambda: _health(srv)["busy"])
        waiter = threading.Thread(target=lambda: post(srv, "/v1/chat/completions",
                                                      {"messages": _user("queued"), "max_tokens": 1}, timeout=60))
        waiter.start()
        assert wait_for(lambda: _health(srv)["waiting"] == 1)
        r = post(srv, "/v1/chat/completions", {"messages": _user("one too many")})
        assert r.status_code == 429 and error_of(r)["code"] == "queue_full"
        assert int(r.headers["Retry-After"]) >= 1
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="m", messages=_user("one too many"))
        fake.gate.set()
        holder.join(30)
        waiter.join(30)
        health = _health(srv)
        assert health["refused"] == 2 and health["served"] == 2 and fake.overlaps == 0


def test_a_request_waiting_past_the_queue_timeout_gets_429():
    fake = FakeGuard(delay=0)
    fake.gate.clear()  # the holder's answer waits until the test lets it go
    with served(fake, api_key=API_KEY, queue_timeout_s=0.3) as srv:
        holder = _hold(srv)
        assert wait_for(lambda: _health(srv)["busy"])
        t0 = time.monotonic()
        r = post(srv, "/v1/chat/completions", {"messages": _user("late")})
        assert r.status_code == 429 and error_of(r)["code"] == "queue_timeout" and "Retry-After" in r.headers
        assert time.monotonic() - t0 < 1.5 + 0.3
        fake.gate.set()
        holder.join(30)


def test_a_request_whose_client_left_before_its_turn_never_runs():
    fake = FakeGuard(delay=0)
    fake.gate.clear()  # the holder's answer waits until the test lets it go
    with served(fake, api_key=API_KEY) as srv:
        holder = _hold(srv)
        assert wait_for(lambda: fake.started == 1)  # the holder's generation runs (busy alone may come first)
        started = fake.started
        with pytest.raises(httpx.ReadTimeout):
            post(srv, "/v1/chat/completions", {"messages": _user("impatient")}, timeout=0.5)
        assert wait_for(lambda: _health(srv)["left_while_waiting"] == 1)
        fake.gate.set()
        holder.join(30)
        assert wait_for(lambda: not _health(srv)["busy"])
        assert fake.started == started  # the holder's generation only
        r = post(srv, "/v1/chat/completions", {"messages": _user("patient"), "max_tokens": 1})
        assert r.status_code == 200 and fake.started == started + 1


def test_a_streaming_client_that_stops_reading_loses_the_slot_after_the_send_timeout():
    fake = FakeGuard(delay=0, n_ctx=10**6)
    with served(fake, api_key=API_KEY, send_timeout_s=1.0, limits={"max_chars": 20_000}) as srv:
        word = "x" * 8000  # 8 KB a token: the socket buffers fill within a few thousand tokens
        body = json.dumps({"stream": True, "max_tokens": 100000, "messages": [{"role": "user", "content": word}]})
        request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
                   f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode()
        closed = fake.closed_early
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect((srv.host, srv.port))
            sock.sendall(request)  # ... and never reads
            assert wait_for(lambda: fake.closed_early == closed + 1, timeout=30)
            t0 = time.monotonic()
            r = post(srv, "/v1/chat/completions", {"messages": [{"role": "user", "content": "next"}],
                                                   "max_tokens": 2})
            assert r.status_code == 200 and time.monotonic() - t0 < 5
        assert fake.overlaps == 0
