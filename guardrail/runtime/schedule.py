"""When a check runs during an answer.

A check at index ``k`` reads the conversation with the first ``k`` answer
tokens written (index 0: the query and any prefill, before the first token).
``due(k)`` says whether it runs. Checks never stop before the answer does:
annealing is dense at the start, where an answer commits to complying or
refusing, then keeps a sparse period to the end.

What a check costs depends on the head, not the schedule: a head without a
[CLS] probe block reads only states the capture already holds (a few scalar
operations, see ``features.LinearCheck``), so ``auto`` checks every step; a
head with a probe pays about one decode step per probe token, so ``auto``
anneals.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

KINDS = ("auto", "every", "annealing", "periodic", "first")


@dataclass(frozen=True)
class Schedule:
    """``kind``: auto | every | annealing | periodic | first."""

    kind: str = "auto"
    period: int = 8          # periodic: every `period` tokens
    dense_until: int = 16    # annealing: every `dense_every` tokens up to here,
    dense_every: int = 4
    sparse_every: int = 16   # then every `sparse_every` tokens to the end of the answer

    def resolve(self, checks_are_free: bool) -> Schedule:
        """``auto`` becomes ``every`` where checks cost nothing, ``annealing`` where they decode a probe."""
        if self.kind != "auto":
            return self
        return replace(self, kind="every" if checks_are_free else "annealing")

    def due(self, index: int) -> bool:
        if index == 0:
            return True
        if self.kind == "every":
            return True
        if self.kind == "first":
            return False
        if self.kind == "periodic":
            return index % self.period == 0
        if self.kind == "annealing":
            every = self.dense_every if index <= self.dense_until else self.sparse_every
            return index % every == 0
        raise ValueError(f"schedule {self.kind!r} must be resolved before use")

    @classmethod
    def parse(cls, spec: str) -> Schedule:
        """'auto', 'every', 'annealing', 'first', or 'periodic:K'."""
        name, _, arg = str(spec).partition(":")
        if name == "periodic":
            try:
                period = int(arg or 8)
            except ValueError:
                period = 0
            if period < 1:
                raise ValueError("periodic:K needs a whole number K >= 1")
            return cls("periodic", period=period)
        if name in KINDS and not arg:
            return cls(name)
        raise ValueError(f"unknown schedule {spec!r}: use auto, every, annealing, first or periodic:K")

    def __str__(self) -> str:
        return f"periodic:{self.period}" if self.kind == "periodic" else self.kind
