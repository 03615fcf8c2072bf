"""Helpers for the server tests: a real server on a loopback port, clients, the SSE wire."""

from __future__ import annotations

import time
from contextlib import contextmanager

import httpx
import openai

from guardrail.measure.serve_bench import sse_chunks
from guardrail.serve.app import create_app
from guardrail.serve.config import make_config
from guardrail.serve.launch import BackgroundServer

API_KEY = "test-key-123"


def auth(key=API_KEY):
    return {"Authorization": f"Bearer {key}"}


@contextmanager
def served(guard, **settings):
    """A server for ``guard`` with the given settings (ServerConfig fields; ``limits`` a dict)."""
    with BackgroundServer(create_app(guard, make_config(settings))) as server:
        yield server


@contextmanager
def openai_client(server, key=API_KEY, timeout=30):
    with openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=timeout) as client:
        yield client


def post(server, path, body=None, *, key=API_KEY, timeout=10, **kwargs):
    headers = {**(auth(key) if key else {}), **kwargs.pop("headers", {})}
    return httpx.post(server.url + path, json=body, headers=headers, timeout=timeout, **kwargs)


def sse(response):
    """The JSON objects of an SSE response, and whether it ended with [DONE]."""
    objects = list(sse_chunks(response.iter_lines()))
    done = bool(objects) and objects[-1] is None
    return (objects[:-1] if done else objects), done


def stream_post(server, path, body, *, key=API_KEY, timeout=30):
    """(status, objects, done) of a streamed request read to its end."""
    with httpx.stream("POST", server.url + path, json={**body, "stream": True}, headers=auth(key) if key else {},
                      timeout=timeout) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, [r.json()], False
        objects, done = sse(r)
        return r.status_code, objects, done


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def error_of(response):
    assert "\n" not in response.text.strip(), response.text
    err = response.json()["error"]
    assert err["message"] and "Traceback" not in err["message"]
    return err
