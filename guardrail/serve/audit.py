"""``--audit-log FILE``: one JSON line per intervention and per flagged moderation input.

Each line: ``time`` (UTC, ISO 8601), ``request_id``, ``endpoint``, ``risk``, ``verdict``,
``action``; the conversation's and the answer's text only when the operator asks for
it (``--audit-log-text``), since they may hold what users would not want kept.
"""

from __future__ import annotations

import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from guardrail._json import json_safe
from guardrail.errors import OptionsError


class AuditLog:
    def __init__(self, path: str | os.PathLike[str], *, with_text: bool = False):
        self.path = Path(path)
        self.with_text = with_text
        self._lock = threading.Lock()
        try:
            self._file = self.path.open("a", encoding="utf-8")
        except OSError as exc:
            raise OptionsError(f"cannot open the audit log {self.path}: {exc.strerror or exc}") from None

    def write(self, request_id: str, endpoint: str, *, risk: float | None, verdict: str, action: str,
              text: dict[str, Any] | None = None, **extra: Any) -> None:
        record = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "request_id": request_id,
                  "endpoint": endpoint, "risk": risk, "verdict": verdict, "action": action, **extra}
        if self.with_text and text:
            record.update(text)
        line = json.dumps(json_safe(record), ensure_ascii=False, allow_nan=False)
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()
