"""OpenAI-style responses built from a guarded event stream (llama-cpp-python's shapes).

Every response and chunk carries a ``guardrail`` object; clients that do not
know it ignore it. Used by ``Guard.create_chat_completion`` and the server.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .events import CheckEvent, DoneEvent, Event, InterventionEvent, TokenEvent


def _finish(done: DoneEvent) -> str:
    return "content_filter" if done.finish_reason == "halt" else (
        "length" if done.finish_reason == "length" else "stop")


@dataclass
class Summary:
    """The guard's outcome of one answer, accumulated from its events."""

    checks: list[dict[str, Any]] = field(default_factory=list)
    interventions: list[dict[str, Any]] = field(default_factory=list)
    done: DoneEvent | None = None

    def add(self, event: Event) -> None:
        if isinstance(event, CheckEvent):
            self.checks.append({"index": event.index, "risk": event.risk, "malicious": event.malicious,
                                "window": [list(r) for r in event.window]})
        elif isinstance(event, InterventionEvent):
            self.interventions.append({"index": event.index, "action": event.action, "text": event.text,
                                       "reason": event.reason})
        elif isinstance(event, DoneEvent):
            self.done = event

    def to_dict(self) -> dict[str, Any]:
        done = self.done
        return {
            "intervened": bool(done and done.intervened),
            "query_risk": done.query_risk if done else None,
            "max_risk": done.max_risk if done else None,
            "checks": len(self.checks),
            "verdicts": self.checks,
            "interventions": self.interventions,
            "guard_seconds": done.guard_s if done else None,
        }


def _usage(done: DoneEvent) -> dict[str, int]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def _collect(events: Iterable[Event]) -> Summary:
    summary = Summary()
    for event in events:
        summary.add(event)
    assert summary.done is not None, "a guarded stream always ends with a done event"
    return summary


def _response(events: Iterable[Event], model: str, chat: bool) -> dict[str, Any]:
    summary = _collect(events)
    done = summary.done
    choice = ({"index": 0, "message": {"role": "assistant", "content": done.text}} if chat
              else {"text": done.text, "index": 0})
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
        "model": model, "choices": [choice | {"logprobs": None, "finish_reason": _finish(done)}],
        "usage": _usage(done), "guardrail": summary.to_dict(),
    }


def chat_response(events: Iterable[Event], model: str) -> dict[str, Any]:
    return _response(events, model, chat=True)


def completion_response(events: Iterable[Event], model: str) -> dict[str, Any]:
    return _response(events, model, chat=False)


def _stream(events: Iterable[Event], model: str, kind: str) -> Iterator[dict[str, Any]]:
    """Chunks: one per token, each with what the guard saw since the previous chunk."""
    chat = kind == "chat"
    ident = f"chatcmpl-{uuid.uuid4().hex}" if chat else f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    summary = Summary()
    pending: list[dict[str, Any]] = []

    def chunk(choice: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        return {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created, "model": model, "choices": [choice], "guardrail": extra}

    if chat:
        yield chunk({"index": 0, "delta": {"role": "assistant"}, "logprobs": None, "finish_reason": None}, {})
    for event in events:
        summary.add(event)
        if isinstance(event, (CheckEvent, InterventionEvent)):
            pending.append(event.to_dict())
        elif isinstance(event, TokenEvent):
            extra = {"risk": event.risk, "forced": event.forced, "events": pending}
            pending = []
            choice = ({"index": 0, "delta": {"content": event.text}, "logprobs": None, "finish_reason": None}
                      if chat else {"text": event.text, "index": 0, "logprobs": None, "finish_reason": None})
            yield chunk(choice, extra)
        elif isinstance(event, DoneEvent):
            final = summary.to_dict() | {"events": pending}
            choice = ({"index": 0, "delta": {}, "logprobs": None, "finish_reason": _finish(event)}
                      if chat else {"text": "", "index": 0, "logprobs": None, "finish_reason": _finish(event)})
            last = chunk(choice, final)
            last["usage"] = _usage(event)
            yield last


def chat_chunks(events: Iterable[Event], model: str) -> Iterator[dict[str, Any]]:
    return _stream(events, model, "chat")


def completion_chunks(events: Iterable[Event], model: str) -> Iterator[dict[str, Any]]:
    return _stream(events, model, "text")
