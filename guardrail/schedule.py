"""When to run a [CLS] check during an answer.

``due(step)`` is asked once per answer token; step 0 is the first check, on the
query (and any prefill) before the first answer token. On a compute-bound CPU
every probe token costs about one decode step, so the default anneals: dense
at the start, where an answer commits to complying or refusing, then sparse,
then silent (the token signal keeps annotating every token for free).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    """``kind``: every | first | periodic | annealing."""

    kind: str = "annealing"
    period: int = 8          # periodic: every `period` tokens
    dense_until: int = 16    # annealing: every `dense_every` tokens up to here,
    dense_every: int = 4
    sparse_until: int = 64   # then every `sparse_every` up to here, then stop
    sparse_every: int = 16

    def due(self, step: int) -> bool:
        if step == 0:
            return True
        if self.kind == "every":
            return True
        if self.kind == "first":
            return False
        if self.kind == "periodic":
            return step % self.period == 0
        if self.kind == "annealing":
            if step <= self.dense_until:
                return step % self.dense_every == 0
            if step <= self.sparse_until:
                return step % self.sparse_every == 0
            return False
        raise ValueError(f"unknown schedule {self.kind!r}")

    @classmethod
    def parse(cls, spec: str) -> Schedule:
        """'every', 'first', 'annealing', or 'periodic:K'."""
        name, _, arg = spec.partition(":")
        if name == "periodic":
            period = int(arg or 8)
            if period < 1:
                raise ValueError("periodic:K needs K >= 1")
            return cls("periodic", period=period)
        if name in ("every", "first", "annealing") and not arg:
            return cls(name)
        raise ValueError(f"unknown schedule {spec!r}: use every, first, annealing or periodic:K")

    def __str__(self) -> str:
        return f"periodic:{self.period}" if self.kind == "periodic" else self.kind
