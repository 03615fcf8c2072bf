"""What to do with the checks' verdicts: strategic decoding.

- ``refuse`` (default; the paper's medium-reliance policy): a malicious first
  verdict starts the answer with the refusal opener and the model writes the
  justification; after a benign first verdict, ``tau`` consecutive malicious
  verdicts insert the opener at that point, after a line break. Written tokens
  are kept (no backtracking).
- ``halt``: the same triggers stop the answer with a fixed refusal.
- ``monitor``: never intervene, only annotate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_OPENER = "Sorry, I cannot fulfill your request because"
DEFAULT_HALT_MESSAGE = "Sorry, I can't help with that."
POLICIES = ("refuse", "halt", "monitor")


@dataclass(frozen=True)
class Action:
    """``kind``: continue | insert (force ``text`` into the answer) | halt (end with ``text``)."""

    kind: str
    text: str = ""
    reason: str = ""


CONTINUE = Action("continue")


@dataclass
class Policy:
    name: str = "refuse"
    tau: int = 3
    opener: str = DEFAULT_OPENER
    halt_message: str = DEFAULT_HALT_MESSAGE
    _first: bool | None = field(default=None, init=False)
    _streak: int = field(default=0, init=False)
    intervened: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if self.name not in POLICIES:
            raise ValueError(f"unknown policy {self.name!r}: use one of {', '.join(POLICIES)}")
        if self.tau < 1:
            raise ValueError("tau must be >= 1")

    def on_verdict(self, malicious: bool, *, answer_len: int) -> Action:
        """Feed one check's verdict; returns what the decoding loop must do now."""
        if self._first is None:
            self._first = malicious
            if malicious:
                # after a caller's prefill ("Sure, here is"), the opener starts a new line
                return self._act("the query was judged malicious", line_break=answer_len > 0)
            return CONTINUE
        if self.intervened or self._first:
            return CONTINUE
        self._streak = self._streak + 1 if malicious else 0
        if self._streak >= self.tau:
            return self._act(f"{self.tau} consecutive checks judged the answer malicious",
                             line_break=answer_len > 0)
        return CONTINUE

    def _act(self, reason: str, *, line_break: bool) -> Action:
        if self.name == "monitor":
            return CONTINUE
        self.intervened = True
        if self.name == "halt":
            return Action("halt", self.halt_message, reason)
        return Action("insert", ("\n" if line_break else "") + self.opener, reason)
