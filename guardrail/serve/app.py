"""``guardrail serve``: an OpenAI-compatible HTTP server over one :class:`~guardrail.guard.Guard`.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both
streaming over SSE or not), ``GET /v1/models``, ``GET /health``. The response
objects are built from the guard's events, so every answer (and every streamed
chunk) carries a ``guardrail`` object: per token its risk and whether the
policy forced it, the check verdicts and interventions as they happen, and a
summary at the end.

One generation runs at a time per model (the guard is not thread-safe):
requests take turns through an asyncio lock, and every call into the guard
runs on one dedicated worker thread, one chunk of events per call, so the event
loop stays free. A client that goes away mid-answer stops its generation.

Errors are OpenAI-shaped, ``{"error": {"message", "type", "param", "code"}}``,
one line each; tracebacks go to the server log only.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from guardrail.errors import (
    ArtifactError,
    CaptureError,
    ContextError,
    ContextOverflowError,
    GuardrailError,
    HeadError,
    ModelError,
)
from guardrail.runtime.events import CheckEvent, DoneEvent, Event, InterventionEvent, QueryEvent, TokenEvent

log = logging.getLogger("guardrail.server")

#: what a server-wide ``defaults`` dict may set (request fields override them)
SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed", "stop")
GUARD_KEYS = ("policy", "schedule", "threshold", "tau")
DEFAULT_KEYS = SAMPLING_KEYS + GUARD_KEYS

# the guard's finish reasons -> OpenAI's
_FINISH = {"stop": "stop", "length": "length", "halt": "content_filter", "interrupted": "stop"}

# ---------------------------------------------------------------------------
# Request models. Unknown top-level fields are ignored (OpenAI clients send
# many); known fields are strict: a string where a number belongs is a 400.


class GuardOptions(BaseModel):
    """The per-request ``guardrail`` body field (our namespace: unknown keys are errors)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    policy: Literal["refuse", "halt", "monitor"] | None = None
    schedule: str | None = None
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    tau: int | None = Field(default=None, ge=1)

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str | None) -> str | None:
        if value is not None:
            from guardrail.runtime.schedule import Schedule

            Schedule.parse(value)  # ValueError -> a 400 naming the field
        return value


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(f"only text content parts are supported, not {part.type!r}")
            parts.append(part.text)
        return "".join(parts)


class _CommonRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None  # informational: this server serves one model
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repeat_penalty: float | None = Field(default=None, ge=0.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int | None = None
    guardrail: GuardOptions | None = None

    @field_validator("n")
    @classmethod
    def _n(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise ValueError("only n=1 is supported")
        return value

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage") is True)

    def guard_kwargs(self, defaults: dict[str, Any]) -> dict[str, Any]:
        """Request fields over server defaults; unset ones are left to the guard's own defaults."""
        stop = self.stop
        if isinstance(stop, str):
            stop = [stop]
        given: dict[str, Any] = {
            "max_tokens": self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens,
            "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
            "repeat_penalty": self.repeat_penalty, "seed": self.seed, "stop": stop or None,
        }
        if self.guardrail is not None:
            given.update(self.guardrail.model_dump(exclude_none=True))
        merged = {k: v for k, v in defaults.items() if v is not None}
        merged.update({k: v for k, v in given.items() if v is not None})
        if isinstance(merged.get("stop"), str):
            merged["stop"] = [merged["stop"]]
        return merged


class ChatCompletionRequest(_CommonRequest):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_CommonRequest):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("only one prompt per request is supported")
        return value

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


# ---------------------------------------------------------------------------
# Errors


class APIError(Exception):
    """An error answered as OpenAI's error object."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), default=_json_default)


def _one_line(text: str) -> str:
    return " ".join(str(text).split()) or "error"


def api_error_from(exc: BaseException) -> APIError:
    """A guard-side exception as the error the client sees (one line, no traceback)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextOverflowError):
        return APIError(400, _one_line(str(exc)), param="messages", code="context_length_exceeded")
    if isinstance(exc, (ArtifactError, ModelError, HeadError, CaptureError, ContextError)):
        return APIError(500, _one_line(str(exc)), type="server_error", code=type(exc).__name__)
    if isinstance(exc, GuardrailError):
        return APIError(400, _one_line(str(exc)), code=type(exc).__name__)
    if isinstance(exc, ValueError):  # the guard refusing an option value
        return APIError(400, _one_line(str(exc)), code="invalid_value")
    log.error("internal error while generating", exc_info=exc)
    return APIError(500, "internal server error (see the server log)", type="server_error",
                    code="internal_error")


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "is-instance"}


