"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}``, one line each.

Tracebacks go to the server log only. A guard error raised while a request is
prepared (its template, its options, its length) is the client's: a 400. One
raised while the model runs is the server's: a 500.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi.responses import JSONResponse

from guardrail._json import json_safe
from guardrail.errors import ContextOverflowError, GuardBusyError, GuardrailError, OptionsError

log = logging.getLogger("guardrail.server")


class APIError(Exception):
    """An error answered as OpenAI's error object."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, one_line(message), type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def one_line(text: str) -> str:
    return " ".join(str(text).split()) or "error"


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def api_error_from(exc: BaseException, *, preparing: bool = False) -> APIError:
    """A guard-side exception as the error the client sees. ``preparing``: raised before the
    model ran (rendering the template, checking options and length), so the request's fault."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextOverflowError):
        return APIError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, OptionsError):
        return APIError(400, str(exc), param="guardrail", code="invalid_value")
    if isinstance(exc, GuardBusyError):
        return APIError(503, str(exc), type="server_error", code="guard_busy")
    if isinstance(exc, GuardrailError):
        if preparing:
            return APIError(400, str(exc), code=type(exc).__name__)
        log.error("the guard failed while generating: %s", one_line(str(exc)))
        return APIError(500, str(exc), type="server_error", code=type(exc).__name__)
    if isinstance(exc, ValueError) and preparing:  # the guard refusing a value it was given
        return APIError(400, str(exc), code="invalid_value")
    log.error("internal error while generating", exc_info=exc)
    return APIError(500, "internal server error (see the server log)", type="server_error", code="internal_error")


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "is-instance", "function-after",
              "function-before", "function-plain", "function-wrap"}


def validation_error(errors: Sequence[Any]) -> APIError:
    """pydantic's first complaint about a body as a 400 naming the field."""
    if not errors:
        return APIError(400, "invalid request")
    err = dict(errors[0])
    if err.get("type") == "json_invalid":
        return APIError(400, "We could not parse the JSON body of your request: it is not valid JSON.",
                        code="invalid_json")
    # drop "body" and pydantic's union-member tags ("str", "list[str]", ...) from the path
    loc = [str(part) for part in err.get("loc", ())
           if part != "body" and not (isinstance(part, str) and (part in _TYPE_TAGS or "[" in part))]
    if not loc:  # no body, or a body that is not a JSON object
        return APIError(400, "The request body must be a JSON object (Content-Type: application/json).",
                        code="invalid_json")
    param = ".".join(loc)
    message = str(err.get("msg", "invalid value"))
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    code = "unsupported_parameter" if "not supported" in message else (
        "invalid_type" if str(err.get("type", "")).endswith("_type") else "invalid_value")
    return APIError(400, f"Invalid request: {param}: {message}{more}", param=param, code=code)


def safe(obj: Any) -> Any:
    """A response object with NaN/inf as null and numpy values as Python ones."""
    return json_safe(obj)
