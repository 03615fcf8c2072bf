"""What a verdict does, and what the guard writes once it acts: strategic decoding.

- ``refuse`` (default; the paper's medium-reliance policy, adapted): a malicious
  first verdict, or the answer stage's rule reaching its threshold after a benign
  start (``tau`` malicious checks in a row, or a moving average of the checks:
  :class:`AnswerRule`), ends the answer with a refusal. The refusal starts with the opener
  ("Sorry, I cannot fulfill your request because"); its reason is the model's
  own sentence when that sentence is a plain, complete reason (``reason="model"``),
  else a fixed one, and nothing follows it. A frozen small model does not
  continue an opener as a refusal (it drifts back to the task), so the guard,
  not the model, owns the end of the answer.
- ``halt``: the same triggers end the answer at once with a fixed refusal.
- ``monitor``: never act, only annotate.

Written tokens are kept (no backtracking); a refusal after some answer text
starts on a new paragraph, never mid-word.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

POLICIES = ("refuse", "halt", "monitor")
REASONS = ("model", "fixed")
DEFAULT_OPENER = "Sorry, I cannot fulfill your request because"
FIXED_REASON = " it asks for help with something that could cause harm."
HALT_MESSAGE = "Sorry, I can't help with that."
MAX_REASON_TOKENS = 40


@dataclass(frozen=True)
class Action:
    """``kind``: continue | refuse | halt."""

    kind: str
    reason: str = ""

    @property
    def acts(self) -> bool:
        return self.kind != "continue"


CONTINUE = Action("continue")


RULES = ("streak", "ema")


@dataclass(frozen=True)
class AnswerRule:
    """How the checks during an answer add up to an alarm: a running statistic over the answer's
    check probabilities, compared with the answer stage's threshold.

    ``streak``: the smallest of the last ``tau`` checks (so ``tau`` in a row at or above the
    threshold; fewer than ``tau`` checks read 0). ``ema``: an exponential moving average of the
    checks' logits, ``alpha`` the weight of the past, so one spike cannot cut an answer, plus
    ``query_weight`` times the query check's own logit: a request the query check found
    suspicious but not malicious needs less evidence from its answer. ``prior``, where set,
    is the logit the average starts from instead of the first check's: an answer's first
    checks read mostly the request, so without it the answer head acts as a second query
    check there (README, "The answer stage"). A risk that is not a finite number counts as 1
    (fail closed)."""

    kind: str = "streak"
    tau: int = 6
    alpha: float = 0.9
    min_checks: int = 2          # ema: no alarm before this many checks (one check alone never cuts)
    query_weight: float = 0.0    # ema: how much of the query check's logit the statistic carries
    prior: float | None = None   # ema: the logit the average starts from (None: the first check's)

    def __post_init__(self) -> None:
        if self.kind not in RULES:
            raise ValueError(f"unknown answer rule {self.kind!r}: use one of {', '.join(RULES)}")

    def start(self, query_risk: float | None = None) -> RuleState:
        return RuleState(self, query_risk)

    def statistic(self, risks: Iterable[float], query_risk: float | None = None) -> list[float]:
        """The running statistic after each check of one answer (what training calibrates on)."""
        state = self.start(query_risk)
        return [state.update(r) for r in risks]

    def describe(self) -> str:
        if self.kind == "streak":
            return f"streak:{self.tau}"
        if self.prior is not None:
            return f"ema:{self.alpha:g}:{self.query_weight:g}:{self.prior:g}"
        return f"ema:{self.alpha:g}" + (f":{self.query_weight:g}" if self.query_weight else "")

    @classmethod
    def parse(cls, spec: str) -> AnswerRule:
        """``streak:TAU`` or ``ema:ALPHA[:QUERY_WEIGHT[:PRIOR]]``."""
        kind, _, arg = spec.partition(":")
        try:
            if kind == "streak":
                return cls("streak", tau=int(arg or 6))
            if kind == "ema":
                parts = arg.split(":") if arg else []
                if len(parts) <= 3:
                    alpha, weight, prior = (parts + ["", "", ""])[:3]
                    return cls("ema", alpha=float(alpha or 0.9), query_weight=float(weight or 0.0),
                               prior=float(prior) if prior else None)
        except ValueError:
            pass
        raise ValueError(f"unknown answer rule {spec!r}: use streak:TAU or ema:ALPHA[:QUERY_WEIGHT[:PRIOR]]")


class RuleState:
    """One answer's running statistic under a rule."""

    def __init__(self, rule: AnswerRule, query_risk: float | None = None):
        self.rule = rule
        self._recent: deque[float] = deque(maxlen=rule.tau)
        self._ema: float | None = rule.prior if rule.kind == "ema" else None
        self.seen = 0
        self._offset = rule.query_weight * _logit(query_risk) if query_risk is not None and rule.query_weight else 0.0

    def can_alarm_next(self) -> bool:
        """Whether the next check could raise the alarm (else the token it reads can be shown first)."""
        if self.rule.kind == "streak":
            return self.seen + 1 >= self.rule.tau
        return self.seen + 1 >= self.rule.min_checks

    def update(self, risk: float) -> float:
        p = float(risk) if math.isfinite(risk) else 1.0
        p = min(max(p, 1e-12), 1.0 - 1e-12)
        self.seen += 1
        if self.rule.kind == "streak":
            self._recent.append(p)
            return min(self._recent) if len(self._recent) == self.rule.tau else 0.0
        z = _logit(p)
        self._ema = z if self._ema is None else self.rule.alpha * self._ema + (1 - self.rule.alpha) * z
        if self.seen < self.rule.min_checks:
            return 0.0
        return 1.0 / (1.0 + math.exp(-min(max(self._ema + self._offset, -700.0), 700.0)))


