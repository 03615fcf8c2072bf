"""Streaming transport: stop strings held back, chunks framed as server-sent events.

The guard ends an answer at a stop string and cuts the string from its text;
a stream must therefore never have sent it. :class:`StopHoldBack` holds back
any tail that could be the start of a stop string until the next tokens show
it is not; it scans only the new text and the longest stop's length before it,
so a token costs the same however long the answer already is. It runs on the
worker thread with the guard, not on the event loop.

A client that stops reading cannot hold the guard: a send that waits longer
than the send timeout ends the response, and its generation with it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

from sse_starlette.sse import EventSourceResponse, SendTimeoutError

from guardrail.runtime.events import DoneEvent, Event, TokenEvent
from guardrail.runtime.shapes import Chunks

from .errors import api_error_from, safe
from .runner import Turn

log = logging.getLogger("guardrail.server")


class StopHoldBack:
    """What of a growing answer may be sent now, given stop strings that end it."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.written = ""
        self.sent = 0
        self.stopped = False

    def push(self, piece: str) -> str:
        """Add a token's text; returns the text that is now safe to send."""
        if not self.stops:
            return piece
        if self.stopped:
            return ""
        start = max(0, len(self.written) - self.longest + 1)  # a stop ending in ``piece`` starts here or later
        self.written += piece
        cut = len(self.written)
        tail = self.written[start:]
        for stop in self.stops:
            found = tail.find(stop)
            if found >= 0:
                cut = min(cut, start + found)
        if cut < len(self.written):
            self.stopped = True  # the guard ends the answer here; the rest is never sent
        else:
            for stop in self.stops:  # hold back the longest tail that begins a stop string
                for k in range(min(len(stop) - 1, len(self.written)), 0, -1):
                    if self.written.endswith(stop[:k]):
                        cut = min(cut, len(self.written) - k)
                        break
        ready = max(self.sent, cut)
        out = self.written[self.sent:ready]
        self.sent = ready
        return out

    def __call__(self, event: Event) -> Event:
        """The transform the runner applies: a token's text becomes what may be sent of it."""
        if isinstance(event, TokenEvent) and self.stops:
            return dataclasses.replace(event, text=self.push(event.text))
        return event


def dumps(obj: Any) -> str:
    """Compact JSON; NaN/inf as null and numpy values as Python ones (only walked when needed)."""
    try:
        return json.dumps(obj, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):
        return json.dumps(safe(obj), separators=(",", ":"), allow_nan=False)


async def sse_chunks(turn: Turn, chunks: Chunks, first: list[Event], *,
                     include_usage: bool) -> AsyncIterator[dict[str, str]]:
    """The SSE events of one streamed answer; its turn is released however it ends."""
    try:
        for opening in chunks.start():
            yield {"data": dumps(opening)}
        batch = first
        while batch:
            for event in batch:
                chunk = chunks.feed(event)
                if chunk is not None:
                    yield {"data": dumps(chunk)}
            if any(isinstance(e, DoneEvent) for e in batch):
                break
            batch = await turn.next_batch()
        if include_usage:
            yield {"data": dumps(chunks.usage_chunk())}
        yield {"data": "[DONE]"}
    except Exception as exc:  # after the 200: the error travels as an SSE event
        yield {"data": dumps(api_error_from(exc).body())}
        yield {"data": "[DONE]"}
    finally:
        turn.release()


class GenerationStream(EventSourceResponse):
    """An SSE response that owns its turn: it releases it however the response ends (even if its
    body never started), and ends it when the client reads nothing for ``send_timeout`` seconds."""

    def __init__(self, content: Any, turn: Turn, rid: str, **kwargs: Any):
        super().__init__(content, sep="\n", ping=15, **kwargs)
        self._turn, self._rid = turn, rid

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:
            log.warning("%s: the client read nothing for %s s; its answer was stopped", self._rid, self.send_timeout)
        finally:
            self._turn.release()
