"""``/v1/chat/completions`` and ``/v1/completions``: a request checked against the operator's bounds
and rules, a turn on the guard, and the answer, whole or streamed.

Bounds are checked before anything is tokenized. An answer that runs into the end of the
context ends with ``finish_reason: "length"`` and keeps what was written.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from guardrail.errors import ContextOverflowError
from guardrail.runtime.events import DoneEvent, Event
from guardrail.runtime.shapes import Answer, Chunks, response, risk_value

from .config import Limits
from .context import ServerContext, request_id
from .errors import APIError, api_error_from, bad_request
from .options import request_options
from .runner import Ask, Turn
from .schemas import ChatCompletionRequest, CommonRequest, CompletionRequest
from .stream import GenerationStream, StopHoldBack, dumps, sse_chunks


def _check_common(body: CommonRequest, limits: Limits, n_ctx: int) -> None:
    for name in ("max_tokens", "max_completion_tokens"):
        value = getattr(body, name)
        if value is not None and value > n_ctx:
            raise bad_request(f"Invalid request: {name} is {value}, more than the context holds ({n_ctx} tokens).",
                              param=name, code="max_tokens_too_large")
    stops = body.stop or []
    if len(stops) > limits.max_stop:
        raise bad_request(f"Invalid request: stop has {len(stops)} strings; this server takes at most "
                          f"{limits.max_stop} (max_stop).", param="stop", code="too_many_stop_strings")
    for i, stop in enumerate(stops):
        if len(stop) > limits.max_stop_chars:
            raise bad_request(f"Invalid request: stop.{i} is {len(stop)} characters; at most {limits.max_stop_chars} "
                              "(max_stop_chars).", param=f"stop.{i}", code="stop_string_too_long")


def _too_much_text(chars: int, limits: Limits, param: str) -> APIError:
    return bad_request(f"Invalid request: {param} holds {chars} characters of text; this server takes at most "
                       f"{limits.max_chars} per request (max_chars).", param=param, code="content_too_long")


def chat_messages(body: ChatCompletionRequest, limits: Limits) -> list[dict[str, str]]:
    """The conversation as the guard takes it, within the bounds."""
    if len(body.messages) > limits.max_messages:
        raise bad_request(f"Invalid request: messages holds {len(body.messages)} messages; this server takes at "
                          f"most {limits.max_messages} (max_messages).", param="messages", code="too_many_messages")
    messages, chars = [], 0
    for i, message in enumerate(body.messages):
        try:
            text = message.text()
        except ValueError as exc:
            raise bad_request(f"Invalid request: messages.{i}.content: {exc}", param=f"messages.{i}.content") from None
        if message.role == "user" and not text:
            raise bad_request(f"Invalid request: messages.{i}.content: a user message must not be empty.",
                              param=f"messages.{i}.content", code="empty_content")
        chars += len(text)
        if chars > limits.max_chars:
            raise _too_much_text(chars, limits, "messages")
        messages.append({"role": "system" if message.role == "developer" else message.role, "content": text})
    if chars == 0:
        raise bad_request("Invalid request: messages: every message is empty; there is nothing to answer.",
                          param="messages", code="empty_content")
    return messages


async def chat_completion(ctx: ServerContext, body: ChatCompletionRequest, request: Request) -> Response:
    limits = ctx.config.limits
    messages = chat_messages(body, limits)
    _check_common(body, limits, ctx.guard.n_ctx)
    kwargs = body.sampling(ctx.sampling_defaults()) | request_options(body.guardrail, ctx.guard,
                                                                       ctx.config.client_options)
    return await _answer(ctx, request, body, Ask(messages=messages, kwargs=kwargs), chat=True,
                         audit_text={"messages": messages})


async def text_completion(ctx: ServerContext, body: CompletionRequest, request: Request) -> Response:
    limits = ctx.config.limits
    prompt = body.prompt_text()
    if len(prompt) > limits.max_chars:
        raise _too_much_text(len(prompt), limits, "prompt")
    _check_common(body, limits, ctx.guard.n_ctx)
    kwargs = body.sampling(ctx.sampling_defaults()) | request_options(body.guardrail, ctx.guard,
                                                                       ctx.config.client_options)
    return await _answer(ctx, request, body, Ask(prompt=prompt, kwargs=kwargs), chat=False,
                         audit_text={"prompt": prompt})


def _audit_hook(ctx: ServerContext, rid: str, endpoint: str, audit_text: dict[str, Any]) -> Callable[[Answer], None]:
    """Writes one audit line per intervention once the answer is over (however it ended);
    ``audit_text`` is the request's text, kept in the line only if the operator asks for it."""
    def write(answer: Answer) -> None:
        if ctx.audit is None:
            return
        for intervention in answer.interventions:
            before = [c for c in answer.checks if c.index <= intervention.index]
            risk = risk_value(before[-1].risk) if before else None
            ctx.audit.write(rid, endpoint, risk=risk, verdict="malicious", action=intervention.action,
                            reason=intervention.reason, index=intervention.index,
                            text=audit_text | {"answer": answer.text})
    return write


async def _answer(ctx: ServerContext, request: Request, body: CommonRequest, ask: Ask,
                  *, chat: bool, audit_text: dict[str, Any]) -> Response:
    """One answer on a turn of the guard: whole, or streamed (the stream then owns the turn)."""
    rid = request_id("chatcmpl" if chat else "cmpl")
    created = int(time.time())
    config = ctx.config
    async with ctx.runner.turn(request, rid) as turn:
        turn.on_release.append(_audit_hook(ctx, rid, request.url.path, audit_text))
        try:
            await turn.start(ask, StopHoldBack(body.stop) if body.stream and body.stop else None)
        except ContextOverflowError as exc:  # more than the KV budget could ever hold
            raise over_budget(ctx, exc, "messages" if chat else "prompt") from None
        except Exception as exc:  # the template, the options: the request's fault
            raise api_error_from(exc, preparing=True) from None
        # the first batch is read before answering, so a failure before the first token is a proper status
        batch = await _next(turn)
        if body.stream:
            chunks = Chunks(ctx.model_name, chat=chat, detail=config.detail, ident=rid, created=created)
            events = sse_chunks(turn.hand_over(), chunks, batch, include_usage=body.include_usage())
            return GenerationStream(events, turn, rid, send_timeout=config.send_timeout_s)
        while batch and not any(isinstance(e, DoneEvent) for e in batch):
            await turn.check_client()
            batch = await _next(turn)
    if turn.answer.done is None:
        raise APIError(500, "the guard ended without finishing the answer", type="server_error", code="internal_error")
    reply = response(turn.answer, ctx.model_name, chat=chat, detail=config.detail, ident=rid, created=created)
    return Response(dumps(reply), media_type="application/json")


def over_budget(ctx: ServerContext, exc: ContextOverflowError, param: str) -> APIError:
    """A request the KV budget cannot hold: a 400 that says the budget."""
    slots = ctx.guard.n_parallel
    shared = f", shared by {slots} slots" if slots > 1 else ""
    return bad_request(f"Invalid request: {exc}. This server's KV budget is {ctx.guard.n_ctx} tokens{shared}: "
                       "shorten the conversation or lower max_tokens.", param=param, code="context_length_exceeded")


async def _next(turn: Turn) -> list[Event]:
    """The turn's next batch of events; a failure while the model runs is the server's (a 500)."""
    try:
        return await turn.next_batch()
    except Exception as exc:
        raise api_error_from(exc) from None
