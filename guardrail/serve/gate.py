"""What every request passes before any endpoint sees it (pure ASGI, so streams are untouched).

In order: the ``Host`` header among the bound names (a page on another site cannot reach a
loopback server through DNS rebinding); ``Authorization: Bearer KEY`` when a key is set (on
everything but ``/health``, which answers everyone but says more to key holders); a JSON
``Content-Type`` on requests with a body (a browser cannot send one without a CORS preflight,
which this server never grants); and the body's size, from ``Content-Length`` before reading
and counted while reading, so an oversized body is refused without being read whole.
"""

from __future__ import annotations

import hmac
from typing import Any

from .errors import APIError

AUTHORIZED = "guardrail.authorized"  # scope key: whether the caller showed the key (or none is needed)


class Gate:
    def __init__(self, app: Any, *, api_key: str | None, allowed_hosts: tuple[str, ...], max_body_bytes: int,
                 open_paths: tuple[str, ...] = ("/health",)):
        self.app = app
        self._key = api_key.encode() if api_key else None
        self._hosts = {_hostname(h.lower()) for h in allowed_hosts}
        self._max = max_body_bytes
        self._open = open_paths

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {name: value for name, value in scope.get("headers", ())}
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            await refusal.response()(scope, receive, send)
            return
        if scope["method"] in ("POST", "PUT", "PATCH"):
            body, refusal = await self._read(receive)
            if refusal is not None:
                await refusal.response()(scope, receive, send)
                return
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    def _refusal(self, scope: Any, headers: dict[bytes, bytes]) -> APIError | None:
        host = headers.get(b"host", b"").decode("latin-1").lower()
        if self._hosts and _hostname(host) not in self._hosts:
            return APIError(403, f"Host {host or '(none)'!r} is not a name this server is bound to; "
                                 "requests through other names are refused (DNS rebinding).",
                            type="permission_error", code="host_not_allowed")
        authorized = self._key is None or _bearer_matches(headers.get(b"authorization", b""), self._key)
        scope[AUTHORIZED] = authorized
        if not authorized and scope.get("path") not in self._open:
            message = ("Incorrect API key provided." if b"authorization" in headers else
                       "You didn't provide an API key: send it as 'Authorization: Bearer KEY'.")
            return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if scope["method"] in ("POST", "PUT", "PATCH"):
            kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if kind != b"application/json":
                return APIError(415, "The body must be JSON sent as 'Content-Type: application/json' "
                                     f"(got {kind.decode('latin-1') or 'none'}).", code="unsupported_media_type")
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self._max:
                return self._too_large()
        return None

    def _too_large(self) -> APIError:
        return APIError(413, f"The request body is larger than this server accepts "
                             f"({self._max} bytes: max_body_bytes).", param="body", code="request_too_large")

    async def _read(self, receive: Any) -> tuple[bytes, APIError | None]:
        """The body, read while it stays within the bound (a chunked one is counted as it comes)."""
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"", None  # gone before sending it all; the app will see the disconnect
            part = message.get("body", b"")
            size += len(part)
            if size > self._max:
                return b"", self._too_large()
            parts.append(part)
            if not message.get("more_body", False):
                return b"".join(parts), None


def _hostname(host: str) -> str:
    """The name in a Host header, without its port ("[::1]:8000" -> "[::1]")."""
    if host.startswith("["):
        return host[:host.find("]") + 1] if "]" in host else host
    return host.split(":", 1)[0]


def _bearer_matches(header: bytes, key: bytes) -> bool:
    scheme, _, token = header.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key)


def _replay(body: bytes, receive: Any) -> Any:
    """A receive that gives the body already read, then the real stream's messages (disconnect)."""
    sent = False

    async def replay() -> Any:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
