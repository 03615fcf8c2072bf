"""What a verdict does, and what the guard writes once it acts: strategic decoding.

- ``refuse`` (default; the paper's medium-reliance policy, adapted): a malicious
  first verdict, or ``tau`` consecutive malicious verdicts after a benign
  start, ends the answer with a refusal. The refusal starts with the opener
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

import re
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


class Policy:
    """Turns the stream of verdicts of one answer into at most one action.

    ``name`` and ``tau`` come from resolved options (``options.ResolvedOptions``), which
    validated them: they are not checked again here."""

    def __init__(self, name: str = "refuse", tau: int = 3):
        self.name, self.tau = name, tau
        self._streak = 0
        self.triggered: str | None = None  # why it acted (or, for monitor, would have)

    def on_verdict(self, index: int, malicious: bool) -> Action:
        """Feed one check's verdict (``index``: answer tokens it read); returns what to do now."""
        if self.triggered is not None:
            return CONTINUE
        if index == 0:
            if not malicious:
                return CONTINUE
            return self._act("the query was judged malicious")
        self._streak = self._streak + 1 if malicious else 0
        if self._streak >= self.tau:
            return self._act(f"{self.tau} consecutive checks judged the answer malicious")
        return CONTINUE

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
