"""The events a guarded generation yields; every surface renders exactly these.

Each event has a ``type`` (a class constant, the JSON name) and plain fields;
``to_dict()`` is its JSON form (the ``--json`` stream is one such object per line).
Code that consumes events tells them apart by their class (``isinstance``, ``match``),
never by the ``type`` string, so a renamed or new event is a type error, not a silent miss.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal

#: what a check read: the [CLS] probe over the window, or the window's own states (no decode)
Signal = Literal["probe", "window"]


@dataclass(frozen=True)
class Event:
    type: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **asdict(self)}


@dataclass(frozen=True)
class QueryEvent(Event):
    """The conversation as decoded: its size, and the first check's window."""

    type: ClassVar[str] = "query"
    prompt_tokens: int
    prefill: str
    cached_tokens: int = 0      # prompt tokens the KV cache already held from the previous call


@dataclass(frozen=True)
class TokenEvent(Event):
    """One answer token. ``risk``: the token signal on its own state (None if no token head).
    ``forced``: written by the policy (the opener), not sampled."""

    type: ClassVar[str] = "token"
    index: int
    token: int
    text: str
    risk: float | None
    forced: bool = False


@dataclass(frozen=True)
class CheckEvent(Event):
    """A check: a probability over a window of the conversation, and its verdict.

    ``index``: answer tokens written when it ran (0 = on the query); ``window``: the
    conversation positions it read, as sorted, disjoint ``(start, end)`` runs (end
    excluded); ``signal``: ``window`` (the head read the window's own states, no decode:
    the default head) or ``probe`` (the [CLS] probe re-read the window). ``stage``:
    ``query`` (the first check, on the request), ``prefill`` (a caller's prefill read by
    the answer stage's head and rule before a word is written; ``risk`` its highest check,
    ``score`` the rule's highest statistic over it) or ``answer`` (a check during the
    answer, by the answer stage's head and rule); ``malicious`` is this check's own
    verdict at its stage's threshold, and for an answer check ``score`` is the answer
    stage's running statistic after it (what makes the guard act). ``reading``: the encodings
    the query check undid (or ``joined`` for a split request), when it read the request's plain
    words as well as the text as written (:mod:`~guardrail.runtime.encodings`,
    :mod:`~guardrail.runtime.splits`; ``window`` stays the text as written)."""

    type: ClassVar[str] = "check"
    index: int
    risk: float
    malicious: bool
    window: list[tuple[int, int]]
    signal: Signal
    stage: str = "query"
    score: float | None = None
    reading: tuple[str, ...] = ()


@dataclass(frozen=True)
class InterventionEvent(Event):
    """The policy acted: ``action`` refuse (the refusal follows) or halt; ``text`` is what it starts with."""

    type: ClassVar[str] = "intervention"
    index: int
    action: str
    text: str
    reason: str


@dataclass(frozen=True)
class DoneEvent(Event):
    """The last event: why the answer ended and what the guard cost."""

    type: ClassVar[str] = "done"
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
