"""``POST /v1/moderations`` in OpenAI's shape, so apps that already ask a moderation endpoint can
ask the local guard without changing their inference backend.

Each input is scored as a user's request (``Guard.score``: the first check, nothing generated).
There is one category, ``harmful``: the head's probability that the request is malicious;
``flagged`` is its verdict at the guard's threshold (a non-finite score is flagged, never
passed). Unless the operator shows clients full detail, the score is the verdict itself
(1.0 or 0.0), so the endpoint is not an oracle for tuning requests against the head. An empty
text asks for nothing and is not flagged (score 0.0, not run through the model).
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from guardrail.errors import ContextOverflowError

from .context import ServerContext, request_id
from .errors import api_error_from, bad_request
from .protocol import VerdictLike
from .runner import Turn
from .schemas import ModerationRequest
from .stream import dumps

CATEGORIES = ("harmful",)


def _verdict(verdict: VerdictLike) -> tuple[float, bool]:
    """(risk, flagged); a non-finite risk is flagged."""
    risk = float(verdict.risk)
    if not math.isfinite(risk):
        return 1.0, True
    return risk, bool(verdict.malicious)


async def _score(turn: Turn, text: str) -> tuple[float, bool]:
    """One text's verdict as a user's request, on the turn's worker; a text past the context is the
    request's fault (a 400)."""
    if not text.strip():
        return 0.0, False
    try:
        return _verdict(await turn.score([{"role": "user", "content": text}]))
    except ContextOverflowError as exc:
        raise bad_request(f"Invalid request: input: {exc}", param="input", code="context_length_exceeded") from None
    except Exception as exc:
        raise api_error_from(exc) from None


async def moderate(ctx: ServerContext, body: ModerationRequest, request: Request) -> Response:
    limits = ctx.config.limits
    texts = body.texts()
    if len(texts) > limits.max_inputs:
        raise bad_request(f"Invalid request: input holds {len(texts)} texts; this server takes at most "
                          f"{limits.max_inputs} per call (max_inputs).", param="input", code="too_many_inputs")
    chars = sum(len(t) for t in texts)
    if chars > limits.max_chars:
        raise bad_request(f"Invalid request: input holds {chars} characters of text; this server takes at most "
                          f"{limits.max_chars} per request (max_chars).", param="input", code="content_too_long")
    rid = request_id("modr")
    verdicts = []
    async with ctx.runner.turn(request, rid) as turn:
        for text in texts:
            verdicts.append(await _score(turn, text))
            await turn.check_client()
    for _, flagged in verdicts:
        ctx.metrics.moderated(flagged)
    full = ctx.config.detail == "full"
    results = []
    for i, (risk, flagged) in enumerate(verdicts):
        score = risk if full else float(flagged)
        results.append({"flagged": flagged, "categories": {"harmful": flagged},
                        "category_scores": {"harmful": score},
                        "category_applied_input_types": {"harmful": ["text"]}})
        if flagged and ctx.audit is not None:
            ctx.audit.write(rid, "/v1/moderations", risk=risk, verdict="malicious", action="flagged", input_index=i,
                            text={"input": texts[i]})
    reply: dict[str, Any] = {"id": rid, "model": ctx.model_name, "results": results}
    if ctx.config.detail != "none":
        threshold = ctx.guard.resolve_options().threshold if full else None
        reply["guardrail"] = {"categories": list(CATEGORIES), "threshold": threshold}
    return Response(dumps(reply), media_type="application/json")
