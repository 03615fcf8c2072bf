"""What serving costs: the guard through the HTTP server vs the guard called in process.

Both sides run the same guard on the same prompts with greedy decoding, runs
interleaved (and their order alternated) so drift in machine load hits both
alike. The server side is real HTTP over loopback: ``guardrail.server`` in a
background uvicorn thread, streamed over SSE with httpx. Reported: medians of
the latency to the first token and of tokens per second, and their ratios
(server / in process), never absolute claims.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from typing import Any

from guardrail.runtime.events import DoneEvent, TokenEvent


def _in_process(guard: Any, messages: list[dict[str, str]], max_tokens: int,
                options: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    first = end = None
    tokens, text = 0, ""
    for event in guard.chat(messages, max_tokens=max_tokens, temperature=0.0, **options):
        if isinstance(event, TokenEvent):
            tokens += 1
            if first is None:
                first = time.perf_counter()
        elif isinstance(event, DoneEvent):
            end = time.perf_counter()
            text = event.text
    return _sample(t0, first, end, tokens, text)


def _over_http(http: Any, messages: list[dict[str, str]], max_tokens: int,
               options: dict[str, Any]) -> dict[str, Any]:
    body = {"model": "bench", "messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
            "stream": True, "guardrail": options}
    t0 = time.perf_counter()
    first = end = None
    tokens, pieces = 0, []
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            response.read()
            raise RuntimeError(f"the server answered {response.status_code}: {response.text[:200]}")
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"the server failed mid-answer: {chunk['error'].get('message')}")
            choice = chunk["choices"][0]
            pieces.append(choice["delta"].get("content") or "")
            if "risk" in chunk.get("guardrail", {}):  # a token chunk
                tokens += 1
                if first is None:
                    first = time.perf_counter()
            if choice.get("finish_reason") is not None:
                end = time.perf_counter()
    return _sample(t0, first, end, tokens, "".join(pieces))


def _sample(t0: float, first: float | None, end: float | None, tokens: int, text: str) -> dict[str, Any]:
    end = end if end is not None else time.perf_counter()
    first = first if first is not None else end
    total = end - t0
    decode = end - first
    return {"ttft_s": first - t0, "total_s": total, "tokens": tokens,
            "tokens_per_s": tokens / total if total > 0 else 0.0,
            "decode_tokens_per_s": (tokens - 1) / decode if tokens > 1 and decode > 0 else 0.0,
            "text": text}


def _medians(samples: list[dict[str, Any]]) -> dict[str, float]:
    keys = ("ttft_s", "total_s", "tokens_per_s", "decode_tokens_per_s")
    out = {k: statistics.median(s[k] for s in samples) for k in keys}
    out["tokens"] = statistics.median(s["tokens"] for s in samples)
    return out


def server_benchmark(guard: Any, prompts: Sequence[str], max_tokens: int = 32, *, runs: int = 3,
                     guard_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Serve ``guard`` on a loopback port and time it against in-process calls.

    Each run goes through every prompt once on each side (in process first on even
    runs, the server first on odd ones), after one untimed warm-up of each side.
    Returns per-side medians, ``ratios`` (server / in process: ttft > 1 and tokens/s < 1
    are the server's cost) and ``same_text`` (greedy answers must match)."""
    import httpx

    from guardrail.serve.app import BackgroundServer, create_app

    if not prompts:
        raise ValueError("server_benchmark needs at least one prompt")
    if runs < 1 or max_tokens < 1:
        raise ValueError("runs and max_tokens must be >= 1")
    options = {k: v for k, v in (guard_options or {}).items() if v is not None}
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    local: list[dict[str, Any]] = []
    served: list[dict[str, Any]] = []
    mismatches = 0
    with BackgroundServer(create_app(guard, api_key=None)) as server, \
            httpx.Client(base_url=server.url, timeout=600.0) as http:
        _in_process(guard, conversations[0], max_tokens, options)
        _over_http(http, conversations[0], max_tokens, options)
        for run in range(runs):
            for messages in conversations:
                if run % 2 == 0:
                    a = _in_process(guard, messages, max_tokens, options)
                    b = _over_http(http, messages, max_tokens, options)
                else:
                    b = _over_http(http, messages, max_tokens, options)
                    a = _in_process(guard, messages, max_tokens, options)
                local.append(a)
                served.append(b)
                mismatches += a["text"] != b["text"]
    mine, theirs = _medians(local), _medians(served)

    def ratio(key: str) -> float | None:
        return theirs[key] / mine[key] if mine[key] else None

    per_token = [(b["total_s"] - a["total_s"]) / max(a["tokens"], 1) for a, b in zip(local, served)]
    return {
        "model": getattr(guard, "model_name", None),
        "prompts": len(prompts), "runs": runs, "max_tokens": max_tokens, "samples": len(local),
        "in_process": mine, "server": theirs,
        "ratios": {"ttft": ratio("ttft_s"), "total": ratio("total_s"), "tokens_per_s": ratio("tokens_per_s"),
                   "decode_tokens_per_s": ratio("decode_tokens_per_s")},
        "overhead_ms_per_token": 1000 * statistics.median(per_token),
        "same_text": mismatches == 0, "mismatches": mismatches,
    }