def _validation_error(errors: list[dict[str, Any]] | tuple[Any, ...]) -> APIError:
    if not errors:
        return APIError(400, "invalid request")
    err = dict(errors[0])
    # drop "body" and pydantic's union-member tags ("str", "list[str]", ...) from the path
    loc = [str(part) for part in err.get("loc", ())
           if part != "body" and not (isinstance(part, str) and (part in _TYPE_TAGS or "[" in part))]
    if err.get("type") == "json_invalid":
        return APIError(400, "We could not parse the JSON body of your request: it is not valid JSON.",
                        code="invalid_json")
    param = ".".join(loc) or None
    if not loc:  # no body, or a body that is not a JSON object
        return APIError(400, "The request body must be a JSON object (Content-Type: application/json).",
                        code="invalid_json")
    message = err.get("msg", "invalid value")
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    where = f"{param}: " if param else ""
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return APIError(400, _one_line(f"Invalid request: {where}{message}{more}"), param=param,
                    code="invalid_type" if err.get("type", "").endswith("_type") else "invalid_value")


# ---------------------------------------------------------------------------
# One generation at a time: the lock gives turns, the worker thread runs the guard.


class _Runner:
    def __init__(self, guard: Any):
        self.guard = guard
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="guardrail-generate")
        self._lock = asyncio.Lock()
        self.waiting = 0
        self.served = 0

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def open(self, start: Callable[[], Iterator[Event]]) -> _Generation:
        """Wait for the guard, then start a generation on it (the caller must ``release()`` it)."""
        self.waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self.waiting -= 1
        generation = _Generation(self)
        try:
            await self.call(generation._start, start)
        except BaseException:
            generation.release()
            raise
        return generation

    def submit(self, fn: Callable[[], Any]) -> None:
        try:
            self._executor.submit(fn)
        except RuntimeError:  # shut down: nothing left to clean
            pass

    def release_lock(self) -> None:
        self.served += 1
        self._lock.release()

    async def drain(self) -> None:
        """Let the worker finish what is queued (single-token steps and closes), off the loop,
        so the guard can be closed safely afterwards."""
        await asyncio.to_thread(self._executor.shutdown, wait=True)


class _Generation:
    """One guarded generation; all its guard calls run on the runner's thread, in order."""

    def __init__(self, runner: _Runner):
        self._runner = runner
        self._events: Iterator[Event] | None = None
        self._released = False

    # -- on the worker thread
    def _start(self, start: Callable[[], Iterator[Event]]) -> None:
        self._events = iter(start())

    def _next_chunk(self) -> list[Event]:
        """The events up to and including the next token or the final event ([] when exhausted)."""
        out: list[Event] = []
        assert self._events is not None
        for event in self._events:
            out.append(event)
            if isinstance(event, (TokenEvent, DoneEvent)):
                break
        return out

    def _close(self) -> None:
        close = getattr(self._events, "close", None)
        if close is not None:
            try:
                close()
            except Exception:  # a failing close must not take the worker with it
                log.exception("closing a generation failed")

    # -- on the event loop
    async def next_chunk(self) -> list[Event]:
        return await self._runner.call(self._next_chunk)

    def release(self) -> None:
        """Stop the generation (if still running) and give the guard to the next request.

        Idempotent and synchronous, so it is safe in ``finally`` under cancellation: the
        close is queued on the worker thread before anyone else's calls can be."""
        if self._released:
            return
        self._released = True
        self._runner.submit(self._close)
        self._runner.release_lock()


# ---------------------------------------------------------------------------
# Events -> OpenAI objects


