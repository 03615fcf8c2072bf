"""``guardrail serve``: an OpenAI-compatible HTTP server over one guard. This module wires it up.

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (whole or streamed over
SSE), ``POST /v1/moderations``, ``GET /v1/models``, ``GET /health``, ``GET /metrics``. What each
does lives in its own module: :mod:`.gate` (host, key, content type, body size), :mod:`.completions`,
:mod:`.moderation`, :mod:`.runner` (turns and the queue), :mod:`.slots` (several answers at once),
:mod:`.stream` (SSE), :mod:`.metrics` (Prometheus), :mod:`.errors`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .audit import AuditLog
from .completions import chat_completion, text_completion
from .config import ServerConfig
from .context import ServerContext
from .errors import APIError, api_error_from, validation_error
from .gate import AUTHORIZED, Gate
from .metrics import Metrics, RequestCounter
from .moderation import moderate
from .protocol import GuardLike
from .runner import ClientGone, Runner
from .schemas import ChatCompletionRequest, CompletionRequest, ModerationRequest, documented

log = logging.getLogger("guardrail.server")


def _resolve_guard(guard_or_factory: GuardLike | Callable[[], GuardLike]) -> GuardLike:
    if isinstance(guard_or_factory, GuardLike):
        return guard_or_factory
    if callable(guard_or_factory):
        return guard_or_factory()
    raise TypeError("create_app needs a Guard or a callable that returns one")


def create_app(guard: GuardLike | Callable[[], GuardLike], config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI app serving ``guard`` (a Guard, or a zero-argument factory called once, now)
    as the operator's ``config`` says."""
    config = config or ServerConfig()
    the_guard, metrics = _resolve_guard(guard), Metrics()
    ctx = ServerContext(the_guard, config,
                        Runner(the_guard, queue_size=config.queue_size, queue_timeout_s=config.queue_timeout_s,
                               metrics=metrics), metrics,
                        AuditLog(config.audit_log, with_text=config.audit_text) if config.audit_log else None)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await ctx.runner.drain()
        if ctx.audit is not None:
            ctx.audit.close()

    app = FastAPI(title="guardrail", version=_version(), lifespan=lifespan,
                  summary="OpenAI-compatible chat, completions and moderation under a guard")
    app.state.context = ctx
    app.add_middleware(Gate, api_key=config.api_key, allowed_hosts=config.allowed_hosts,
                       max_body_bytes=config.limits.max_body_bytes)
    app.add_middleware(RequestCounter, metrics=metrics)  # outermost: the gate's refusals are counted too
    _errors(app)

    gate = (401, 403)  # every route: the key and the Host header (Gate)
    posted = (*gate, 400, 413, 415, 429, 500, 503)  # a body, a turn on the guard

    @app.get("/health", responses=documented(403))
    async def health(request: Request) -> dict[str, Any]:
        if not request.scope.get(AUTHORIZED, False):
            return {"status": "ok"}  # liveness only: the rest is for key holders
        runner = ctx.runner
        return {"status": "ok", "model": ctx.model_name, "busy": runner.busy, "waiting": runner.waiting,
                "queue_size": runner.queue_size, "served": runner.served, "refused": runner.refused,
                "left_while_waiting": runner.left, "parallel": runner.parallel, "busy_slots": runner.holding,
                "kv_cells": ctx.guard.n_ctx}

    @app.get("/metrics", response_class=PlainTextResponse, responses=documented(*gate))
    async def metrics_text() -> Response:
        body, kind = ctx.metrics.exposition()
        return Response(body, media_type=kind)

    def model_card() -> dict[str, Any]:
        return {"id": ctx.model_name, "object": "model", "created": ctx.started, "owned_by": "guardrail",
                "guardrail": {"n_ctx": ctx.guard.n_ctx, "detail": config.detail,
                              "client_options": dict(config.client_options),
                              "defaults": {k: v for k, v in config.defaults.items() if v is not None}}}

    @app.get("/v1/models", responses=documented(*gate))
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", responses=documented(*gate, 404))
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != ctx.model_name:
            raise APIError(404, f"The model '{model_id}' does not exist; this server serves '{ctx.model_name}'.",
                           param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions", responses=documented(*posted, 403, stream=True))
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await chat_completion(ctx, body, request)

    @app.post("/v1/completions", responses=documented(*posted, stream=True))
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await text_completion(ctx, body, request)

    @app.post("/v1/moderations", responses=documented(*posted))
    async def moderations(body: ModerationRequest, request: Request) -> Response:
        return await moderate(ctx, body, request)

    return app


def _errors(app: FastAPI) -> None:
    """Every error as OpenAI's error object, one line; tracebacks only in the log."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nobody is there to read it; the turn was released on the way

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return APIError(exc.status_code, str(exc.detail), type=kind, code=code,
                        headers=dict(exc.headers or {})).response()

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        return api_error_from(exc).response()


def _version() -> str:
    from guardrail._version import __version__

    return __version__
