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

from guardrail.errors import ContextOverflowError

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
    if "reading" in data:
        data["reading"] = list(data["reading"])  # as JSON carries it
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
    """What one answer's events add up to: the one accumulator every surface reads its numbers from.

    The server's responses and chunks, the library's ``create_chat_completion``, the llm
    plugin's log and the terminal's footer all read these fields and :meth:`summary`;
    a surface keeps only how it draws them."""

    def __init__(self) -> None:
        self.query: QueryEvent | None = None
        self.tokens: list[TokenEvent] = []
        self.checks: list[CheckEvent] = []
        self.interventions: list[InterventionEvent] = []
        self.done: DoneEvent | None = None

    def add(self, event: Event) -> None:
        match event:
            case TokenEvent():
                self.tokens.append(event)
            case CheckEvent():
                self.checks.append(event)
            case InterventionEvent():
                self.interventions.append(event)
            case QueryEvent():
                self.query = event
            case DoneEvent():
                self.done = event

    # -- what the events say --------------------------------------------------------------

    @property
    def written(self) -> str:
        """The text of the token events so far."""
        return "".join(t.text for t in self.tokens)

    @property
    def text(self) -> str:
        """The answer's text: the guard's own at the end, else what the tokens wrote."""
        return self.done.text if self.done is not None else self.written

    @property
    def tail(self) -> str:
        """Text the last event carries that no token event did (the detokenizer's held-back bytes)."""
        if self.done is None:
            return ""
        written = self.written
        return self.done.text[len(written):] if self.done.text.startswith(written) else ""

    @property
    def flagged(self) -> bool:
        """Whether any check judged the conversation malicious (a non-finite risk counts)."""
        return any(is_malicious(c) for c in self.checks)

    @property
    def query_check(self) -> CheckEvent | None:
        """The first check, on the query (index 0), once it has run."""
        return self.checks[0] if self.checks and self.checks[0].index == 0 else None

    @property
    def sampled_tokens(self) -> int:
        """Tokens the model wrote (the guard's forced text not counted)."""
        return sum(not t.forced for t in self.tokens)

    @property
    def forced_tokens(self) -> int:
        return sum(bool(t.forced) for t in self.tokens)

    @property
    def token_risk(self) -> float | None:
        """The latest token's own risk (the token signal), None before any."""
        return next((t.risk for t in reversed(self.tokens) if t.risk is not None), None)

    @property
    def intervened(self) -> bool:
        return bool(self.done.intervened) if self.done is not None else bool(self.interventions)

    def usage(self) -> dict[str, int]:
        done = self.done
        prompt = done.prompt_tokens if done else (self.query.prompt_tokens if self.query else 0)
        completion = done.completion_tokens if done else len(self.tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def length_end(self, elapsed_s: float) -> DoneEvent:
        """The end of an answer that ran into the end of the context without the guard's own
        ``length`` end (an overflow error): a done event from what was written, added here."""
        risks = [risk_value(c.risk) for c in self.checks]
        finite = [r for r in risks if r is not None]
        n = len(self.tokens)
        done = DoneEvent(finish_reason="length", text=self.written, completion_tokens=n,
                         prompt_tokens=self.query.prompt_tokens if self.query else 0, checks=len(self.checks),
                         intervened=bool(self.interventions), query_risk=risks[0] if risks else None,
                         max_risk=(max(finite) if len(finite) == len(risks) else 1.0) if risks else None,
                         elapsed_s=elapsed_s, tokens_per_s=n / elapsed_s if elapsed_s > 0 else 0.0, guard_s=0.0)
        self.add(done)
        return done

    def end_on_overflow(self, error: BaseException, elapsed_s: float) -> DoneEvent:
        """The end an error leaves: an answer that ran out of context after its query keeps what it
        wrote (a ``length`` end); anything else, a prompt that never fitted included, is raised."""
        if isinstance(error, ContextOverflowError) and self.query is not None:
            return self.length_end(elapsed_s)
        raise error

    # -- what a client sees -----------------------------------------------------------------

    def summary(self, detail: str = "full") -> dict[str, Any]:
        """The ``guardrail`` object of a whole answer (non-streamed, or the last chunk); without
        a done event (a stream cut short) its ``finish_reason`` is ``interrupted``."""
        if detail != "full":
            return {"intervened": self.intervened}
        verdicts = [event_dict(c) for c in self.checks]
        out: dict[str, Any] = {
            "intervened": self.intervened,
            "flagged": self.flagged,
            "query_risk": verdicts[0]["risk"] if verdicts else None,
            "max_risk": None,
            "checks": len(verdicts),
            "verdicts": verdicts,
            "interventions": [event_dict(i) for i in self.interventions],
            "token_risks": [risk_value(t.risk) for t in self.tokens],
            "forced_tokens": self.forced_tokens,
            "finish_reason": "interrupted",
        }
        done = self.done
        if done is not None:
            finite = [v["risk"] for v in verdicts if v["risk"] is not None]
            out.update(finish_reason=done.finish_reason, query_risk=risk_value(done.query_risk),
                       max_risk=1.0 if len(finite) < len(verdicts) else risk_value(done.max_risk),
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
        out: dict[str, Any] = {"id": self.ident, "object": "chat.completion.chunk" if self.chat else "text_completion",
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
            extra = self.answer.summary(self.detail) | ({"events": self._pending} if full else {})
            self._pending = []
            last = self._chunk(self.answer.tail, finish_reason(event), extra)
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
