"""OpenAI-style responses built from a guarded event stream (llama-cpp-python's shapes).

The one builder of response objects: ``Guard.create_chat_completion`` and the
server both use it, so a chunk's ``guardrail`` object is the same wherever it
is read. The server adds transport only (SSE framing, holding back text that
may be a stop string).

``detail`` says how much of the guard a client sees: ``full`` (every token's
risk, every check and intervention, the summary), ``summary`` (whether the
guard intervened, nothing per token: per-token risks are an oracle for tuning
jailbreaks against the head) or ``none`` (no ``guardrail`` object).

A check whose risk is not a finite number is shown as malicious with risk
``null``: a broken signal never reads as benign.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from .events import CheckEvent, DoneEvent, Event, InterventionEvent, QueryEvent, TokenEvent

DETAILS = ("full", "summary", "none")


def finish_reason(done: DoneEvent) -> str:
    """OpenAI's finish reason for the guard's: the guard ending an answer is a content filter."""
    if done.finish_reason in ("halt", "refuse"):
        return "content_filter"
    return "length" if done.finish_reason == "length" else "stop"


def risk_value(risk: float | None) -> float | None:
    """A risk as JSON can carry it: a finite float, or None."""
    if risk is None:
        return None
    risk = float(risk)
    return risk if math.isfinite(risk) else None


def is_malicious(event: CheckEvent) -> bool:
    """The check's verdict, failing closed: a non-finite risk is malicious."""
    return bool(event.malicious) or risk_value(event.risk) is None


def event_dict(event: Event) -> dict[str, Any]:
    """An event as a JSON object (``type`` included); risks made JSON-safe, failing closed."""
    data = event.to_dict()
    if "window" in data:
        data["window"] = [list(run) for run in data["window"]]
    for key in ("risk", "query_risk", "max_risk"):
        if key in data:
            data[key] = risk_value(data[key])
    if isinstance(event, CheckEvent):
        data["malicious"] = is_malicious(event)
    return data


def _check_detail(detail: str) -> None:
    if detail not in DETAILS:
        raise ValueError(f"unknown detail {detail!r}: use one of {', '.join(DETAILS)}")


class Answer:
    """What one answer's events add up to: its text, checks, interventions and summary."""

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.token_risks: list[float | None] = []
        self.forced = 0
        self.checks: list[dict[str, Any]] = []
        self.interventions: list[dict[str, Any]] = []
        self.flagged = False
        self.query: QueryEvent | None = None
        self.done: DoneEvent | None = None

    def add(self, event: Event) -> None:
        if isinstance(event, TokenEvent):
            self.pieces.append(event.text)
            self.token_risks.append(risk_value(event.risk))
            self.forced += bool(event.forced)
        elif isinstance(event, CheckEvent):
            self.checks.append(event_dict(event))
            self.flagged = self.flagged or is_malicious(event)
        elif isinstance(event, InterventionEvent):
            self.interventions.append(event_dict(event))
        elif isinstance(event, QueryEvent):
            self.query = event
        elif isinstance(event, DoneEvent):
            self.done = event

    @property
    def written(self) -> str:
        return "".join(self.pieces)

    @property
    def text(self) -> str:
        return self.done.text if self.done is not None else self.written

    def usage(self) -> dict[str, int]:
        done = self.done
        prompt = done.prompt_tokens if done else (self.query.prompt_tokens if self.query else 0)
        completion = done.completion_tokens if done else len(self.pieces)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def summary(self, detail: str = "full") -> dict[str, Any]:
        """The ``guardrail`` object of a whole answer (non-streamed, or the last chunk)."""
        done = self.done
        intervened = bool(done.intervened) if done is not None else bool(self.interventions)
        if detail != "full":
            return {"intervened": intervened}
        out: dict[str, Any] = {
            "intervened": intervened,
            "flagged": self.flagged,
            "query_risk": self.checks[0]["risk"] if self.checks else None,
            "max_risk": None,
            "checks": len(self.checks),
            "verdicts": self.checks,
            "interventions": self.interventions,
            "token_risks": self.token_risks,
            "forced_tokens": self.forced,
        }
        if done is not None:
            finite = [c["risk"] for c in self.checks if c["risk"] is not None]
            out.update(finish_reason=done.finish_reason, query_risk=risk_value(done.query_risk),
                       max_risk=1.0 if len(finite) < len(self.checks) else risk_value(done.max_risk),
                       prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens,
                       elapsed_s=done.elapsed_s, tokens_per_s=done.tokens_per_s, guard_seconds=done.guard_s)
        return out


