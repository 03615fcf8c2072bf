"""How the guard decides: the options a caller may set, checked in one place and resolved once.

Every surface (library, CLI, server, llm plugin) validates through
:meth:`GuardOptions.updated`, so a bad value fails before any decoding, with
one :class:`~guardrail.errors.OptionsError` line, and the rules are written once.

``threshold`` and ``tau`` left unset mean "the head file's". That fallback is the
safety number, so it is written once too: :meth:`GuardOptions.resolve` turns options
and a head's defaults into :class:`ResolvedOptions`, where both are concrete, and
``Guard.resolve_options`` hands that object to every surface that shows or compares
them (the server's rules, the moderation reply, the llm plugin's log, the CLI).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol

from guardrail.errors import OptionsError

from .policy import DEFAULT_OPENER, POLICIES, REASONS, AnswerRule
from .probe import WindowParams
from .schedule import Schedule

WINDOW_KEYS = ("r1", "r2", "r3")


class HeadDefaults(Protocol):
    """What a head decides when the caller does not: its threshold and its tau."""

    @property
    def threshold(self) -> float: ...

    @property
    def tau(self) -> int: ...


@dataclass(frozen=True)
class ResolvedOptions:
    """The options one answer runs under, nothing left to a fallback: what every surface shows.

    Made only by :meth:`GuardOptions.resolve`, so the values are already valid."""

    policy: str
    schedule: Schedule
    threshold: float
    answer_threshold: float
    tau: int
    opener: str
    reason: str
    window: WindowParams
    answer_rule: AnswerRule = field(default_factory=AnswerRule)
    prefill_threshold: float = 1.0

    def value(self, name: str) -> Any:
        """An option by the name a caller uses (``r1``/``r2``/``r3`` read the window)."""
        if name in WINDOW_KEYS:
            return getattr(self.window, name)
        if name not in GuardOptions.names():
            raise OptionsError(f"unknown guard option {name!r}; known: {', '.join(GuardOptions.names())}")
        return getattr(self, name)


@dataclass(frozen=True)
class GuardOptions:
    """``threshold``/``tau`` of None mean: the head file's. ``threshold`` decides the query's own
    check; ``answer_threshold`` the checks during the answer (None: the head's answer-stage
    operating point, else ``threshold``); ``prefill_threshold`` the prefill check, the answer
    stage's rule over a caller's prefill (None: the head's; 1.0, which a head without one gets,
    never acts).

    ``reason``: ``model`` lets the model write the refusal's reason (kept only when
    it is one plain sentence), ``fixed`` always writes the fixed one. ``read_encoded``: the query
    check reads a request hidden in an encoding (base64, ROT13, leetspeak...) or split into quoted
    pieces as its plain words too (:mod:`~guardrail.runtime.encodings`, :mod:`~guardrail.runtime.splits`);
    off, it reads the text as written."""

    policy: str = "refuse"
    schedule: Schedule = field(default_factory=Schedule)
    threshold: float | None = None
    answer_threshold: float | None = None
    prefill_threshold: float | None = None
    tau: int | None = None
    opener: str = DEFAULT_OPENER
    reason: str = "fixed"
    window: WindowParams = field(default_factory=WindowParams)
    read_encoded: bool = True

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Every option a caller may pass (the window's r1/r2/r3 by name)."""
        return tuple(f.name for f in fields(cls) if f.name != "window") + WINDOW_KEYS

    def updated(self, **changes: Any) -> GuardOptions:
        """A copy with the given options changed (None leaves one as it is), or one OptionsError line."""
        changes = {k: v for k, v in changes.items() if v is not None}
        unknown = set(changes) - set(self.names())
        if unknown:
            raise OptionsError(f"unknown guard option(s): {', '.join(sorted(unknown))}; "
                               f"known: {', '.join(self.names())}")
        try:
            if "schedule" in changes and not isinstance(changes["schedule"], Schedule):
                changes["schedule"] = Schedule.parse(changes["schedule"])
            windows: dict[str, Any] = {k: _whole(k, changes.pop(k)) for k in WINDOW_KEYS if k in changes}
            if windows:
                changes["window"] = replace(self.window, **windows)
        except ValueError as exc:
            raise OptionsError(str(exc)) from None
        options = replace(self, **changes)
        options._check()
        return options

    def resolve(self, head: HeadDefaults) -> ResolvedOptions:
        """These options with the head's operating points wherever the caller gave none.

        The query check uses ``threshold``; the checks during the answer use the answer stage's
        own operating point and rule when the head has an answer-stage head (``answer_threshold``,
        and ``tau`` for a streak rule, override them), else the query's threshold with ``tau``
        checks in a row."""
        threshold = float(self.threshold if self.threshold is not None else head.threshold)
        answer_head = getattr(head, "answer_head", None)
        if answer_head is not None:
            stage = answer_head.extra.get("answer_stage") or {}
            rule = AnswerRule.parse(str(stage.get("rule", f"streak:{answer_head.tau}")))
            answer_default = float(answer_head.threshold)
            prefill_default = float((stage.get("prefill") or {}).get("threshold", 1.0))
        else:
            rule, answer_default, prefill_default = AnswerRule("streak", tau=int(head.tau)), threshold, 1.0
        if self.tau is not None and rule.kind == "streak":
            rule = replace(rule, tau=self.tau)
        return ResolvedOptions(
            policy=self.policy, schedule=self.schedule, threshold=threshold,
            answer_threshold=float(self.answer_threshold if self.answer_threshold is not None else answer_default),
            tau=int(self.tau if self.tau is not None else (rule.tau if rule.kind == "streak" else head.tau)),
            opener=self.opener, reason=self.reason, window=self.window, answer_rule=rule,
            prefill_threshold=float(self.prefill_threshold if self.prefill_threshold is not None else prefill_default))

    def _check(self) -> None:
        if self.policy not in POLICIES:
            raise OptionsError(f"unknown policy {self.policy!r}: use one of {', '.join(POLICIES)}")
        if self.reason not in REASONS:
            raise OptionsError(f"unknown reason {self.reason!r}: use one of {', '.join(REASONS)}")
        if self.tau is not None and (isinstance(self.tau, bool) or not isinstance(self.tau, int) or self.tau < 1):
            raise OptionsError(f"tau must be a whole number of at least 1, got {self.tau!r}")
        for name in ("threshold", "answer_threshold", "prefill_threshold"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or not 0.0 <= value <= 1.0):
                raise OptionsError(f"{name} must be a number between 0 and 1, got {value!r}")
        if not isinstance(self.read_encoded, bool):
            raise OptionsError(f"read_encoded must be true or false, got {self.read_encoded!r}")
        if not isinstance(self.opener, str) or not self.opener.strip():
            raise OptionsError("the refusal opener must be non-empty text")
        if min(self.window.r1, self.window.r2, self.window.r3) < 1:
            raise OptionsError("r1, r2 and r3 must be at least 1")


def _whole(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    return value