@dataclass
class _Chunk:
    """What happened between two streamed chunks."""

    token: TokenEvent | None = None
    done: DoneEvent | None = None
    query: QueryEvent | None = None
    verdicts: list[dict[str, Any]] = field(default_factory=list)
    interventions: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def of(cls, events: list[Event]) -> _Chunk:
        chunk = cls()
        for event in events:
            if isinstance(event, TokenEvent):
                chunk.token = event
            elif isinstance(event, DoneEvent):
                chunk.done = event
            elif isinstance(event, QueryEvent):
                chunk.query = event
            elif isinstance(event, CheckEvent):
                chunk.verdicts.append(_plain(event))
            elif isinstance(event, InterventionEvent):
                chunk.interventions.append(_plain(event))
        return chunk

    def extras(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.query is not None:
            out["query"] = _plain(self.query)
        if self.verdicts:
            out["verdicts"] = self.verdicts
        if self.interventions:
            out["interventions"] = self.interventions
        return out


def _releasable(text: str, stops: list[str]) -> int:
    """How much of ``text`` may be sent: up to a stop string, or short of a tail that could begin one."""
    cut = len(text)
    for stop in stops:
        if not stop:
            continue
        found = text.find(stop)
        if found >= 0:
            cut = min(cut, found)
            continue
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                cut = min(cut, len(text) - k)
                break
    return cut


def _plain(event: Event) -> dict[str, Any]:
    data = event.to_dict()
    data.pop("type", None)
    if "window" in data:
        data["window"] = [list(run) for run in data["window"]]
    return data


def _summary(done: DoneEvent) -> dict[str, Any]:
    data = _plain(done)
    data.pop("text", None)
    data["guard_seconds"] = data.get("guard_s")  # the name Guard.create_chat_completion uses
    return data


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass
class _Answer:
    """All of a non-streamed answer's events, folded."""

    pieces: list[str] = field(default_factory=list)
    token_risks: list[float | None] = field(default_factory=list)
    forced: int = 0
    verdicts: list[dict[str, Any]] = field(default_factory=list)
    interventions: list[dict[str, Any]] = field(default_factory=list)
    query: QueryEvent | None = None
    done: DoneEvent | None = None

    def add(self, chunk: _Chunk) -> None:
        if chunk.query is not None:
            self.query = chunk.query
        self.verdicts += chunk.verdicts
        self.interventions += chunk.interventions
        if chunk.token is not None:
            self.pieces.append(chunk.token.text)
            self.token_risks.append(chunk.token.risk)
            self.forced += chunk.token.forced
        if chunk.done is not None:
            self.done = chunk.done

    @property
    def text(self) -> str:
        return self.done.text if self.done is not None else "".join(self.pieces)

    @property
    def finish_reason(self) -> str:
        return _FINISH.get(self.done.finish_reason, "stop") if self.done is not None else "stop"

    def usage(self) -> dict[str, int]:
        if self.done is not None:
            return _usage(self.done.prompt_tokens, self.done.completion_tokens)
        return _usage(self.query.prompt_tokens if self.query else 0, len(self.pieces))

    def guardrail(self) -> dict[str, Any]:
        out: dict[str, Any] = _summary(self.done) if self.done is not None else {"finish_reason": "stop"}
        out.update(verdicts=self.verdicts, interventions=self.interventions,
                   token_risks=self.token_risks, forced_tokens=self.forced)
        out.setdefault("intervened", bool(self.interventions))
        out.setdefault("query_risk", self.verdicts[0]["risk"] if self.verdicts else None)
        return out


# ---------------------------------------------------------------------------
# The app


class _ApiKeyMiddleware:
    """``Authorization: Bearer KEY`` on everything but /health (pure ASGI: streams untouched)."""

    def __init__(self, app: Any, api_key: str, open_paths: tuple[str, ...] = ("/health",)):
        self.app, self._key, self._open = app, api_key.encode(), open_paths

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") in self._open:
            await self.app(scope, receive, send)
            return
        header = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                header = value
                break
        scheme, _, token = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key):
            await self.app(scope, receive, send)
            return
        message = ("Incorrect API key provided." if header else
                   "You didn't provide an API key: send it as 'Authorization: Bearer KEY'.")
        response = APIError(401, message, code="invalid_api_key").response({"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


def _resolve_guard(guard_or_factory: Any) -> Any:
    if hasattr(guard_or_factory, "chat") and hasattr(guard_or_factory, "complete"):
        return guard_or_factory
    if callable(guard_or_factory):
        return guard_or_factory()
    raise TypeError("create_app needs a Guard or a callable that returns one")


def create_app(guard: Any, *, api_key: str | None = None, defaults: dict[str, Any] | None = None) -> FastAPI:
    """The FastAPI app serving ``guard`` (a Guard, or a zero-argument factory called once, now).

    ``defaults``: server-wide request defaults (``max_tokens``, ``temperature``, ...,
    ``policy``, ``schedule``, ``threshold``, ``tau``); request fields override them and
    what neither sets is left to the guard. ``api_key``: if set, every endpoint but
    /health needs ``Authorization: Bearer <api_key>``."""
    defaults = dict(defaults or {})
    unknown = sorted(set(defaults) - set(DEFAULT_KEYS))
    if unknown:
        raise ValueError(f"unknown server defaults: {', '.join(unknown)}; known: {', '.join(DEFAULT_KEYS)}")
    if defaults.get("policy") is not None or defaults.get("schedule") is not None:
        GuardOptions.model_validate({k: defaults.get(k) for k in GUARD_KEYS})  # fail at start, not per request
    guard = _resolve_guard(guard)
    model_name = str(getattr(guard, "model_name", "guardrail"))
    started = int(time.time())
    runner_box: dict[str, _Runner] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if "runner" in runner_box:
            await runner_box["runner"].drain()

    app = FastAPI(title="guardrail", version=_version(), lifespan=lifespan,
                  summary="OpenAI-compatible chat and completions under a guard")
    app.state.guard = guard

    def runner() -> _Runner:  # created on the serving loop, on first use
        if "runner" not in runner_box:
            runner_box["runner"] = _Runner(guard)
        return runner_box["runner"]

    if api_key:
        app.add_middleware(_ApiKeyMiddleware, api_key=api_key)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return APIError(exc.status_code, _one_line(str(exc.detail)), type=kind, code=code).response(
            dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        return api_error_from(exc).response()

    # -- endpoints

    @app.get("/health")
    async def health() -> dict[str, Any]:
        box = runner_box.get("runner")
        return {"status": "ok", "model": model_name, "busy": bool(box and box.busy),
                "waiting": box.waiting if box else 0, "served": box.served if box else 0}

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": started, "owned_by": "guardrail",
                "guardrail": {"n_ctx": getattr(guard, "n_ctx", None),
                              "defaults": {k: v for k, v in defaults.items() if v is not None}}}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != model_name:
            raise APIError(404, f"The model '{model_id}' does not exist; this server serves '{model_name}'.",
                           param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        try:
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                        for m in body.messages]
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages", code="invalid_value") from None
        kwargs = body.guard_kwargs(defaults)
        return await _respond(request, body, lambda: guard.chat(messages, **kwargs), chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        prompt = body.prompt_text()
        kwargs = body.guard_kwargs(defaults)
        return await _respond(request, body, lambda: guard.complete(prompt, **kwargs), chat=False)

    async def _respond(request: Request, body: _CommonRequest, start: Callable[[], Iterator[Event]],
                       *, chat: bool) -> Any:
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        try:
            generation = await runner().open(start)
        except Exception as exc:
            raise api_error_from(exc) from None
        if await request.is_disconnected():  # gave up while waiting its turn
            generation.release()
            return Response(status_code=499)
        # the first chunk is pulled before answering, so an error before the first
        # token (a prompt too long, a bad option) is a proper HTTP status
        try:
            first = _Chunk.of(await generation.next_chunk())
        except BaseException as exc:
            generation.release()
            if isinstance(exc, Exception):
                raise api_error_from(exc) from None
            raise
        if body.stream:
            stream = _stream(request, generation, first, rid, created, chat=chat,
                             include_usage=body.include_usage(), stops=body.guard_kwargs(defaults).get("stop") or [])
            return _GenerationStream(stream, generation, sep="\n", ping=15)
        try:
            answer = _Answer()
            chunk = first
            while True:
                answer.add(chunk)
                if chunk.done is not None or chunk.token is None:  # the end (or the events ran out)
                    break
                if await request.is_disconnected():
                    log.info("%s: client went away; generation stopped", rid)
                    return Response(status_code=499)
                chunk = _Chunk.of(await generation.next_chunk())
        except Exception as exc:
            raise api_error_from(exc) from None
        finally:
            generation.release()
        return Response(_dumps(_final_object(answer, rid, created, chat=chat)), media_type="application/json")

    def _final_object(answer: _Answer, rid: str, created: int, *, chat: bool) -> dict[str, Any]:
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": answer.text},
                      "logprobs": None, "finish_reason": answer.finish_reason}
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": answer.text, "logprobs": None, "finish_reason": answer.finish_reason}
            kind = "text_completion"
        return {"id": rid, "object": kind, "created": created, "model": model_name, "choices": [choice],
                "usage": answer.usage(), "guardrail": answer.guardrail()}

    async def _stream(request: Request, generation: _Generation, first: _Chunk, rid: str, created: int,
                      *, chat: bool, include_usage: bool, stops: list[str]) -> AsyncIterator[dict[str, str]]:
        kind = "chat.completion.chunk" if chat else "text_completion"
        role_sent = False
        written, sent, n_tokens = "", 0, 0
        prompt_tokens = first.query.prompt_tokens if first.query else 0

        def frame(text: str | None, finish: str | None, guardrail: dict[str, Any]) -> dict[str, str]:
            nonlocal role_sent
            if chat:
                delta: dict[str, Any] = {} if text is None else {"content": text}
                if not role_sent:
                    delta = {"role": "assistant", **delta}
                    role_sent = True
                choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            obj = {"id": rid, "object": kind, "created": created, "model": model_name,
                   "choices": [choice], "guardrail": guardrail}
            return {"data": _dumps(obj)}

        try:
            chunk = first
            while True:
                if chunk.token is not None:
                    token = chunk.token
                    n_tokens += 1
                    written += token.text
                    # hold back a tail that may be the start of a stop string: the guard cuts
                    # the stop string from its text, so the stream must never have sent it
                    ready = _releasable(written, stops)
                    piece = written[sent:ready] if ready > sent else ""
                    sent = max(sent, ready)
                    yield frame(piece, None, {"index": token.index, "risk": token.risk,
                                              "forced": token.forced, **chunk.extras()})
                if chunk.done is not None or chunk.token is None:
                    done = chunk.done
                    guardrail: dict[str, Any] = {**(_summary(done) if done else {"finish_reason": "stop"}),
                                                 **chunk.extras()}
                    # what is still unsent of the final text: held-back text, the detokenizer's tail
                    final = done.text if done else written
                    rest = final[sent:] if final.startswith(written[:sent]) else ""
                    finish = _FINISH.get(done.finish_reason, "stop") if done else "stop"
                    yield frame(rest or None, finish, guardrail)
                    if include_usage:
                        usage = (_usage(done.prompt_tokens, done.completion_tokens) if done
                                 else _usage(prompt_tokens, n_tokens))
                        yield {"data": _dumps({"id": rid, "object": kind, "created": created,
                                               "model": model_name, "choices": [], "usage": usage})}
                    yield {"data": "[DONE]"}
                    return
                if await request.is_disconnected():
                    log.info("%s: client went away; generation stopped", rid)
                    return
                chunk = _Chunk.of(await generation.next_chunk())
        except Exception as exc:  # after the 200: the error travels as an SSE event
            yield {"data": _dumps(api_error_from(exc).body())}
            yield {"data": "[DONE]"}
        finally:
            generation.release()

    return app


class _GenerationStream(EventSourceResponse):
    """An SSE response that frees its generation however the response ends, even if
    its body iterator never started."""

    def __init__(self, content: Any, generation: _Generation, **kwargs: Any):
        super().__init__(content, **kwargs)
        self._generation = generation

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._generation.release()


def _version() -> str:
    from guardrail import __version__

    return __version__


# ---------------------------------------------------------------------------
# Running it


def _loopback(host: str) -> bool:
    return host in ("127.0.0.1", "::1", "localhost")


def serve(model: Any = None, head: Any = None, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, *, log_level: str = "info", **guard_defaults: Any) -> None:
    """Load the guard and serve it until interrupted (uvicorn).

    ``guard_defaults``: ``policy``/``schedule``/``threshold``/``tau`` and ``n_ctx`` (and other
    Guard options) configure the guard; the sampling keys (``max_tokens``, ``temperature``,
    ``top_p``, ``top_k``, ``min_p``, ``repeat_penalty``, ``seed``) become request defaults."""
    import sys

    import uvicorn

    from guardrail.runtime.guard import Guard
    from guardrail.runtime.schedule import Schedule

    if guard_defaults.get("schedule") is not None:
        try:
            Schedule.parse(guard_defaults["schedule"])
        except ValueError as exc:
            raise GuardrailError(str(exc)) from None
    request_defaults = {k: guard_defaults.pop(k) for k in SAMPLING_KEYS if k in guard_defaults}
    guard_options = {k: guard_defaults[k] for k in GUARD_KEYS if k in guard_defaults}
    if not api_key and not _loopback(host):
        log.warning("serving on %s without an API key: anyone who can reach it can use it", host)
    guard = Guard(model, head, **guard_defaults)
    try:
        app = create_app(guard, api_key=api_key, defaults={**request_defaults, **guard_options})
        shown = f"[{host}]" if ":" in host else host
        print(f"guardrail serve: {guard.model_name} (n_ctx {guard.n_ctx}) on http://{shown}:{port}/v1"
              f"{'' if api_key else ', no API key'}", file=sys.stderr, flush=True)
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    finally:
        close = getattr(guard, "close", None)
        if close is not None:
            close()


class BackgroundServer:
    """A uvicorn server for ``app`` on a free loopback port, in a daemon thread (tests, benchmarks).

    ``with BackgroundServer(app) as server: server.url`` -> ``http://127.0.0.1:PORT``."""

    def __init__(self, app: Any, *, host: str = "127.0.0.1", start_timeout: float = 30.0):
        import uvicorn

        if not _loopback(host):
            raise ValueError("BackgroundServer binds loopback addresses only")
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, 0))
        self.host, self.port = host, self._sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name=f"guardrail-server-{self.port}", daemon=True)
        self._start_timeout = start_timeout

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + self._start_timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the background server did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
