"""When to check during an answer, and with which signal.

``due(step)`` says when the [CLS] probe runs (step 0 is the first check, on the
query and any prefill, before the first answer token); ``token_due(step)`` says
when the free token signal decides instead. On a compute-bound CPU every probe
token costs about one decode step, so the default anneals: dense at the start,
where an answer commits to complying or refusing, then sparse, then silent.
``every`` decides at every step for free: the token signal at every step, the
probe where annealing puts it; ``every-probe`` runs the probe itself every step.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    """``kind``: every | every-probe | first | periodic | annealing."""

    kind: str = "annealing"
    period: int = 8          # periodic: every `period` tokens
    dense_until: int = 16    # annealing: every `dense_every` tokens up to here,
    dense_every: int = 4
    sparse_until: int = 64   # then every `sparse_every` up to here, then stop
    sparse_every: int = 16

    def due(self, step: int) -> bool:
        if step == 0:
            return True
        if self.kind == "every-probe":
            return True
        if self.kind == "first":
            return False
        if self.kind == "periodic":
            return step % self.period == 0
        if self.kind in ("annealing", "every"):
            if step <= self.dense_until:
                return step % self.dense_every == 0
            if step <= self.sparse_until:
                return step % self.sparse_every == 0
            return False
        raise ValueError(f"unknown schedule {self.kind!r}")

    def token_due(self, step: int) -> bool:
        """Whether the token signal decides at this step (only where the probe does not run)."""
        return self.kind == "every" and step > 0 and not self.due(step)

    @classmethod
    def parse(cls, spec: str) -> Schedule:
        """'every', 'every-probe', 'first', 'annealing', or 'periodic:K'."""
        name, _, arg = spec.partition(":")
        if name == "periodic":
            period = int(arg or 8)
            if period < 1:
                raise ValueError("periodic:K needs K >= 1")
            return cls("periodic", period=period)
        if name in ("every", "every-probe", "first", "annealing") and not arg:
            return cls(name)
        raise ValueError(f"unknown schedule {spec!r}: use annealing, every, every-probe, first or periodic:K")

    def __str__(self) -> str:
        return f"periodic:{self.period}" if self.kind == "periodic" else self.kind
