"""What every endpoint shares: the guard, the operator's configuration, the runner, the audit log."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from .audit import AuditLog
from .config import ServerConfig
from .runner import Runner


@dataclass
class ServerContext:
    guard: Any  # a GuardLike
    config: ServerConfig
    runner: Runner
    audit: AuditLog | None = None
    started: int = field(default_factory=lambda: int(time.time()))

    @property
    def model_name(self) -> str:
        return str(self.guard.model_name)

    def max_tokens_default(self) -> dict[str, Any]:
        """The server's sampling defaults, ``max_tokens`` kept within the context."""
        defaults = dict(self.config.defaults)
        if defaults.get("max_tokens") is not None:
            defaults["max_tokens"] = min(int(defaults["max_tokens"]), int(self.guard.n_ctx))
        return defaults


def request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


async def client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