class Chunks:
    """Streamed chunks, one per token plus a last one, each with what the guard saw since the last.

    ``start()`` gives the opening chunk (chat: the assistant role); ``feed(event)``
    gives a chunk for a token or the end, else None. The last chunk carries any text
    the token chunks did not (the detokenizer's tail), the finish reason, the
    usage and the answer's summary."""

    def __init__(self, model: str, *, chat: bool, detail: str = "full", ident: str | None = None,
                 created: int | None = None):
        _check_detail(detail)
        self.chat, self.detail, self.model = chat, detail, model
        self.ident = ident or f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = created if created is not None else int(time.time())
        self.answer = Answer()
        self._pending: list[dict[str, Any]] = []

    def _chunk(self, text: str | None, finish: str | None, guardrail: dict[str, Any] | None,
               role: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"text": text or "", "index": 0, "logprobs": None, "finish_reason": finish}
        out = {"id": self.ident, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.model, "choices": [choice]}
        if self.detail != "none" and guardrail is not None:
            out["guardrail"] = guardrail
        return out

    def start(self) -> list[dict[str, Any]]:
        return [self._chunk(None, None, {}, role=True)] if self.chat else []

    def feed(self, event: Event) -> dict[str, Any] | None:
        self.answer.add(event)
        full = self.detail == "full"
        if isinstance(event, (QueryEvent, CheckEvent, InterventionEvent)):
            if full:
                self._pending.append(event_dict(event))
            return None
        if isinstance(event, TokenEvent):
            extra = ({"index": event.index, "risk": risk_value(event.risk), "forced": bool(event.forced),
                      "events": self._pending} if full else {})
            self._pending = []
            return self._chunk(event.text, None, extra)
        if isinstance(event, DoneEvent):
            written = self.answer.written
            rest = event.text[len(written):] if event.text.startswith(written) else ""
            extra = self.answer.summary(self.detail) | ({"events": self._pending} if full else {})
            self._pending = []
            last = self._chunk(rest, finish_reason(event), extra)
            last["usage"] = self.answer.usage()
            return last
        return None

    def usage_chunk(self) -> dict[str, Any]:
        """OpenAI's ``stream_options.include_usage`` chunk: no choices, the usage."""
        return {"id": self.ident, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [], "usage": self.answer.usage()}


def response(answer: Answer, model: str, *, chat: bool, detail: str = "full", ident: str | None = None,
             created: int | None = None) -> dict[str, Any]:
    """The whole response of a finished answer."""
    _check_detail(detail)
    assert answer.done is not None, "a guarded stream always ends with a done event"
    choice = ({"index": 0, "message": {"role": "assistant", "content": answer.text}} if chat
              else {"text": answer.text, "index": 0})
    out = {
        "id": ident or f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        "object": "chat.completion" if chat else "text_completion",
        "created": created if created is not None else int(time.time()),
        "model": model, "choices": [choice | {"logprobs": None, "finish_reason": finish_reason(answer.done)}],
        "usage": answer.usage(),
    }
    if detail != "none":
        out["guardrail"] = answer.summary(detail)
    return out


def _collect(events: Iterable[Event]) -> Answer:
    answer = Answer()
    for event in events:
        answer.add(event)
    return answer


def chat_response(events: Iterable[Event], model: str) -> dict[str, Any]:
    return response(_collect(events), model, chat=True)


def completion_response(events: Iterable[Event], model: str) -> dict[str, Any]:
    return response(_collect(events), model, chat=False)


def _stream(events: Iterable[Event], model: str, chat: bool) -> Iterator[dict[str, Any]]:
    chunks = Chunks(model, chat=chat)
    yield from chunks.start()
    for event in events:
        chunk = chunks.feed(event)
        if chunk is not None:
            yield chunk


def chat_chunks(events: Iterable[Event], model: str) -> Iterator[dict[str, Any]]:
    return _stream(events, model, chat=True)


def completion_chunks(events: Iterable[Event], model: str) -> Iterator[dict[str, Any]]:
    return _stream(events, model, chat=False)
