"""What every endpoint shares: the guard, the operator's configuration, the runner, the metrics, the audit log."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from .audit import AuditLog
from .config import ServerConfig
from .metrics import Metrics
from .protocol import GuardLike
from .runner import Runner


@dataclass
class ServerContext:
    guard: GuardLike
    config: ServerConfig
    runner: Runner
    metrics: Metrics
    audit: AuditLog | None = None
    started: int = field(default_factory=lambda: int(time.time()))

    @property
    def model_name(self) -> str:
        return str(self.guard.model_name)

    def sampling_defaults(self) -> dict[str, Any]:
        """The operator's sampling defaults for a request that sets none, ``max_tokens`` kept within
        the context (what neither sets is the guard's own default)."""
        defaults = dict(self.config.defaults)
        if defaults.get("max_tokens") is not None:
            defaults["max_tokens"] = min(int(defaults["max_tokens"]), int(self.guard.n_ctx))
        return defaults


def request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"