def _logit(p: float) -> float:
    p = float(p) if math.isfinite(p) else 1.0
    p = min(max(p, 1e-12), 1.0 - 1e-12)
    return math.log(p) - math.log1p(-p)


class Policy:
    """Turns the checks of one answer into at most one action.

    The query check acts on its own verdict; the checks during the answer act when the
    answer stage's rule (``rule``, see :class:`AnswerRule`) reaches its threshold. ``name``
    comes from resolved options (``options.ResolvedOptions``), which validated it."""

    def __init__(self, name: str = "refuse", rule: AnswerRule | None = None):
        self.name = name
        self.rule = rule or AnswerRule()
        self._state = self.rule.start()
        self.triggered: str | None = None  # why it acted (or, for monitor, would have)

    def on_query(self, malicious: bool, risk: float | None = None) -> Action:
        """The query check's verdict (its ``risk`` primes the answer stage's rule)."""
        if risk is not None:
            self._state = self.rule.start(risk)
        if self.triggered is not None or not malicious:
            return CONTINUE
        return self._act("the query was judged malicious")

    def on_prefill(self, risks: Iterable[float], query_risk: float | None, threshold: float) -> tuple[float, Action]:
        """The prefill check: the answer stage's rule run over a caller's prefill, each of its tokens
        read as a written answer token would be, from the query check's risk; the answer's own rule
        then starts afresh at its first written token, as it does without a prefill. Its own
        threshold, because it decides once, before a word is written, on text the caller wrote: a
        compliant start that already serves a harmful request can only be stopped here (README, "The
        prefill check"). Returns the rule's highest statistic over the prefill and what to do."""
        peak = max(self.rule.statistic(risks, query_risk), default=0.0)
        if self.triggered is not None or peak < threshold:
            return peak, CONTINUE
        return peak, self._act("the prefill, read as the answer's first tokens, was judged malicious")

    def next_answer_check_may_act(self) -> bool:
        """Whether the next answer check could end the answer: when it cannot, the token it reads is
        shown before it is decoded (it can never be taken back)."""
        return self.name != "monitor" and self.triggered is None and self._state.can_alarm_next()

    def on_answer(self, risk: float, threshold: float) -> tuple[float, Action]:
        """One check during the answer: the rule's statistic after it, and what to do now."""
        score = self._state.update(risk)
        if self.triggered is not None or score < threshold:
            return score, CONTINUE
        if self.rule.kind == "streak":
            return score, self._act(f"{self.rule.tau} consecutive checks judged the answer malicious")
        return score, self._act(f"the answer's checks averaged over the malicious threshold ({self.rule.describe()})")

    def _act(self, reason: str) -> Action:
        self.triggered = reason
        if self.name == "monitor":
            return CONTINUE
        return Action(self.name, reason)


# ---------------------------------------------------------------------------
# What is written after acting

_SENTENCE_END = re.compile(r"[.!?][\"')\]]?$")
# A reason that turns back to the task, lists, instructs or hedges is no reason: the
# words and marks a complying continuation starts with (checked on the sentence only).
_DRIFT = re.compile(
    r"(\n|:|;|\d\.|\bhowever\b|\bbut\b|\bhere\b|\bsure\b|\bstep\b|\bsteps\b|\binstructions?\b|\bfirst\b|"
    r"\bhow to\b|\byou can\b|\byou need\b|\byou will\b|\byou should\b|\bfollow\b|\binstead\b|\bexample\b|"
    r"\bi can\b|\bi will\b|\bi'll\b|\blet me\b|\bto do (?:this|that|so)\b|\bingredients?\b|\bmaterials?\b)",
    re.IGNORECASE)


def lead_in(answer_so_far: str) -> str:
    """What separates a refusal from answer text already written: a new paragraph, never mid-word."""
    if not answer_so_far:
        return ""
    return "" if answer_so_far.endswith("\n\n") else ("\n" if answer_so_far.endswith("\n") else "\n\n")


def acceptable_reason(text: str) -> bool:
    """Whether the model's continuation of the opener is one plain, complete reason.

    It must be a single sentence of reasonable length that ends the sentence and
    contains none of the marks of drifting back to the task (a list, a colon, "but",
    "here", "step", "you can", ...); anything else is replaced by the fixed reason."""
    body = text.strip()
    return (8 <= len(body) <= 220 and bool(_SENTENCE_END.search(body)) and not _DRIFT.search(body)
            and body.count(".") + body.count("!") + body.count("?") == 1)


def halt_text(answer_so_far: str) -> str:
    return lead_in(answer_so_far) + HALT_MESSAGE
