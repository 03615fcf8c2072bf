"""The events a guarded generation yields; every surface renders exactly these.

Each event has a ``type`` and plain fields; ``to_dict()`` is its JSON form (the
``--json`` stream is one such object per line).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Event:
    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **asdict(self)}  # type: ignore[attr-defined]


@dataclass(frozen=True)
class QueryEvent(Event):
    """The conversation as decoded: its size, and the first check's window."""

    prompt_tokens: int
    prefill: str
    cached_tokens: int = 0      # prompt tokens the KV cache already held from the previous call
    type: str = field(default="query", init=False)


@dataclass(frozen=True)
class TokenEvent(Event):
    """One answer token. ``risk``: the token signal on its own state (None if no token head).
    ``forced``: written by the policy (the opener), not sampled."""

    index: int
    token: int
    text: str
    risk: float | None
    forced: bool = False
    type: str = field(default="token", init=False)


@dataclass(frozen=True)
class CheckEvent(Event):
    """A check: a probability over a window of the conversation, and its verdict.

    ``index``: answer tokens written when it ran (0 = on the query);
    ``window``: the positions it read, as [start, end) runs; ``signal``: ``probe``
    (the [CLS] probe read the window) or ``window`` (the head read the window's own
    states, no decode)."""

    index: int
    risk: float
    malicious: bool
    window: list[tuple[int, int]]
    signal: str = "probe"
    type: str = field(default="check", init=False)


@dataclass(frozen=True)
class InterventionEvent(Event):
    """The policy acted: ``action`` refuse (the refusal follows) or halt; ``text`` is what it starts with."""

    index: int
    action: str
    text: str
    reason: str
    type: str = field(default="intervention", init=False)


@dataclass(frozen=True)
class DoneEvent(Event):
    """The last event: why the answer ended and what the guard cost."""

    finish_reason: str          # stop | length | refuse | halt
    text: str
    completion_tokens: int
    prompt_tokens: int
    checks: int
    intervened: bool
    query_risk: float | None
    max_risk: float | None
    elapsed_s: float
    tokens_per_s: float
    guard_s: float              # time spent on probes and heads
    type: str = field(default="done", init=False)
